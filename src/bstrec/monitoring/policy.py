"""The stochastic serving policy: a Plackett-Luce draw of the shown list, and each shown item's
exact probability of being in it (its propensity, what off-policy estimates divide by).

Plackett-Luce on logits ``s`` draws the first item with probability softmax(s), the next from
the rest renormalised, and so on. Its Gumbel form is what this module uses twice: perturb every
logit with independent standard Gumbel noise ``g_i = s_i + G_i`` and take the ``k`` largest, in
order (the same distribution over ranked lists). So the sampler is one argpartition, and

    P(i in the top k) = integral over x of f_i(x) P(at most k-1 of the others exceed x) dx

with ``f_i`` the density of ``g_i`` (a Gumbel located at ``s_i``) and the count of others above
``x`` a Poisson-binomial of their probabilities ``q_j(x) = 1 - exp(-exp(s_j - x))``. It is
computed by the trapezoid rule on a uniform grid: the integrand is analytic near the real axis
and decays on both sides, where that rule converges geometrically in 1/step (``_step`` sets the
step from k; ``_inclusion`` the grid's ends, where the Poisson-binomial factor is within
``_TOL`` of 0 or 1, with the tails in closed form). The leave-one-out Poisson-binomial (counts
below k only) comes from products of the items' generating polynomials, so every term stays a
probability and nothing cancels (``_leave_one_out_below_k``). k = 1 is a softmax, k >= C is 1.
tests/monitoring/test_policy.py bounds the error against enumeration of every ordering and
against Monte Carlo.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

PolicyKind = Literal["greedy", "plackett_luce"]
POLICY_KINDS: tuple[PolicyKind, ...] = ("greedy", "plackett_luce")

# Click probabilities of exactly 0 or 1 would have infinite logits: clipped this far from them
_SCORE_EPS = 1e-12
# A gap between the k-th and the (k+1)-th largest logits wider than this is shrunk to it before
# both sampling and the propensities (so the two agree exactly): a wider gap only changes any
# probability by about C^2 exp(-_MAX_GAP), below float64 resolution, but would make the
# quadrature grid proportionally long at low temperatures
_MAX_GAP = 50.0
# The truncation tolerance of the quadrature (absolute, on each inclusion probability)
_TOL = 1e-14
# Below s - _LOW_REACH a Gumbel density located at s is negligible (it decays
# double-exponentially there) at the _TOL level
_LOW_REACH = math.log(math.log(1.0 / _TOL)) + 0.2


@dataclass(frozen=True)
class PolicyConfig:
    """How the shown list is drawn from the ranked candidates.

    ``greedy``: the ``k`` best scores (no propensities). ``plackett_luce``: a Plackett-Luce
    draw on ``logit(score) / temperature``; lower temperatures approach greedy, higher ones
    explore more (and give off-policy estimates larger effective samples)."""

    kind: PolicyKind = "greedy"
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in POLICY_KINDS:
            raise ValueError(f"policy kind must be one of {POLICY_KINDS}, got {self.kind!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"policy temperature must be finite and > 0, got {self.temperature}")


def logits(scores: NDArray[np.floating] | FloatArray, temperature: float) -> FloatArray:
    """Plackett-Luce logits ``logit(score) / temperature`` (C,), scores clipped into (0, 1),
    with the gap after the largest ``k`` not yet shrunk (``plackett_luce`` does that)."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    p = np.clip(np.asarray(scores, dtype=np.float64), _SCORE_EPS, 1.0 - _SCORE_EPS)
    if p.ndim != 1:
        raise ValueError(f"scores must be one-dimensional (C,), got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("scores must be finite")
    out: FloatArray = (np.log(p) - np.log1p(-p)) / temperature
    return out


def _shrink_gap(s: FloatArray, k: int) -> FloatArray:
    """``s`` with the gap between its k-th and (k+1)-th largest values capped at _MAX_GAP (the
    items below it moved up together), so that the quadrature grid stays short."""
    part = np.partition(s, (s.size - k - 1, s.size - k))
    kth, next_ = part[s.size - k], part[s.size - k - 1]
    gap = kth - next_
    if gap <= _MAX_GAP:
        return s
    shrunk = s.copy()
    shrunk[s <= next_] += gap - _MAX_GAP
    return shrunk


def _leave_one_out_below_k(q: FloatArray, k: int) -> FloatArray:
    """P(at most k-1 of the items other than j are 1), for independent Bernoulli(q[g, j]).

    q: (G, C) -> (G, C). Each count distribution is a polynomial truncated to degree k-1, and
    products of them keep every coefficient a probability (nothing cancels). The items are cut
    into ~sqrt(C) chains of ~sqrt(C) items so that a call costs ~3 sqrt(C) NumPy steps rather
    than 2 C (at small C a step's overhead, not its arithmetic, is its cost): (1) a backward
    scan within all chains at once gives each item the pmf of the items after it in its chain,
    and the chains' products; (2) scans over the chains give each chain the product X of all
    other chains; (3) a forward scan within the chains, started from X's CDF, gives each item
    the CDF of X times the items before it (the recurrence maps a CDF as it maps a pmf); the
    two are combined for the count's CDF at k-1. Coefficient axis first in the scans, so that
    the degree shift is a contiguous slice."""
    g, c = q.shape
    b = math.isqrt(c - 1) + 1  # chain length
    nb = -(-c // b)  # number of chains
    padded = np.zeros((g, nb * b))
    padded[:, :c] = q  # q = 0: a factor 1, for the padding items
    chains = np.ascontiguousarray(padded.reshape(g, nb, b).transpose(2, 1, 0))  # (b, nb, G)
    stay = 1.0 - chains

    shifted = np.empty((k - 1, nb, g))

    def scan(start: FloatArray, order: range) -> FloatArray:
        out = np.empty((b + 1, *start.shape))
        out[0] = start
        for step, t in enumerate(order):
            np.multiply(out[step], stay[t], out=out[step + 1])
            np.multiply(out[step, :-1], chains[t], out=shifted)
            np.add(out[step + 1, 1:], shifted, out=out[step + 1, 1:])
        return out

    one = np.zeros((k, nb, g))
    one[0] = 1.0  # the pmf of an empty product
    backward = scan(one, range(b - 1, -1, -1))  # backward[s]: the chain's last s items
    totals = backward[b].transpose(1, 2, 0)  # (nb, G, k): each chain's product

    # the products of the chains before and after each chain, as row vectors times the
    # (truncated) Toeplitz matrices of the factors, both scans in one matmul a step
    def toeplitz(a: FloatArray) -> FloatArray:  # (..., k) -> (..., k, k), a view
        padded_a = np.concatenate([np.zeros((*a.shape[:-1], k - 1)), a], axis=-1)
        windows = np.lib.stride_tricks.sliding_window_view(padded_a, k, axis=-1)
        out: FloatArray = windows[..., ::-1, :]
        return out

    factors = toeplitz(np.stack([totals, totals[::-1]], axis=1))  # (nb, 2, G, k, k)
    outer = np.empty((nb, 2, g, 1, k))
    outer[0] = 0.0
    outer[0, ..., 0] = 1.0
    for t in range(nb - 1):
        np.matmul(outer[t], factors[t], out=outer[t + 1])
    others = (outer[:, 0] @ toeplitz(outer[::-1, 1, :, 0]))[:, :, 0]  # (nb, G, k)

    forward = scan(np.cumsum(others, axis=-1).transpose(2, 0, 1), range(b))  # CDFs
    # item t: P(before + after <= k-1) = sum_a P(after = a) P(before <= k-1-a)
    after = backward[b - 1::-1]  # (b, k, nb, G): after[t] = backward[b-1-t]
    below = np.einsum("tang,tang->gnt", forward[:b, ::-1], after).reshape(g, nb * b)[:, :c]
    result: FloatArray = np.ascontiguousarray(below)
    return result


_TAIL_TERMS = 24  # of the series in _lattice_tail: its terms fall faster than 1 / j!
_TAIL_J = np.arange(_TAIL_TERMS)
_LOG_FACTORIAL = np.cumsum(np.log(np.maximum(_TAIL_J, 1)))


@functools.lru_cache(maxsize=256)
def _step(k: int) -> float:
    """The trapezoid step for a top-k integral, from the aliasing error of the rule.

    The lattice sum's error is of the order of the integrand's Fourier transform at 2 pi /
    step. The sharpest factor of the integrand is the distribution of the k-th largest
    perturbed score; in the many-equal-items limit exp(-x) of it is Gamma(k) distributed, whose
    log has characteristic function modulus |Gamma(k + it)| / Gamma(k) =
    sqrt(pi t / sinh(pi t) * prod_{m<k} (1 + t^2 / m^2)): the step makes it _TOL. It shrinks
    like 1 / sqrt(k), as the k-th largest concentrates."""
    def log_modulus(t: float) -> float:
        # log sinh(pi t) = pi t - log 2 to float64 precision for the t searched here
        return 0.5 * (math.log(math.pi * t) - math.pi * t + math.log(2.0)
                      + sum(math.log1p((t / m) ** 2) for m in range(1, k)))

    lo, hi = 1.0, 1e4  # bisection on t = 2 pi / step: log_modulus falls with t
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if log_modulus(mid) > math.log(_TOL) else (lo, mid)
    return 2.0 * math.pi / hi


def _lattice_tail(a: FloatArray, step: float) -> FloatArray:
    """step * sum_{n >= 1} f(x0 + n step) for the Gumbel densities f(x) = l exp(-l),
    l = exp(s - x), given a = exp(s - x0) <= 1 (m,): expanding exp(-l) in powers of l turns
    each power's lattice sum into a geometric series, sum_j (-a)^j a / (j! (e^{(j+1) step} - 1))."""
    coef = (-1.0) ** _TAIL_J / np.exp(_LOG_FACTORIAL) / np.expm1((_TAIL_J + 1) * step)
    out: FloatArray = step * a * np.polynomial.polynomial.polyval(a, coef)
    return out


def _logsumexp(v: FloatArray) -> float:
    top = float(v.max())
    return top + math.log(float(np.exp(v - top).sum()))


def _inclusion(s: FloatArray, k: int) -> FloatArray:
    """P(i in the top k) under Plackett-Luce on logits ``s`` (C,), for 2 <= k < C.

    On the lattice x_n = x_lo + n * step the trapezoid sum of f_i(x) S_i(x), S_i = P(at most
    k-1 others exceed x), is taken over [x_lo, x_hi], outside which S_i is within _TOL of 0
    (below) or 1 (above). Items whose density is negligible below x_lo use the complement,
    1 - sum f_i (1 - S_i), whose integrand vanishes at both ends of the grid; the others add the
    lattice sum of f_i above x_hi (where S_i = 1) in closed form (_lattice_tail)."""
    desc = np.sort(s)[::-1]
    step = _step(k)
    # below x_lo, each of the k largest others (the (k+1)-th largest at worst) is under x with
    # probability exp(-exp(s - x)) <= _TOL / k
    x_lo = float(desc[k]) - math.log(math.log(k / _TOL))
    # above x_hi, k others exceed x with probability <= _TOL: by the union bound over k-sets,
    # (sum_j exp(s_j - x))^k / k!, and since one of them is not among the k-1 largest,
    # sum_{j >= k-th largest} exp(s_j - x)
    x_hi = min(_logsumexp(desc) - (math.log(_TOL) + math.lgamma(k + 1)) / k,
               _logsumexp(desc[k - 1:]) - math.log(_TOL))
    # exp(s_j - x) on the lattice, as a product (the lattice is uniform), capped where
    # exp(-lam) is 0 already so that lam * exp(-lam) is 0 there rather than inf * 0 (the grid
    # spans less than _MAX_GAP + log C + 40, so a capped lam stays far above 745 along it)
    n = max(math.ceil((x_hi - x_lo) / step), 0) + 1
    lam = np.exp(-step * np.arange(n))[:, None] * np.exp(np.minimum(s - x_lo, 700.0))[None, :]
    stay = np.exp(-lam)  # (G, C): P(g_j <= x)
    # With many candidates the others' count is far above k-1 well above x_lo: the Chernoff
    # bound P(N <= k-1) <= exp(-mu) (e mu / (k-1))^(k-1), mu >= (its mean over all) - 1,
    # lets the grid start later (it grows with x, so the points it clears are a prefix)
    mu = np.maximum((1.0 - stay).sum(axis=1) - 1.0, k - 1.0)
    log_bound = -mu + (k - 1) * (1.0 + np.log(mu / (k - 1)))
    first = max(int(np.searchsorted(log_bound, math.log(_TOL), side="right")) - 1, 0)
    lam, stay = lam[first:], stay[first:]
    x0 = x_lo + first * step
    # the items of the first form must all lie below the grid's end (the tail series needs it)
    extra = math.ceil((x0 + _LOW_REACH - (x_lo + (n - 1) * step)) / step)
    if extra > 0:
        more = np.exp(-step * np.arange(1, extra + 1))[:, None] * lam[-1][None, :]
        lam = np.concatenate([lam, more])
        stay = np.concatenate([stay, np.exp(-more)])
    x_end = x0 + (len(lam) - 1) * step

    density = lam * stay  # f_j(x)
    below = _leave_one_out_below_k(1.0 - stay, k)  # (G, C)
    low = s < x0 + _LOW_REACH
    p = np.where(low, step * np.sum(density * below, axis=0),
                 1.0 - step * np.sum(density * (1.0 - below), axis=0))
    p[low] += _lattice_tail(np.exp(s[low] - x_end), step)
    out: FloatArray = np.clip(p, 0.0, 1.0)
    return out


def inclusion_probabilities(scores: NDArray[np.floating] | FloatArray, k: int,
                            temperature: float) -> FloatArray:
    """Each candidate's probability (C,) of being among the ``k`` items that
    ``plackett_luce(scores, k, temperature, rng)`` shows; sums to min(k, C)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    s = logits(scores, temperature)
    c = s.size
    if k >= c:
        return np.ones(c)
    s = _shrink_gap(s, k)
    if k == 1:
        # the first draw is a softmax: closed form
        e = np.exp(s - s.max())
        out: FloatArray = e / e.sum()
        return out
    return _inclusion(s, k)


def plackett_luce(scores: NDArray[np.floating] | FloatArray, k: int, temperature: float,
                  rng: np.random.Generator) -> tuple[IntArray, FloatArray]:
    """A Plackett-Luce draw of ``k' = min(k, C)`` of ``C`` candidates.

    scores: (C,) click probabilities; logits ``logit(score) / temperature``. Returns the chosen
    candidates' indices (k',) in shown order and each one's exact probability (k',) of being
    in the shown set (its marginal inclusion probability, not the list's probability): the
    propensity that off-policy estimates divide by. Quadrature error: see the tests
    (tests/monitoring/test_policy.py compares against enumeration and Monte Carlo)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    s = logits(scores, temperature)
    c = s.size
    kk = min(k, c)
    if kk == 0:
        return np.empty(0, dtype=np.int64), np.empty(0)
    if kk < c:
        s = _shrink_gap(s, kk)
    perturbed = s + rng.gumbel(size=c)
    top = np.argpartition(-perturbed, kk - 1)[:kk] if kk < c else np.arange(c)
    chosen = top[np.argsort(-perturbed[top], kind="stable")].astype(np.int64)
    if kk == c:
        return chosen, np.ones(c)
    if kk == 1:
        e = np.exp(s - s.max())
        return chosen, (e / e.sum())[chosen]
    return chosen, _inclusion(s, kk)[chosen]


def choose(scores: NDArray[np.floating] | FloatArray, k: int, config: PolicyConfig,
           rng: np.random.Generator) -> tuple[IntArray, FloatArray | None]:
    """The shown list under ``config``: indices (k',) best first (greedy, ties in input order;
    propensities None) or a Plackett-Luce draw with its propensities (k',)."""
    if config.kind == "plackett_luce":
        return plackett_luce(scores, k, config.temperature, rng)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]
    return order.astype(np.int64), None
