"""P5 implicit logs: nothing in a sample, its negatives, its vocabularies or the sampler's weights
comes from an event later than the sample; and histories survive Polars' parallel joins."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bstrec.data.samples import (
    SampleConfig,
    SampleSet,
    build_samples,
    negative_pool,
    prepare_events,
)
from bstrec.data.schema import Dataset
from bstrec.features.spec import OOV

ACTIONS = ("pv", "cart", "fav", "buy")
Row = tuple[int, int, int, str]  # user, item, timestamp, action


def category(item: int) -> str:
    return f"c{item % 3}"


def implicit_dataset(rows: list[Row]) -> Dataset:
    users, items, ts, actions = (list(x) for x in zip(*rows, strict=True))
    events = pl.DataFrame({
        "user_id": pl.Series(users, dtype=pl.Int64), "item_id": pl.Series(items, dtype=pl.Int64),
        "timestamp": pl.Series(ts, dtype=pl.Int64), "action": actions,
        "value": pl.Series([None] * len(rows), dtype=pl.Float64),
        "event_id": pl.Series([None] * len(rows), dtype=pl.String)})
    # items and users the log never mentions, to catch a vocabulary fitted on the tables
    catalog = sorted(set(items) | {90, 91})
    item_table = pl.DataFrame({"item_id": pl.Series(catalog, dtype=pl.Int64),
                               "category": [category(i) for i in catalog]})
    people = sorted(set(users) | {90})
    user_table = pl.DataFrame({"user_id": pl.Series(people, dtype=pl.Int64),
                               "segment": [f"s{u}" for u in people]})
    return Dataset("toy-implicit", events, item_table, user_table, "implicit",
                   user_features=("segment",))


def all_samples(s: SampleSet) -> pl.DataFrame:
    return pl.concat([s.splits[k] for k in s.splits])


def brute_weights(rows: list[Row], t: int, sampling: str) -> dict[int, int]:
    """The catalogue as of t, from the distinct events strictly before t."""
    counts = Counter(item for _, item, ts, _ in set(rows) if ts < t)
    return {i: 1 for i in counts} if sampling == "uniform" else dict(counts)


# Small ranges: many same-second ties, repeated (user, item) pairs and exact duplicate rows.
event = st.tuples(st.integers(1, 4), st.integers(1, 8), st.integers(0, 12), st.sampled_from(ACTIONS))
implicit_log = st.lists(event, min_size=1, max_size=40).flatmap(
    lambda rows: st.lists(st.sampled_from(rows), max_size=6).map(lambda dup: rows + dup))
sample_config = st.builds(
    SampleConfig, max_len=st.integers(1, 4), negatives=st.integers(1, 3),
    negative_sampling=st.sampled_from(["uniform", "popularity"]),
    positive_actions=st.sampled_from([None, ("buy",), ("cart", "buy")]),
    seed=st.integers(0, 2**16))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=implicit_log, cfg=sample_config)
def test_p5_samples_never_see_the_future(rows: list[Row], cfg: SampleConfig) -> None:
    distinct = set(rows)
    wanted = [r for r in distinct if cfg.positive_actions is None or r[3] in cfg.positive_actions]
    if not wanted:
        with pytest.raises(ValueError, match="no samples"):
            build_samples(implicit_dataset(rows), cfg)
        return
    s = build_samples(implicit_dataset(rows), cfg, raw_history=True)
    out = all_samples(s)
    pos, neg = out.filter(pl.col("label") == 1), out.filter(pl.col("label") == 0)

    # every distinct event (of a positive action) is one positive, with its behaviour type
    assert sorted(pos.select("user_id", "item_id", "timestamp", "action").rows()) == sorted(wanted)
    assert neg["action"].null_count() == neg.height
    assert s.manifest["duplicate_events_dropped"] == len(rows) - len(distinct)

    def touched(user: int, t: int) -> set[int]:
        return {i for u, i, ts, _ in distinct if u == user and ts <= t}

    # negatives: from the catalogue strictly before t, never touched by the user at or before t,
    # and as many as asked whenever one exists
    for r in neg.iter_rows(named=True):
        u, item, t = r["user_id"], r["item_id"], r["timestamp"]
        assert item in brute_weights(rows, t, "uniform"), "negative not in the catalogue as of t"
        assert item not in touched(u, t), "negative the user had already touched"
    # what a negative may be depends on (user, t) only: count per (user, t)
    positives_at = Counter((u, t) for u, _, t, _ in wanted)
    negatives_at = Counter(neg.select("user_id", "timestamp").rows())
    for (u, t), n_pos in positives_at.items():
        drawable = set(brute_weights(rows, t, "uniform")) - touched(u, t)
        assert negatives_at[(u, t)] == (cfg.negatives * n_pos if drawable else 0)
    assert negatives_at.keys() <= positives_at.keys()
    # a negative shares its positive's user, time, context and history
    shared = ["user_id", "timestamp", "user", "hour", "dow", "hist_item_id", "hist_dt"]
    def keys(frame: pl.DataFrame) -> set[tuple[Any, ...]]:
        return {tuple(tuple(v) if isinstance(v, list) else v for v in row)
                for row in frame.select(shared).rows()}
    assert keys(neg) <= keys(pos)

    # vocabularies: only values of events before t80; everything else is out of vocabulary
    t80 = s.manifest["t80"]
    early = [r for r in distinct if r[2] < t80]
    assert set(s.vocabs["item_id"].values) <= {i for _, i, _, _ in early}
    assert set(s.vocabs["user_id"].values) <= {u for u, _, _, _ in early}
    assert set(s.vocabs["category"].values) <= {category(i) for _, i, _, _ in early}
    assert set(s.vocabs["user_segment"].values) <= {f"s{u}" for u, _, _, _ in early}
    train = s.splits["train"]
    assert set(s.vocabs["item_id"].values) == set(train["item_id"]) | set(
        train["hist_item_id"].explode().drop_nulls())
    assert set(s.vocabs["user_id"].values) == set(train["user_id"])
    item_index = s.vocabs["item_id"].index
    for r in out.iter_rows(named=True):
        assert r["item"] == item_index.get(r["item_id"], OOV)
        assert r["hist_item"] == [item_index.get(i, OOV) for i in r["hist_item_id"]]
        assert r["user"] == s.vocabs["user_id"].index.get(r["user_id"], OOV)


@settings(max_examples=80, deadline=None)
@given(rows=implicit_log, sampling=st.sampled_from(["uniform", "popularity"]))
def test_sampler_weights_are_the_events_strictly_before_t(rows: list[Row], sampling: Any) -> None:
    pool = negative_pool(prepare_events(implicit_dataset(rows)), sampling)
    for t in range(-1, 15):
        assert pool.weights(t) == brute_weights(rows, t, sampling), f"t={t}"


def test_draws_follow_the_weights() -> None:
    rows: list[Row] = [(1, 1, 0, "pv"), (2, 1, 0, "pv"), (1, 2, 1, "pv"), (3, 1, 1, "buy"),
                       (2, 3, 5, "pv")]
    events = prepare_events(implicit_dataset(rows))
    rng = np.random.default_rng(0)
    n = 40_000
    for sampling, want in (("uniform", {1: 0.5, 2: 0.5}), ("popularity", {1: 0.75, 2: 0.25})):
        pool = negative_pool(events, sampling)  # type: ignore[arg-type]
        drawn = pool.item_ids.gather(pool.draw(np.full(n, 5), rng.random(n))).to_list()
        freq = {i: c / n for i, c in Counter(drawn).items()}
        assert freq.keys() == want.keys()
        assert all(abs(freq[i] - want[i]) < 0.01 for i in want), (sampling, freq)


def test_positive_with_nothing_left_to_draw_gets_no_negative() -> None:
    # user 1 has touched, by t=2, every item the log holds before t=2
    rows: list[Row] = [(1, 1, 0, "pv"), (1, 2, 1, "pv"), (1, 3, 2, "pv"), (2, 4, 3, "pv")]
    s = build_samples(implicit_dataset(rows), SampleConfig(negatives=2))
    out = all_samples(s).sort("timestamp", "label", descending=[False, True])
    assert s.manifest["negatives_not_drawn"] == {"empty_catalogue": 2, "all_touched": 4}
    # t=3 (user 2): the catalogue {1, 2, 3}, none touched by user 2
    assert out.filter(pl.col("label") == 0)["timestamp"].to_list() == [3, 3]


def test_histories_on_a_log_large_enough_for_parallel_joins() -> None:
    """history_slices needs user-sorted rows after the item join: check against an oracle."""
    rng = np.random.default_rng(7)
    n = 300_000
    frame = pl.DataFrame({
        "user_id": rng.integers(0, 4_000, n), "item_id": rng.integers(0, 30_000, n),
        "timestamp": 1_600_000_000 + rng.integers(0, 50_000, n) * 60,  # minute grid: ties
        "action": rng.choice(["pv", "buy"], n)}).unique(["user_id", "item_id", "timestamp"],
                                                       keep="first", maintain_order=True)
    events = frame.with_columns(pl.lit(None, dtype=pl.Float64).alias("value"),
                                pl.lit(None, dtype=pl.String).alias("event_id"))
    # shuffled item table: the join must not return rows in its order either
    items = pl.DataFrame({"item_id": rng.permutation(30_000).astype(np.int64)}).with_columns(
        (pl.lit("c") + (pl.col("item_id") % 97).cast(pl.String)).alias("category"))
    users = pl.DataFrame({"user_id": np.arange(4_000, dtype=np.int64)})
    ds = Dataset("big", events, items, users, "implicit")
    s = build_samples(ds, SampleConfig(negatives=0), raw_history=True)
    out = all_samples(s)
    assert out.height == frame.height

    picked = out.sample(300, seed=3)
    mine = frame.filter(pl.col("user_id").is_in(picked["user_id"].unique().to_list()))
    by_user: dict[int, list[tuple[int, int]]] = {}
    for u, i, t in mine.select("user_id", "item_id", "timestamp").iter_rows():
        by_user.setdefault(u, []).append((t, i))
    cats = s.vocabs["category"].index
    for r in picked.iter_rows(named=True):
        ordered = sorted(by_user[r["user_id"]])
        k = ordered.index((r["timestamp"], r["item_id"]))
        earlier = ordered[max(0, k - 20):k]
        assert r["hist_item_id"] == [i for _, i in earlier]
        assert r["hist_dt"] == [r["timestamp"] - t for t, _ in earlier]
        assert r["hist_cat"] == [cats.get(f"c{i % 97}", OOV) for _, i in earlier]
