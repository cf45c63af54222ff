"""The match stage end to end: every source's ranked list, cold-start routing, and the merge.

Sources (each returns its top ``source_k`` catalog items per query, seen items excluded):

- ``two_tower``: the user vector searched in the item index (exact or approximate);
- ``item_cf``: the user's recent behaviours' co-occurrence neighbours (item_cf.py);
- ``popular``: time-decayed popularity in the user's context segment (popular.py);
- ``category``: popular items of the categories the user touched (cold-start path only);
- ``item2vec``: the user's recent behaviours' session-embedding query searched in item2vec's
  own index (item2vec.py); merged only where a quota names it (none by default).

Users with a regular history get ``quotas`` of two_tower / item_cf / popular; users with none or
few behaviours take the cold-start paths of coldstart.py.

Notation: Q queries, N catalog size, k list length.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from bstrec.retrieval.catalog import Catalog, QuerySet
from bstrec.retrieval.coldstart import COLD, FEW, REGULAR, ColdStartConfig, category_scores, route
from bstrec.retrieval.index import VectorIndex
from bstrec.retrieval.item2vec import Item2Vec
from bstrec.retrieval.item_cf import ItemCF
from bstrec.retrieval.merge import Candidates, merge
from bstrec.retrieval.popular import Popularity
from bstrec.retrieval.topk import drop_excluded, first_k_without, top_k
from bstrec.retrieval.two_tower import TwoTower

I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]
# appended, never reordered: a source's bit in Candidates.sources is its position here
SOURCES = ("two_tower", "item_cf", "popular", "category", "item2vec")


@dataclass(frozen=True)
class CandidateConfig:
    """(``bstrec.config.from_dict`` fills it; unknown keys are errors)."""

    quotas: tuple[tuple[str, int], ...] = (("two_tower", 300), ("item_cf", 150), ("popular", 50))
    source_k: int = 500  # length of each source's own list
    cold: ColdStartConfig = field(default_factory=ColdStartConfig)

    def __post_init__(self) -> None:
        for name, q in self.quotas:
            if name not in SOURCES or q < 0:
                raise ValueError(f"bad quota {name}={q}; sources are {list(SOURCES)}")
        if self.source_k < 1:
            raise ValueError("source_k must be >= 1")

    @property
    def total(self) -> int:
        return sum(q for _, q in self.quotas)


class CandidateGenerator:
    """``source_lists(queries, rows)`` and ``generate(queries)``; any source may be absent."""

    def __init__(self, catalog: Catalog, *, model: TwoTower | None = None,
                 index: VectorIndex | None = None, item_cf: ItemCF | None = None,
                 popular: Popularity | None = None, config: CandidateConfig | None = None,
                 item2vec: Item2Vec | None = None) -> None:
        self.catalog = catalog
        self.item2vec = item2vec
        self.model = model
        self.index = index
        self.item_cf = item_cf
        self.popular = popular
        self.config = config or CandidateConfig()
        self._plans: tuple[CandidateConfig, dict[int, dict[str, int]]] | None = None

    # -- sources ---------------------------------------------------------------------------
    def user_vectors(self, batch: dict[str, Tensor]) -> F32:
        """(q, D) two-tower user vectors of a batch (the model must be present)."""
        assert self.model is not None
        if self.model.training:
            self.model.eval()
        with torch.inference_mode():  # cheaper than no_grad per call; this runs per request
            u: F32 = self.model.encode_users(batch).numpy()
        return u

    def _two_tower(self, u: F32, seen: npt.NDArray[np.bool_], n_seen: int, k: int) -> I64:
        assert self.index is not None
        # ask for enough extra results that k remain once the seen ones are dropped
        scores, ids = self.index.search(u, min(k + n_seen, max(len(self.index), 1)))
        return drop_excluded(ids, scores, seen, k)[1]

    def _dense(self, scores: npt.NDArray[np.floating], seen: npt.NDArray[np.bool_], k: int
               ) -> I64:
        # a source that gives an item no evidence (score 0) does not propose it
        return top_k(np.where(scores > 0, scores, -np.inf), k, seen)[1]

    @staticmethod
    def _popular(popular: Popularity, segments: I64, seen: npt.NDArray[np.bool_], k: int) -> I64:
        # the rows of one segment share its scores: its ranking, computed once, minus each row's
        # seen items (the same lists as _dense on context_scores)
        out = np.full((len(segments), k), -1, dtype=np.int64)
        for seg in np.unique(segments).tolist():
            rows = np.flatnonzero(segments == seg)
            out[rows] = first_k_without(popular.context_ranking(seg), seen[rows], k)
        return out

    def source_lists(self, queries: QuerySet, rows: I64, k: int | None = None, *,
                     user_vectors: F32 | None = None,
                     only: Collection[str] | None = None) -> dict[str, I64]:
        """Each available source's top k (default ``source_k``) for ``rows``: (q, k), -1 = none.
        ``user_vectors``: the rows' two-tower vectors when the caller has them already;
        ``only``: the sources wanted (default all; one request needs only its route's)."""
        k = k or self.config.source_k
        wanted = set(SOURCES if only is None else only)
        # a request's query set is its one row: no gather needed
        whole = len(rows) == len(queries) and bool((rows == np.arange(len(rows))).all())
        batch = queries.data.tensors if whole else queries.data.batch(torch.from_numpy(rows))
        seen = queries.seen_mask(rows, self.catalog.size)
        out: dict[str, I64] = {}
        if self.model is not None and self.index is not None and "two_tower" in wanted:
            u = self.user_vectors(batch) if user_vectors is None else user_vectors
            n_seen = int(queries.seen_count()[rows].max()) if len(rows) else 0
            out["two_tower"] = self._two_tower(u, seen, n_seen, k)
        hist_item, hist_cat, hist_mask = (batch[n].numpy() for n in
                                          ("hist_item", "hist_cat", "hist_mask"))
        if self.item_cf is not None and "item_cf" in wanted:
            out["item_cf"] = self._dense(self.item_cf.scores(hist_item, hist_mask), seen, k)
        if self.popular is not None and "popular" in wanted:
            out["popular"] = self._popular(self.popular, self.popular.segment_of(batch), seen, k)
        if self.popular is not None and "category" in wanted:
            out["category"] = self._dense(category_scores(self.popular, hist_cat, hist_mask),
                                          seen, k)
        if self.item2vec is not None and "item2vec" in wanted:
            out["item2vec"] = self.item2vec.search(hist_item, hist_mask, seen, k)
        return out

    def plans(self) -> dict[int, dict[str, int]]:
        """Cold-start route (coldstart.py) -> the quotas of the sources merged for it (computed
        once per config: a request asks for them twice)."""
        cfg = self.config
        if self._plans is None or self._plans[0] is not cfg:
            total = cfg.total
            self._plans = cfg, {REGULAR: dict(cfg.quotas), FEW: cfg.cold.few_quotas(total),
                                COLD: {"popular": total}}
        return self._plans[1]

    # -- merge -----------------------------------------------------------------------------
    def merge_rows(self, queries: QuerySet, rows: I64, lists: dict[str, I64],
                   paths: npt.NDArray[np.int8] | None = None) -> Candidates:
        """Merged candidates of ``rows`` from their ``source_lists`` (which hold no seen item
        already), cold-start routing applied (``paths``: the rows' routes when the caller has
        them already)."""
        cfg = self.config
        total = cfg.total
        if paths is None:
            paths = route(queries.data.tensors["hist_mask"][torch.from_numpy(rows)], cfg.cold)
        ids = np.full((len(rows), total), -1, dtype=np.int64)
        src = np.zeros((len(rows), total), dtype=np.int64)
        for path, quotas in self.plans().items():
            sel = np.flatnonzero(paths == path)
            if not len(sel):
                continue
            sub = lists if len(sel) == len(rows) else {n: v[sel] for n, v in lists.items()}
            # when a source is missing, its quota goes to the others through backfill
            usable = {n: q for n, q in quotas.items() if n in sub} or {"popular": total}
            c = merge(sub, usable, names=SOURCES)
            # backfilled lists can be shorter than the total when sources run out
            ids[sel, :c.ids.shape[1]] = c.ids[:, :total]
            src[sel, :c.ids.shape[1]] = c.sources[:, :total]
        return Candidates(ids, src, SOURCES)

    def batches(self, queries: QuerySet, batch: int = 2048) -> Iterator[I64]:
        for lo in range(0, len(queries), batch):
            yield np.arange(lo, min(lo + batch, len(queries)), dtype=np.int64)

    def generate(self, queries: QuerySet, batch: int = 2048
                 ) -> tuple[Candidates, dict[str, I64]]:
        """Merged candidates of every query, and every source's own list (for evaluation)."""
        merged: list[Candidates] = []
        per_source: dict[str, list[I64]] = {}
        for rows in self.batches(queries, batch):
            lists = self.source_lists(queries, rows)
            for n, v in lists.items():
                per_source.setdefault(n, []).append(v)
            merged.append(self.merge_rows(queries, rows, lists))
        cands = Candidates(np.concatenate([m.ids for m in merged]),
                           np.concatenate([m.sources for m in merged]), SOURCES)
        return cands, {n: np.concatenate(v) for n, v in per_source.items()}
