"""Protocol P2 on the real ML-1M: the query set and the catalog match PROTOCOL.md's counts."""

from __future__ import annotations

import numpy as np
import pytest

from bstrec.data.loaders import load_dataset
from bstrec.data.samples import build_samples
from bstrec.retrieval.catalog import Catalog, QuerySet
from tests.conftest import require


@pytest.mark.shared_data
def test_ml1m_retrieval_queries_match_the_protocol() -> None:
    folder = require("ml-1m", "movies.dat", "users.dat", "ratings*.dat*")
    samples = build_samples(load_dataset("ml-1m", folder.parent))
    catalog = Catalog.from_samples(samples)
    q = QuerySet.from_samples(samples, "test")
    assert len(q) == 26_431
    assert len(catalog.candidates) == 3_576
    assert int((q.targets < 2).sum()) == 33  # never rated in train: a miss for every method
    # seen items: every earlier rating of the user, never the target itself
    counts = q.seen_count()
    assert (counts > 0).mean() > 0.99
    for j in np.random.default_rng(0).choice(len(q), 200, replace=False):
        assert q.targets[j] not in q.seen_items[q.seen_offsets[j]:q.seen_offsets[j + 1]]
