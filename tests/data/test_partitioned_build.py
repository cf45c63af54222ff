"""The partitioned build (bstrec.distributed.build) writes, row for row, what the in-memory
build writes: for any number of partitions, on one process or on a 2-worker Dask cluster;
and the pieces that make that possible (exact split times from counts, counter-keyed draws)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal
from typer.testing import CliRunner

from bstrec.cli import app
from bstrec.data import synthetic
from bstrec.data.samples import (
    SPLITS,
    SampleConfig,
    build_samples,
    counter_uniforms,
    quantiles_of_counts,
)
from bstrec.data.schema import DataFormatError, Dataset
from bstrec.data.tabular import ColumnMapping, load_table, scan_table
from bstrec.distributed.build import build_partitioned, dask_client, dask_runner

distributed = pytest.importorskip("distributed")


def implicit_log() -> Dataset:
    """A small P5 log with String user ids (sorted as text, not as numbers), exact duplicate
    rows and same-second ties on one item with another action."""
    ds = synthetic.generate_implicit(synthetic.ImplicitConfig(
        n_users=120, events_per_user=(3, 30), n_items=400, n_categories=20, seed=3))
    events = ds.events.with_columns(pl.format("u{}", pl.col("user_id")).alias("user_id"))
    extra = pl.concat([events.slice(5, 7),  # exact duplicates
                       events.slice(40, 9).with_columns(pl.lit("buy").alias("action"))])
    users = ds.users.with_columns(pl.format("u{}", pl.col("user_id")).alias("user_id"))
    return Dataset("toy-p5", pl.concat([events, extra]), ds.items, users, "implicit")


def explicit_log() -> Dataset:
    return synthetic.generate(synthetic.SyntheticConfig(n_users=80, events_per_user=(5, 25)))


def assert_same_build(a: Path, b: Path) -> None:
    for split in SPLITS:
        assert_frame_equal(pl.read_parquet(a / "samples" / f"{split}.parquet"),
                           pl.read_parquet(b / "samples" / f"{split}.parquet"))
    for name in ("vocab.json", "feature_spec.json"):
        assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), name
    drop = {"created", "partitions"}
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert {k: v for k, v in ma.items() if k not in drop} == {
        k: v for k, v in mb.items() if k not in drop}
    for table in ("events", "items", "users"):
        assert_frame_equal(pl.read_parquet(a / "dataset" / f"{table}.parquet"),
                           pl.read_parquet(b / "dataset" / f"{table}.parquet"))


CASES = {
    "implicit-uniform": (implicit_log, SampleConfig(max_len=5, negatives=2, seed=7)),
    "implicit-popularity": (implicit_log, SampleConfig(
        max_len=4, negatives=1, negative_sampling="popularity", positive_actions=("pv", "buy"))),
    "explicit": (explicit_log, SampleConfig(label_threshold=1.0)),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The in-memory build of each case."""
    out = {}
    for name, (make, cfg) in CASES.items():
        path = tmp_path_factory.mktemp("ref") / name
        build_samples(make(), cfg).save(path)
        out[name] = path
    return out


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    with dask_client(workers=2) as c:
        yield c


@pytest.mark.parametrize("case", list(CASES))
def test_partitioned_build_equals_the_in_memory_build(case: str, reference: dict[str, Path],
                                                      tmp_path: Path) -> None:
    make, cfg = CASES[case]
    for partitions in (1, 3, 4):
        out = tmp_path / f"p{partitions}"
        manifest = build_partitioned(make(), out, cfg, partitions=partitions)
        assert manifest["partitions"] == partitions
        assert_same_build(reference[case], out)


@pytest.mark.parametrize("case", list(CASES))
def test_dask_cluster_build_equals_the_single_process_build(
        case: str, reference: dict[str, Path], client: Any, tmp_path: Path) -> None:
    make, cfg = CASES[case]
    build_partitioned(make(), tmp_path / "dask", cfg, partitions=3, runner=dask_runner(client))
    assert len(client.scheduler_info()["workers"]) == 2
    assert_same_build(reference[case], tmp_path / "dask")


def test_a_dataset_folder_builds_without_loading_its_events(reference: dict[str, Path],
                                                           tmp_path: Path) -> None:
    make, cfg = CASES["implicit-uniform"]
    folder = make().save(tmp_path / "log")
    build_partitioned(folder, tmp_path / "out", cfg, partitions=2)
    assert_same_build(reference["implicit-uniform"], tmp_path / "out")


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.integers(-2**40, 2**40), min_size=1, max_size=60),
       qs=st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0)))
def test_quantiles_from_counts_are_numpys_to_the_bit(values: list[int],
                                                     qs: tuple[float, float]) -> None:
    distinct, counts = np.unique(np.array(values, dtype=np.int64), return_counts=True)
    want = np.quantile(np.array(values, dtype=np.int64), list(qs))
    assert quantiles_of_counts(distinct, counts, qs) == tuple(float(x) for x in want)


def test_counter_uniforms_depend_on_their_key_alone() -> None:
    users = np.arange(20_000, dtype=np.int64) % 97
    k = np.arange(20_000, dtype=np.int64) // 97
    u = counter_uniforms(5, users, k)
    assert ((u >= 0) & (u < 1)).all()
    # any subset, in any order, draws the same numbers: what makes partitions agree
    pick = np.random.default_rng(0).permutation(20_000)[:500]
    assert np.array_equal(counter_uniforms(5, users[pick], k[pick]), u[pick])
    assert not np.array_equal(counter_uniforms(6, users, k), u)
    # uniform: deciles each hold a tenth
    hist = np.histogram(u, bins=10, range=(0, 1))[0] / len(u)
    assert np.abs(hist - 0.1).max() < 0.01


def write_log(path: Path, bad_row: int | None = None) -> Path:
    rng = np.random.default_rng(1)
    n = 3_000
    frame = pl.DataFrame({
        "uid": [f"u{i}" for i in rng.integers(0, 150, n)],
        "sku": rng.integers(0, 300, n), "ts": 1_700_000_000 + rng.integers(0, 10**6, n),
        "kind": rng.choice(["click", "buy"], n), "cat": [f"c{i % 7}" for i in range(n)]})
    frame = frame.with_columns(pl.col("ts").cast(pl.String))
    if bad_row is not None:
        frame = frame.with_columns(pl.when(pl.int_range(pl.len()) == bad_row - 1)
                                   .then(pl.lit("yesterday")).otherwise("ts").alias("ts"))
    frame.write_csv(path) if path.suffix == ".csv" else frame.write_parquet(path)
    return path


MAPPING = ColumnMapping(user_id="uid", item_id="sku", timestamp="ts", action="kind",
                        category="cat")


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_scanned_log_is_the_loaded_log(suffix: str, tmp_path: Path) -> None:
    path = write_log(tmp_path / f"log{suffix}")
    loaded = load_table(path, MAPPING)
    scanned = scan_table(path, MAPPING)
    assert_frame_equal(scanned.events.collect(), loaded.events)
    assert_frame_equal(scanned.items, loaded.items)
    assert_frame_equal(scanned.users, loaded.users)
    assert scanned.meta == loaded.meta


def test_scanned_log_reports_bad_rows_like_the_loader(tmp_path: Path) -> None:
    path = write_log(tmp_path / "log.csv", bad_row=8)
    with pytest.raises(DataFormatError, match=r"log\.csv:9: .*'yesterday'"):
        scan_table(path, MAPPING)
    scanned = scan_table(path, MAPPING, strict=False)
    assert scanned.meta["skipped_rows"] == load_table(path, MAPPING, strict=False).meta[
        "skipped_rows"] == {"log.csv": 1}


def test_cli_builds_a_parquet_log_in_partitions_as_in_memory(tmp_path: Path) -> None:
    src = write_log(tmp_path / "log.parquet")
    cols = ["--column", "user_id=uid", "--column", "item_id=sku", "--column", "timestamp=ts",
            "--column", "action=kind", "--column", "category=cat"]
    common = ["data", "build", "--dataset", "parquet", "--input", str(src), *cols,
              "--set", "negatives=2"]
    runner = CliRunner()
    res = runner.invoke(app, [*common, "--out", str(tmp_path / "mem")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, [*common, "--out", str(tmp_path / "parts"), "--partitions", "3"])
    assert res.exit_code == 0, res.output
    assert_same_build(tmp_path / "mem", tmp_path / "parts")
    res = runner.invoke(app, [*common, "--out", str(tmp_path / "x"), "--engine", "spark"])
    assert res.exit_code == 2 and "engine must be one of local, dask" in res.output


def test_large_logs_build_out_of_core_by_default(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from bstrec.data import build

    log = write_log(tmp_path / "log.parquet")  # 3,000 rows
    assert not build.wants_partitions("parquet", log)
    assert not build.wants_partitions("ml-1m", None)
    monkeypatch.setattr(build, "OUT_OF_CORE_EVENTS", 3_000)
    assert build.wants_partitions("parquet", log)
    res = CliRunner().invoke(app, ["data", "build", "--dataset", "parquet", "--input", str(log),
                                   "--column", "user_id=uid", "--column", "item_id=sku",
                                   "--column", "timestamp=ts", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["partitions"] == 1


def test_chunked_implicit_log_is_one_log_of_every_user(tmp_path: Path) -> None:
    cfg = synthetic.ImplicitConfig(n_users=250, n_items=500, n_categories=10)
    n = synthetic.write_implicit_log(cfg, tmp_path / "log.parquet", users_per_chunk=100)
    log = pl.read_parquet(tmp_path / "log.parquet")
    assert log.height == n
    assert log["user_id"].unique().sort().to_list() == list(range(1, 251))
    lo, hi = cfg.events_per_user
    per_user = log.group_by("user_id").agg(pl.len(), pl.col("timestamp").diff().min().alias("d"))
    assert per_user["len"].is_between(lo, hi).all() and (per_user["d"] >= 1).all()
    assert log["timestamp"].min() >= cfg.start_timestamp
    world = synthetic.build_implicit_world(cfg)
    want = [f"cat_{world.item_category[i - 1]}" for i in log["item_id"].to_list()]
    assert log["category"].to_list() == want
    # chunks draw from their own streams: not one chunk repeated
    firsts = log.group_by("user_id", maintain_order=True).first()
    assert firsts.filter(pl.col("user_id") <= 100)["item_id"].to_list() != firsts.filter(
        pl.col("user_id").is_between(101, 200))["item_id"].to_list()


def test_workers_needs_a_local_dask_cluster(tmp_path: Path) -> None:
    from bstrec.data.build import build_partitioned as build_cli

    for engine, scheduler in (("local", None), ("dask", "tcp://127.0.0.1:1")):
        with pytest.raises(ValueError, match="workers sizes the local Dask cluster"):
            build_cli("synthetic-order", tmp_path / "out", engine=engine, scheduler=scheduler,
                      workers=3)
    assert not (tmp_path / "out").exists()
