"""P5 ``synthetic-implicit``: a large long-tailed catalogue whose categories carry the signal,
implicit feedback with sampled negatives, determinism by seed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from bstrec.config import ConfigError
from bstrec.data import synthetic as syn
from bstrec.data.build import build
from bstrec.data.loaders import available, load_dataset
from bstrec.data.samples import SampleConfig, SampleSet, build_samples
from bstrec.data.schema import Dataset
from bstrec.evaluation.metrics import auc

SMALL = syn.ImplicitConfig(n_users=2000)
MAX_LEN = 20


def gini(counts: np.ndarray) -> float:
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n = x.shape[0]
    return float((2 * np.arange(1, n + 1) - n - 1) @ x / (n * x.sum()))


def test_gini_helper() -> None:
    assert gini(np.ones(10)) == 0.0
    assert gini(np.r_[np.zeros(99), 1.0]) == pytest.approx(0.99)


@pytest.fixture(scope="module")
def small() -> Dataset:
    return syn.generate_implicit(SMALL)


@pytest.fixture(scope="module")
def samples(small: Dataset) -> SampleSet:
    return build_samples(small, SampleConfig(max_len=MAX_LEN), raw_history=True)


def left_padded(histories: list[list[int]]) -> np.ndarray:
    out = np.zeros((len(histories), MAX_LEN), dtype=np.int64)
    for i, h in enumerate(histories):
        if h:
            out[i, MAX_LEN - len(h):] = h
    return out


def test_default_catalogue_is_large() -> None:
    c = syn.ImplicitConfig()
    assert c.n_items >= 50_000
    world = syn.build_implicit_world(c)
    assert world.n_items == c.n_items
    assert np.all(np.diff(world.item_category) >= 0)
    assert np.bincount(world.item_category).min() >= 1


def test_schema_and_actions(small: Dataset) -> None:
    assert small.name == "synthetic-implicit"
    assert small.feedback == "implicit"
    ev = small.events
    assert ev.height == small.summary()["events"]
    assert set(ev["action"].unique()) == set(syn.ACTIONS)
    assert ev["value"].null_count() == ev.height
    assert small.items.height == SMALL.n_items
    assert small.items["category"].null_count() == 0
    lo, hi = SMALL.events_per_user
    per_user = ev.group_by("user_id").len()["len"].to_numpy()
    assert per_user.min() >= lo and per_user.max() <= hi
    # strictly increasing per user: the drawn order is P5's (timestamp, item id) order
    steps = ev.select(pl.col("timestamp").diff().over("user_id").drop_nulls())
    assert steps["timestamp"].to_numpy().min() > 0


def test_repeats_turn_views_into_carts_and_buys(small: Dataset) -> None:
    ev = small.events.with_columns(
        (pl.col("item_id") == pl.col("item_id").shift(1).over("user_id")).alias("repeat"))
    buy_rate = ev.group_by("repeat").agg((pl.col("action") == "buy").mean()).sort("repeat")
    fresh, repeat = buy_rate["action"].to_list()[-2:]
    assert repeat > 5 * fresh


def test_same_seed_same_frames_other_seed_other_frames() -> None:
    cfg = syn.ImplicitConfig(n_users=100, n_items=2000, n_categories=50)
    a, b = syn.generate_implicit(cfg), syn.generate_implicit(cfg)
    assert a.events.equals(b.events) and a.items.equals(b.items)
    c = syn.generate_implicit(dataclasses.replace(cfg, seed=1))
    assert not a.events.equals(c.events)


def test_long_tailed_popularity(small: Dataset) -> None:
    counts = np.bincount(small.events["item_id"].to_numpy(), minlength=SMALL.n_items + 1)[1:]
    top = np.sort(counts)[::-1]
    assert top[: SMALL.n_items // 100].sum() / counts.sum() > 0.25  # the top 1% of items
    assert gini(counts) > 0.8
    cat_counts = small.events.join(small.items, on="item_id").group_by("category").len()["len"]
    assert gini(cat_counts.to_numpy()) > 0.5


def test_samples_are_p5_with_sampled_negatives(samples: SampleSet) -> None:
    rows = pl.concat(list(samples.splits.values()))
    pos, neg = rows.filter(pl.col("label") == 1), rows.filter(pl.col("label") == 0)
    assert pos["action"].null_count() == 0 and neg["action"].null_count() == neg.height
    # one negative per positive, except where the catalogue as of t was empty or exhausted
    missing = samples.manifest["negatives_not_drawn"]
    assert neg.height == pos.height - missing["empty_catalogue"] - missing["all_touched"]
    assert missing["empty_catalogue"] <= 1
    # a negative is an item the user had not touched at or before its time
    touched = pos.select("user_id", "item_id", pl.col("timestamp").alias("t_pos"))
    clash = neg.join(touched, on=["user_id", "item_id"]).filter(
        pl.col("t_pos") <= pl.col("timestamp"))
    assert clash.height == 0


@pytest.fixture(scope="module")
def valid_scores(small: Dataset, samples: SampleSet) -> dict[str, np.ndarray]:
    world = syn.build_implicit_world(SMALL)
    train, valid = samples.splits["train"], samples.splits["valid"]
    counts = train.filter(pl.col("label") == 1).group_by("item_id").len()
    v = valid.join(counts, on="item_id", how="left").with_columns(pl.col("len").fill_null(0))
    hist = left_padded(v["hist_item_id"].to_list())
    items = v["item_id"].to_numpy()
    rng = np.random.default_rng(0)
    shuffled = np.take_along_axis(hist, rng.permuted(np.tile(np.arange(MAX_LEN), (len(hist), 1)),
                                                     axis=1), axis=1)
    # shuffling moves pads too; the oracle reads only non-pad slots of the last columns
    return {
        "label": v["label"].to_numpy(),
        "oracle": syn.implicit_oracle_log_probabilities(world, hist, items),
        "shuffled": syn.implicit_oracle_log_probabilities(world, shuffled, items),
        "popularity": v["len"].to_numpy().astype(np.float64),
    }


def test_categories_and_order_carry_the_signal(valid_scores: dict[str, np.ndarray]) -> None:
    y = valid_scores["label"]
    oracle = auc(y, valid_scores["oracle"])
    popularity = auc(y, valid_scores["popularity"])
    shuffled = auc(y, valid_scores["shuffled"])
    assert popularity > 0.65  # the long tail alone tells positives from uniform negatives
    assert oracle > popularity + 0.1
    assert oracle > shuffled + 0.08  # the last behaviours, in order, are what the rule reads


def test_oracle_rule_by_hand() -> None:
    cfg = syn.ImplicitConfig(n_users=1, n_items=40, n_categories=4, successors=1,
                             category_source_weights=(0.5, 0.2, 0.1, 0.2), repeat_prob=0.1,
                             recent_window=2)
    w = syn.build_implicit_world(cfg)
    last = 1  # item id 1 is in category 0
    succ = int(w.successor[0, 0])
    target = int(np.flatnonzero(w.item_category == succ)[0]) + 1
    got = syn.implicit_oracle_log_probabilities(w, [[0, last]], [target])[0]
    p_cat = (0.5 + 0.2 * (succ == 0) + 0.1 * (succ == 0)
             + 0.2 * w.category_popularity[succ])
    expected = 0.9 * p_cat * w.item_popularity[target - 1] + 0.1 * (target == last)
    assert got == pytest.approx(np.log(expected))
    empty = syn.implicit_oracle_log_probabilities(w, [[0, 0]], [target])[0]
    assert empty == pytest.approx(np.log(w.category_popularity[succ]
                                         * w.item_popularity[target - 1]))


def test_config_is_typed_and_checked() -> None:
    with pytest.raises(ValueError, match="n_items >= n_categories"):
        syn.ImplicitConfig(n_items=10, n_categories=20)
    with pytest.raises(ConfigError, match="unknown keys"):
        load_dataset("synthetic-implicit", None, n_user=5)


def test_registered_for_data_build(tmp_path: Path) -> None:
    assert available("synthetic-implicit", None)
    options = {"n_users": "60", "n_items": "3000", "n_categories": "30", "seed": 2}
    s = build("synthetic-implicit", tmp_path / "out", dataset_options=options)
    assert s.manifest["dataset"] == "synthetic-implicit"
    assert s.manifest["protocol"] == "synthetic-implicit"  # named like synthetic-order
    # P5's sample defaults, as taobao-ctr takes them: histories of 20, one uniform negative
    cfg = s.manifest["config"]
    assert (cfg["max_len"], cfg["negatives"], cfg["negative_sampling"]) == (20, 1, "uniform")
    assert (tmp_path / "out" / "manifest.json").exists()
    assert s.splits["train"]["label"].min() == 0.0
