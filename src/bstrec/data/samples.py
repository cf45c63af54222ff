"""Point-in-time training samples (protocols P1/P3 and P5 in ../shared/PROTOCOL.md).

One sample per event (explicit feedback: label = value >= threshold) or, for implicit logs (P5),
per distinct positive event plus negatives drawn from the catalogue as of its time. The history
of a sample is the same user's at most ``max_len`` earlier events in (timestamp, item id) order,
oldest first, each with its item, category and the time difference ``sample time - event time``
(seconds, >= 0). Nothing in a sample, its negatives or its vocabularies comes from a later time
than the sample. Splits cut the samples' timestamps at global quantiles; vocabularies are fitted
on the train samples and their histories only.

Everything is vectorised: the history of every event is a slice of the user-sorted event arrays,
so the (sample, position) index matrix is built with NumPy, never with a Python loop per user.
Negatives are drawn with uniforms keyed by (seed, user, event, draw, round) rather than from one
generator's stream, and every whole-log quantity (split times, vocabularies, catalogue) reduces
from per-user parts, so that ``bstrec.distributed.build`` builds the same rows partition by
partition (``part_samples``, ``vocab_times``, ``split_times``, ``encode_part``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import numpy as np
import polars as pl
import pyarrow as pa

import bstrec
from bstrec.data.io import atomic_dir
from bstrec.data.schema import Dataset
from bstrec.features.spec import OOV, Feature, FeatureSpec
from bstrec.features.vocab import Vocabularies, Vocabulary

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
# Generated logs name their own protocol; synthetic-implicit takes P5's sample defaults (max_len
# 20, one uniform negative per positive), as taobao-ctr does.
PROTOCOLS = {"ml-1m": "ml1m-ctr", "ml-100k": "ml100k-ctr", "synthetic-order": "synthetic-order",
             "synthetic-implicit": "synthetic-implicit", "synthetic-taobao": "synthetic-taobao"}
SECONDS_PER_DAY = 86_400
EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday; Monday = 0


@dataclass(frozen=True)
class SampleConfig:
    """How samples are built (``bstrec.config.from_dict`` fills it; unknown keys are errors)."""

    max_len: int = 20
    # explicit feedback: label = value >= label_threshold (P1: rating >= 4)
    label_threshold: float = 4.0
    # implicit feedback: which actions are positives (None = every action); histories keep all
    positive_actions: tuple[str, ...] | None = None
    # implicit feedback: sampled negatives per positive, and from which distribution
    negatives: int = 1
    negative_sampling: Literal["uniform", "popularity"] = "uniform"
    split_quantiles: tuple[float, float] = (0.8, 0.9)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")
        if self.negatives < 0:
            raise ValueError(f"negatives must be >= 0, got {self.negatives}")
        if self.negative_sampling not in ("uniform", "popularity"):
            raise ValueError(f"negative_sampling must be 'uniform' or 'popularity', "
                             f"got {self.negative_sampling!r}")
        lo, hi = self.split_quantiles
        if not 0 < lo < hi < 1:
            raise ValueError(
                f"split_quantiles must satisfy 0 < a < b < 1, got {self.split_quantiles}")

@dataclass
class SampleSet:
    """Encoded samples per split, with what is needed to encode the same way online."""

    splits: dict[str, pl.DataFrame]
    vocabs: Vocabularies
    spec: FeatureSpec
    manifest: dict[str, Any]
    dataset: Dataset | None = field(default=None, repr=False)

    def save(self, out: str | Path, *, with_dataset: bool = True) -> Path:
        """Write ``samples/*.parquet``, ``vocab.json``, ``feature_spec.json``, ``manifest.json``
        (and the canonical ``dataset/`` tables) in one atomic rename."""
        with atomic_dir(out) as tmp:
            (tmp / "samples").mkdir()
            for name, frame in self.splits.items():
                frame.write_parquet(tmp / "samples" / f"{name}.parquet")
            self.vocabs.save(tmp / "vocab.json")
            self.spec.save(tmp / "feature_spec.json")
            if with_dataset and self.dataset is not None:
                self.dataset.save(tmp / "dataset")
            (tmp / "manifest.json").write_text(json.dumps(self.manifest, indent=2) + "\n")
        return Path(out)

    @classmethod
    def load(cls, path: str | Path, splits: tuple[str, ...] = SPLITS) -> SampleSet:
        root = Path(path)
        manifest_path = root / "manifest.json"
        if not manifest_path.exists():
            raise FileNotFoundError(f"{manifest_path} not found: is {root} the output of "
                                    "`bstrec data build`?")
        dataset = Dataset.load(root / "dataset") if (root / "dataset").exists() else None
        return cls(
            splits={s: pl.read_parquet(root / "samples" / f"{s}.parquet") for s in splits},
            vocabs=Vocabularies.load(root / "vocab.json"),
            spec=FeatureSpec.load(root / "feature_spec.json"),
            manifest=json.loads(manifest_path.read_text()),
            dataset=dataset,
        )


def protocol_name(dataset: str) -> str:
    return PROTOCOLS.get(dataset, f"{dataset}-ctr")


def sort_events(events: pl.DataFrame) -> pl.DataFrame:
    """The behaviour order: per user by (timestamp, item id), ties kept in file order."""
    return (events.with_row_index("_row")
            .sort(["user_id", "timestamp", "item_id", "_row"]).drop("_row"))


def behaviour_order(timestamps: list[int], item_ids: list[Any]) -> list[int]:
    """The order ``sort_events`` gives ONE user's events, as positions into them: by
    (timestamp, item id), full ties in input order. For a request's few behaviours, where a
    frame and its sort cost more than the rest of the request's features (features/online.py);
    tests/data/test_samples.py checks it against ``sort_events``."""
    return sorted(range(len(timestamps)), key=lambda j: (timestamps[j], item_ids[j]))


def history_slices(user_codes: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """For user-sorted events, the first index and length of each event's history.

    History of event i = events [i - length, i) of the same user, length <= max_len.
    """
    idx = np.arange(len(user_codes), dtype=np.int64)
    lengths = np.minimum(_positions(user_codes), max_len)
    return idx - lengths, lengths


def _positions(user_codes: np.ndarray) -> np.ndarray:
    """(n,) each user-sorted event's position in its user's sequence (0 = first)."""
    n = len(user_codes)
    idx = np.arange(n, dtype=np.int64)
    is_start = np.ones(n, dtype=bool)
    is_start[1:] = user_codes[1:] != user_codes[:-1]
    out: np.ndarray = idx - np.maximum.accumulate(np.where(is_start, idx, 0))
    return out


def gather_lists(first: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (n+1,) and flat indices of the slices [first[j], first[j] + lengths[j])."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    within = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], lengths)
    return offsets, np.repeat(first, lengths) + within


def list_series(name: str, offsets: np.ndarray, values: np.ndarray) -> pl.Series:
    arr = pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(values))
    return pl.Series(name, arr)


def hour_and_weekday(ts: Any) -> tuple[Any, Any]:
    """Hour of day and day of week (Monday = 0) of unix times, UTC: the arithmetic alone, so
    that one definition serves Polars expressions (offline) and integers (one request)."""
    return (ts % SECONDS_PER_DAY) // 3600, (ts // SECONDS_PER_DAY + EPOCH_WEEKDAY) % 7


def context_columns(ts: pl.Expr) -> list[pl.Expr]:
    """Hour of day and day of week (Monday = 0) of a unix time, UTC."""
    hour, dow = hour_and_weekday(ts)
    return [hour.cast(pl.Int32).alias("hour"), dow.cast(pl.Int32).alias("dow")]


def prepare_events(dataset: Dataset) -> pl.DataFrame:
    """The events samples are built from, in the behaviour order (``sort_events``). Implicit
    logs (P5) drop exact duplicate rows: a logging retry is not a second behaviour."""
    return prepare_events_of(dataset.events, dataset.feedback != "explicit")


def prepare_events_of(events: pl.DataFrame, implicit: bool) -> pl.DataFrame:
    """``prepare_events`` of an events frame (the whole log, or all events of some users)."""
    if implicit:
        events = events.unique(maintain_order=True)
    return sort_events(events)


@dataclass(frozen=True)
class NegativePool:
    """The catalogue of every time at once (P5 step 3): entries in (time, item code) order,
    the drawable ones as of t being those whose time is strictly before t.

    Uniform: one entry per item at its first event, weight 1. Popularity: one entry per
    distinct (time, item) with its event count as weight, so that an item is drawn with its
    event count before t. A draw is an inverse CDF over ``cum``: one binary search and one
    uniform per draw, however long the log.
    """

    items: np.ndarray  # (P,) item codes
    times: np.ndarray  # (P,) non-decreasing timestamps
    cum: np.ndarray  # (P,) int64 total weight of entries [0, j]
    item_ids: pl.Series  # item id of each code

    @classmethod
    def from_entries(cls, entries: pl.DataFrame, item_ids: pl.Series) -> NegativePool:
        """From ``code`` (item code), ``t`` and ``n`` (weight) columns, in any order."""
        # (time, item code): the pool, and so the draws, do not depend on the file order
        entries = entries.sort("t", "code")
        return cls(entries["code"].to_numpy(), entries["t"].to_numpy(),
                   np.cumsum(entries["n"].to_numpy().astype(np.int64)), item_ids)

    def to_entries(self) -> pl.DataFrame:
        """The ``code``, ``t``, ``n`` frame ``from_entries`` reads (to ship the pool)."""
        return pl.DataFrame({"code": self.items, "t": self.times,
                             "n": np.diff(self.cum, prepend=0)})

    def entries(self, t: np.ndarray) -> np.ndarray:
        """(N,) how many entries are drawable at each of the times ``t`` (N,)."""
        # sorted needles: the binary searches walk the pool once instead of missing the cache
        order = np.argsort(t, kind="stable")
        n = np.empty(len(t), dtype=np.int64)
        n[order] = np.searchsorted(self.times, t[order], side="left")
        return n

    def size(self, t: np.ndarray) -> np.ndarray:
        """(N,) the total weight drawable at each of the times ``t`` (0: nothing to draw)."""
        n = self.entries(t)
        total: np.ndarray = np.where(n > 0, self.cum[np.maximum(n - 1, 0)], 0)
        return total

    def weights(self, t: int) -> dict[Any, int]:
        """Item id -> weight of the distribution ``draw`` samples at time ``t``."""
        n = int(self.entries(np.array([t]))[0])
        w = np.diff(self.cum[:n], prepend=0)
        frame = (pl.DataFrame({"code": self.items[:n], "w": w})
                 .group_by("code").agg(pl.col("w").sum()).sort("code"))
        ids = self.item_ids.gather(frame["code"].to_numpy()).to_list()
        return dict(zip(ids, frame["w"].to_list(), strict=True))

    def draw(self, t: np.ndarray, u: np.ndarray) -> np.ndarray:
        """(N,) item codes, one drawn as of each time in ``t`` (N,) by the uniforms ``u`` (N,)
        in [0, 1); every size(t) must be > 0."""
        return self.draw_below(self.size(t), u)

    def draw_below(self, totals: np.ndarray, u: np.ndarray) -> np.ndarray:
        """``draw`` for times whose ``size`` is already known."""
        k = np.minimum((u * totals).astype(np.int64), totals - 1)
        out: np.ndarray = self.items[np.searchsorted(self.cum, k, side="right")]
        return out


def negative_pool(events: pl.DataFrame, sampling: Literal["uniform", "popularity"]
                  ) -> NegativePool:
    """The pool ``_sample_negatives`` draws from, for the ``prepare_events`` frame ``events``."""
    entries = pool_entries(events.select("item_id", pl.col("timestamp").alias("t")), sampling)
    return pool_of(entries, events["item_id"].unique().sort())


FrameT = TypeVar("FrameT", pl.DataFrame, pl.LazyFrame)


def pool_entries(events: FrameT, sampling: Literal["uniform", "popularity"]) -> FrameT:
    """``item_id``, ``t``, ``n`` (weight) entries of the pool of (deduplicated) events
    ``item_id``, ``t``: uniform, each item at its first time; popularity, each (item, time)
    with its event count."""
    if sampling == "uniform":
        return events.group_by("item_id").agg(pl.col("t").min(), pl.lit(1).alias("n"))
    return events.group_by("item_id", "t").agg(pl.len().alias("n"))


def pool_of(entries: pl.DataFrame | pl.LazyFrame, item_ids: pl.Series) -> NegativePool:
    """The pool of ``pool_entries``; ``item_ids``: every item id of the log, sorted (they
    define the item codes). A LazyFrame is collected by the streaming engine."""
    if isinstance(entries, pl.LazyFrame):
        entries = entries.collect(engine="streaming")
    coded = with_codes(entries, item_ids, "item_id", "code").select("code", "t", "n")
    return NegativePool.from_entries(coded, item_ids)


def with_codes(frame: pl.DataFrame, ids: pl.Series, col: str, name: str,
               offset: int = 0) -> pl.DataFrame:
    """``frame`` with ``name``: the position of ``col`` in the sorted ``ids`` (+ ``offset``),
    rows kept in place. The codes of the whole log, whatever part of it ``frame`` holds."""
    index = pl.DataFrame({col: ids, name: np.arange(offset, offset + len(ids), dtype=np.int64)})
    return frame.join(index, on=col, how="left", maintain_order="left")


@dataclass(frozen=True)
class _Touched:
    """When each user first touched each item: (user code, item code) keys, sorted."""

    keys: np.ndarray
    first: np.ndarray
    n_items: int

    @classmethod
    def build(cls, user_codes: np.ndarray, item_codes: np.ndarray, ts: np.ndarray,
              n_items: int) -> _Touched:
        frame = (pl.DataFrame({"k": user_codes.astype(np.int64) * n_items + item_codes,
                               "t": ts})
                 .group_by("k").agg(pl.col("t").min()).sort("k"))
        return cls(frame["k"].to_numpy(), frame["t"].to_numpy(), n_items)

    def at_or_before(self, users: np.ndarray, items: np.ndarray, t: np.ndarray) -> np.ndarray:
        """(N,) whether user ``users[j]`` touched item ``items[j]`` at or before ``t[j]``."""
        keys = users.astype(np.int64) * self.n_items + items
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        hit: np.ndarray = (self.keys[pos] == keys) & (self.first[pos] <= t)
        return hit

    def items_of(self, user: int, t: int) -> np.ndarray:
        """Item codes the user touched at or before ``t``."""
        lo, hi = np.searchsorted(self.keys, [user * self.n_items, (user + 1) * self.n_items])
        return self.keys[lo:hi][self.first[lo:hi] <= t] - user * self.n_items


REJECTION_ROUNDS = 30
_U64 = np.uint64
_MASK64 = (1 << 64) - 1


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser over uint64, wrapping: a bijection that scatters nearby keys."""
    z = x.astype(np.uint64) + _U64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    out: np.ndarray = z ^ (z >> _U64(31))
    return out


def counter_uniforms(seed: int, *keys: np.ndarray) -> np.ndarray:
    """(N,) uniforms in [0, 1), one per key tuple ``(keys[0][j], keys[1][j], ...)`` (each key a
    non-negative integer array (N,)): a hash chain, so that a draw depends on its key alone, not
    on which other draws are made, in which order or on which machine (partitioned builds)."""
    h = splitmix64(np.array([seed & _MASK64], dtype=np.uint64))
    for k in keys:
        h = splitmix64(h ^ k.astype(np.uint64))
    out: np.ndarray = (h >> _U64(11)).astype(np.float64) * 2.0 ** -53
    return out


def _sample_negatives(events: pl.DataFrame, user_codes: np.ndarray, local: np.ndarray,
                      item_codes: np.ndarray, pos_idx: np.ndarray, cfg: SampleConfig,
                      pool: NegativePool) -> tuple[pl.DataFrame, dict[str, int]]:
    """``cfg.negatives`` items per positive event ``pos_idx`` (P5 step 3) from the catalogue
    as of its time, none of which the user touched at or before that time; and how many could
    not be drawn (``empty_catalogue``: nothing before t; ``all_touched``: the user had touched
    every item of it).

    Draw d of the positive at the user's k-th event, rejection round r, uses the uniform keyed
    by (seed, user code, k, d, r) (``counter_uniforms``): the same negatives whether the log is
    built whole or in partitions of users. ``user_codes``: codes in the whole log's users;
    ``local``: each event's position in its user's sequence; ``item_codes``: in ``pool``.
    """
    ts = events["timestamp"].to_numpy()
    touched = _Touched.build(user_codes, item_codes, ts, len(pool.item_ids))
    # row r = (positive r // negatives, draw r % negatives)
    row_event = np.repeat(pos_idx, cfg.negatives)
    row_key = np.tile(np.arange(cfg.negatives, dtype=np.int64) * (REJECTION_ROUNDS + 1),
                      len(pos_idx))
    row_user, row_ts, row_local = user_codes[row_event], ts[row_event], local[row_event]
    row_size = np.repeat(pool.size(ts[pos_idx]), cfg.negatives)
    drawn = np.full(len(row_event), -1, dtype=np.int64)
    empty = row_size == 0
    todo = np.flatnonzero(~empty)
    for rnd in range(REJECTION_ROUNDS):
        if len(todo) == 0:
            break
        u = counter_uniforms(cfg.seed, row_user[todo], row_local[todo], row_key[todo] + rnd)
        cand = pool.draw_below(row_size[todo], u)
        ok = ~touched.at_or_before(row_user[todo], cand, row_ts[todo])
        drawn[todo[ok]] = cand[ok]
        todo = todo[~ok]
    # The few rows still rejected draw exactly from what the user left untouched (the same
    # distribution as endless redrawing), or have nothing left to draw.
    all_touched = 0
    last = counter_uniforms(cfg.seed, row_user[todo], row_local[todo],
                            row_key[todo] + REJECTION_ROUNDS)
    for r, u in zip(todo.tolist(), last.tolist(), strict=True):
        n = int(pool.entries(row_ts[r:r + 1])[0])
        entries = pool.items[:n]
        w = np.diff(pool.cum[:n], prepend=0)
        w[np.isin(entries, touched.items_of(int(row_user[r]), int(row_ts[r])))] = 0
        cum = np.cumsum(w)
        if n == 0 or cum[-1] == 0:
            all_touched += 1
        else:
            drawn[r] = entries[np.searchsorted(cum, min(int(u * cum[-1]), cum[-1] - 1),
                                               side="right")]
    if all_touched:
        log.warning("dropped %d negatives: the user had touched every item of the catalogue "
                    "as of the sample's time", all_touched)
    keep = drawn >= 0
    negatives = pl.DataFrame({
        "_event": pl.Series(row_event[keep]).cast(events.schema["_event"]),
        "item_id": pool.item_ids.gather(drawn[keep]),
        "label": pl.Series(np.zeros(int(keep.sum())), dtype=pl.Float64),
    })
    return negatives, {"empty_catalogue": int(empty.sum()), "all_touched": all_touched}


@dataclass
class PartSamples:
    """The samples of a set of whole users (the log, or one partition of its users) before
    the split: what every later stage reads."""

    events: pl.DataFrame  # user-sorted events with ``_event`` (row) and ``category``
    samples: pl.DataFrame  # _event, item_id, label, [action], user_id, timestamp; row order
    first: np.ndarray  # (E,) first index of each event's history
    lengths: np.ndarray  # (E,) its length
    missing: dict[str, int]  # negatives not drawn, by reason
    duplicates: int  # exact duplicate events dropped (implicit)


def part_samples(raw_events: pl.DataFrame, items: pl.DataFrame, implicit: bool,
                 cfg: SampleConfig, user_ids: pl.Series, pool: NegativePool | None
                 ) -> PartSamples:
    """Steps 1-3 of P1/P5 on ``raw_events``, which must hold every event of each of its users.

    ``user_ids``: the sorted user ids of the whole log (users' codes key the negatives);
    ``pool``: the whole log's catalogue (implicit with negatives; else unused).
    """
    events = prepare_events_of(raw_events, implicit).with_row_index("_event")
    # history_slices reads runs of one user: the joins must keep the user-sorted rows in place
    events = events.join(items.select("item_id", "category"), on="item_id", how="left",
                         maintain_order="left")
    user_codes = with_codes(events.select("user_id"), user_ids, "user_id", "u",
                            offset=1)["u"].to_numpy()
    first, lengths = history_slices(user_codes, cfg.max_len)
    missing: dict[str, int] = {}
    if not implicit:
        label = (pl.col("value") >= cfg.label_threshold).cast(pl.Float32).alias("label")
        samples = events.select("_event", "item_id", label)
    else:
        pos_mask = (pl.lit(True) if cfg.positive_actions is None
                    else pl.col("action").is_in(list(cfg.positive_actions)))
        pos = events.filter(pos_mask)
        parts = [pos.select("_event", "item_id", pl.lit(1.0).alias("label"), "action")]
        if cfg.negatives and pos.height:
            if pool is None:
                raise ValueError("sampling negatives needs the log's NegativePool")
            item_codes = with_codes(events.select("item_id"), pool.item_ids, "item_id",
                                    "c")["c"].to_numpy()
            local = _positions(user_codes)
            negatives, missing = _sample_negatives(events, user_codes, local, item_codes,
                                                   pos["_event"].to_numpy(), cfg, pool)
            parts.append(negatives.with_columns(pl.lit(None, dtype=pl.String).alias("action")))
        elif cfg.negatives:
            missing = {"empty_catalogue": 0, "all_touched": 0}  # so that partitions add up
        samples = pl.concat(parts).with_columns(pl.col("label").cast(pl.Float32))
    samples = samples.sort("_event", "label", descending=[False, True], maintain_order=True)
    ev_cols = events.select("user_id", "timestamp").gather(samples["_event"].to_numpy())
    samples = samples.with_columns(ev_cols["user_id"], ev_cols["timestamp"])
    return PartSamples(events, samples, first, lengths, missing,
                       raw_events.height - events.height)


def vocab_times(part: PartSamples, max_len: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``(item_id, t)`` and ``(user_id, t)``: the earliest time of a sample that holds each
    item (as target or in its history) and each user. An id is in the train vocabulary
    (P5 step 5) iff its time is < t80, so partitions can be reduced before t80 is known."""
    events, samples = part.events, part.samples
    user_codes = events["user_id"].rank("dense").to_numpy()
    ev = samples["_event"].to_numpy().astype(np.int64)  # sorted: unique = where it changes
    targets = ev[np.flatnonzero(np.diff(ev, prepend=-1) != 0)] if len(ev) else ev
    ts = events["timestamp"].to_numpy()
    # the nearest sample after an event is the earliest one whose history holds it
    n = events.height
    idx = np.arange(n, dtype=np.int64)
    nxt = np.searchsorted(targets, idx, side="right")
    e = targets[np.minimum(nxt, max(len(targets) - 1, 0))] if len(targets) else idx
    covered = ((nxt < len(targets)) & (e - idx <= max_len) & (user_codes[e] == user_codes)
               if len(targets) else np.zeros(n, dtype=bool))
    hist = pl.DataFrame({"item_id": events["item_id"].filter(pl.Series(covered)),
                         "t": ts[e[covered]]})
    items = (pl.concat([samples.select("item_id", pl.col("timestamp").alias("t")), hist])
             .group_by("item_id").agg(pl.col("t").min()))
    users = samples.group_by("user_id").agg(pl.col("timestamp").min().alias("t"))
    return items, users


def quantiles_of_counts(values: np.ndarray, counts: np.ndarray,
                        qs: tuple[float, ...]) -> tuple[float, ...]:
    """``np.quantile(np.repeat(values, counts), qs)`` (method "linear", as P1 step 4 says) from
    the sorted distinct ``values`` and their counts, without the repeat, replaying NumPy's
    arithmetic so that the cut points are the same to the last bit."""
    cum = np.cumsum(counts.astype(np.int64))
    n = int(cum[-1])
    q = np.asarray(qs, dtype=np.float64)
    virtual = (n - 1) * q
    prev = np.floor(virtual)
    gamma = virtual - prev
    above = virtual >= n - 1
    lo = np.where(above, n - 1, prev).astype(np.int64)
    hi = np.where(above, n - 1, prev + 1).astype(np.int64)
    a = values[np.searchsorted(cum, lo, side="right")]
    b = values[np.searchsorted(cum, hi, side="right")]
    diff = b - a
    out = np.add(a, diff * gamma)
    np.subtract(b, diff * (1 - gamma), out=out, where=gamma >= 0.5, casting="unsafe")
    return tuple(float(x) for x in out)


def split_times(samples_ts: pl.Series | pl.DataFrame, cfg: SampleConfig) -> tuple[float, float]:
    """t80, t90 of P1 step 4 from the samples' timestamps, or from a ``timestamp``, ``n``
    frame of their counts (the sum of the partitions' counts)."""
    counts = (samples_ts.value_counts(name="n") if isinstance(samples_ts, pl.Series)
              else samples_ts).sort("timestamp")
    t80, t90 = quantiles_of_counts(counts["timestamp"].to_numpy(), counts["n"].to_numpy(),
                                   cfg.split_quantiles)
    return t80, t90


def fit_vocabs(log_info: LogTables, train_item_ids: pl.Series,
               train_user_ids: pl.Series) -> Vocabularies:
    """Vocabularies of P1 step 7 / P5 step 5 from the ids seen by train samples."""
    train_items = log_info.items.join(train_item_ids.to_frame(), on="item_id", how="semi")
    train_users = log_info.users.join(train_user_ids.to_frame(), on="user_id", how="semi")
    vocabs = Vocabularies({
        "user_id": Vocabulary.fit(train_user_ids),
        "item_id": Vocabulary.fit(train_item_ids),
        "category": Vocabulary.fit(train_items["category"]),
        "hour": Vocabulary(list(range(24))),
        "dow": Vocabulary(list(range(7))),
    })
    for f in log_info.user_features:
        vocabs[f"user_{f}"] = Vocabulary.fit(train_users[f].cast(pl.String))
    for f in log_info.item_features:
        vocabs[f"item_{f}"] = Vocabulary.fit(train_items[f].cast(pl.String))
    for f in log_info.item_multi_features:
        vocabs[f"item_{f}"] = Vocabulary.fit(train_items[f].explode().cast(pl.String))
    return vocabs


def encode_part(part: PartSamples, t80: float, t90: float, vocabs: Vocabularies,
                item_enc: pl.DataFrame, user_enc: pl.DataFrame, spec: FeatureSpec,
                implicit: bool, *, raw_history: bool = False) -> dict[str, pl.DataFrame]:
    """Steps 4-5: the encoded rows of ``part``, per split, in row order."""
    samples = part.samples
    ev_idx = samples["_event"].to_numpy()
    ts = samples["timestamp"].to_numpy()
    split = np.where(ts < t80, 0, np.where(ts < t90, 1, 2)).astype(np.int8)
    hist = history_columns(part.events, item_enc, vocabs, part.first[ev_idx],
                           part.lengths[ev_idx], ts, raw_history=raw_history)
    out = assemble_rows(samples.with_columns(*hist, pl.Series("_split", split)), user_enc,
                        item_enc, vocabs, spec)
    cols = ["user_id", "item_id", "timestamp", "label", *(["action"] if implicit else []),
            *[f.name for f in spec.features], "hist_item", "hist_cat", "hist_dt",
            *(["hist_item_id"] if raw_history else [])]
    return {name: out.filter(pl.col("_split") == i).select(cols)
            for i, name in enumerate(SPLITS)}


def split_stats(splits: dict[str, pl.DataFrame]) -> dict[str, dict[str, float]]:
    """Per split: rows, sum of labels, rows with an empty history (what the manifest reports;
    sums, so that partitions add up)."""
    return {k: {"rows": v.height, "positives": float(v["label"].cast(pl.Float64).sum()),
                "empty_history": int((v["hist_item"].list.len() == 0).sum())}
            for k, v in splits.items()}


def build_samples(dataset: Dataset, cfg: SampleConfig | None = None, *,
                  raw_history: bool = False,
                  progress: Callable[[str], None] | None = None) -> SampleSet:
    """Build encoded point-in-time samples of ``dataset`` (see the module docstring), in
    memory. ``bstrec.distributed.build`` builds the same rows partition by partition.

    ``raw_history`` adds ``hist_item_id``: the history's raw item ids (for inspection and tests).
    ``progress`` is called with the name of each stage as it starts.
    """
    cfg = cfg or SampleConfig()
    stage = progress or (lambda name: None)
    implicit = dataset.feedback != "explicit"
    stage("ordering events and sampling negatives")
    raw = dataset.events
    pool = None
    if implicit and cfg.negatives:
        # the first time of an item does not change with duplicate rows; its counts do
        pool = negative_pool(raw.unique() if cfg.negative_sampling == "popularity" else raw,
                             cfg.negative_sampling)
    user_ids = raw["user_id"].unique().sort()
    part = part_samples(raw, dataset.items, implicit, cfg, user_ids, pool)
    check_not_empty(part.samples.height, dataset.name, cfg, implicit)

    stage("splitting by time")
    t80, t90 = split_times(part.samples["timestamp"], cfg)

    stage("fitting vocabularies on train")
    item_t, user_t = vocab_times(part, cfg.max_len)
    vocabs = fit_vocabs(dataset, item_t.filter(pl.col("t") < t80)["item_id"],
                        user_t.filter(pl.col("t") < t80)["user_id"])

    stage("encoding features and gathering histories")
    item_enc = encode_items(dataset.items, dataset, vocabs)
    user_enc = encode_users(dataset.users, dataset, vocabs)
    spec = make_spec(dataset, vocabs, cfg.max_len)
    splits = encode_part(part, t80, t90, vocabs, item_enc, user_enc, spec, implicit,
                         raw_history=raw_history)
    manifest = make_manifest(dataset, cfg, split_stats(splits), vocabs, t80, t90,
                             n_events=raw.height)
    if implicit:
        manifest["duplicate_events_dropped"] = part.duplicates
        manifest["negatives_not_drawn"] = part.missing
    return SampleSet(splits=splits, vocabs=vocabs, spec=spec, manifest=manifest, dataset=dataset)


def check_not_empty(n_samples: int, name: str, cfg: SampleConfig, implicit: bool) -> None:
    if n_samples == 0:
        raise ValueError(f"dataset {name!r}: no samples (no event"
                         + (f" of positive_actions {list(cfg.positive_actions)})"
                            if implicit and cfg.positive_actions is not None else ")"))


def with_conversion_labels(frame: pl.DataFrame, events: pl.DataFrame, *,
                           conversion_actions: tuple[str, ...] = ("buy",),
                           window_s: int | None = 86_400) -> pl.DataFrame:
    """Sample rows of an implicit log (P5) with two labels beside ``label``: ``click`` (=
    ``label``: the user touched the item) and ``buy`` (the click converted: the same user has
    a ``conversion_actions`` event on the same item at or after the sample's time, at most
    ``window_s`` seconds later; None = any time later), both Float32, rows in place.

    The P5 rules are untouched: features still come from before the sample's time; only the
    conversion label looks ahead, as any label does (ESMM's click -> buy; with
    ``positive_actions=("pv",)`` the samples are the views). A negative never converts: no
    click, no conversion, whatever the user did later. ``events``: the raw log
    (``user_id``, ``item_id``, ``timestamp``, ``action``).
    """
    if window_s is not None and window_s < 0:
        raise ValueError(f"window_s must be >= 0 or None, got {window_s}")
    missing = [c for c in ("user_id", "item_id", "timestamp", "label") if c not in frame.columns]
    if missing:
        raise ValueError(f"conversion labels need sample columns {missing}")
    buys = (events.filter(pl.col("action").is_in(list(conversion_actions)))
            .select("user_id", "item_id", pl.col("timestamp").alias("_buy_ts"))
            .unique().sort("_buy_ts"))
    rows = frame.select("user_id", "item_id", "timestamp").with_row_index("_row")
    # the first conversion at or after each sample's time, per (user, item); both sides are
    # sorted on time, which polars cannot check within the ``by`` groups
    nxt = (rows.sort("timestamp")
           .join_asof(buys, left_on="timestamp", right_on="_buy_ts", by=["user_id", "item_id"],
                      strategy="forward", check_sortedness=False)
           .sort("_row"))
    gap = nxt["_buy_ts"] - nxt["timestamp"]
    within = gap.is_not_null() & (gap <= window_s if window_s is not None else True)
    click = frame["label"].cast(pl.Float32)
    buy = ((click > 0) & within.fill_null(False)).cast(pl.Float32)
    return frame.with_columns(click.alias("click"), buy.alias("buy"))


class FeatureColumns(Protocol):
    """Which raw user/item columns are features: a Dataset, or online the FeatureSpec's view."""

    @property
    def user_features(self) -> tuple[str, ...]: ...
    @property
    def item_features(self) -> tuple[str, ...]: ...
    @property
    def item_multi_features(self) -> tuple[str, ...]: ...


class LogTables(FeatureColumns, Protocol):
    """A log's item and user tables with its feature columns: a Dataset, or the partitioned
    build's view of a log it never loads whole."""

    @property
    def items(self) -> pl.DataFrame: ...
    @property
    def users(self) -> pl.DataFrame: ...


class LogInfo(Protocol):
    """What the manifest says of the log: a Dataset, or the partitioned build's view."""

    @property
    def name(self) -> str: ...
    @property
    def feedback(self) -> str: ...
    @property
    def meta(self) -> dict[str, object]: ...


def history_columns(events: pl.DataFrame, item_enc: pl.DataFrame, vocabs: Vocabularies,
                    first: np.ndarray, lengths: np.ndarray, sample_ts: np.ndarray, *,
                    raw_history: bool = False) -> list[pl.Series]:
    """``hist_item``, ``hist_cat``, ``hist_dt`` (and ``hist_item_id``) list columns.

    ``events``: user-sorted events (``item_id``, ``timestamp``, ``category``); sample j's history
    is ``events[first[j] : first[j] + lengths[j]]`` seen at time ``sample_ts[j]``. Shared by the
    offline builder and the online features (features/online.py), so that both encode alike.
    """
    ev_item = events.select("item_id").join(item_enc.select("item_id", "item", "category"),
                                            on="item_id", how="left", maintain_order="left")
    ev_item_idx = ev_item["item"].fill_null(OOV).to_numpy()
    ev_cat_idx = vocabs["category"].encode(events["category"]).to_numpy()
    offsets, hidx, item_idx, cat_idx, hist_dt = history_arrays(
        ev_item_idx, ev_cat_idx, events["timestamp"].to_numpy(), first, lengths, sample_ts)
    hist = [
        list_series("hist_item", offsets, item_idx.astype(np.int32)),
        list_series("hist_cat", offsets, cat_idx.astype(np.int32)),
        list_series("hist_dt", offsets, hist_dt),
    ]
    if raw_history:
        raw_ids = events["item_id"].to_numpy()[hidx]
        hist.append(list_series("hist_item_id", offsets, raw_ids))
    return hist


def history_arrays(ev_item_idx: np.ndarray, ev_cat_idx: np.ndarray, ev_ts: np.ndarray,
                   first: np.ndarray, lengths: np.ndarray, sample_ts: np.ndarray
                   ) -> tuple[np.ndarray, ...]:
    """``history_columns`` on encoded event arrays: offsets (n+1,), the flat event indices, and
    flat ``hist_item``, ``hist_cat`` codes and ``hist_dt`` (int64 seconds) of every sample's
    history ``[first[j], first[j] + lengths[j])``; one request calls it without frames."""
    offsets, hidx = gather_lists(first, lengths)
    sample_of = np.repeat(np.arange(len(first)), lengths)
    hist_dt = (sample_ts[sample_of] - ev_ts[hidx]).astype(np.int64)
    return offsets, hidx, ev_item_idx[hidx], ev_cat_idx[hidx], hist_dt


def assemble_rows(samples: pl.DataFrame, user_enc: pl.DataFrame, item_enc: pl.DataFrame,
                  vocabs: Vocabularies, spec: FeatureSpec) -> pl.DataFrame:
    """Samples (``user_id``, ``item_id``, ``timestamp``, ...) with every encoded feature column
    joined on: user and target-item columns, context of the timestamp. Shared with serving."""
    out = (samples
           .join(user_enc, on="user_id", how="left", maintain_order="left")
           .join(item_enc, on="item_id", how="left", maintain_order="left")
           .with_columns(context_columns(pl.col("timestamp"))))
    # Users or items absent from their tables join as null: they are out of vocabulary.
    return out.with_columns(
        vocabs["hour"].encode(out["hour"]), vocabs["dow"].encode(out["dow"]),
        *[pl.col(f.name).fill_null(OOV if f.kind == "categorical" else [])
          for f in spec.features if f.group != "context"])


def encode_items(items: pl.DataFrame, dataset: FeatureColumns, vocabs: Vocabularies) -> pl.DataFrame:
    """Item id -> encoded target-item columns (``item``, ``category``, ``item_<feature>``)."""
    cols = [
        vocabs["item_id"].encode(items["item_id"]).alias("item"),
        vocabs["category"].encode(items["category"]).alias("category"),
    ]
    for f in (*dataset.item_features, *dataset.item_multi_features):
        src = items[f]
        src = src.cast(pl.List(pl.String) if isinstance(src.dtype, pl.List) else pl.String)
        cols.append(vocabs[f"item_{f}"].encode(src).alias(f"item_{f}"))
    return pl.DataFrame([items["item_id"], *cols])


def encode_users(users: pl.DataFrame, dataset: FeatureColumns, vocabs: Vocabularies) -> pl.DataFrame:
    """User id -> encoded user columns (``user``, ``user_<feature>``)."""
    cols = [vocabs["user_id"].encode(users["user_id"]).alias("user")]
    for f in dataset.user_features:
        cols.append(vocabs[f"user_{f}"].encode(users[f].cast(pl.String)).alias(f"user_{f}"))
    return pl.DataFrame([users["user_id"], *cols])


def make_spec(dataset: FeatureColumns, vocabs: Vocabularies, max_len: int) -> FeatureSpec:
    feats = [Feature("user", "categorical", "user", len(vocabs["user_id"]), "user_id")]
    feats += [Feature(f"user_{f}", "categorical", "user", len(vocabs[f"user_{f}"]), f"user_{f}")
              for f in dataset.user_features]
    feats += [Feature("item", "categorical", "item", len(vocabs["item_id"]), "item_id"),
              Feature("category", "categorical", "item", len(vocabs["category"]), "category")]
    feats += [Feature(f"item_{f}", "categorical", "item", len(vocabs[f"item_{f}"]), f"item_{f}")
              for f in dataset.item_features]
    feats += [Feature(f"item_{f}", "multi", "item", len(vocabs[f"item_{f}"]), f"item_{f}")
              for f in dataset.item_multi_features]
    feats += [Feature("hour", "categorical", "context", len(vocabs["hour"]), "hour"),
              Feature("dow", "categorical", "context", len(vocabs["dow"]), "dow")]
    return FeatureSpec(features=tuple(feats), max_len=max_len)


def config_hash(dataset: LogInfo, cfg: SampleConfig, n_events: int) -> str:
    blob = json.dumps({"dataset": dataset.name, "meta": dataset.meta,
                       "events": n_events, "config": dataclasses.asdict(cfg)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def make_manifest(dataset: LogInfo, cfg: SampleConfig, stats: dict[str, dict[str, float]],
                  vocabs: Vocabularies, t80: float, t90: float, n_events: int
                  ) -> dict[str, Any]:
    """The manifest of samples whose per-split ``split_stats`` are ``stats``."""
    manifest = {
        "protocol": protocol_name(dataset.name),
        "dataset": dataset.name,
        "feedback": dataset.feedback,
        "splits": {k: int(v["rows"]) for k, v in stats.items()},
        "positive_rate": {k: round(v["positives"] / max(v["rows"], 1), 6)
                          for k, v in stats.items()},
        "empty_history": {k: int(v["empty_history"]) for k, v in stats.items()},
        "t80": t80,
        "t90": t90,
        # train values only, without the padding and OOV slots
        "vocab_sizes": {k: len(v.values) for k, v in vocabs.items()},
        "max_len": cfg.max_len,
        "config": dataclasses.asdict(cfg),
        "config_hash": config_hash(dataset, cfg, n_events),
        "source": dataset.meta,
        "events": n_events,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "bstrec_version": bstrec.__version__,
    }
    # as it will read back from manifest.json (tuples become lists)
    loaded: dict[str, Any] = json.loads(json.dumps(manifest))
    return loaded
