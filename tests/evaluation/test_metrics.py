from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bstrec.evaluation import metrics as M
from bstrec.evaluation.metrics import (
    auc,
    auc_by_bucket,
    calibration_curve,
    ece,
    gauc,
    logloss,
    mean_std,
    ndcg_at_k,
    paired_bootstrap_auc_diff,
    recall_at_k,
    rela_impr,
)


def brute_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (pos.size * neg.size))


def test_auc_with_ties_is_exact_fraction() -> None:
    # pos 0.8 vs neg 0.8: tie (1/2); pos 0.8 vs neg 0.1: 1; pos 0.3 vs neg 0.8: 0; vs 0.1: 1
    y = np.array([1, 0, 1, 0])
    s = np.array([0.8, 0.8, 0.3, 0.1])
    assert auc(y, s) == 5 / 8


def test_auc_one_class_is_nan() -> None:
    assert math.isnan(auc(np.ones(3), np.arange(3.0)))


labels_scores = st.integers(2, 30).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 1), min_size=n, max_size=n),
    st.lists(st.integers(0, 4), min_size=n, max_size=n)))  # few values: many ties


@settings(max_examples=200, deadline=None)
@given(labels_scores)
def test_auc_equals_pairwise_count(data: tuple[list[int], list[int]]) -> None:
    y, s = np.array(data[0]), np.array(data[1], dtype=np.float64)
    expected = brute_auc(y, s)
    if math.isnan(expected):
        assert math.isnan(auc(y, s))
    else:
        assert auc(y, s) == pytest.approx(expected, abs=1e-12)


def test_gauc_hand_case() -> None:
    users = np.array(["a", "a", "a", "b", "b", "c", "c", "d", "e", "e"])
    y = np.array([1, 0, 0, 0, 1, 1, 1, 0, 1, 0])
    s = np.array([0.9, 0.2, 0.95, 0.4, 0.6, 0.1, 0.2, 0.5, 0.5, 0.5])
    # a: 1 of 2 pairs won -> 1/2, weight 3; b: 1, weight 2; e: tie -> 1/2, weight 2;
    # c (positives only) and d (one negative) are left out.
    assert gauc(users, y, s) == pytest.approx((3 * 0.5 + 2 * 1.0 + 2 * 0.5) / 7, abs=1e-12)


def test_gauc_no_user_with_both_labels_is_nan() -> None:
    assert math.isnan(gauc(np.array([1, 1, 2]), np.array([1, 1, 0]), np.array([0.1, 0.2, 0.3])))


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 40).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 4), min_size=n, max_size=n),
    st.lists(st.integers(0, 1), min_size=n, max_size=n),
    st.lists(st.integers(0, 3), min_size=n, max_size=n))))
def test_gauc_equals_per_user_loop(data: tuple[list[int], list[int], list[int]]) -> None:
    u, y, s = (np.array(x) for x in data)
    total = weight = 0.0
    for user in np.unique(u):
        m = u == user
        a = brute_auc(y[m], s[m].astype(np.float64))
        if not math.isnan(a):
            total += a * m.sum()
            weight += m.sum()
    got = gauc(u, y, s)
    if weight == 0:
        assert math.isnan(got)
    else:
        assert got == pytest.approx(total / weight, abs=1e-12)


def test_logloss_hand_case_and_clipping() -> None:
    assert logloss([1, 0], [0.8, 0.4]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    assert logloss([0], [1.0], eps=1e-7) == pytest.approx(-math.log(1e-7), rel=1e-6)


def test_logloss_rejects_bad_labels() -> None:
    with pytest.raises(ValueError):
        logloss([2], [0.5])


def test_rela_impr() -> None:
    assert rela_impr(0.75, 0.7) == pytest.approx(25.0)
    assert rela_impr(0.7, 0.7) == 0.0


def test_ece_two_bins_hand_case() -> None:
    p = np.array([0.1, 0.2, 0.3, 0.7, 0.9])
    y = np.array([0, 1, 0, 1, 1])
    # bin [0, .5): mean p 0.2, rate 1/3, n 3; bin [.5, 1]: mean p 0.8, rate 1, n 2
    assert ece(y, p, n_bins=2) == pytest.approx((3 * (1 / 3 - 0.2) + 2 * 0.2) / 5)
    curve = calibration_curve(y, p, 2)
    np.testing.assert_allclose(curve.mean_pred, [0.2, 0.8])
    np.testing.assert_allclose(curve.frac_pos, [1 / 3, 1.0])
    np.testing.assert_array_equal(curve.counts, [3, 2])


def test_calibration_curve_empty_bin_and_upper_edge() -> None:
    curve = calibration_curve([1, 0], [1.0, 0.0], 3)
    np.testing.assert_array_equal(curve.counts, [1, 0, 1])
    assert math.isnan(curve.frac_pos[1])
    assert ece([1, 0], [1.0, 0.0], 3) == 0.0


def test_auc_by_bucket() -> None:
    y = np.array([1, 0, 1, 0, 1])
    s = np.array([0.9, 0.1, 0.2, 0.8, 0.5])
    out = auc_by_bucket(y, s, np.array([0, 0, 1, 1, 2]), ["a", "b", "c"])
    assert [b.name for b in out] == ["a", "b", "c"]
    assert [b.n for b in out] == [2, 2, 1]
    assert [b.n_pos for b in out] == [1, 1, 1]
    assert out[0].auc == 1.0 and out[1].auc == 0.0 and math.isnan(out[2].auc)


def test_recall_and_ndcg_at_k() -> None:
    ranked = np.array([[5, 3, 9], [1, 2, 3], [7, 8, 4]])
    targets = np.array([3, 9, 4])
    assert recall_at_k(ranked, targets, 2) == pytest.approx(1 / 3)
    assert ndcg_at_k(ranked, targets, 2) == pytest.approx((1 / math.log2(3)) / 3)
    assert recall_at_k(ranked, targets, 3) == pytest.approx(2 / 3)
    assert ndcg_at_k(ranked, targets, 3) == pytest.approx((1 / math.log2(3) + 0.5) / 3)
    assert ndcg_at_k(ranked[:1], np.array([5]), 1) == 1.0


def test_mean_std() -> None:
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)


def test_weighted_auc_equals_auc_of_resample() -> None:
    rng = np.random.default_rng(3)
    n = 300
    y = (rng.random(n) < 0.4).astype(np.float64)
    s = np.round(rng.random(n), 1)  # ties
    idx = rng.integers(0, n, n)
    w = np.bincount(idx, minlength=n).astype(np.float64)
    order = np.argsort(s, kind="mergesort")
    rs, ys = s[order], y[order]
    bounds = np.r_[np.flatnonzero(np.r_[True, rs[1:] != rs[:-1]]), n]
    block = np.repeat(np.arange(bounds.size - 1), np.diff(bounds))
    pos = np.flatnonzero(ys == 1)
    pb = np.stack([bounds[block[pos]], bounds[block[pos] + 1]])
    got = M._weighted_auc(1.0 - ys, pos, pb, w[order][:, None])
    assert got[0] == pytest.approx(auc(y[idx], s[idx]), abs=1e-12)


def naive_bootstrap(y: np.ndarray, a: np.ndarray, b: np.ndarray, n_boot: int, seed: int,
                    groups: np.ndarray | None) -> tuple[float, float]:
    """The same draws as paired_bootstrap_auc_diff with chunk >= n_boot, resampled explicitly."""
    rng = np.random.default_rng(seed)
    if groups is None:
        members = [np.array([i]) for i in range(y.size)]
    else:
        _, inv = np.unique(groups, return_inverse=True)
        members = [np.flatnonzero(inv == g) for g in range(inv.max() + 1)]
    draws = rng.integers(0, len(members), size=(n_boot, len(members)))
    diffs = []
    for row in draws:
        idx = np.concatenate([members[g] for g in row])
        diffs.append(auc(y[idx], a[idx]) - auc(y[idx], b[idx]))
    lo, hi = np.nanpercentile(diffs, [2.5, 97.5])
    return float(lo), float(hi)


@pytest.mark.parametrize("grouped", [False, True])
def test_bootstrap_matches_explicit_resampling(grouped: bool) -> None:
    rng = np.random.default_rng(0)
    n = 400
    y = (rng.random(n) < 0.5).astype(np.float64)
    a = np.round(y * 0.5 + rng.random(n), 1)
    b = y * 0.3 + rng.random(n)
    groups = rng.integers(0, 30, n) if grouped else None
    res = paired_bootstrap_auc_diff(y, a, b, n_boot=60, seed=4, groups=groups, chunk=60)
    lo, hi = naive_bootstrap(y, a, b, 60, 4, groups)
    assert res.diff == pytest.approx(auc(y, a) - auc(y, b), abs=1e-12)
    assert res.lo == pytest.approx(lo, abs=1e-12)
    assert res.hi == pytest.approx(hi, abs=1e-12)
    # chunking does not change the draws
    again = paired_bootstrap_auc_diff(y, a, b, n_boot=60, seed=4, groups=groups, chunk=7)
    assert again.lo == pytest.approx(res.lo, abs=1e-12)
    assert again.hi == pytest.approx(res.hi, abs=1e-12)


def test_bootstrap_interval_contains_true_difference() -> None:
    # score = label x mu + N(0, 1): population AUC = Phi(mu / sqrt 2)
    rng = np.random.default_rng(1)
    n = 5000
    y = (rng.random(n) < 0.5).astype(np.float64)
    a = y * 1.0 + rng.standard_normal(n)
    b = y * 0.5 + rng.standard_normal(n)

    def phi(x: float) -> float:
        return 0.5 * (1 + math.erf(x / math.sqrt(2)))

    true = phi(1.0 / math.sqrt(2)) - phi(0.5 / math.sqrt(2))
    diff, lo, hi = paired_bootstrap_auc_diff(y, a, b, n_boot=300, seed=0)
    assert lo < true < hi
    assert lo < diff < hi
    assert hi - lo < 0.06


def test_bootstrap_identical_inputs_is_exactly_zero() -> None:
    rng = np.random.default_rng(2)
    y = (rng.random(500) < 0.5).astype(np.float64)
    s = rng.random(500)
    assert tuple(paired_bootstrap_auc_diff(y, s, s, n_boot=100)) == (0.0, 0.0, 0.0)
    users = rng.integers(0, 20, 500)
    assert tuple(paired_bootstrap_auc_diff(y, s, s, n_boot=100, groups=users)) == (0.0, 0.0, 0.0)


def test_bootstrap_with_seeds_compares_mean_auc() -> None:
    rng = np.random.default_rng(5)
    n = 300
    y = (rng.random(n) < 0.5).astype(np.float64)
    a = np.stack([y + rng.standard_normal(n) for _ in range(3)])
    b = y + rng.standard_normal(n)
    res = paired_bootstrap_auc_diff(y, a, b, n_boot=50)
    assert res.diff == pytest.approx(np.mean([auc(y, r) for r in a]) - auc(y, b), abs=1e-12)
    assert res.lo <= res.hi
