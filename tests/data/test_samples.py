"""Point-in-time samples: no leakage, train-only vocabularies, the exact P1/P3 counts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bstrec.config import ConfigError, from_dict
from bstrec.data.samples import (
    SampleConfig,
    SampleSet,
    behaviour_order,
    build_samples,
    context_columns,
    hour_and_weekday,
    sort_events,
)
from bstrec.data.schema import Dataset
from bstrec.features.spec import OOV, PAD
from tests.conftest import require


def make_dataset(rows: list[tuple[int, int, int, float]], feedback: str = "explicit",
                 actions: list[str] | None = None) -> Dataset:
    users, items, ts, values = (list(x) for x in zip(*rows, strict=True))
    events = pl.DataFrame({
        "user_id": pl.Series(users, dtype=pl.Int64), "item_id": pl.Series(items, dtype=pl.Int64),
        "timestamp": pl.Series(ts, dtype=pl.Int64),
        "action": actions or ["rating"] * len(rows), "value": pl.Series(values, dtype=pl.Float64),
        "event_id": pl.Series([None] * len(rows), dtype=pl.String)})
    catalog = sorted(set(items) | {99, 98, 97})
    item_table = pl.DataFrame({"item_id": pl.Series(catalog, dtype=pl.Int64),
                               "category": [f"c{i % 3}" for i in catalog]})
    user_table = pl.DataFrame({"user_id": pl.Series(sorted(set(users)), dtype=pl.Int64),
                               "segment": [f"s{u % 2}" for u in sorted(set(users))]})
    return Dataset("toy", events, item_table, user_table, feedback,  # type: ignore[arg-type]
                   user_features=("segment",))


def all_samples(s: SampleSet) -> pl.DataFrame:
    return pl.concat([s.splits[k].with_columns(pl.lit(k).alias("split")) for k in s.splits])


log_rows = st.lists(
    st.tuples(st.integers(1, 4), st.integers(1, 8), st.integers(0, 30), st.sampled_from([1.0, 5.0])),
    min_size=1, max_size=60)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=log_rows, max_len=st.integers(1, 5))
def test_history_is_the_users_earlier_events_never_later(
        rows: list[tuple[int, int, int, float]], max_len: int) -> None:
    s = build_samples(make_dataset(rows), SampleConfig(max_len=max_len), raw_history=True)
    out = all_samples(s)
    assert out.height == len(rows)
    # brute force: the user's events in (timestamp, item id, file order), the L before this one
    order = sorted(range(len(rows)), key=lambda i: (rows[i][0], rows[i][2], rows[i][1], i))
    expected: dict[tuple[int, int, int], list[tuple[list[int], list[int]]]] = {}
    for pos, i in enumerate(order):
        u, item, t, _ = rows[i]
        earlier = [j for j in order[:pos] if rows[j][0] == u][-max_len:]
        expected.setdefault((u, item, t), []).append(
            ([rows[j][1] for j in earlier], [t - rows[j][2] for j in earlier]))
    for r in out.iter_rows(named=True):
        assert all(dt >= 0 for dt in r["hist_dt"]), "a history entry is later than its sample"
        assert len(r["hist_item_id"]) <= max_len
        assert (r["hist_item_id"], r["hist_dt"]) in expected[(r["user_id"], r["item_id"],
                                                              r["timestamp"])]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["a", "b", "ab", "B", "é", "10", "9"])),
                max_size=25), st.booleans())
def test_behaviour_order_is_sort_events_order_for_one_user(
        events: list[tuple[int, str]], int_ids: bool) -> None:
    """Many same-second ties and repeats; string ids (byte vs code point order) and integers."""
    ts = [t for t, _ in events]
    ids: list[object] = [len(i) * 7 + ord(i[0]) if int_ids else i for _, i in events]
    frame = pl.DataFrame({"user_id": [1] * len(ts), "item_id": ids, "timestamp": ts,
                          "row": list(range(len(ts)))},
                         schema_overrides={"timestamp": pl.Int64, "user_id": pl.Int64})
    assert behaviour_order(ts, ids) == sort_events(frame)["row"].to_list()


def test_hour_and_weekday_is_context_columns_arithmetic() -> None:
    ts = [0, 3599, 3600, 86_399, 86_400, 1_700_000_000, 1_800_012_345]
    cols = pl.DataFrame({"t": ts}).select(context_columns(pl.col("t")))
    assert [hour_and_weekday(t) for t in ts] == list(zip(cols["hour"], cols["dow"], strict=True))
    assert hour_and_weekday(0) == (0, 3)  # 1970-01-01 00:00 UTC, a Thursday


def test_splits_cut_at_global_time_quantiles() -> None:
    rng = np.random.default_rng(0)
    rows = [(int(u), int(i), int(t), float(v)) for u, i, t, v in zip(
        rng.integers(1, 30, 2000), rng.integers(1, 50, 2000), rng.integers(0, 10_000, 2000),
        rng.integers(1, 6, 2000), strict=True)]
    s = build_samples(make_dataset(rows))
    m = s.manifest
    t80, t90 = np.quantile([r[2] for r in rows], [0.8, 0.9])
    assert (m["t80"], m["t90"]) == (t80, t90)
    assert s.splits["train"]["timestamp"].max() < t80  # type: ignore[operator]
    assert s.splits["valid"]["timestamp"].min() >= t80  # type: ignore[operator]
    assert s.splits["valid"]["timestamp"].max() < t90  # type: ignore[operator]
    assert s.splits["test"]["timestamp"].min() >= t90  # type: ignore[operator]
    assert sum(m["splits"].values()) == len(rows)
    labels = np.array([r[3] >= 4 for r in rows])
    times = np.array([r[2] for r in rows])
    for name, in_split in (("train", times < t80), ("valid", (times >= t80) & (times < t90)),
                           ("test", times >= t90)):
        assert m["splits"][name] == in_split.sum()
        assert m["positive_rate"][name] == round(labels[in_split].sum() / in_split.sum(), 6)
    assert abs(sum(m["positive_rate"][k] * m["splits"][k] for k in m["splits"])
               - labels.sum()) < 1e-3


def test_vocabularies_hold_only_train_values_and_unseen_values_are_oov() -> None:
    # item 7 and user 3 appear only at the end of the log: they must be out of vocabulary
    rows = [(u, i, t, 5.0) for t, (u, i) in enumerate([(1, 1), (2, 2)] * 20)]
    rows += [(1, 7, 100, 5.0), (3, 1, 101, 5.0), (3, 7, 102, 1.0)]
    s = build_samples(make_dataset(rows), raw_history=True)
    train = s.splits["train"]
    assert set(s.vocabs["item_id"].values) == set(train["item_id"].to_list()) == {1, 2}
    assert set(s.vocabs["user_id"].values) == set(train["user_id"].to_list()) == {1, 2}
    test = s.splits["test"]
    assert (test.filter(pl.col("item_id") == 7)["item"] == OOV).all()
    assert (test.filter(pl.col("user_id") == 3)["user"] == OOV).all()
    # ... and in the history, where item 7 sits before user 3's last event
    last = test.filter((pl.col("user_id") == 3) & (pl.col("item_id") == 7)).row(0, named=True)
    assert last["hist_item_id"] == [1] and last["hist_item"] == [s.vocabs["item_id"].index[1]]
    for f in s.spec.features:
        col = train[f.name]
        values = col.explode() if f.kind == "multi" else col
        assert int(values.max()) < f.vocab_size  # type: ignore[arg-type]
        assert PAD not in values.to_list()


def test_implicit_feedback_negatives_are_never_touched_items() -> None:
    rng = np.random.default_rng(1)
    rows = [(int(u), int(i), int(t), 1.0) for u, i, t in zip(
        rng.integers(1, 20, 800), rng.integers(1, 40, 800), rng.integers(0, 5000, 800),
        strict=True)]
    first_t = min(r[2] for r in rows)
    for sampling in ("uniform", "popularity"):
        cfg = SampleConfig(negatives=3, negative_sampling=sampling)  # type: ignore[arg-type]
        s = build_samples(make_dataset(rows, feedback="implicit"), cfg, raw_history=True)
        out = all_samples(s)
        pos, neg = out.filter(pl.col("label") == 1), out.filter(pl.col("label") == 0)
        assert pos.height == len(rows)
        not_drawn = s.manifest["negatives_not_drawn"]
        # the log's first second has nothing before it to draw from
        assert not_drawn["empty_catalogue"] == 3 * sum(r[2] == first_t for r in rows)
        assert neg.height == 3 * len(rows) - not_drawn["empty_catalogue"] - not_drawn["all_touched"]
        touched = pl.DataFrame(rows, schema=["user_id", "item_id", "t", "v"], orient="row")
        bad = neg.join(touched, on=["user_id", "item_id"]).filter(pl.col("t") <= pl.col("timestamp"))
        assert bad.height == 0, f"{sampling}: negatives the user had already touched"
        # a negative shares its positive's history
        assert set(neg["hist_item_id"].list.len().to_list()) <= set(
            pos["hist_item_id"].list.len().to_list())


def test_positive_actions_select_targets_but_history_keeps_every_action() -> None:
    rows = [(1, i, i, 1.0) for i in range(1, 11)]
    actions = ["pv", "buy"] * 5
    cfg = SampleConfig(positive_actions=("buy",), negatives=0)
    s = build_samples(make_dataset(rows, "implicit", actions), cfg, raw_history=True)
    out = all_samples(s).sort("timestamp")
    assert out["item_id"].to_list() == [2, 4, 6, 8, 10]
    assert out.row(1, named=True)["hist_item_id"] == [1, 2, 3]


def test_sample_config_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ConfigError, match="max_lenn"):
        from_dict(SampleConfig, {"max_lenn": 3})
    with pytest.raises(ConfigError, match="max_len"):
        from_dict(SampleConfig, {"max_len": 0})
    assert from_dict(SampleConfig, {"split_quantiles": [0.7, 0.85]}).split_quantiles == (0.7, 0.85)


def test_save_is_atomic_and_round_trips(tmp_path: Path) -> None:
    rows = [(u, i, t, 5.0) for t, (u, i) in enumerate([(1, 1), (2, 2), (1, 3)] * 10)]
    s = build_samples(make_dataset(rows))
    out = tmp_path / "out"
    s.save(out)
    loaded = SampleSet.load(out)
    assert loaded.manifest == json.loads((out / "manifest.json").read_text())
    assert loaded.splits["train"].equals(s.splits["train"])
    assert loaded.spec == s.spec

    broken = SampleSet(s.splits, s.vocabs, s.spec, {"bad": object()}, None)
    with pytest.raises(TypeError):
        broken.save(out)  # the manifest is not JSON: fails after the Parquet files were written
    assert SampleSet.load(out).manifest == s.manifest, "a failed save touched the old output"
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "a temporary folder was left behind"


@pytest.mark.shared_data
def test_p1_ml1m_ctr_reference_counts_and_record() -> None:
    from bstrec.data.movielens import load_ml1m

    s = build_samples(load_ml1m(require("ml-1m", "ratings*.dat*", "movies.dat", "users.dat")),
                      raw_history=True)
    m = s.manifest
    assert m["protocol"] == "ml1m-ctr"
    assert m["splits"] == {"train": 390_119, "valid": 48_766, "test": 48_765}
    assert {k: round(v, 4) for k, v in m["positive_rate"].items()} == {
        "train": 0.5761, "valid": 0.5727, "test": 0.5420}
    assert m["empty_history"] == {"train": 2_777, "valid": 216, "test": 6}
    assert (m["t80"], round(m["t90"], 1)) == (976862649.0, 980998147.8)
    assert (m["vocab_sizes"]["user_id"], m["vocab_sizes"]["item_id"],
            m["vocab_sizes"]["category"]) == (2_777, 3_576, 18)
    user10 = all_samples(s).filter(pl.col("user_id") == 10).sort("timestamp", "item_id")
    rec = user10.row(24, named=True)
    assert (rec["item_id"], rec["timestamp"], rec["label"], rec["split"]) == (
        1204, 978225456, 1.0, "valid")
    assert rec["hist_item_id"] == [1948, 551, 1282, 2312, 3751, 2858, 2033, 480, 2791, 3155,
                                   1544, 2135, 2657, 3675, 2399, 648, 3189, 3481, 3408, 3629]
    assert rec["hist_dt"] == [1056, 907, 907, 907, 907, 829, 781, 751, 751, 751, 707, 677, 677,
                              677, 635, 531, 423, 406, 386, 28]
    # context of 2000-12-31 01:17:36 UTC, a Sunday (Monday = 0)
    assert s.vocabs["hour"].values[rec["hour"] - 2] == 1
    assert s.vocabs["dow"].values[rec["dow"] - 2] == 6


@pytest.mark.shared_data
def test_p3_ml100k_ctr_reference_counts() -> None:
    from bstrec.data.movielens import load_ml100k

    s = build_samples(load_ml100k(require("ml-100k", "u.data*", "u.item", "u.user")))
    m = s.manifest
    assert m["protocol"] == "ml100k-ctr"
    assert m["splits"] == {"train": 79_999, "valid": 10_001, "test": 10_000}
    assert {k: round(v, 4) for k, v in m["positive_rate"].items()} == {
        "train": 0.5509, "valid": 0.5673, "test": 0.5629}
    assert m["empty_history"] == {"train": 751, "valid": 116, "test": 76}
    assert (m["t80"], round(m["t90"], 1)) == (889237269.0, 891382271.2)
