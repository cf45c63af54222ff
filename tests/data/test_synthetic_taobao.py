"""The Taobao-format mode of the synthetic generator (issue 25): actions, prices, the purchase
rule, the UserBehavior files and the conversion labels of P5 samples."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from bstrec.data.samples import SampleConfig, build_samples, sort_events, with_conversion_labels
from bstrec.data.synthetic import (
    PAD,
    TaobaoConfig,
    build_taobao_world,
    generate_taobao,
    history_matrix,
    taobao_buy_probabilities,
    write_taobao_log,
)
from bstrec.data.taobao import load_taobao
from bstrec.evaluation.metrics import auc

SMALL = TaobaoConfig(seed=3, n_users=300, views_per_user=(20, 40), n_items=600,
                     n_categories=20)


@pytest.fixture(scope="module")
def log() -> pl.DataFrame:
    return generate_taobao(SMALL).events


def test_same_seed_same_log_and_prices(log: pl.DataFrame) -> None:
    again = generate_taobao(SMALL)
    assert again.events.equals(log)
    other = generate_taobao(dataclasses.replace(SMALL, seed=4)).events
    assert not other.equals(log)
    items = again.items
    assert items.columns == ["item_id", "category", "price"]
    assert items["price"].min() > 0  # type: ignore[operator]
    assert items["price"].round(2).equals(items["price"])  # cents


def test_actions_follow_their_view(log: pl.DataFrame) -> None:
    assert set(log["action"].unique()) == {"pv", "cart", "fav", "buy"}
    diffs = log.group_by("user_id").agg((pl.col("timestamp").diff() > 0).all().alias("ok"))
    assert diffs["ok"].all()  # strictly increasing per user: P5's order is the drawn order
    # every fav, cart and buy comes after a view of the same item by the same user
    views = log.filter(pl.col("action") == "pv").group_by("user_id", "item_id").agg(
        pl.col("timestamp").min().alias("first_view"))
    rest = log.filter(pl.col("action") != "pv").join(views, on=["user_id", "item_id"],
                                                       how="left")
    assert rest["first_view"].null_count() == 0
    assert (rest["timestamp"] > rest["first_view"]).all()
    n_pv = int((log["action"] == "pv").sum())
    assert 0.03 < (log["action"] == "buy").sum() / n_pv < 0.4


def _views_with_outcome(log: pl.DataFrame, length: int) -> tuple[np.ndarray, np.ndarray,
                                                                  np.ndarray]:
    """Each view's P5 history (over every action), item and whether the next events of the
    same view hold its buy."""
    ev = sort_events(log)
    user = ev["user_id"].to_numpy()
    item = ev["item_id"].to_numpy()
    hist = history_matrix(user - 1, item, length)
    act = ev["action"].to_numpy()
    is_pv = act == "pv"
    # a view's buy is the first buy of its item before the user's next view
    view_no = np.cumsum(is_pv)
    buys = pl.DataFrame({"v": view_no[act == "buy"]})
    bought = np.isin(view_no[is_pv], buys["v"].to_numpy())
    return hist[is_pv], item[is_pv], bought


def test_buy_rule_is_what_the_generator_draws(log: pl.DataFrame) -> None:
    world = build_taobao_world(SMALL)
    hist, item, bought = _views_with_outcome(log, SMALL.history_length)
    p = taobao_buy_probabilities(world, hist, item)
    # calibrated: the rule's mean is the drawn rate, and it ranks the drawn buys
    assert abs(p.mean() - bought.mean()) < 0.02
    assert auc(bought.astype(float), p) > 0.7
    # dearer items sell less (prices do not move views, only purchases)
    price = world.price[item - 1]
    assert np.median(price[bought]) < np.median(price[~bought])


def test_buy_rule_reads_order_and_price() -> None:
    world = build_taobao_world(SMALL)
    chain = world.chain
    # a target whose category follows category a, and an item of another category b
    a = 0
    succ = int(chain.successor[a, 0])
    target = int(np.flatnonzero(chain.item_category == succ)[0]) + 1
    other_cat = next(c for c in range(SMALL.n_categories)
                     if c != a and succ not in chain.successor[c])
    item_a = int(np.flatnonzero(chain.item_category == a)[0]) + 1
    item_b = int(np.flatnonzero(chain.item_category == other_cat)[0]) + 1
    if item_a == target or item_b == target:
        pytest.skip("degenerate catalogue draw")
    ab = [PAD, item_b, item_a]  # a last: the sequel holds
    ba = [PAD, item_a, item_b]  # the same items, b last: it does not
    p = taobao_buy_probabilities(world, np.array([ab, ba]), np.array([target, target]))
    assert p[0] > p[1]
    odds = p / (1 - p)
    assert np.log(odds[0] / odds[1]) == pytest.approx(SMALL.sequel_weight)
    # revisits: the target itself in the history
    p_rev = taobao_buy_probabilities(world, np.array([[target, item_b, item_b]]),
                                     np.array([target]))
    assert p_rev[0] > p[1]
    # price: twice the price costs price_weight * ln 2 of log-odds
    dear = build_taobao_world(SMALL)
    dear.price[target - 1] *= 2
    p_dear = taobao_buy_probabilities(dear, np.array([ba]), np.array([target]))
    assert np.log(odds[1] / (p_dear[0] / (1 - p_dear[0]))) == pytest.approx(
        SMALL.price_weight * np.log(2))


def test_taobao_loader_reads_the_written_log(tmp_path: Path) -> None:
    ds = generate_taobao(SMALL)
    root = write_taobao_log(SMALL, tmp_path / "taobao")
    loaded = load_taobao(root)
    assert loaded.feedback == "implicit" and loaded.meta["prices_file"] == "item_prices.csv"
    assert sort_events(loaded.events).equals(sort_events(ds.events))
    seen = ds.items.join(loaded.items.select("item_id"), on="item_id", how="semi")
    assert loaded.items.sort("item_id").select("item_id", "category", "price").equals(
        seen.sort("item_id"))
    # without the prices file the loader is as before: no price column
    (root / "item_prices.csv").unlink()
    assert "price" not in load_taobao(root).items.columns


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="views_per_user"):
        TaobaoConfig(views_per_user=(5, 2))
    with pytest.raises(ValueError, match="n_items >= n_categories"):
        TaobaoConfig(n_items=5, n_categories=10)


def test_conversion_labels_by_hand() -> None:
    events = pl.DataFrame({
        "user_id": [1, 1, 1, 1, 2],
        "item_id": [10, 10, 11, 11, 10],
        "timestamp": [100, 150, 200, 200 + 90_000, 120],
        "action": ["pv", "buy", "pv", "buy", "buy"],
    })
    frame = pl.DataFrame({  # rows in any order: they must come back in place
        "user_id": [1, 1, 1, 2, 1],
        "item_id": [11, 10, 12, 10, 10],
        "timestamp": [200, 100, 100, 130, 160],
        "label": [1.0, 1.0, 0.0, 1.0, 1.0],
    })
    out = with_conversion_labels(frame, events)
    assert out["click"].to_list() == [1.0, 1.0, 0.0, 1.0, 1.0]
    # 11: bought 25 h later (outside 1 day); 10 at 100: bought at 150; 12: a negative;
    # user 2 bought 10 before the view at 130; 10 at 160: no buy after it
    assert out["buy"].to_list() == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert with_conversion_labels(frame, events, window_s=None)["buy"].to_list() == [
        1.0, 1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="window_s"):
        with_conversion_labels(frame, events, window_s=-1)


def test_p5_samples_of_views_carry_both_labels() -> None:
    ds = generate_taobao(SMALL)
    samples = build_samples(ds, SampleConfig(positive_actions=("pv",)))
    test = with_conversion_labels(samples.splits["test"], ds.events)
    assert (test["click"] == test["label"]).all()
    assert (test["buy"] <= test["click"]).all()  # no conversion without a click
    assert set(test.filter(pl.col("label") > 0)["action"].unique()) == {"pv"}
    rate = test.filter(pl.col("click") > 0)["buy"].mean()
    assert rate is not None and 0.02 < rate < 0.5  # type: ignore[operator]
