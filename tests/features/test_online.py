"""Training/serving skew: what the service computes from the store equals the offline samples.

The store is seeded the way serving seeds it (``load_dataset`` up to a cut time), then each
user's later events are replayed in the behaviour order: before appending an event to the store
(the POST /events path), the online features of its sample(s) (target = the candidate, request
time = the sample time) are computed from the store and compared field by field, and as tensors,
with the rows ``build_samples`` wrote.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from bstrec.data.movielens import load_ml100k
from bstrec.data.samples import SPLITS, SampleConfig, SampleSet, build_samples, sort_events
from bstrec.data.schema import Dataset
from bstrec.features.online import FeatureColumns, OnlineFeatures
from bstrec.features.spec import OOV
from bstrec.features.store import Event, FeatureStore, UserSnapshot
from bstrec.training.tensors import Batch, to_tensors
from tests.conftest import require
from tests.features.conftest import StoreFactory


def fixture_dataset(seed: int = 0) -> Dataset:
    """A small log with what can go wrong: string ids, many same-second ties and repeats, an
    item missing from the item table, items without category, a user without profile, a
    categorical and a multi-hot item attribute, implicit feedback (sampled negatives)."""
    rng = np.random.default_rng(seed)
    n = 700
    users = rng.integers(0, 25, n)
    items = rng.integers(0, 40, n)
    ts = 1_700_000_000 + rng.integers(0, 400, n) * 60  # minute grid: many ties
    events = pl.DataFrame({
        "user_id": [f"u{u:02d}" for u in users], "item_id": [f"i{i:02d}" for i in items],
        "timestamp": ts.astype(np.int64), "action": rng.choice(["view", "buy"], n).tolist(),
        "value": [None] * n, "event_id": [None] * n},
        schema_overrides={"value": pl.Float64, "event_id": pl.String})
    catalog = [f"i{i:02d}" for i in range(39)]  # i39 has no catalogue entry
    item_table = pl.DataFrame({
        "item_id": catalog,
        "category": [None if i % 7 == 0 else f"c{i % 5}" for i in range(39)],
        "brand": [f"b{i % 4}" if i % 9 else None for i in range(39)],
        "tags": [[f"t{(i + k) % 6}" for k in range(i % 3)] for i in range(39)]})
    user_table = pl.DataFrame({"user_id": [f"u{u:02d}" for u in range(24)],  # u24: no profile
                               "segment": [f"s{u % 3}" for u in range(24)]})
    return Dataset("fixture", events, item_table, user_table, "implicit",
                   user_features=("segment",), item_features=("brand",),
                   item_multi_features=("tags",))


def all_rows(samples: SampleSet) -> pl.DataFrame:
    return pl.concat([samples.splits[s] for s in SPLITS])


def seed_shuffled(store: FeatureStore, dataset: Dataset, cut: int, seed: int) -> None:
    """Profiles and items as the bulk load puts them, then the events before ``cut`` appended
    in a random order, a random number at a time: the store must order and cap them itself."""
    store.load_dataset(dataset, until=-(2**62))  # profiles and items only
    early = dataset.events.filter(pl.col("timestamp") < cut).with_row_index("k")
    rng = np.random.default_rng(seed)
    rows = early.select("user_id", "item_id", "timestamp", "k").rows()
    order = rng.permutation(len(rows))
    i = 0
    while i < len(order):
        step = int(rng.integers(1, 40))
        store.append_many([Event(u, it, t, f"early-{k}") for u, it, t, k in
                           (rows[j] for j in order[i:i + step])])
        i += step


def replay(store: FeatureStore, dataset: Dataset, samples: SampleSet, cut: int,
           users: list[object], max_requests: int, shuffled: bool = False,
           per_user: int = 10**9) -> Iterator[tuple[pl.DataFrame, pl.DataFrame, Batch]]:
    """Seed the store up to ``cut`` (the bulk load, or shuffled appends), then per user and event
    from ``cut`` on: yield (offline rows of the event's samples, online rows for their targets,
    the serving path's tensors for them: ``query_row`` + ``candidate_batch``), then append the
    event."""
    online = OnlineFeatures(samples.vocabs, samples.spec)
    if shuffled:
        seed_shuffled(store, dataset, cut, seed=0)
    else:
        store.load_dataset(dataset, until=cut)
    rows = all_rows(samples).filter(pl.col("timestamp") >= cut)
    later = sort_events(dataset.events.filter(pl.col("timestamp") >= cut))
    done = 0
    for user in users:
        mine = rows.filter(pl.col("user_id") == user)
        events = later.filter(pl.col("user_id") == user)
        pos = k = 0
        for k, (item, ts) in enumerate(events.select("item_id", "timestamp").iter_rows()):
            if k == per_user:
                break
            # this event's samples: its positive (or rated) row and, implicit, its negatives
            group = mine.slice(pos, 1)
            assert group["item_id"][0] == item and group["timestamp"][0] == ts
            pos += 1
            while pos < mine.height and mine["label"][pos] == 0 and dataset.feedback == "implicit":
                group = pl.concat([group, mine.slice(pos, 1)])
                pos += 1
            cands = group["item_id"].to_list()
            got = online.rows_from_store(store, user, cands, ts)  # type: ignore[arg-type]
            snap = store.snapshot(user)  # type: ignore[arg-type]
            items = store.items(online.item_ids_needed(snap, cands))
            served = online.candidate_batch(online.query_row(snap, items, cands[0], ts), items,
                                            cands)
            yield group, got, served
            store.append(Event(user, item, ts, f"live-{user}-{k}"))  # type: ignore[arg-type]
            done += 1
            if done >= max_requests:
                return
        assert pos == mine.height or k == per_user


def assert_same(offline: pl.DataFrame, online: pl.DataFrame, online_features: OnlineFeatures) -> None:
    cols = online_features.row_columns
    assert online.columns == cols
    assert online.schema == offline.select(cols).schema
    for a, b in zip(offline.select(cols).iter_rows(named=True), online.iter_rows(named=True),
                    strict=True):
        for c in cols:
            assert a[c] == b[c], f"skew in {c}: offline {a[c]!r} online {b[c]!r} (sample {a})"
    want = to_tensors(offline, online_features.spec)
    del want["label"]
    got = online_features.tensors(online)
    assert want.keys() == got.keys()
    for key in want:
        assert want[key].dtype == got[key].dtype and torch.equal(want[key], got[key]), key


def run_skew(store: FeatureStore, dataset: Dataset, samples: SampleSet, users: list[object],
             max_requests: int, shuffled: bool = False, per_user: int = 10**9) -> int:
    cut = int(samples.manifest["t80"])
    online = OnlineFeatures(samples.vocabs, samples.spec)
    n = 0
    for offline, got, served in replay(store, dataset, samples, cut, users, max_requests,
                                       shuffled, per_user):
        assert_same(offline, got, online)
        want = to_tensors(offline, online.spec)
        del want["label"]
        assert want.keys() == served.keys()
        for key in want:
            assert want[key].dtype == served[key].dtype and torch.equal(want[key], served[key]), \
                f"serving path skew in {key}: offline {want[key]} online {served[key]}"
        n += offline.height
    return n


@pytest.fixture(scope="module")
def fixture_samples() -> tuple[Dataset, SampleSet]:
    ds = fixture_dataset()
    return ds, build_samples(ds, SampleConfig(max_len=4, negatives=2))


@pytest.fixture
def fixture_store(fixture_samples: tuple[Dataset, SampleSet]) -> Iterator[FeatureStore]:
    """An in-memory embedded store holding the whole fixture dataset (each test its own)."""
    from bstrec.features.store_embedded import EmbeddedStore

    with EmbeddedStore(":memory:", max_events=5) as store:
        store.load_dataset(fixture_samples[0])
        yield store


@pytest.mark.parametrize("shuffled", [False, True], ids=["bulk-load", "shuffled-appends"])
def test_skew_fixture_dataset(make_store: StoreFactory, shuffled: bool,
                              fixture_samples: tuple[Dataset, SampleSet]) -> None:
    ds, samples = fixture_samples
    # a cap just above max_len: the store's trimming must keep exactly what the window reads
    store, _ = make_store(max_events=5)
    users = sorted(all_rows(samples).filter(pl.col("timestamp") >= samples.manifest["t80"])
                   ["user_id"].unique().to_list())
    n = run_skew(store, ds, samples, users, max_requests=10_000, shuffled=shuffled)
    assert n > 250  # every later event of every user, with its negatives
    # the fixture does reach the edge cases it is for
    rows = all_rows(samples)
    assert (rows["user"] == OOV).any() and (rows["item"] == OOV).any()
    assert (rows["hist_dt"].list.min() == 0).any(), "no same-second history entry"


def test_skew_ml100k(make_store: StoreFactory) -> None:
    root = require("ml-100k", "u.data*", "u.item", "u.user", "u.genre")
    ds = load_ml100k(root)
    samples = build_samples(ds)
    store, _ = make_store(max_events=25)
    later = all_rows(samples).filter(pl.col("timestamp") >= samples.manifest["t80"])
    users = later.group_by("user_id").len().sort(["len", "user_id"], descending=True)["user_id"]
    # busy users (long histories, ties) and a few with a handful of later events
    chosen = [*users[:3].to_list(), *users[-40:].to_list()]
    n = run_skew(store, ds, samples, chosen, max_requests=120, per_user=25)
    assert n == 120


def test_skew_test_detects_a_tie_order_skew(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            fixture_samples: tuple[Dataset, SampleSet]) -> None:
    """Negative control: order same-second behaviours by item id DEScending in the online path,
    and the skew test must fail (the fixture's histories do hold such ties)."""
    import bstrec.features.online as online_mod
    from bstrec.features.store_embedded import EmbeddedStore

    def wrong_order(events: pl.DataFrame) -> pl.DataFrame:
        return events.sort(["user_id", "timestamp", "item_id"], descending=[False, False, True])

    monkeypatch.setattr(online_mod, "sort_events", wrong_order)
    ds, samples = fixture_samples
    users = sorted(all_rows(samples)["user_id"].unique().to_list())
    with EmbeddedStore(tmp_path / "s.sqlite", max_events=5) as store, \
            pytest.raises(AssertionError, match="skew in hist_"):
        run_skew(store, ds, samples, users, max_requests=10_000, shuffled=True)


def test_skew_test_detects_a_tie_order_skew_in_the_serving_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        fixture_samples: tuple[Dataset, SampleSet]) -> None:
    """The same negative control for ``query_row``'s frame-free behaviour order."""
    import bstrec.features.online as online_mod
    from bstrec.features.store_embedded import EmbeddedStore

    def wrong_order(timestamps: list[int], item_ids: list[str]) -> list[int]:
        # same-second behaviours by item id descending (sorted is stable)
        by_item = sorted(range(len(timestamps)), key=lambda j: item_ids[j], reverse=True)
        return sorted(by_item, key=lambda j: timestamps[j])

    monkeypatch.setattr(online_mod, "behaviour_order", wrong_order)
    ds, samples = fixture_samples
    users = sorted(all_rows(samples)["user_id"].unique().to_list())
    with EmbeddedStore(tmp_path / "s.sqlite", max_events=5) as store, \
            pytest.raises(AssertionError, match="serving path skew in hist_"):
        run_skew(store, ds, samples, users, max_requests=10_000, shuffled=True)


def test_rows_for_many_candidates_share_user_history_and_context(
        fixture_samples: tuple[Dataset, SampleSet], fixture_store: FeatureStore) -> None:
    samples = fixture_samples[1]
    store = fixture_store
    online = OnlineFeatures(samples.vocabs, samples.spec)
    cands = ["i03", "i39", "nope", "i03"]
    rows = online.rows_from_store(store, "u01", cands, 1_800_000_000)
    assert rows["item_id"].to_list() == cands and rows.height == 4
    for c in ("user", "user_segment", "hour", "dow", "hist_item", "hist_cat", "hist_dt"):
        assert rows[c].n_unique() == 1, c
    assert rows["hist_item"][0].len() == 4
    assert rows["item"].to_list()[1:3] == [OOV, OOV]  # not in the catalogue / unknown
    batch = online.tensors(rows)
    assert batch["hist_item"].shape == (4, 4) and "label" not in batch
    # an unknown user with no behaviours: empty history, everything user-side out of vocabulary
    empty = online.rows(UserSnapshot("ghost", (), None), {}, ["i01"], 1_800_000_000)
    assert empty["user"].to_list() == [OOV] and empty["hist_item"].to_list() == [[]]
    assert online.tensors(empty)["hist_mask"].sum() == 0
    none = online.rows_from_store(store, "u01", [], 1_800_000_000)
    assert none.height == 0 and none.schema == rows.schema
    # a store that keeps fewer behaviours than the ranker's window would cut histories short
    from bstrec.features.store_embedded import EmbeddedStore

    with EmbeddedStore(":memory:", max_events=3) as short, pytest.raises(ValueError, match="fewer"):
        online.rows_from_store(short, "u01", ["i01"], 1_800_000_000)


def test_feature_columns_from_spec_match_the_dataset(
        fixture_samples: tuple[Dataset, SampleSet]) -> None:
    ds, samples = fixture_samples
    spec = samples.spec
    cols = FeatureColumns.from_spec(spec)
    assert (cols.user_features, cols.item_features, cols.item_multi_features) == (
        ds.user_features, ds.item_features, ds.item_multi_features)


def test_encoding_cache_never_changes_rows_and_follows_store_updates(
        fixture_samples: tuple[Dataset, SampleSet], fixture_store: FeatureStore) -> None:
    samples = fixture_samples[1]
    store = fixture_store
    plain = OnlineFeatures(samples.vocabs, samples.spec, cache_size=0)
    tiny = OnlineFeatures(samples.vocabs, samples.spec, cache_size=2)
    cached = OnlineFeatures(samples.vocabs, samples.spec)
    cands = ["i01", "i05", "i39", "i11", "i05"]
    for user in ["u01", "u02", "u01", "u24", "ghost", "u02"]:
        want = plain.rows_from_store(store, user, cands, 1_800_000_000)
        for online in (tiny, cached):
            assert online.rows_from_store(store, user, cands, 1_800_000_000).equals(want)
    # the store changes an item's attributes and a profile: the cache must not serve old codes
    brand = samples.vocabs["item_brand"].values
    old = cached.rows_from_store(store, "u01", ["i05"], 1_800_000_000)
    store.put_items({"i05": {**store.items(["i05"])["i05"], "brand": "never-seen"}})
    store.put_profiles({"u01": {"segment": "never-seen"}})
    new = cached.rows_from_store(store, "u01", ["i05"], 1_800_000_000)
    assert old["item_brand"].to_list() != [OOV] and "never-seen" not in brand
    assert new["item_brand"].to_list() == [OOV] and new["user_segment"].to_list() == [OOV]
    assert new.equals(plain.rows_from_store(store, "u01", ["i05"], 1_800_000_000))


def test_candidate_batch_from_the_query_row_equals_the_full_rows(
        fixture_samples: tuple[Dataset, SampleSet], fixture_store: FeatureStore) -> None:
    samples = fixture_samples[1]
    store = fixture_store
    online = OnlineFeatures(samples.vocabs, samples.spec)
    cands = ["i01", "i05", "i39", "nope", "i11", "i05", "i07"]
    # the request time cuts a history (later behaviours are not history) or keeps it whole
    for user, ts in itertools.product(["u01", "u02", "u24", "ghost"], [1_700_012_000,
                                                                      1_800_000_000]):
        snap = store.snapshot(user)
        items = store.items(online.item_ids_needed(snap, cands))
        query = online.tensors(online.rows(snap, items, ["i02"], ts))
        fast = online.query_row(snap, items, "i02", ts)
        assert fast.keys() == query.keys()
        for name, t in query.items():
            assert fast[name].dtype == t.dtype and torch.equal(fast[name], t), (user, name)
        # the items of the history window (and the probe) are all the query row reads
        window = online.query_row(snap, store.items(online.item_ids_needed(snap, ["i02"], ts)),
                                  "i02", ts)
        for name in set(query) - set(online.item_names):
            assert torch.equal(window[name], query[name]), (user, name)
        for subset in (cands, cands[:1], cands[2:4], []):
            want = online.tensors(online.rows(snap, items, subset, ts))
            got = online.candidate_batch(query, items, subset)
            assert got.keys() == want.keys()
            for name, t in want.items():
                assert got[name].dtype == t.dtype and torch.equal(got[name], t), (user, name)


def test_item_table_rows_equal_item_inputs_and_follow_updates(
        fixture_samples: tuple[Dataset, SampleSet], fixture_store: FeatureStore) -> None:
    """ItemTable (the catalogue's item inputs as arrays) gives what item_inputs gives, for
    known, featureless, unknown and repeated items, the query row too; ``updated`` re-encodes
    the items given and leaves the old table as it was."""
    samples = fixture_samples[1]
    store = fixture_store
    from bstrec.features.online import ItemTable
    online = OnlineFeatures(samples.vocabs, samples.spec)
    catalogue = store.items(samples.vocabs["item_id"].values)
    table = ItemTable.build(online, catalogue)

    def same(a: Batch, b: Batch) -> None:
        assert a.keys() == b.keys()
        for name, t in b.items():
            assert a[name].dtype == t.dtype and torch.equal(a[name], t), name

    for cands in (["i01", "i05", "i39", "nope", "i11", "i05", "i07"], ["i00"], []):
        want = online.item_inputs(catalogue, cands)
        same(table.inputs_of(cands), want)
        if all(c in samples.vocabs["item_id"].index for c in cands):
            same(table.inputs(table.indices(cands)), want)
    for user in ["u01", "u02", "u24", "ghost"]:
        snap = store.snapshot(user)
        same(online.query_row(snap, table, "i02", 1_800_000_000),
             online.query_row(snap, catalogue, "i02", 1_800_000_000))
    new = {**catalogue["i05"], "brand": "never-seen", "tags": ["t1", "t2", "t3", "t4", "t5"],
           "category": "c-new"}
    newer = table.updated({"i05": new}, ("e", 1))
    changed = {**catalogue, "i05": new}
    same(newer.inputs_of(["i05", "i01"]), online.item_inputs(changed, ["i05", "i01"]))
    assert newer.categories[newer.indices(["i05"])[0]] == "c-new" and newer.version == ("e", 1)
    same(table.inputs_of(["i05"]), online.item_inputs(catalogue, ["i05"]))  # unchanged
    # a full re-read starts from a base: items it lacks lose their features (OOV)
    rebuilt = table.updated({"i01": catalogue["i01"]}, ("f", 1), base={})
    same(rebuilt.inputs_of(["i01", "i05"]), online.item_inputs({"i01": catalogue["i01"]},
                                                              ["i01", "i05"]))


def test_a_behaviour_takes_its_category_from_the_item_features_the_target_reads(
        make_store: StoreFactory, fixture_samples: tuple[Dataset, SampleSet]) -> None:
    """An event ingested while its item had category A, then the item put with category B:
    every path of a request (rows, the query row from a mapping and from an item table,
    updated the way serving updates it) gives B to the history entry and to the candidate,
    for an item of the vocabulary and for one outside it (history only: as a target it is
    out of vocabulary), on both backends."""
    from bstrec.features.online import ItemTable

    ds, samples = fixture_samples
    store, _ = make_store(max_events=5)
    store.load_dataset(ds)
    online = OnlineFeatures(samples.vocabs, samples.spec)
    code = samples.vocabs["category"].index
    known = "i05"
    unknown = "zz-new"
    assert known in samples.vocabs["item_id"].index and unknown not in samples.vocabs["item_id"].index
    a, b = store.items([known])[known]["category"], "c3"
    assert a is not None and a != b and a in code and b in code
    store.put_items({unknown: {"category": a}})
    ids = [*samples.vocabs["item_id"].values, unknown]
    table = ItemTable.build(online, store.items(ids), store.snapshot("u01").items_version)
    ts = 1_800_000_000
    store.append_many([Event("u01", unknown, ts - 20, "x1"), Event("u01", known, ts - 10, "x2")])
    store.put_items({known: {**store.items([known])[known], "category": b},
                     unknown: {"category": b}})

    snap = store.snapshot("u01")
    changes = store.items_changed(table.version)
    assert not changes.full
    table = table.updated(changes.items, changes.version)
    items = store.items(online.item_ids_needed(snap, [known]))
    rows = online.tensors(online.rows_from_store(store, "u01", [known], ts))
    for got in (rows, online.query_row(snap, items, known, ts),
                online.query_row(snap, table, known, ts),
                online.query_row(snap, ItemTable.build(online, store.items(ids)), known, ts)):
        assert got["hist_cat"][0, -2:].tolist() == [code[b], code[b]]
        assert got["category"].tolist() == [code[b]]
    assert table.category_names([known, unknown, "nope"]) == [b, b, None]
