"""Samples from the impression log (data/impressions.py): labels on a hand-made log, histories
strictly before the request time, the base's vocabularies and spec, and the CLI."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from bstrec.cli import app as cli
from bstrec.data.impressions import (
    build_impression_samples,
    history_bounds,
    impression_samples,
    label_impressions,
)
from bstrec.data.samples import SampleConfig, SampleSet, build_samples
from bstrec.data.schema import Dataset, normalize_events
from bstrec.features.spec import OOV
from bstrec.monitoring.impressions import SCHEMAS, Kind

T0 = 1_700_000_000
W = 100


def _default(field: pa.Field) -> Any:
    """A value of ``field``'s type, so that rows fill any column the log gains later."""
    t = field.type
    if field.nullable:
        return None
    if pa.types.is_list(t):
        return []
    if pa.types.is_boolean(t):
        return True
    if pa.types.is_string(t):
        return "{}" if field.name in ("user_features", "candidates", "timings_ms") else "x"
    return 0


def log_rows(kind: Kind, rows: list[dict[str, Any]]) -> pl.DataFrame:
    schema = SCHEMAS[kind]
    full = [{f.name: row.get(f.name, _default(f)) for f in schema} for row in rows]
    frame = pl.from_arrow(pa.Table.from_pylist(full, schema=schema))
    assert isinstance(frame, pl.DataFrame)
    return frame


def imp(request_id: str, user: int, item: int, ts: int, position: int = 0,
        shown: bool = True) -> dict[str, Any]:
    return {"request_id": request_id, "user_id": str(user), "item_id": str(item),
            "ts": float(ts), "position": position, "shown": shown, "k": 2}


def ev(user: int, item: int, ts: int, request_id: str | None = None) -> dict[str, Any]:
    return {"request_id": request_id, "user_id": str(user), "item_id": str(item),
            "ts": float(ts), "event_id": f"{user}:{item}:{ts}", "received_at": float(ts)}


def test_labels_follow_the_window_and_the_request_id() -> None:
    impressions = log_rows("impressions", [
        imp("r1", 1, 10, T0, 0), imp("r1", 1, 11, T0, 1),  # 10: clicked in the window
        imp("r2", 1, 12, T0, 0),  # 12: clicked too late
        imp("r3", 2, 10, T0, 0), imp("r3", 2, 11, T0, 1),  # user 2: 11 clicked at ts itself
        imp("r4", 1, 13, T0, 0), imp("r5", 1, 13, T0 + 10, 0),  # 13: the click names r5
        imp("r6", 2, 14, T0 + 50, 0),  # an event before the request is no click
    ])
    events = log_rows("events", [
        ev(1, 10, T0 + W - 1), ev(1, 12, T0 + W), ev(2, 11, T0), ev(1, 13, T0 + 20, "r5"),
        ev(2, 14, T0 + 49), ev(3, 10, T0 + 1)])  # user 3 saw nothing
    out = label_impressions(impressions, events, W)
    assert out.select("request_id", "item_id").rows() == impressions.select(
        "request_id", "item_id").rows()  # order kept
    assert out["label"].to_list() == [1, 0, 0, 0, 1, 0, 1, 0]
    with pytest.raises(ValueError, match="window_s"):
        label_impressions(impressions, events, 0)


def test_history_bounds_stop_strictly_before_the_time() -> None:
    events = pl.DataFrame({"user_id": [1, 1, 1, 2, 2], "timestamp": [5, 7, 9, 1, 3]})
    first, lengths = history_bounds(events, pl.Series([1, 1, 1, 2, 3, 1]),
                                    np.array([7, 10, 5, 100, 4, 8]), max_len=2)
    # user 1 at 7: only the event at 5 (7 is not before 7); at 10 the last two; user 3: none
    assert lengths.tolist() == [1, 2, 0, 2, 0, 2]
    assert first.tolist()[:2] == [0, 1] and first[3] == 3


def base_dataset() -> Dataset:
    rng = np.random.default_rng(0)
    n = 240
    users = rng.integers(1, 9, n)
    items = rng.integers(1, 21, n)
    ts = T0 + np.sort(rng.integers(0, 20_000, n))
    events = normalize_events(pl.DataFrame({
        "user_id": users, "item_id": items, "timestamp": ts,
        "value": rng.integers(1, 6, n).astype(float)}).with_columns(pl.lit("rating").alias("action")))
    item_ids = np.arange(1, 23)  # 21 and 22 never occur in the log
    return Dataset("hand", events,
                   pl.DataFrame({"item_id": item_ids,
                                 "category": [f"c{i % 3}" for i in item_ids]}),
                   pl.DataFrame({"user_id": np.arange(1, 9)}))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("base") / "samples"
    build_samples(base_dataset(), SampleConfig(max_len=5)).save(out)
    return out


def served_log(base_samples: SampleSet) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Requests over the base's test period, two shown items each, clicks on some, a shadow
    row, an unknown user and item, and logged events (one replays a base event)."""
    assert base_samples.dataset is not None
    test = base_samples.splits["test"]
    rows, events = [], []
    for n, r in enumerate(test.head(12).iter_rows(named=True)):
        rid, t = f"r{n}", int(r["timestamp"])
        a, b = r["item_id"], 21 if n % 4 == 0 else (r["item_id"] % 20) + 1
        rows += [imp(rid, r["user_id"], a, t, 0), imp(rid, r["user_id"], b, t, 1),
                 imp(rid, r["user_id"], 5, t, 0, shown=False)]
        if n % 2 == 0:
            events.append(ev(r["user_id"], a, t, rid))
    last = int(test["timestamp"].to_numpy().max())
    rows.append(imp("new-user", 99, 3, last, 0))
    events.append(ev(99, 3, last + 1))
    return log_rows("impressions", rows), log_rows("events", events)


def test_samples_from_the_log_use_the_base_contract_and_no_later_history(base: Path) -> None:
    base_samples = SampleSet.load(base)
    impressions, events = served_log(base_samples)
    out = impression_samples(base_samples, impressions, events, W, raw_history=True)
    rows = pl.concat(out.splits.values())
    shown = impressions.filter("shown")
    assert rows.height == shown.height  # the shadow rows are no samples
    assert {k: v.values for k, v in out.vocabs.items()} == {
        k: v.values for k, v in base_samples.vocabs.items()}
    assert out.spec == base_samples.spec
    assert out.manifest["protocol"] == "impressions"
    assert out.manifest["impressions"]["shown"] == shown.height
    # labels: exactly the clicked (request, item) pairs
    clicked = {(e["request_id"], int(e["item_id"])) for e in events.iter_rows(named=True)
               if e["request_id"]} | {("new-user", 3)}  # no request id: the window decides
    got = {(r["request_id"], r["item_id"]) for r in rows.filter(pl.col("label") == 1)
           .iter_rows(named=True)}
    assert got == clicked
    # ids unknown to the base vocabulary: OOV, as the builder encodes them
    assert rows.filter(pl.col("item_id") == 21)["item"].unique().to_list() == [OOV]
    assert rows.filter(pl.col("user_id") == 99)["user"].to_list() == [OOV]
    # point in time: every history item happened strictly before the request
    assert base_samples.dataset is not None
    log_events = base_samples.dataset.events
    for r in rows.iter_rows(named=True):
        past = (log_events.filter((pl.col("user_id") == r["user_id"])
                                  & (pl.col("timestamp") < r["timestamp"]))
                .sort("timestamp", "item_id")["item_id"].to_list())
        n = min(len(past), out.spec.max_len)
        assert r["hist_item_id"] == past[len(past) - n:]
        assert all(dt > 0 for dt in r["hist_dt"])
    # splits by time, in order
    bounds = [(int(s["timestamp"].to_numpy().min()), int(s["timestamp"].to_numpy().max()))
              for s in out.splits.values() if s.height]
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(bounds))


def test_logged_events_join_the_history_and_the_dataset(base: Path) -> None:
    base_samples = SampleSet.load(base)
    assert base_samples.dataset is not None
    t = int(base_samples.dataset.events["timestamp"].to_numpy().max()) + 1_000
    impressions = log_rows("impressions", [imp("a", 1, 2, t), imp("b", 1, 2, t + 50)])
    # an event the base lacks (between the requests) and a replay of a base event
    first = base_samples.dataset.events.row(0, named=True)
    events = log_rows("events", [ev(1, 7, t + 10),
                                 ev(first["user_id"], first["item_id"], first["timestamp"])])
    out = impression_samples(base_samples, impressions, events, W, raw_history=True)
    assert out.dataset is not None
    assert out.dataset.events.height == base_samples.dataset.events.height + 1
    rows = pl.concat(out.splits.values()).sort("timestamp")
    hist_a, hist_b = rows["hist_item_id"].to_list()
    assert 7 not in hist_a[-1:] and hist_b[-1] == 7  # only the later request sees it


def test_the_cli_builds_bundleable_samples_from_a_log_dir(base: Path, tmp_path: Path) -> None:
    base_samples = SampleSet.load(base)
    impressions, events = served_log(base_samples)
    log = tmp_path / "log"
    log.mkdir()
    pq.write_table(impressions.to_arrow().cast(SCHEMAS["impressions"]),
                   log / "impressions-20260101T000000000000Z-1-000001.parquet")
    pq.write_table(events.to_arrow().cast(SCHEMAS["events"]),
                   log / "events-20260101T000000000000Z-1-000001.parquet")
    out = tmp_path / "imp"
    res = CliRunner().invoke(cli, ["data", "build", "--dataset", "impressions", "--input",
                                   str(log), "--base", str(base), "--out", str(out),
                                   "--window-s", str(W)])
    assert res.exit_code == 0, res.output
    loaded = SampleSet.load(out)
    assert loaded.manifest["impressions"]["window_s"] == W
    assert loaded.dataset is not None and loaded.spec == base_samples.spec
    direct = build_impression_samples(log, base, tmp_path / "direct", window_s=W)
    assert SampleSet.load(direct).splits["train"].equals(loaded.splits["train"])
    # bad input: a missing log, a missing --base
    res = CliRunner().invoke(cli, ["data", "build", "--dataset", "impressions", "--input",
                                   str(tmp_path / "nope"), "--base", str(base), "--out",
                                   str(out)])
    assert res.exit_code == 2 and "impression log" in " ".join(res.output.split())
    res = CliRunner().invoke(cli, ["data", "build", "--dataset", "impressions", "--input",
                                   str(log), "--out", str(out)])
    assert res.exit_code == 2 and "--base" in res.output


def test_a_log_of_another_id_kind_or_without_impressions_is_refused(base: Path) -> None:
    base_samples = SampleSet.load(base)
    events = log_rows("events", [])
    bad = log_rows("impressions", [imp("a", 1, 2, T0)]).with_columns(pl.lit("u-1").alias("user_id"))
    with pytest.raises(ValueError, match="user_id that is not of the base's id type"):
        impression_samples(base_samples, bad, events, W)
    shadow = log_rows("impressions", [imp("a", 1, 2, T0, shown=False)])
    with pytest.raises(ValueError, match="no shown impression"):
        impression_samples(base_samples, shadow, events, W)
