"""Popularity with time decay: global, per category and per context segment (the fallback source).

An event at time t counts ``0.5 ** ((now - t) / half_life)`` towards its item, ``now`` being the
end of the log it is fitted on, so that last month's hits outrank last year's. Scores are kept
per item for the whole log, per category (the items of one category only) and per segment of
users (e.g. gender x age group): "popular in context" for a user with no history is the
segment's popularity, shrunk towards the global one when the segment holds little weight.

Notation: N catalog size (ids 0, 1 reserved), C categories, S segments, Q queries.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import polars as pl
import torch

from bstrec.features.spec import N_RESERVED

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
SECONDS_PER_DAY = 86_400.0


@dataclass(frozen=True)
class PopularConfig:
    """(``bstrec.config.from_dict`` fills it; unknown keys are errors)."""

    half_life_days: float = 30.0  # 0 = no decay (plain counts)
    positives_only: bool = False  # count only events with label 1 (else every event)
    segment: tuple[str, ...] = ("user_gender", "user_age")  # encoded user features of a segment
    # pseudo-weight of the global distribution mixed into a segment's (shrinkage)
    segment_prior: float = 50.0

    def __post_init__(self) -> None:
        if self.half_life_days < 0 or self.segment_prior < 0:
            raise ValueError("half_life_days and segment_prior must be >= 0")


def decay_weights(ts: npt.ArrayLike, now: float, half_life_days: float) -> F64:
    """(E,) unix times -> (E,) weights 0.5 ** (age / half_life); 1 without decay."""
    t = np.asarray(ts, dtype=np.float64)
    if half_life_days <= 0:
        return np.ones_like(t)
    age = np.maximum(now - t, 0.0) / (half_life_days * SECONDS_PER_DAY)
    out: F64 = np.power(0.5, age)
    return out


class Popularity:
    """Time-decayed item popularity. ``scores(...)`` -> (Q, N) for the top-k helpers."""

    def __init__(self, config: PopularConfig, global_: F64, by_category: F64,
                 by_segment: F64, item_category: I64, segment_sizes: tuple[int, ...],
                 now: float) -> None:
        self.config = config
        self.global_ = global_  # (N,)
        self.by_category = by_category  # (C, N)
        self.by_segment = by_segment  # (S, N)
        self.item_category = item_category  # (N,)
        self.segment_sizes = segment_sizes  # vocabulary size of each segment feature
        self.now = now
        self._rankings: dict[int, I64] = {}  # context_ranking's, by segment

    @property
    def size(self) -> int:
        return int(self.global_.shape[0])

    @classmethod
    def fit(cls, frame: pl.DataFrame, item_category: npt.ArrayLike, n_categories: int,
            segment_sizes: dict[str, int] | None = None,
            config: PopularConfig | None = None) -> Popularity:
        """From encoded sample rows (``item``, ``timestamp``, ``label`` and the segment's user
        features); ``item_category`` (N,) the category of each item id."""
        cfg = config or PopularConfig()
        if cfg.positives_only:
            frame = frame.filter(pl.col("label") == 1)
        cats = np.asarray(item_category, dtype=np.int64)
        n = len(cats)
        item = frame["item"].to_numpy().astype(np.int64)
        ts = frame["timestamp"].to_numpy()
        now = float(ts.max()) if len(ts) else 0.0
        w = decay_weights(ts, now, cfg.half_life_days)
        keep = item >= N_RESERVED
        item, w = item[keep], w[keep]
        glob = np.bincount(item, weights=w, minlength=n).astype(np.float64)
        by_cat = np.zeros((n_categories, n))
        np.add.at(by_cat, (cats[item], item), w)
        sizes = segment_sizes or {}
        seg_names = [s for s in cfg.segment if s in sizes]
        seg_sizes = tuple(sizes[s] for s in seg_names)
        seg = cls._segment_codes(frame.filter(pl.Series(keep)), seg_names, seg_sizes)
        n_seg = int(np.prod(seg_sizes)) if seg_sizes else 1
        by_seg = np.zeros((n_seg, n))
        np.add.at(by_seg, (seg, item), w)
        pop = cls(cfg, glob, by_cat, by_seg, cats, seg_sizes, now)
        pop.segment_names = tuple(seg_names)
        return pop

    segment_names: tuple[str, ...] = ()

    @staticmethod
    def _segment_codes(frame: pl.DataFrame | dict[str, npt.NDArray[np.generic]],
                       names: list[str] | tuple[str, ...], sizes: tuple[int, ...]) -> I64:
        n = frame.height if isinstance(frame, pl.DataFrame) else len(next(iter(frame.values()))) \
            if frame else 0
        code = np.zeros(n, dtype=np.int64)
        for name, size in zip(names, sizes, strict=True):
            col = frame[name]
            v = col.to_numpy() if isinstance(col, pl.Series) else np.asarray(col)
            code = code * size + np.clip(v.astype(np.int64), 0, size - 1)
        return code

    def segment_of(self, batch: dict[str, torch.Tensor]) -> I64:
        """Batch contract rows -> (Q,) segment codes from their user features."""
        cols = {n: batch[n].numpy() for n in self.segment_names}
        if not cols:
            return np.zeros(len(batch["hist_mask"]), dtype=np.int64)
        return self._segment_codes(cols, self.segment_names, self.segment_sizes)

    def global_scores(self) -> F64:
        """(N,) decayed counts of the whole log."""
        return self.global_

    def category_scores(self, categories: npt.ArrayLike) -> F64:
        """(Q,) categories -> (Q, N) decayed counts of each category's items (0 elsewhere)."""
        out: F64 = self.by_category[np.asarray(categories, dtype=np.int64)]
        return out

    def context_scores(self, segments: npt.ArrayLike) -> F64:
        """(Q,) segment codes -> (Q, N) shares: the segment's, shrunk towards the global ones."""
        out: F64 = self._context_table[np.asarray(segments, dtype=np.int64)]
        return out

    @functools.cached_property
    def category_shares(self) -> F64:
        """(C, N) each category's decayed counts as shares of the category's total."""
        by_cat = self.by_category
        out: F64 = by_cat / np.maximum(by_cat.sum(1, keepdims=True), 1e-12)
        return out

    def context_ranking(self, segment: int) -> I64:
        """The items segment ``segment`` gives evidence for (share > 0; reserved ids never), by
        share, best first, ties by the smaller id: ``top_k`` of its ``context_scores`` row,
        computed once per segment (segments are few; a request reads one)."""
        ranking = self._rankings.get(segment)
        if ranking is None:
            share = self._context_table[segment]
            ids = np.flatnonzero(share > 0)
            ids = ids[ids >= N_RESERVED]
            ranking = ids[np.lexsort((ids, -share[ids]))]
            self._rankings[segment] = ranking
        return ranking

    @functools.cached_property
    def _context_table(self) -> F64:
        """(S, N) every segment's shares, computed once: a request reads one row."""
        seg = self.by_segment
        g = self.global_ / max(self.global_.sum(), 1e-12)
        prior = self.config.segment_prior
        out: F64 = (seg + prior * g) / (seg.sum(1, keepdims=True) + prior)
        return out

    def save(self, folder: str | Path) -> None:
        root = Path(folder)
        root.mkdir(parents=True, exist_ok=True)
        np.savez(root / "popular.npz", global_=self.global_, by_category=self.by_category,
                 by_segment=self.by_segment, item_category=self.item_category)
        (root / "popular.json").write_text(json.dumps({
            "config": asdict(self.config), "segment_names": list(self.segment_names),
            "segment_sizes": list(self.segment_sizes), "now": self.now}, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> Popularity:
        root = Path(folder)
        meta = json.loads((root / "popular.json").read_text())
        cfg = meta["config"]
        cfg["segment"] = tuple(cfg["segment"])
        with np.load(root / "popular.npz", allow_pickle=False) as z:
            pop = cls(PopularConfig(**cfg), z["global_"], z["by_category"], z["by_segment"],
                      z["item_category"], tuple(meta["segment_sizes"]), float(meta["now"]))
        pop.segment_names = tuple(meta["segment_names"])
        return pop
