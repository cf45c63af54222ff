"""P4 synthetic-order: determinism, schema, time, catalog structure and, above all, that the
label's signal lives in the ORDER of the history."""

from __future__ import annotations

import dataclasses

import numpy as np
import numpy.typing as npt
import polars as pl
import pytest

from bstrec.data import synthetic as syn
from bstrec.data.schema import Dataset

HIST = 20
SMALL = syn.SyntheticConfig(n_users=200)


def auc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Rank-based AUC (Mann-Whitney) with average ranks for ties."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based average rank of each distinct score
    ranks = avg_rank[inv]
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_auc_helper() -> None:
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auc([0, 1], [0.5, 0.5]) == 0.5
    assert auc([1, 0, 1, 0], [0.9, 0.8, 0.1, 0.2]) == 0.5


@pytest.fixture(scope="module")
def default() -> Dataset:
    return syn.generate()


@pytest.fixture(scope="module")
def p1(default: Dataset) -> dict[str, np.ndarray]:
    """P1 samples built here, independently of the generator: order by (timestamp, item id) per
    user, history = previous up to 20 events, oldest first (column 0 = oldest), 0 = empty."""
    ds = default
    ev = ds.events.sort("user_id", "timestamp", "item_id")
    shifted = ev.select(
        [pl.col("item_id").shift(k).over("user_id").fill_null(0).alias(f"h{k}")
         for k in range(HIST, 0, -1)]
    )
    return {
        "user": ev["user_id"].to_numpy(),
        "item": ev["item_id"].to_numpy(),
        "label": ev["value"].to_numpy() >= 1.0,
        "hist": shifted.to_numpy().astype(np.int64),
    }


# --- config -----------------------------------------------------------------------------------

def test_from_dict_rejects_unknown_keys_and_converts_lists() -> None:
    cfg = syn.SyntheticConfig.from_dict({"seed": 3, "events_per_user": [5, 9]})
    assert cfg.seed == 3 and cfg.events_per_user == (5, 9)
    with pytest.raises(ValueError, match="unknown keys \\['n_user'\\]"):
        syn.SyntheticConfig.from_dict({"n_user": 10})
    with pytest.raises(TypeError):
        syn.SyntheticConfig(n_user=10)  # type: ignore[call-arg]


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="noise_rate"):
        syn.SyntheticConfig(noise_rate=1.5)
    with pytest.raises(ValueError, match="events_per_user"):
        syn.SyntheticConfig(events_per_user=(10, 5))


# --- determinism and schema ---------------------------------------------------------------------

def test_same_seed_same_frames_other_seed_other_frames() -> None:
    a, b = syn.generate(SMALL), syn.generate(SMALL)
    for table in ("events", "items", "users"):
        assert getattr(a, table).equals(getattr(b, table)), table
    c = syn.generate(dataclasses.replace(SMALL, seed=1))
    assert not a.events.equals(c.events)


def test_schema(default: Dataset) -> None:
    ds = default
    ds.validate()
    assert ds.name == "synthetic-order" and ds.feedback == "explicit"
    assert ds.events.schema == pl.Schema({
        "user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64, "action": pl.String,
        "value": pl.Float64, "event_id": pl.String})
    assert ds.items.schema == pl.Schema({"item_id": pl.Int64, "category": pl.String,
                                         "kind": pl.String, "family": pl.String})
    assert ds.users.schema["user_id"] == pl.Int64
    assert set(ds.user_features) <= set(ds.users.columns)
    assert set(ds.item_features) <= set(ds.items.columns)
    assert set(ds.events["value"].unique().to_list()) == {0.0, 1.0}
    assert ds.events["item_id"].is_in(ds.items["item_id"].implode()).all()
    assert ds.events["user_id"].is_in(ds.users["user_id"].implode()).all()
    # Accessories are impressions, everything else a view.
    kinds = ds.events.join(ds.items, on="item_id").select(
        ((pl.col("kind") == "accessory") == (pl.col("action") == "impression")).all())
    assert kinds.item()


def test_size_and_positive_rate(default: Dataset) -> None:
    ds = default
    assert ds.events["user_id"].n_unique() == 3000
    assert 150_000 <= ds.events.height <= 250_000
    assert 0.2 < ds.events["value"].mean() < 0.45  # type: ignore[operator]


# --- time ---------------------------------------------------------------------------------------

def test_timestamps(default: Dataset) -> None:
    ds = default
    ev = ds.events
    assert ev["timestamp"].min() >= 1704067200  # type: ignore[operator]
    assert ev["timestamp"].max() < 1704067200 + 100 * 86400  # type: ignore[operator]
    # Strictly increasing per user in log order, so P1's (timestamp, item id) order is the
    # order the generator drew (and the order the labels read).
    gaps = ev.select(pl.col("timestamp").diff().over("user_id").alias("gap"),
                     pl.col("timestamp")).drop_nulls()
    assert gaps["gap"].min() >= 1  # type: ignore[operator]
    g = gaps["gap"].to_numpy()
    within, between = g[g < 3600], g[g >= 3600]
    assert 10 < np.median(within) < 600  # seconds to minutes inside a session
    assert 3 * 3600 < np.median(between) < 14 * 86400  # hours to days between sessions
    # Drift: sessions gaps in the last third of the period are longer than in the first.
    t = gaps.filter(pl.col("gap") >= 3600)["timestamp"].to_numpy()
    lo, hi = np.quantile(t, [1 / 3, 2 / 3])
    assert np.median(between[t >= hi]) > 1.2 * np.median(between[t < lo])


# --- catalog ------------------------------------------------------------------------------------

def test_catalog_structure(default: Dataset) -> None:
    ds = default
    items = ds.items
    assert set(items["kind"].unique().to_list()) == {"device", "accessory", "filler"}
    device_families = set(items.filter(pl.col("kind") == "device")["family"].to_list())
    acc = items.filter(pl.col("kind") == "accessory")
    assert set(acc["family"].to_list()) <= device_families
    assert (items.filter(pl.col("kind") == "filler")["family"] == "none").all()
    # The family is not the category: a category spans several families.
    per_cat = acc.group_by("category").agg(pl.col("family").n_unique())
    assert (per_cat["family"] > 1).all()


def test_popularity_skew(default: Dataset) -> None:
    ds = default
    counts = np.sort(ds.events["item_id"].value_counts()["count"].to_numpy())[::-1]
    top = counts[: max(1, ds.items.height // 10)].sum() / counts.sum()
    assert top > 0.4  # uniform would give 0.1


def test_generator_labels_follow_the_oracle(p1: dict[str, np.ndarray]) -> None:
    """The history here is built independently; the generator's own helper must agree."""
    world = syn.build_world()
    idx = p1["user"] - 1
    assert np.array_equal(syn.history_matrix(idx, p1["item"], HIST), p1["hist"])
    p = syn.oracle_probabilities(world, p1["hist"], p1["item"], p1["user"])
    # Calibration by decile: the labels were drawn from these probabilities.
    deciles = np.quantile(p, np.linspace(0, 1, 11))
    bins = np.clip(np.searchsorted(deciles, p, side="right") - 1, 0, 9)
    for b in range(10):
        m = bins == b
        assert abs(p1["label"][m].mean() - p[m].mean()) < 0.02


# --- the order signal ---------------------------------------------------------------------------

def _shuffle_rows(hist: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    key = rng.random(hist.shape)
    key[hist == syn.PAD] = -1.0  # pads stay first
    return np.take_along_axis(hist, np.argsort(key, axis=1), axis=1)


def test_order_is_information(p1: dict[str, np.ndarray]) -> None:
    world = syn.build_world()
    hist, item, user, y = p1["hist"], p1["item"], p1["user"], p1["label"]
    ordered = syn.oracle_probabilities(world, hist, item, user)
    shuffled = syn.oracle_probabilities(world, _shuffle_rows(hist, np.random.default_rng(0)),
                                        item, user)
    # Order-blind: everything the oracle uses except the order, i.e. "a device of the target
    # accessory's family is somewhere in the history", on top of the no-order terms.
    h = np.maximum(hist - 1, 0)
    t = item - 1
    present = ((hist > 0) & (world.kind[h] == syn.DEVICE)
               & (world.family[h] == world.family[t][:, None])).any(axis=1)
    blind = present & (world.kind[t] == syn.ACCESSORY)
    auc_ordered, auc_shuffled, auc_blind = auc(y, ordered), auc(y, shuffled), auc(y, blind)
    print(f"oracle AUC ordered {auc_ordered:.4f} shuffled {auc_shuffled:.4f} "
          f"device-present {auc_blind:.4f}")
    assert auc_ordered > 0.85
    assert auc_ordered - auc_shuffled >= 0.05
    assert auc_ordered - auc_blind >= 0.05
    # Where the order is all there is: accessory targets whose family's device is in the history
    # together with another family's device. Same presence, the order decides.
    is_dev = (hist > 0) & (world.kind[h] == syn.DEVICE)
    other = (is_dev & (world.family[h] != world.family[t][:, None])).any(axis=1)
    amb = blind & other
    assert amb.mean() > 0.2  # a large share of all samples
    assert 0.3 < y[amb].mean() < 0.7
    assert auc(y[amb], ordered[amb]) > 0.8
    assert auc(y[amb], shuffled[amb]) < 0.7


def test_oracle_rule_on_hand_made_histories() -> None:
    world = syn.build_world(SMALL)
    kind, fam = world.kind, world.family

    def first(k: int, f: int) -> int:
        return int(np.flatnonzero((kind == k) & (fam == f))[0]) + 1

    dev_a, dev_b = first(syn.DEVICE, 0), first(syn.DEVICE, 1)
    acc_b = first(syn.ACCESSORY, 1)
    filler = int(np.flatnonzero(kind == syn.FILLER)[0]) + 1

    def prob(h: list[int]) -> float:
        return syn.oracle_probability(world, h, acc_b)

    after_own = prob([dev_a, dev_b, filler])  # its device is the most recent device
    after_other = prob([dev_b, dev_a, filler])  # same items, another device came after
    before_device = prob([acc_b, dev_a, filler])  # accessory seen before, no own device
    nothing = prob([dev_a, filler, filler])
    assert after_own > 0.5 > after_other
    assert after_own - after_other > 0.4
    assert after_other > nothing  # presence alone counts a little (c)
    assert before_device < after_other
    # Padding anywhere is ignored; vectorised and scalar forms agree.
    padded = np.array([[0, dev_a, 0, dev_b, filler], [dev_a, dev_b, filler, 0, 0]])
    both = syn.oracle_probabilities(world, padded, [acc_b, acc_b])
    assert np.allclose(both, after_own)
    # A device target gains nothing from its own accessory before it (an accessory after its
    # device sells, not a device after its accessory): its own family's accessory counts only
    # as much as another family's of the same product line (b).
    acc_same_line = first(syn.ACCESSORY, 1 + SMALL.n_lines)
    assert world.line[acc_same_line - 1] == world.line[acc_b - 1]
    assert syn.oracle_probability(world, [acc_b, filler], dev_b) == pytest.approx(
        syn.oracle_probability(world, [acc_same_line, filler], dev_b))
    with pytest.raises(ValueError):
        syn.oracle_probabilities(world, np.zeros((2, 3), dtype=np.int64), [acc_b])
