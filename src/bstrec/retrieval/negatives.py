"""Negative sampling for the two-tower retriever: a pluggable component.

Notation: B batch, M negatives per row, N catalog size (ids ``2 .. N-1`` are catalog items).

A sampler draws, for each row of a batch, M catalog items none of which is that row's positive,
and tells the log of each drawn id's expected count in one row's draw (``log_q``), which the
loss subtracts from the logit: sampled softmax with logQ correction (Bengio & Senecal 2008;
Yi et al. 2019), so that an item is not pushed down merely because the sampler shows it often.

- ``UniformSampler``: uniform over the catalog without the positive (exact: draw from N-1
  slots and skip the positive's);
- ``PopularitySampler``: proportional to ``counts ** power`` (word2vec's 0.75 by default),
  rejecting the positive and redrawing;
- ``HardSampler``: mined by the model itself: for each row, M items drawn among the ``pool``
  highest-scoring catalog items (the positive and the user's own history excluded); not a
  sample of a fixed distribution, so its ``log_q`` is 0 (no correction, as in mixed negative
  sampling, Yang et al. 2020).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from bstrec.features.spec import N_RESERVED


class NegativeSampler(ABC):
    """Draws (B, M) catalog ids, never the row's positive. ``scores`` is the hard sampler's input."""

    def __init__(self, n_items: int, per_row: int) -> None:
        if n_items - N_RESERVED < 2:
            raise ValueError("a catalog needs at least two items to draw negatives")
        if per_row < 1:
            raise ValueError(f"per_row must be >= 1, got {per_row}")
        self.n_items = n_items
        self.per_row = per_row

    @abstractmethod
    def sample(self, positives: Tensor, generator: torch.Generator,
               scores: Tensor | None = None) -> Tensor:
        """(B,) positive ids -> (B, M) negative ids; ``scores`` (B, N) model scores if needed."""

    @abstractmethod
    def log_q(self, ids: Tensor) -> Tensor:
        """(...) ids -> (...) log expected count of each id among one row's M draws."""


class UniformSampler(NegativeSampler):
    def sample(self, positives: Tensor, generator: torch.Generator,
               scores: Tensor | None = None) -> Tensor:
        B = positives.shape[0]
        n_cat = self.n_items - N_RESERVED
        # N-1 slots: the slots at or after the positive's shift by one, so it is never drawn
        slot = torch.randint(0, n_cat - 1, (B, self.per_row), generator=generator)
        pos_slot = (positives - N_RESERVED).unsqueeze(1)
        slot = slot + (slot >= pos_slot).long()
        return slot + N_RESERVED

    def log_q(self, ids: Tensor) -> Tensor:
        q = self.per_row / (self.n_items - N_RESERVED - 1)
        return torch.full(ids.shape, float(np.log(q)), dtype=torch.float32)


class PopularitySampler(NegativeSampler):
    """Proportional to ``(counts + 1) ** power``; ``counts`` (N,) per item id (reserved rows 0)."""

    def __init__(self, counts: npt.ArrayLike, per_row: int, power: float = 0.75,
                 max_redraws: int = 20) -> None:
        c = np.asarray(counts, dtype=np.float64)
        super().__init__(len(c), per_row)
        w = (c + 1.0) ** power
        w[:N_RESERVED] = 0.0
        self.probs = torch.from_numpy(w / w.sum())
        self.max_redraws = max_redraws

    def sample(self, positives: Tensor, generator: torch.Generator,
               scores: Tensor | None = None) -> Tensor:
        B = positives.shape[0]
        out = torch.multinomial(self.probs, B * self.per_row, replacement=True,
                                generator=generator).view(B, self.per_row)
        for _ in range(self.max_redraws):
            bad = out == positives.unsqueeze(1)
            if not bad.any():
                return out
            n_bad = int(bad.sum())
            out[bad] = torch.multinomial(self.probs, n_bad, replacement=True, generator=generator)
        # an item so dominant that redraws keep hitting it: the uniform fallback is always valid
        bad = out == positives.unsqueeze(1)
        if bad.any():
            uni = UniformSampler(self.n_items, self.per_row).sample(positives, generator)
            out = torch.where(bad, uni, out)
        return out

    def log_q(self, ids: Tensor) -> Tensor:
        return torch.log(self.probs[ids].float() * self.per_row).clamp(min=-1e4)


class HardSampler(NegativeSampler):
    """M ids drawn uniformly among each row's ``pool`` top-scored items, the positive and any
    id masked in ``scores`` (set to -inf, e.g. the user's history) excluded."""

    def __init__(self, n_items: int, per_row: int, pool: int = 50) -> None:
        super().__init__(n_items, per_row)
        if pool < per_row:
            raise ValueError(f"pool ({pool}) must be >= per_row ({per_row})")
        self.pool = pool

    def sample(self, positives: Tensor, generator: torch.Generator,
               scores: Tensor | None = None) -> Tensor:
        if scores is None:
            raise ValueError("the hard sampler needs the model's scores (B, N)")
        s = scores.detach().float().clone()
        s[:, :N_RESERVED] = -torch.inf
        s.scatter_(1, positives.unsqueeze(1), -torch.inf)
        pool = min(self.pool, self.n_items - N_RESERVED - 1)
        top_s, top = s.topk(pool, dim=1)  # (B, pool)
        # random keys rank the pool; masked (-inf) entries always lose, so they are drawn last
        keys = torch.rand(top.shape, generator=generator)
        keys = torch.where(torch.isfinite(top_s), keys, keys - 2.0)
        pick = keys.topk(self.per_row, dim=1).indices
        out = top.gather(1, pick)
        # rows with fewer finite candidates than M (tiny catalogs): fill uniformly
        bad = ~torch.isfinite(top_s.gather(1, pick))
        if bad.any():
            uni = UniformSampler(self.n_items, self.per_row).sample(positives, generator)
            out = torch.where(bad, uni, out)
        return out

    def log_q(self, ids: Tensor) -> Tensor:
        return torch.zeros(ids.shape, dtype=torch.float32)


def item_counts(items: npt.ArrayLike, n_items: int) -> npt.NDArray[np.float64]:
    """(E,) item ids of training positives -> (N,) counts (reserved rows 0)."""
    c = np.bincount(np.asarray(items, dtype=np.int64), minlength=n_items).astype(np.float64)
    c[:N_RESERVED] = 0.0
    return c


def in_batch_log_q(counts: npt.ArrayLike, batch_size: int) -> Tensor:
    """(N,) counts -> (N,) log expected count of each item among a batch's B positives, i.e.
    log(B * p_i) with p_i its share of training positives (+1 smoothing, so no -inf)."""
    c = np.asarray(counts, dtype=np.float64) + 1.0
    return torch.from_numpy(np.log(batch_size * c / c.sum())).float()


def build_sampler(kind: str, counts: npt.NDArray[np.float64], per_row: int, *,
                  power: float = 0.75, pool: int = 50) -> NegativeSampler:
    """A sampler by name: ``uniform``, ``popularity`` or ``hard``."""
    if kind == "uniform":
        return UniformSampler(len(counts), per_row)
    if kind == "popularity":
        return PopularitySampler(counts, per_row, power)
    if kind == "hard":
        return HardSampler(len(counts), per_row, pool)
    raise ValueError(f"unknown negative sampler {kind!r}; choose uniform, popularity or hard")
