"""The business objective a ranked list serves, and what a list earns (issue 25).

A multi-task ranker (ranking/multitask.py) gives each candidate pCTR and pCVR (conversion given a
click); the served score is one of

- ``engagement``: pCTR (today's behaviour of every single-task ranker);
- ``conversion``: pCTCVR = pCTR x pCVR, the probability of a click that converts;
- ``revenue``: pCTCVR x price, the expected revenue of showing the item;
- ``blend``: pCTR^a x pCVR^b x price^c with the config's weights (a, b, c): engagement is
  (1, 0, 0), conversion (1, 1, 0), revenue (1, 1, 1); weights between trade one for the other.

Items without a price (NaN) earn nothing: under ``revenue`` (and a blend with a price weight)
they score 0 and rank last. Offline, ``revenue_at_k`` is what the top K of each list earned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
Objective = Literal["engagement", "conversion", "revenue", "blend"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)
# (ctr, cvr, price) exponents of each named objective
_EXPONENTS = {"engagement": (1.0, 0.0, 0.0), "conversion": (1.0, 1.0, 0.0),
              "revenue": (1.0, 1.0, 1.0)}


@dataclass(frozen=True)
class ObjectiveConfig:
    """Which score ranks the candidates (``bstrec.config.from_dict`` fills it)."""

    kind: Objective = "engagement"
    # blend only: score = pCTR^ctr_weight x pCVR^cvr_weight x price^price_weight
    ctr_weight: float = 1.0
    cvr_weight: float = 1.0
    price_weight: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in OBJECTIVES:
            raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {self.kind!r}")
        weights = (self.ctr_weight, self.cvr_weight, self.price_weight)
        if min(weights) < 0 or not np.all(np.isfinite(weights)):
            raise ValueError(f"blend weights must be finite and >= 0, got {weights}")

    @property
    def exponents(self) -> tuple[float, float, float]:
        """(ctr, cvr, price) exponents of the score."""
        if self.kind == "blend":
            return self.ctr_weight, self.cvr_weight, self.price_weight
        return _EXPONENTS[self.kind]

    @property
    def needs_cvr(self) -> bool:
        return self.exponents[1] > 0

    @property
    def needs_price(self) -> bool:
        return self.exponents[2] > 0


def objective_scores(config: ObjectiveConfig, p_ctr: npt.ArrayLike,
                     p_cvr: npt.ArrayLike | None = None,
                     price: npt.ArrayLike | None = None) -> FloatArray:
    """(N,) scores of N candidates under ``config`` from pCTR (N,), pCVR (N,) and prices (N,)
    (NaN: no price, score 0). pCVR and price are needed only where the objective reads them."""
    a, b, c = config.exponents
    ctr = np.asarray(p_ctr, dtype=np.float64)
    score = ctr ** a
    if b > 0:
        if p_cvr is None:
            raise ValueError(f"objective {config.kind!r} needs pCVR: rank with a multi-task "
                             "model (ESMM), not a click-only one")
        score = score * np.asarray(p_cvr, dtype=np.float64) ** b
    if c > 0:
        if price is None:
            raise ValueError(f"objective {config.kind!r} needs item prices: the item table "
                             "has no price column")
        p = np.asarray(price, dtype=np.float64)
        if np.any(p < 0):
            raise ValueError("prices must be >= 0")
        score = np.where(np.isnan(p), 0.0, score * np.nan_to_num(p) ** c)
    out: FloatArray = score
    return out


def top_k_mask(groups: npt.ArrayLike, scores: npt.ArrayLike, k: int) -> npt.NDArray[np.bool_]:
    """(N,) whether each row is among the ``k`` best-scored rows of its group (ties: the
    earlier row first)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    g = np.asarray(groups)
    s = np.asarray(scores, dtype=np.float64)
    if g.shape != s.shape or g.ndim != 1:
        raise ValueError(f"groups and scores must be (N,), got {g.shape} and {s.shape}")
    n = s.shape[0]
    order = np.lexsort((np.arange(n), -s, g))  # by group, then score descending
    g_sorted = g[order]
    start = np.r_[True, g_sorted[1:] != g_sorted[:-1]] if n else np.zeros(0, dtype=bool)
    first = np.maximum.accumulate(np.where(start, np.arange(n), 0)) if n else np.zeros(0, int)
    rank = np.arange(n) - first
    out = np.zeros(n, dtype=bool)
    out[order] = rank < k
    return out


def revenue_at_k(groups: npt.ArrayLike, scores: npt.ArrayLike, revenue: npt.ArrayLike,
                 k: int = 10) -> float:
    """Mean over groups (e.g. users' lists) of the revenue earned by the top ``k`` rows by
    score; ``revenue`` (N,) is what a row earns (price if bought, else 0)."""
    rev = np.asarray(revenue, dtype=np.float64)
    mask = top_k_mask(groups, scores, k)
    if rev.shape != mask.shape:
        raise ValueError(f"revenue must be (N,) like scores, got {rev.shape}")
    _, group_of = np.unique(np.asarray(groups), return_inverse=True)
    if group_of.size == 0:
        return float("nan")
    per_group = np.bincount(group_of, weights=rev * mask)
    return float(per_group.mean())
