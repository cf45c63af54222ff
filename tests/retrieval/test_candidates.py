"""The match stage end to end on the tiny log: every source, the merge, attribution, no seen."""

from __future__ import annotations

import numpy as np

from bstrec.data.samples import SampleSet
from bstrec.retrieval.candidates import SOURCES, CandidateConfig, CandidateGenerator
from bstrec.retrieval.catalog import Catalog, QuerySet
from bstrec.retrieval.index import IndexConfig, build_index
from bstrec.retrieval.item_cf import ItemCF
from bstrec.retrieval.popular import PopularConfig, Popularity
from bstrec.retrieval.topk import list_metrics
from bstrec.retrieval.train import item_vectors
from bstrec.retrieval.two_tower import TwoTower


def test_generate_merges_every_source_without_seen_items(tiny_samples: SampleSet,
                                                          tiny_model: TwoTower) -> None:
    s = tiny_samples
    cat = Catalog.from_samples(s)
    train = s.splits["train"]
    pop = Popularity.fit(train, cat.features["category"].numpy(), s.spec.vocab_size("category"),
                         {f.name: f.vocab_size for f in s.spec.features},
                         PopularConfig(segment=("user_gender",)))
    vecs = item_vectors(tiny_model, cat).numpy()
    index = build_index(cat.candidates, vecs[cat.candidates], IndexConfig(kind="hnsw", hnsw_m=8))
    cfg = CandidateConfig(quotas=(("two_tower", 6), ("item_cf", 3), ("popular", 1)), source_k=10)
    gen = CandidateGenerator(cat, model=tiny_model, index=index, item_cf=ItemCF.fit(train, cat.size),
                             popular=pop, config=cfg)
    q = QuerySet.from_samples(s, "test")
    merged, lists = gen.generate(q, batch=7)  # several batches
    assert merged.ids.shape == (len(q), 10) and merged.names == SOURCES
    assert set(lists) == set(SOURCES) - {"item2vec"}  # no item2vec model given
    for j in range(len(q)):
        row = merged.ids[j][merged.ids[j] >= 0].tolist()
        assert len(row) == len(set(row))  # deduplicated
        seen = set(q.seen_items[q.seen_offsets[j]:q.seen_offsets[j + 1]].tolist())
        assert not seen & set(row)
        for lst in lists.values():
            assert not seen & set(lst[j].tolist())
        # every candidate names at least one source, and each named source did propose it
        for c, item in enumerate(merged.ids[j]):
            if item < 0:
                continue
            names = merged.source_names(j, c)
            assert names and all(item in lists[n][j] for n in names)
    regular = q.data.tensors["hist_mask"].sum(1).numpy() > 2
    assert merged.from_source("two_tower")[regular].any(1).all()
    # the learned source finds the next item far more often than popularity does
    tt = list_metrics(lists["two_tower"], q.targets, (5,))["recall@5"]
    pp = list_metrics(lists["popular"], q.targets, (5,))["recall@5"]
    assert tt > pp
    assert np.isfinite(list_metrics(merged.ids, q.targets, (10,))["ndcg@10"])
