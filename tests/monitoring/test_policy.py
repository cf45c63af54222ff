"""The Plackett-Luce serving policy: its inclusion probabilities against enumeration of every
ordering and against Monte Carlo, its draws, extreme inputs, and the config."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from bstrec.monitoring.policy import (
    PolicyConfig,
    _leave_one_out_below_k,
    choose,
    inclusion_probabilities,
    logits,
    plackett_luce,
)

# bounds on the quadrature against exact enumeration, with a wide margin over what it reaches
EXACT_ABS = 1e-10
EXACT_REL = 1e-8


def enumerated(s: np.ndarray, k: int) -> np.ndarray:
    """P(i in the top k) by summing the probability of every ordered k-prefix."""
    p = np.zeros(s.size)
    for prefix in itertools.permutations(range(s.size), k):
        left = list(range(s.size))
        log_prob = 0.0
        for i in prefix:
            log_prob += s[i] - np.logaddexp.reduce(s[left])  # in logs: the weights underflow
            left.remove(i)
        p[list(prefix)] += np.exp(log_prob)
    return p


def gumbel_top_k(s: np.ndarray, k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Inclusion frequencies (C,) of n independent Gumbel top-k draws."""
    counts = np.zeros(s.size)
    for chunk in np.array_split(np.arange(n), max(1, n // 20_000)):
        perturbed = s[None, :] + rng.gumbel(size=(chunk.size, s.size))
        top = np.argpartition(-perturbed, k - 1, axis=1)[:, :k]
        counts += np.bincount(top.ravel(), minlength=s.size)
    return counts / n


SCORE_SETS = {
    "spread": np.array([0.9, 0.5, 0.3, 0.1, 0.02, 0.001]),
    "close": np.array([0.11, 0.1, 0.1, 0.09, 0.12, 0.105]),
    "ties": np.array([0.2, 0.2, 0.2, 0.5, 0.5, 0.01]),
}


@pytest.mark.parametrize("temperature", [0.05, 0.3, 1.0, 5.0])
@pytest.mark.parametrize("name", sorted(SCORE_SETS))
def test_inclusion_matches_enumeration_of_every_ordering(name: str, temperature: float) -> None:
    scores = SCORE_SETS[name]
    s = logits(scores, temperature)
    for k in range(1, scores.size + 1):
        p = inclusion_probabilities(scores, k, temperature)
        exact = enumerated(s, k)
        np.testing.assert_allclose(p, exact, rtol=EXACT_REL, atol=EXACT_ABS, err_msg=f"k={k}")
        assert p.sum() == pytest.approx(k, abs=1e-9)


def test_inclusion_matches_enumeration_for_random_scores() -> None:
    rng = np.random.default_rng(3)
    for trial in range(12):
        scores = rng.uniform(0.001, 0.999, size=6) if trial % 2 else rng.beta(0.5, 5.0, size=6)
        temperature = float(rng.choice([0.1, 1.0, 3.0]))
        s = logits(scores, temperature)
        for k in range(2, 6):
            np.testing.assert_allclose(inclusion_probabilities(scores, k, temperature),
                                       enumerated(s, k), rtol=EXACT_REL, atol=EXACT_ABS)


@pytest.mark.parametrize(("k", "temperature"), [(10, 1.0), (10, 0.3), (3, 2.0)])
def test_inclusion_matches_monte_carlo_for_100_candidates(k: int, temperature: float) -> None:
    rng = np.random.default_rng(11)
    scores = rng.beta(1.0, 8.0, size=100)
    p = inclusion_probabilities(scores, k, temperature)
    n = 100_000
    freq = gumbel_top_k(logits(scores, temperature), k, n, rng)
    se = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(freq - p) <= 5 * se + 1e-4), np.max(np.abs(freq - p) / (se + 1e-12))
    assert p.sum() == pytest.approx(k, abs=1e-9)


@pytest.mark.parametrize(("c", "k"), [(3, 2), (7, 3), (16, 5), (30, 10), (41, 1)])
def test_leave_one_out_count_matches_a_plain_dynamic_programme(c: int, k: int) -> None:
    rng = np.random.default_rng(c)
    q = rng.uniform(size=(4, c)) ** rng.choice([1.0, 8.0], size=(4, c))  # some near 0
    q[0, :2] = 1.0  # certain items: their leave-one-out counts differ most
    expected = np.empty_like(q)
    for j in range(c):
        pmf = np.zeros((q.shape[0], k))
        pmf[:, 0] = 1.0
        for other in np.delete(np.arange(c), j):
            p = q[:, other:other + 1]
            pmf = np.concatenate([pmf[:, :1] * (1 - p), pmf[:, 1:] * (1 - p) + pmf[:, :-1] * p],
                                 axis=1)
        expected[:, j] = pmf.sum(axis=1)
    np.testing.assert_allclose(_leave_one_out_below_k(q, k), expected, rtol=1e-12, atol=1e-15)


def test_inclusion_matches_monte_carlo_for_500_candidates_and_a_long_list() -> None:
    rng = np.random.default_rng(12)
    scores = rng.beta(1.0, 8.0, size=500)
    p = inclusion_probabilities(scores, 50, 1.0)
    n = 20_000
    freq = gumbel_top_k(logits(scores, 1.0), 50, n, rng)
    se = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(freq - p) <= 5 * se + 2e-4)
    assert p.sum() == pytest.approx(50, abs=1e-9)


def test_draws_follow_the_inclusion_probabilities_and_the_first_is_a_softmax() -> None:
    rng = np.random.default_rng(5)
    scores = np.array([0.6, 0.3, 0.2, 0.1, 0.05, 0.01])
    k, n = 3, 3_000
    counts = np.zeros(scores.size)
    first = np.zeros(scores.size)
    expected = inclusion_probabilities(scores, k, 1.0)
    for _ in range(n):
        chosen, propensity = plackett_luce(scores, k, 1.0, rng)
        assert len(set(chosen.tolist())) == k
        np.testing.assert_allclose(propensity, expected[chosen], rtol=1e-12)
        counts[chosen] += 1
        first[chosen[0]] += 1
    se = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(counts / n - expected) <= 5 * se + 1e-3)
    softmax = np.exp(logits(scores, 1.0))
    softmax /= softmax.sum()
    assert np.all(np.abs(first / n - softmax) <= 5 * np.sqrt(softmax * (1 - softmax) / n) + 1e-3)


def test_a_seed_redraws_the_same_list() -> None:
    scores = np.random.default_rng(0).uniform(size=50)
    a = plackett_luce(scores, 10, 1.0, np.random.default_rng(42))
    b = plackett_luce(scores, 10, 1.0, np.random.default_rng(42))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("k", [6, 7, 50])
def test_k_at_least_the_candidates_shows_all_with_probability_one(k: int) -> None:
    scores = np.array([0.9, 0.5, 0.3, 0.1, 0.02, 0.001])
    chosen, propensity = plackett_luce(scores, k, 1.0, np.random.default_rng(0))
    assert sorted(chosen.tolist()) == list(range(6))
    np.testing.assert_array_equal(propensity, np.ones(6))
    np.testing.assert_array_equal(inclusion_probabilities(scores, k, 1.0), np.ones(6))


def test_no_candidates_gives_an_empty_list() -> None:
    chosen, propensity = plackett_luce(np.empty(0), 5, 1.0, np.random.default_rng(0))
    assert chosen.size == 0 and propensity.size == 0


@pytest.mark.parametrize("temperature", [1e-6, 1e-3, 0.05, 1.0, 100.0])
def test_extreme_scores_and_temperatures_stay_finite(temperature: float) -> None:
    rng = np.random.default_rng(1)
    scores = np.concatenate([[0.0, 1.0, 1.0, 0.0], rng.uniform(size=96)]).astype(np.float32)
    for k in (1, 2, 10, 99):
        p = inclusion_probabilities(scores, k, temperature)
        assert np.all(np.isfinite(p)) and np.all((p >= 0) & (p <= 1))
        assert p.sum() == pytest.approx(k, abs=1e-8)
        chosen, propensity = plackett_luce(scores, k, temperature, rng)
        assert chosen.size == k and np.all(np.isfinite(propensity)) and np.all(propensity > 0)


def test_a_cold_policy_is_greedy_with_propensity_one() -> None:
    scores = np.array([0.5, 0.9, 0.1, 0.7, 0.3])
    chosen, propensity = plackett_luce(scores, 3, 1e-4, np.random.default_rng(0))
    assert chosen.tolist() == [1, 3, 0]
    np.testing.assert_allclose(propensity, 1.0, atol=1e-12)


def test_a_wide_gap_at_k_is_handled_without_a_long_grid() -> None:
    # 3 near-certain items far above the rest at a low temperature: the gap is shrunk, and
    # the probabilities still match enumeration of the distribution that is sampled
    scores = np.array([0.999, 0.998, 0.997, 0.01, 0.009, 0.008])
    p = inclusion_probabilities(scores, 3, 0.01)
    np.testing.assert_allclose(p[:3], 1.0, atol=1e-12)
    assert p.sum() == pytest.approx(3.0, abs=1e-9)
    p4 = inclusion_probabilities(scores, 4, 0.01)
    np.testing.assert_allclose(p4, enumerated(logits(scores, 0.01), 4), atol=EXACT_ABS)


def test_invalid_arguments_are_refused() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="k must be"):
        plackett_luce(np.array([0.5]), 0, 1.0, rng)
    with pytest.raises(ValueError, match="temperature"):
        plackett_luce(np.array([0.5]), 1, 0.0, rng)
    with pytest.raises(ValueError, match="one-dimensional"):
        inclusion_probabilities(np.ones((2, 2)) / 2, 1, 1.0)
    with pytest.raises(ValueError, match="finite"):
        inclusion_probabilities(np.array([0.5, np.nan]), 1, 1.0)


def test_policy_config_validates() -> None:
    assert PolicyConfig() == PolicyConfig(kind="greedy", temperature=1.0)
    for temperature in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            PolicyConfig(kind="plackett_luce", temperature=temperature)
    with pytest.raises(ValueError, match="kind"):
        PolicyConfig(kind="softmax")  # type: ignore[arg-type]


def test_choose_dispatches_on_the_config() -> None:
    scores = np.array([0.2, 0.9, 0.2, 0.5])
    rng = np.random.default_rng(0)
    order, propensity = choose(scores, 3, PolicyConfig(), rng)
    assert order.tolist() == [1, 3, 0] and propensity is None
    drawn, propensity = choose(scores, 3, PolicyConfig("plackett_luce", 0.5), rng)
    assert propensity is not None and drawn.size == 3
    np.testing.assert_allclose(propensity,
                               inclusion_probabilities(scores, 3, 0.5)[drawn], rtol=1e-12)
