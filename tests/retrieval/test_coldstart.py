"""Cold start: no history -> popular in context; one or two events -> item-to-item and category
neighbours; a new item -> its content vector, searchable after an incremental add."""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

from bstrec.data.samples import SampleSet
from bstrec.features.spec import OOV
from bstrec.retrieval.candidates import CandidateConfig, CandidateGenerator
from bstrec.retrieval.catalog import Catalog, QuerySet, encode_new_items
from bstrec.retrieval.coldstart import COLD, FEW, REGULAR, ColdStartConfig, new_item_vectors, route
from bstrec.retrieval.index import IndexConfig, build_index
from bstrec.retrieval.item_cf import ItemCF
from bstrec.retrieval.popular import PopularConfig, Popularity
from bstrec.retrieval.train import item_vectors
from bstrec.retrieval.two_tower import TwoTower


def _generator(s: SampleSet) -> CandidateGenerator:
    cat = Catalog.from_samples(s)
    train = s.splits["train"]
    sizes = {f.name: f.vocab_size for f in s.spec.features}
    pop = Popularity.fit(train, cat.features["category"].numpy(), s.spec.vocab_size("category"),
                         sizes, PopularConfig(segment=("user_gender",), segment_prior=1.0))
    return CandidateGenerator(cat, item_cf=ItemCF.fit(train, cat.size), popular=pop,
                              config=CandidateConfig(quotas=(("item_cf", 6), ("popular", 2)),
                                                     source_k=10))


def _with_history(q: QuerySet, rows: np.ndarray, n: int) -> QuerySet:
    """The queries ``rows`` with only their ``n`` most recent behaviours kept."""
    sub = q.subset(rows)
    t = sub.data.tensors
    L = t["hist_mask"].shape[1]
    drop = torch.arange(L) < L - n
    for k in ("hist_item", "hist_cat", "hist_dt"):
        t[k][:, drop] = 0
    t["hist_mask"][:, drop] = False
    return sub


def test_route() -> None:
    mask = torch.tensor([[False, False, False], [False, False, True], [False, True, True],
                         [True, True, True]])
    assert route(mask, ColdStartConfig(few_events=2)).tolist() == [COLD, FEW, FEW, REGULAR]
    assert ColdStartConfig().few_quotas(10) == {"item_cf": 6, "category": 3, "popular": 1}


def test_user_without_history_gets_popular_in_context(tiny_samples: SampleSet) -> None:
    gen = _generator(tiny_samples)
    q = QuerySet.from_samples(tiny_samples, "test")
    g = q.data.tensors["user_gender"].numpy()
    rows = np.array([int(np.flatnonzero(g == v)[0]) for v in np.unique(g)[:2]])
    sub = _with_history(q, rows, 0)
    cands = gen.merge_rows(sub, np.arange(len(sub)), gen.source_lists(sub, np.arange(len(sub))))
    for j in range(len(sub)):
        ids = cands.ids[j][cands.ids[j] >= 0]
        assert len(ids) == 8
        assert all(cands.source_names(j, c) == ["popular"] for c in range(len(ids)))
        seen = set(sub.seen_items[sub.seen_offsets[j]:sub.seen_offsets[j + 1]].tolist())
        assert not seen & set(ids.tolist())
    # the context matters: the two genders' users (who watch different categories) differ
    assert set(cands.ids[0].tolist()) != set(cands.ids[1].tolist())


def test_user_with_one_or_two_events_gets_item_and_category_neighbours(
        tiny_samples: SampleSet) -> None:
    gen = _generator(tiny_samples)
    q = QuerySet.from_samples(tiny_samples, "test")
    cat = gen.catalog.features["category"]
    long_enough = np.flatnonzero(q.data.tensors["hist_mask"].sum(1).numpy() >= 2)[:10]
    for n in (1, 2):
        sub = _with_history(q, long_enough, n)
        rows = np.arange(len(sub))
        lists = gen.source_lists(sub, rows)
        cands = gen.merge_rows(sub, rows, lists)
        for j in rows:
            ids = cands.ids[j]
            names = {n for c in range(len(ids)) if ids[c] >= 0 for n in cands.source_names(j, c)}
            assert {"item_cf", "category"} <= names and "two_tower" not in names
            last = int(sub.data.tensors["hist_item"][j, -1])
            # category neighbours are items of the categories of the user's events
            from_cat = ids[cands.from_source("category")[j]]
            assert len(from_cat) and (cat[from_cat] == cat[last]).all()
            # item-to-item neighbours are the last event's co-occurring items
            nbrs = set(gen.item_cf.ids[last].tolist()) if gen.item_cf else set()  # type: ignore[union-attr]
            hist = sub.data.tensors["hist_item"][j][sub.data.tensors["hist_mask"][j]].tolist()
            for h in hist:
                nbrs |= set(gen.item_cf.ids[h].tolist())  # type: ignore[union-attr]
            assert set(ids[cands.from_source("item_cf")[j]].tolist()) <= nbrs


def test_new_item_gets_a_content_vector_near_its_category(tiny_samples: SampleSet,
                                                         tiny_model: TwoTower) -> None:
    model = tiny_model
    cat = Catalog.from_samples(tiny_samples)
    vecs = item_vectors(model, cat).numpy()
    new = pl.DataFrame({"item_id": [900, 901], "category": ["c1", "c3"], "year": ["1991", "1993"],
                        "genres": [["g1", "all"], ["g3", "all"]]})
    batch = encode_new_items(new, tiny_samples.spec, tiny_samples.vocabs,
                             cat.features["item_genres"].shape[1])
    assert batch["item"].tolist() == [OOV, OOV]
    nv = new_item_vectors(model, batch).numpy()
    assert np.isfinite(nv).all() and np.allclose(np.linalg.norm(nv, axis=1), 1, atol=1e-5)
    cats = cat.features["category"].numpy()
    want = tiny_samples.vocabs["category"].encode_values(["c1", "c3"])
    index = build_index(cat.candidates, vecs[cat.candidates], IndexConfig(kind="flat"))
    for v, c in zip(nv, want, strict=True):
        sims = vecs[cat.candidates] @ v
        same = cats[cat.candidates] == c
        assert sims[same].mean() > sims[~same].mean()
        _, top = index.search(v[None, :], 4)
        assert (cats[top[0]] == c).mean() >= 0.5
    # added to the index without a rebuild, the new items are found by their own vectors
    index.add(np.array([10_000, 10_001]), nv)
    _, top = index.search(nv, 1)
    assert top[:, 0].tolist() == [10_000, 10_001]
