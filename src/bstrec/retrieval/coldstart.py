"""Cold start: what the match stage does for users and items it knows little or nothing about.

- A user with no history gets the items popular in their context (their profile segment, e.g.
  gender x age group, shrunk towards global popularity): ``popular`` only.
- A user with one to ``few_events`` behaviours gets the item-to-item neighbours of those
  behaviours and the popular items of their categories ("category neighbours"), topped up with
  popular items: too few behaviours for the sequence tower to say much.
- A new item (no interactions, so no id embedding) gets its content vector from the item tower
  (id = out of vocabulary; category, attributes, genres known) and can be added to the index
  without a rebuild.

Notation: Q queries, L history length, C categories, N catalog size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from bstrec.retrieval.popular import Popularity
from bstrec.retrieval.two_tower import TwoTower

COLD, FEW, REGULAR = 0, 1, 2


@dataclass(frozen=True)
class ColdStartConfig:
    """(``bstrec.config.from_dict`` fills it; unknown keys are errors)."""

    few_events: int = 2  # users with 1..few_events behaviours take the few-events path
    # shares of the merged list for few-events users, by source
    few_shares: tuple[tuple[str, float], ...] = (("item_cf", 0.6), ("category", 0.3),
                                                 ("popular", 0.1))

    def __post_init__(self) -> None:
        if self.few_events < 0:
            raise ValueError(f"few_events must be >= 0, got {self.few_events}")
        if any(s < 0 for _, s in self.few_shares) or sum(s for _, s in self.few_shares) <= 0:
            raise ValueError("few_shares must be >= 0 and sum to more than 0")

    def few_quotas(self, total: int) -> dict[str, int]:
        """Integer quotas summing to ``total`` in the proportions of ``few_shares``."""
        shares = np.array([s for _, s in self.few_shares], dtype=np.float64)
        raw = shares / shares.sum() * total
        q = np.floor(raw).astype(np.int64)
        q[np.argsort(-(raw - q))[: total - int(q.sum())]] += 1
        return {n: int(v) for (n, _), v in zip(self.few_shares, q, strict=True)}


def route(hist_mask: Tensor | npt.NDArray[np.bool_], config: ColdStartConfig
          ) -> npt.NDArray[np.int8]:
    """(Q, L) history masks -> (Q,) path: COLD (no behaviour), FEW (1..few_events), REGULAR."""
    n = np.asarray(hist_mask).sum(1)
    out: npt.NDArray[np.int8] = np.where(n == 0, COLD, np.where(
        n <= config.few_events, FEW, REGULAR)).astype(np.int8)
    return out


def category_scores(pop: Popularity, hist_cat: npt.ArrayLike, hist_mask: npt.ArrayLike
                    ) -> npt.NDArray[np.float64]:
    """(Q, L) history categories -> (Q, N): the popular items of the categories the user
    touched, each category weighted by how many of the behaviours it holds."""
    C = pop.by_category.shape[0]
    cats = np.clip(np.asarray(hist_cat, dtype=np.int64), 0, C - 1)
    Q = cats.shape[0]
    cell = (np.arange(Q, dtype=np.int64)[:, None] * C + cats).ravel()
    counts = np.bincount(cell, weights=np.asarray(hist_mask, dtype=np.float64).ravel(),
                         minlength=Q * C).reshape(Q, C)
    counts[:, :2] = 0.0  # padding / unknown category say nothing
    out: npt.NDArray[np.float64] = counts @ pop.category_shares
    return out


@torch.no_grad()
def new_item_vectors(model: TwoTower, items: dict[str, Tensor]) -> Tensor:
    """Item columns of new items (``item`` = OOV, content encoded; see
    ``catalog.encode_new_items``) -> (n, D) content vectors."""
    model.eval()
    return model.encode_items(items)
