"""Objectives (issue 25): scores by hand, the named objectives as blends, revenue@K by hand."""

from __future__ import annotations

import numpy as np
import pytest

from bstrec.config import ConfigError, from_dict
from bstrec.evaluation.objective import (
    ObjectiveConfig,
    objective_scores,
    revenue_at_k,
    top_k_mask,
)

P_CTR = np.array([0.5, 0.2, 0.4])
P_CVR = np.array([0.1, 0.5, 0.2])
PRICE = np.array([10.0, 4.0, np.nan])


def test_named_objectives_by_hand() -> None:
    assert np.allclose(objective_scores(ObjectiveConfig(), P_CTR), P_CTR)
    assert np.allclose(objective_scores(ObjectiveConfig("conversion"), P_CTR, P_CVR),
                       [0.05, 0.1, 0.08])
    # revenue: pCTCVR x price; an item without a price earns nothing
    assert np.allclose(objective_scores(ObjectiveConfig("revenue"), P_CTR, P_CVR, PRICE),
                       [0.5, 0.4, 0.0])


def test_blend_spans_the_named_ones() -> None:
    for kind, w in (("engagement", (1, 0, 0)), ("conversion", (1, 1, 0)),
                    ("revenue", (1, 1, 1))):
        blend = ObjectiveConfig("blend", ctr_weight=w[0], cvr_weight=w[1], price_weight=w[2])
        assert np.allclose(objective_scores(blend, P_CTR, P_CVR, PRICE),
                           objective_scores(from_dict(ObjectiveConfig, {"kind": kind}), P_CTR,
                                            P_CVR, PRICE))
    half = ObjectiveConfig("blend", price_weight=0.5)
    assert np.allclose(objective_scores(half, P_CTR, P_CVR, PRICE)[:2],
                       [0.05 * np.sqrt(10), 0.1 * 2])


def test_missing_inputs_and_bad_configs_are_errors() -> None:
    with pytest.raises(ValueError, match="needs pCVR"):
        objective_scores(ObjectiveConfig("conversion"), P_CTR)
    with pytest.raises(ValueError, match="needs item prices"):
        objective_scores(ObjectiveConfig("revenue"), P_CTR, P_CVR)
    with pytest.raises(ValueError, match="prices must be >= 0"):
        objective_scores(ObjectiveConfig("revenue"), P_CTR, P_CVR, -PRICE)
    with pytest.raises(ConfigError, match="'profit' is not one of"):
        from_dict(ObjectiveConfig, {"kind": "profit"})
    with pytest.raises(ValueError, match="objective must be one of"):
        ObjectiveConfig("profit")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown keys"):
        from_dict(ObjectiveConfig, {"kind": "blend", "margin_weight": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        ObjectiveConfig("blend", price_weight=-1.0)


def test_revenue_at_k_by_hand() -> None:
    groups = np.array([1, 1, 1, 2, 2])
    scores = np.array([0.9, 0.1, 0.5, 0.3, 0.3])
    revenue = np.array([0.0, 7.0, 5.0, 2.0, 3.0])
    assert top_k_mask(groups, scores, 2).tolist() == [True, False, True, True, True]
    # group 1: top 2 = rows 0 and 2 (0 + 5); group 2: both rows (5): mean 5
    assert revenue_at_k(groups, scores, revenue, k=2) == pytest.approx(5.0)
    # k = 1: group 1 row 0 (0); group 2 ties: the earlier row (2)
    assert revenue_at_k(groups, scores, revenue, k=1) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="k must be"):
        revenue_at_k(groups, scores, revenue, k=0)
