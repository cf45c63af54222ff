"""The match stage for one online request, on retrieval's own sources and merge.

retrieval/candidates.py generates candidates for offline query sets (``QuerySet``); a request
is a query set of one row: the user's batch-contract row built by ``OnlineFeatures`` from the
feature store, and the items they have seen. This adapter builds that one-row set, so the
online candidates, cold-start routing and quotas are exactly the offline ones.

Notation: K merged candidates, D vector width, N catalog size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from bstrec.retrieval.candidates import CandidateGenerator
from bstrec.retrieval.catalog import QuerySet
from bstrec.retrieval.coldstart import COLD, FEW, route
from bstrec.serving.bundle import Bundle
from bstrec.training.tensors import Batch, TensorSplit

I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]
PATHS = {COLD: "cold", FEW: "few"}


@dataclass
class Matched:
    """Merged candidates of one request: ``ids`` (K,) item indices in merged order,
    ``source_bits`` (K,) which sources proposed each (bit b = ``names[b]``; ``sources(k)``
    spells them out, for the few candidates a response returns), ``path`` the cold-start route
    taken."""

    ids: I64
    source_bits: I64
    names: tuple[str, ...]
    path: str
    per_source: dict[str, int]
    user_vector: F32 | None  # (D,) two-tower vector, computed once for match and pre-rank

    def sources(self, k: int) -> tuple[str, ...]:
        """The names of the sources that proposed candidate ``k``."""
        bits = int(self.source_bits[k])
        return tuple(n for b, n in enumerate(self.names) if bits >> b & 1)


class OnlineMatcher:
    """``match(row, seen) -> Matched`` and ``prerank(matched) -> scores`` for one request."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.generator = CandidateGenerator(
            bundle.catalog, model=bundle.two_tower, index=bundle.index, item_cf=bundle.item_cf,
            popular=bundle.popular, config=bundle.config.candidates, item2vec=bundle.item2vec)

    def match(self, row: Batch, seen: I64) -> Matched:
        """``row``: the user's batch contract, one row (history, profile, context); ``seen``:
        item indices never to propose."""
        queries = QuerySet(data=TensorSplit(row), targets=np.full(1, -1, dtype=np.int64),
                           users=np.zeros(1, dtype=np.int64),
                           seen_offsets=np.array([0, len(seen)], dtype=np.int64),
                           seen_items=np.asarray(seen, dtype=np.int64))
        rows = np.zeros(1, dtype=np.int64)
        # pre-rank reads the two-tower vector on every route
        u = self.user_vector(row)
        paths = route(row["hist_mask"].numpy(), self.generator.config.cold)
        route_id = int(paths[0])
        # only the sources this route merges: the others' lists would be dropped by the merge
        lists = self.generator.source_lists(queries, rows, user_vectors=u,
                                            only=self.generator.plans()[route_id])
        merged = self.generator.merge_rows(queries, rows, lists, paths)
        keep = np.flatnonzero(merged.ids[0] >= 0)
        per_source = {n: int(merged.from_source(n)[0, keep].sum()) for n in merged.names}
        path = PATHS.get(route_id, "regular")
        return Matched(merged.ids[0, keep], merged.sources[0, keep], merged.names, path,
                       {n: c for n, c in per_source.items() if c}, None if u is None else u[0])

    def user_vector(self, row: Batch) -> F32 | None:
        """(1, D) two-tower vector of the request's row, None without a two-tower: by the
        bundle's exported user tower, else (bundles built before it) by eager torch."""
        if self.bundle.user_tower is not None:
            # one ONNX Runtime call: eager torch's per-op overhead dominates a batch of one
            return self.bundle.user_tower.encode(row)
        return self.generator.user_vectors(row) if self.bundle.two_tower is not None else None

    def prerank(self, matched: Matched) -> F32:
        """(K,) cheap scores of the merged candidates: the two-tower dot product when the bundle
        has one, else the items' global popularity."""
        ids, u, vectors = matched.ids, matched.user_vector, self.bundle.item_vectors
        if u is None or vectors is None:
            out: F32 = self.bundle.popular.global_[ids].astype(np.float32)
            return out
        scores: F32 = vectors[ids] @ u
        return scores
