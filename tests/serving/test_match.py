"""The online match stage: computing only the sources a request's route merges changes nothing."""

from __future__ import annotations

import numpy as np

from bstrec.features.spec import N_RESERVED
from bstrec.features.store import FeatureStore, UserSnapshot
from bstrec.retrieval.catalog import QuerySet
from bstrec.serving.pipeline import Pipeline
from bstrec.training.tensors import TensorSplit

NOW = 1_800_000_000


def test_match_equals_the_merge_of_every_source(pipeline: Pipeline, store: FeatureStore) -> None:
    f, gen = pipeline.features, pipeline.matcher.generator
    few = UserSnapshot(30_000_000, store.snapshot(3).behaviours[:1], None)
    paths = set()
    for snap in (store.snapshot(3), store.snapshot(11), few, UserSnapshot(-5, (), None)):
        items = store.items(f.item_ids_needed(snap, [pipeline.probe_item]))
        row = f.query_row(snap, items, pipeline.probe_item, NOW)
        seen = np.array([i for i in pipeline.item_vocab.encode_values(
            {b.item_id for b in snap.behaviours}) if i >= N_RESERVED], dtype=np.int64)
        got = pipeline.matcher.match(row, seen)
        paths.add(got.path)
        queries = QuerySet(data=TensorSplit(row), targets=np.full(1, -1, dtype=np.int64),
                           users=np.zeros(1, dtype=np.int64),
                           seen_offsets=np.array([0, len(seen)], dtype=np.int64), seen_items=seen)
        rows = np.zeros(1, dtype=np.int64)
        every = gen.merge_rows(queries, rows, gen.source_lists(queries, rows))
        keep = every.ids[0] >= 0
        np.testing.assert_array_equal(got.ids, every.ids[0, keep])
        np.testing.assert_array_equal(got.source_bits, every.sources[0, keep])
    assert paths == {"regular", "few", "cold"}
