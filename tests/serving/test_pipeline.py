"""The request pipeline without HTTP: stages, rules, cold start, events, fallbacks."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pytest
import torch

from bstrec.features.store import (
    Features,
    FeatureStore,
    ItemChanges,
    ItemId,
    ItemsVersion,
    StoreUnavailable,
    UserId,
    UserSnapshot,
)
from bstrec.retrieval.candidates import SOURCES
from bstrec.serving.bundle import Bundle
from bstrec.serving.guard import StoreGuard
from bstrec.serving.pipeline import (
    STAGES,
    IncomingEvent,
    NotFound,
    Pipeline,
    RequestError,
)

NOW = 1_800_000_000


def test_known_user_gets_k_ranked_unseen_items_with_sources_and_version(
        pipeline: Pipeline, store: FeatureStore) -> None:
    rec = pipeline.recommend("3", k=8)  # "3": query strings carry ids as text
    history = store.behaviours(3)
    seen = {b.item_id for b in history}
    assert rec.user_id == 3 and rec.known_user and rec.history_length == len(history) > 0
    assert rec.path == "regular" and not rec.degraded and rec.degraded_reasons == []
    assert len(rec.items) == 8
    ids = [i.item_id for i in rec.items]
    assert len(set(ids)) == 8 and not set(ids) & seen
    scores = [i.score for i in rec.items]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
    assert all(i.model_version == "A" == rec.model_version for i in rec.items)
    assert all(i.sources and set(i.sources) <= set(SOURCES) for i in rec.items)
    # the two-tower, item-CF and popularity each proposed candidates
    assert {"two_tower", "item_cf", "popular"} <= set(rec.candidates)
    assert set(rec.timings_ms) == set(STAGES) and all(v >= 0 for v in rec.timings_ms.values())
    cats = Counter(i.category for i in rec.items)
    assert max(cats.values()) <= pipeline.bundle.config.max_per_category


def test_scores_are_the_exported_rankers_on_the_online_rows(pipeline: Pipeline,
                                                            store: FeatureStore) -> None:
    rec = pipeline.recommend(3, k=5, now=NOW)
    items = [i.item_id for i in rec.items]
    batch = pipeline.features.batch_from_store(store, 3, items, NOW)
    expected = pipeline.bundle.ranker.score(batch)
    np.testing.assert_allclose([i.score for i in rec.items], expected, rtol=1e-5)


def test_unknown_user_gets_cold_start_items(pipeline: Pipeline) -> None:
    rec = pipeline.recommend(10_000_000, k=5)
    assert rec.path == "cold" and not rec.known_user and rec.history_length == 0
    assert len(rec.items) == 5 and not rec.degraded
    assert set(rec.candidates) == {"popular"}
    assert all(i.sources == ("popular",) for i in rec.items)


def test_an_event_is_seen_by_the_next_request(pipeline: Pipeline, store: FeatureStore) -> None:
    user = 20_000_000  # new: cold, then one behaviour puts them on the few-events path
    first = pipeline.recommend(user, k=5, now=NOW)
    target = first.items[0].item_id
    res = pipeline.ingest([IncomingEvent(user_id=str(user), item_id=target, timestamp=NOW - 60)],
                          now=NOW)
    assert (res.received, res.stored, res.ignored) == (1, 1, 0)
    assert pipeline.ingest([IncomingEvent(user, target, NOW - 60)], now=NOW).ignored == 1
    after = pipeline.recommend(user, k=5, now=NOW)
    assert after.known_user and after.history_length == 1 and after.path == "few"
    assert target not in {i.item_id for i in after.items}  # the seen filter
    assert pipeline.history(user).behaviours[0].category == \
        pipeline.bundle.items[target]["category"]


def test_a_behaviour_and_a_candidate_read_one_category(pipeline: Pipeline,
                                                       store: FeatureStore) -> None:
    """An event ingested while its item had category A, then the item put with category B:
    the request reads B for the behaviour (history, hist_cat) and for the candidate."""
    user = 20_000_001
    item = pipeline.item_vocab.values[0]
    cats = pipeline.bundle.vocabs["category"].values
    old = pipeline.bundle.items[item]["category"]
    new = next(c for c in cats if c != old)
    pipeline.ingest([IncomingEvent(user, item, NOW - 60)], now=NOW)
    store.put_items({item: {**store.items([item])[item], "category": new}})
    pipeline.recommend(user, k=5, now=NOW)  # reads the item table at the new version
    assert pipeline.history(user).behaviours[0].category == new
    snap = store.snapshot(user)
    table = pipeline.table
    assert table.version == snap.items_version
    code = pipeline.bundle.vocabs["category"].index[new]
    row = pipeline.features.query_row(snap, table, item, NOW)
    assert row["hist_cat"][0, -1] == code and row["category"][0] == code
    full = pipeline.features.batch_from_store(store, user, [item], NOW)
    assert full["hist_cat"][0, -1] == code and full["category"][0] == code


@pytest.mark.parametrize("event, message", [
    (IncomingEvent(1, 10**9), "unknown item"),
    (IncomingEvent("not-a-number", 5), "user_id must be an integer"),
    (IncomingEvent(1, 5, timestamp=-1), "timestamp must be unix seconds"),
    (IncomingEvent(1, 5, timestamp=NOW * 1000), "in the future"),
])
def test_bad_events_are_refused_and_nothing_is_stored(pipeline: Pipeline, store: FeatureStore,
                                                      event: IncomingEvent, message: str) -> None:
    before = store.behaviours(1)
    with pytest.raises(RequestError, match=message):
        pipeline.ingest([IncomingEvent(1, 5, NOW - 10, "ok-event"), event], now=NOW)
    assert store.behaviours(1) == before


def test_similar_items(pipeline: Pipeline) -> None:
    sim = pipeline.similar("5", k=4)
    ids = [i.item_id for i in sim.items]
    assert sim.item_id == 5 and len(ids) == 4 and 5 not in ids and len(set(ids)) == 4
    assert all(i.source in ("item_cf", "two_tower", "category") for i in sim.items)
    with pytest.raises(NotFound, match="unknown item"):
        pipeline.similar(10**9)


class DownStore(FeatureStore):
    """A store whose backend is gone: every call raises StoreUnavailable."""

    max_events = 50

    def _down(self, *_: Any) -> Any:
        raise StoreUnavailable("connection refused")

    def _append_user(self, user_id: UserId, events: Any) -> list[bool]:
        return self._down()  # type: ignore[no-any-return]

    def snapshot(self, user_id: UserId) -> UserSnapshot:
        return self._down()  # type: ignore[no-any-return]

    def put_profiles(self, profiles: Mapping[UserId, Features]) -> None:
        self._down()

    def put_items(self, items: Mapping[ItemId, Features]) -> None:
        self._down()

    def items(self, item_ids: Iterable[ItemId]) -> dict[ItemId, Features]:
        return self._down()  # type: ignore[no-any-return]

    def items_changed(self, since: ItemsVersion | None) -> ItemChanges:
        return self._down()  # type: ignore[no-any-return]

    def ping(self) -> None:
        self._down()

    def clear(self) -> None:
        self._down()

    def close(self) -> None:
        pass


def test_store_down_answers_from_fallbacks_and_says_so(bundle: Bundle) -> None:
    pipeline = Pipeline(bundle, StoreGuard(DownStore(), "redis"))
    rec = pipeline.recommend(3, k=5)
    assert rec.degraded and "feature store unavailable" in rec.degraded_reasons[0]
    assert rec.path == "cold" and len(rec.items) == 5
    assert all(i.category is not None for i in rec.items)  # item features from the bundle
    with pytest.raises(StoreUnavailable):
        pipeline.ingest([IncomingEvent(3, 5)])


def test_item_features_are_read_only_when_the_store_changes_them(
        pipeline: Pipeline, store: FeatureStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests read the store's item version with the user; the item table is re-read only
    when it moved (the items put since), and an update is served by the next request."""
    reads: list[object] = []
    real = store.items_changed

    def counted(since: ItemsVersion | None) -> ItemChanges:
        reads.append(since)
        return real(since)

    monkeypatch.setattr(store, "items_changed", counted)
    first = pipeline.recommend(3, k=5, now=1_800_000_000)
    assert reads == [None]  # the first request reads the store's items once, all of them
    version = pipeline.table.version
    assert version == store.snapshot(3).items_version
    again = pipeline.recommend(3, k=5, now=1_800_000_000)
    assert len(reads) == 1 and [i.item_id for i in again.items] == [i.item_id for i in first.items]
    item = first.items[0].item_id
    store.put_items({item: {**store.items([item])[item], "category": "renamed"}})
    pipeline.recommend(3, k=5, now=1_800_000_000)
    assert reads[1:] == [version]  # only what changed since
    table = pipeline.table
    assert table.version == store.snapshot(3).items_version != version
    assert table.categories[table.indices([item])[0]] == "renamed"
    features = store.items([item])
    want = pipeline.features.item_inputs(features, [item])
    got = table.inputs_of([item])
    assert all(torch.equal(got[n], want[n]) for n in want)
    # a cleared store: a new epoch, every item read again (none: the bundle's features)
    store.clear()
    pipeline.recommend(3, k=5, now=1_800_000_000)
    assert pipeline.table.categories[table.indices([item])[0]] == first.items[0].category


def test_warmup_reads_the_stores_item_features_before_traffic(
        pipeline: Pipeline, store: FeatureStore, bundle: Bundle,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Warm-up encodes the store's catalogue into the item table, so the first request reads
    no item features; with the store down it still warms up (bundle features kept)."""
    pipeline.warmup()
    assert pipeline.table.version == store.snapshot(3).items_version is not None
    reads: list[object] = []
    monkeypatch.setattr(store, "items_changed", lambda since: reads.append(since))
    pipeline.recommend(3, k=5, now=1_800_000_000)
    assert reads == []
    down = Pipeline(bundle, StoreGuard(DownStore(), "redis"))
    assert len(down.warmup().items) == 10 and down.table.version is None
