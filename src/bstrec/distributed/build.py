"""Samples from logs larger than memory, and larger than one machine: the P1/P5 build of
``bstrec.data.samples`` run partition by partition.

A user's samples need only that user's events, plus state of the whole log computed first: the
user and item ids (whose positions key the seeded negatives), the catalogue as of each time
(the negative pool), the split times and the vocabularies. So users are split into P
partitions, and each partition is read alone from the shared log (a filter on a lazily scanned
Parquet file, never the whole log) and built with that state. A partition is a contiguous range
of the sorted user ids, the ranges balanced by event count, rather than a hash class: the rows
of ``build_samples`` are in user order, so the output is then the partitions' files one after
another, where hash classes need a k-way merge (``merge_sorted``, which took more time than
building the samples in a first version), and a log written user by user lets the Parquet
reader skip the row groups of other users.

0. the log in the canonical schema, ``<out>/dataset/`` (the folder the in-memory build writes
   too): every worker scans ``events.parquet`` from that path itself;
1. global, by Polars' streaming engine: ids, events per user (the ranges), the catalogue
   (popularity sampling: counted per partition, since exact duplicate rows are dropped per
   user first);
2. map: each partition's samples (negatives drawn by counter, ``counter_uniforms``, so the same
   whatever the partitioning) reduced to sample-time counts and, per id, the earliest sample
   time that holds it;
3. reduce: t80 and t90 from the summed counts, the vocabularies (ids held before t80);
4. map: each partition encoded and written, per split, in row order;
5. concatenate: per split, the partitions' files in range order, streaming: exactly the rows
   and order of ``build_samples`` (the local engine appends each partition's rows to the split
   files as it encodes them, with no part files).

Steps 2 and 4 each rebuild the partition's samples instead of spilling them: the draws are
deterministic, and a worker then needs nothing but the shared folder.

Engines: ``local`` runs the partitions one after another in this process (memory bounded by the
largest partition); ``dask`` runs them on a ``dask.distributed`` cluster (``Client(address)``,
or a ``LocalCluster``). Dask rather than Ray: the tasks are coarse (one partition each) and
exchange only paths and small dicts, so Ray's object store, raylet daemons and actors buy
nothing here; Dask is pure Python wheels, starts a local cluster in seconds for tests, and a
real one is a scheduler address. The output folder must be on storage every worker sees.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from bstrec.data.io import atomic_dir
from bstrec.data.samples import (
    SPLITS,
    NegativePool,
    PartSamples,
    SampleConfig,
    check_not_empty,
    encode_items,
    encode_part,
    encode_users,
    fit_vocabs,
    make_manifest,
    make_spec,
    part_samples,
    pool_entries,
    pool_of,
    prepare_events_of,
    split_stats,
    split_times,
    vocab_times,
)
from bstrec.data.schema import Dataset, Feedback
from bstrec.features.spec import FeatureSpec
from bstrec.features.vocab import Vocabularies

Engine = Literal["local", "dask"]
ENGINES: tuple[str, ...] = ("local", "dask")
# Events per partition when P is not given: a worker's peak is then about that of a
# million-event build, whatever the log's size (scale.json key build: peak per log size).
EVENTS_PER_PARTITION = 1_000_000
T = TypeVar("T")


@dataclass(frozen=True)
class LogTables:
    """What the build needs of a log besides its events (which stay on disk)."""

    name: str
    feedback: Feedback
    items: pl.DataFrame
    users: pl.DataFrame
    user_features: tuple[str, ...] = ()
    item_features: tuple[str, ...] = ()
    item_multi_features: tuple[str, ...] = ()
    meta: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Job:
    """One build, as every task sees it: all state lives under ``root`` (shared storage)."""

    root: str
    ranges: tuple[tuple[Any, Any], ...]  # each partition's first and last user id
    cfg: SampleConfig
    raw_history: bool = False

    @property
    def partitions(self) -> int:
        return len(self.ranges)

    @property
    def dataset(self) -> Path:
        return Path(self.root) / "dataset"

    @property
    def state(self) -> Path:
        return Path(self.root) / "_state"

    def part_file(self, kind: str, p: int) -> Path:
        return self.state / kind / f"part-{p:05d}.parquet"


def user_ranges(users: pl.DataFrame, partitions: int) -> tuple[tuple[Any, Any], ...]:
    """At most ``partitions`` contiguous ranges (first, last user id) of ``users`` (``user_id``
    sorted, ``n`` events each), balanced by events; a user is never split."""
    n = users["n"].to_numpy()
    before = np.cumsum(n) - n
    part = np.minimum(before * partitions // max(int(n.sum()), 1), partitions - 1)
    frame = users.with_columns(pl.Series("p", part)).group_by("p", maintain_order=True).agg(
        pl.col("user_id").first().alias("lo"), pl.col("user_id").last().alias("hi"))
    return tuple(zip(frame["lo"].to_list(), frame["hi"].to_list(), strict=True))


def _tables(job: Job) -> LogTables:
    return _read_tables(str(job.dataset))


@functools.lru_cache(maxsize=2)
def _read_tables(folder: str) -> LogTables:
    # once per worker process: every task of a job reads the same small tables
    root = Path(folder)
    meta = json.loads((root / "dataset.json").read_text())
    return LogTables(
        name=meta["name"], feedback=meta["feedback"],
        items=pl.read_parquet(root / "items.parquet"), users=pl.read_parquet(root / "users.parquet"),
        user_features=tuple(meta["user_features"]), item_features=tuple(meta["item_features"]),
        item_multi_features=tuple(meta["item_multi_features"]), meta=meta.get("meta", {}))


@functools.lru_cache(maxsize=2)
def _read_state(folder: str) -> tuple[pl.Series, pl.Series, NegativePool | None]:
    root = Path(folder)
    user_ids = pl.read_parquet(root / "user_ids.parquet")["user_id"]
    item_ids = pl.read_parquet(root / "item_ids.parquet")["item_id"]
    pool = (NegativePool.from_entries(pl.read_parquet(root / "pool.parquet"), item_ids)
            if (root / "pool.parquet").exists() else None)
    return user_ids, item_ids, pool


def _events(job: Job, p: int) -> pl.DataFrame:
    """Every event of partition ``p``'s users, in file order, read by this worker itself."""
    lo, hi = job.ranges[p]
    return (pl.scan_parquet(job.dataset / "events.parquet")
            .filter(pl.col("user_id").is_between(pl.lit(lo), pl.lit(hi)))
            .collect(engine="streaming"))


def _samples(job: Job, p: int) -> PartSamples:
    tables = _tables(job)
    user_ids, _, pool = _read_state(str(job.state))
    return part_samples(_events(job, p), tables.items, tables.feedback != "explicit", job.cfg,
                        user_ids, pool)


def _count_pool(job: Job, p: int) -> None:
    """Popularity sampling: the partition's (item, time) event counts after deduplication."""
    events = prepare_events_of(_events(job, p), implicit=True)
    out = job.part_file("pool", p)
    out.parent.mkdir(parents=True, exist_ok=True)
    events.group_by("item_id", pl.col("timestamp").alias("t")).agg(pl.len().alias("n")
                                                                  ).write_parquet(out)


def _scan(job: Job, p: int) -> dict[str, Any]:
    """Step 2 on partition ``p``: sample-time counts and vocabulary times, to disk."""
    part = _samples(job, p)
    items, users = vocab_times(part, job.cfg.max_len)
    ts = part.samples["timestamp"].value_counts(name="n")
    for kind, frame in (("ts", ts), ("items", items), ("users", users)):
        out = job.part_file(kind, p)
        out.parent.mkdir(parents=True, exist_ok=True)
        frame.write_parquet(out)
    return {"samples": part.samples.height, "missing": part.missing,
            "duplicates": part.duplicates}


def _encoded(job: Job, p: int) -> dict[str, pl.DataFrame]:
    """Step 4 on partition ``p``: its rows per split."""
    tables = _tables(job)
    vocabs, spec, t80, t90 = _read_encoding(str(job.state))
    part = _samples(job, p)
    return encode_part(part, t80, t90, vocabs, encode_items(tables.items, tables, vocabs),
                       encode_users(tables.users, tables, vocabs), spec,
                       tables.feedback != "explicit", raw_history=job.raw_history)


def _encode(job: Job, p: int) -> dict[str, dict[str, float]]:
    """Step 4 on partition ``p``, on a worker: its rows per split, to disk; their manifest
    sums."""
    splits = _encoded(job, p)
    for name, frame in splits.items():
        out = job.part_file(name, p)
        out.parent.mkdir(parents=True, exist_ok=True)
        frame.write_parquet(out)
    return split_stats(splits)


@functools.lru_cache(maxsize=2)
def _read_encoding(folder: str) -> tuple[Vocabularies, FeatureSpec, float, float]:
    root = Path(folder)
    times = json.loads((root / "split_times.json").read_text())
    return (Vocabularies.load(root / "vocab.json"), FeatureSpec.load(root / "feature_spec.json"),
            float(times["t80"]), float(times["t90"]))


Runner = Callable[[Callable[[Job, int], T], Job, Sequence[int]], list[T]]


def local_runner(fn: Callable[[Job, int], T], job: Job, parts: Sequence[int]) -> list[T]:
    """One partition after another in this process: memory bounded by the largest one."""
    return [fn(job, p) for p in parts]


def dask_runner(client: Any) -> Runner[Any]:
    """Partitions as tasks on a ``dask.distributed.Client``; results gathered in order."""

    def run(fn: Callable[[Job, int], T], job: Job, parts: Sequence[int]) -> list[T]:
        # pure=False: a rerun of a stage must run again (its files may have been replaced)
        futures = client.map(fn, [job] * len(parts), list(parts), pure=False)
        out: list[T] = client.gather(futures)
        return out

    return run


def _write_log(source: Dataset, folder: Path) -> LogTables:
    source.save(folder)
    return LogTables(source.name, source.feedback, source.items, source.users,
                     source.user_features, source.item_features, source.item_multi_features,
                     source.meta)


def _encode_in_order(job: Job, folder: Path) -> list[dict[str, dict[str, float]]]:
    """Step 4 in this process, each partition's rows appended to the split files as they come
    (partitions are in row order): no part files written, read back and written again."""
    writers: dict[str, pq.ParquetWriter] = {}
    stats = []
    try:
        for p in range(job.partitions):
            splits = _encoded(job, p)
            stats.append(split_stats(splits))
            for name, frame in splits.items():
                table = frame.to_arrow()
                if name not in writers:
                    # zstd without dictionaries: Polars' own default, and half the time of
                    # pyarrow's on the list columns
                    writers[name] = pq.ParquetWriter(str(folder / f"{name}.parquet"),
                                                     table.schema, compression="zstd",
                                                     use_dictionary=False)
                writers[name].write_table(table)
    finally:
        for writer in writers.values():
            writer.close()
    return stats


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def build_partitioned(source: Dataset | Path | Callable[[Path], object], out: str | Path,
                      cfg: SampleConfig | None = None,
                      *, partitions: int | None = None, runner: Runner[Any] | None = None,
                      raw_history: bool = False,
                      progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build ``source``'s samples into ``out`` (the files ``SampleSet.save`` writes, the same
    rows in the same order as ``build_samples``), ``partitions`` users' partitions at a time
    on ``runner`` (default ``local_runner``). Returns the manifest.

    ``source``: a Dataset; or, for a log larger than memory, a folder in the ``Dataset.save``
    layout or a function that writes one into the folder it is given (``ScannedLog.save``),
    whose events are never loaded whole. ``partitions`` defaults to one per
    ``EVENTS_PER_PARTITION`` events.
    """
    cfg = cfg or SampleConfig()
    if partitions is not None and partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    stage = progress or (lambda name: None)
    run = runner or local_runner
    with atomic_dir(out) as tmp:
        stage("writing the canonical log")
        if isinstance(source, Dataset):
            _write_log(source, tmp / "dataset")
        elif callable(source):
            source(tmp / "dataset")
        else:
            # hard links where the file system allows: the log may be larger than the disk left
            shutil.copytree(Path(source), tmp / "dataset", copy_function=_link_or_copy)
        _read_tables.cache_clear()
        tables = _read_tables(str(tmp / "dataset"))
        implicit = tables.feedback != "explicit"
        events = pl.scan_parquet(tmp / "dataset" / "events.parquet")

        stage("global state: ids and catalogue")
        per_user = (events.group_by("user_id").agg(pl.len().alias("n"))
                    .collect(engine="streaming").sort("user_id"))
        n_events = int(per_user["n"].sum())
        ranges = user_ranges(per_user, partitions or max(
            1, math.ceil(n_events / EVENTS_PER_PARTITION)))
        job = Job(str(tmp), ranges, cfg, raw_history)
        p_count = job.partitions
        job.state.mkdir()
        parts = range(p_count)
        ids = {"user_id": per_user["user_id"],
               "item_id": events.select(pl.col("item_id").unique())
               .collect(engine="streaming")["item_id"].sort()}
        ids["user_id"].to_frame().write_parquet(job.state / "user_ids.parquet")
        ids["item_id"].to_frame().write_parquet(job.state / "item_ids.parquet")
        if implicit and cfg.negatives:
            if cfg.negative_sampling == "popularity":
                # counts after each user's duplicate rows are dropped: a pass over partitions
                run(_count_pool, job, parts)
                entries = (pl.scan_parquet(job.state / "pool" / "*.parquet")
                           .group_by("item_id", "t").agg(pl.col("n").sum()))
            else:
                entries = pool_entries(events.select("item_id", pl.col("timestamp").alias("t")),
                                       "uniform")
            pool_of(entries, ids["item_id"]).to_entries().write_parquet(job.state / "pool.parquet")
        _read_state.cache_clear()

        stage(f"samples of {p_count} partitions: split times and vocabularies")
        scanned = run(_scan, job, parts)
        check_not_empty(sum(s["samples"] for s in scanned), tables.name, cfg, implicit)
        ts = (pl.scan_parquet(job.state / "ts" / "*.parquet").group_by("timestamp")
              .agg(pl.col("n").sum()).collect(engine="streaming"))
        t80, t90 = split_times(ts, cfg)
        train = {kind: (pl.scan_parquet(job.state / kind / "*.parquet").group_by(col)
                        .agg(pl.col("t").min()).filter(pl.col("t") < t80)
                        .collect(engine="streaming")[col])
                 for kind, col in (("items", "item_id"), ("users", "user_id"))}
        vocabs = fit_vocabs(tables, train["items"], train["users"])
        spec = make_spec(tables, vocabs, cfg.max_len)
        vocabs.save(job.state / "vocab.json")
        spec.save(job.state / "feature_spec.json")
        (job.state / "split_times.json").write_text(json.dumps({"t80": t80, "t90": t90}))
        _read_encoding.cache_clear()

        (tmp / "samples").mkdir()
        if runner is None:
            stage(f"encoding {p_count} partitions into the split files")
            stats = _encode_in_order(job, tmp / "samples")
        else:
            stage(f"encoding {p_count} partitions")
            stats = run(_encode, job, parts)
            stage("concatenating the partitions")
            for name in SPLITS:
                files = [job.part_file(name, p) for p in parts]
                if len(files) == 1:
                    os.replace(files[0], tmp / "samples" / f"{name}.parquet")
                else:
                    pl.concat([pl.scan_parquet(f) for f in files]).sink_parquet(
                        tmp / "samples" / f"{name}.parquet")
        vocabs.save(tmp / "vocab.json")
        spec.save(tmp / "feature_spec.json")
        total = {name: {k: sum(s[name][k] for s in stats) for k in stats[0][name]}
                 for name in SPLITS}
        manifest = make_manifest(tables, cfg, total, vocabs, t80, t90, n_events)
        if implicit:
            manifest["duplicate_events_dropped"] = sum(s["duplicates"] for s in scanned)
            manifest["negatives_not_drawn"] = (
                {k: sum(s["missing"][k] for s in scanned) for k in scanned[0]["missing"]}
                if cfg.negatives else {})
        manifest["partitions"] = p_count
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(job.state)
    _read_tables.cache_clear()
    _read_state.cache_clear()
    _read_encoding.cache_clear()
    return manifest


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, workers: int = 2) -> Iterator[Any]:
    """A ``dask.distributed`` client: of the cluster at ``scheduler`` (``tcp://host:8786``), or
    of a new local cluster of ``workers`` single-threaded processes, closed on exit."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ImportError("the dask engine needs dask.distributed: pip install "
                          "'bstrec[distributed]'") from None
    if scheduler is not None:
        with Client(scheduler) as client:  # type: ignore[no-untyped-call]
            yield client
        return
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    with (LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,  # type: ignore[no-untyped-call]
                       dashboard_address=None) as cluster,
          Client(cluster) as client):  # type: ignore[no-untyped-call]
        yield client
