"""Off-policy estimates: a hand-computed log, simulations with a known truth (users with fixed
click probabilities per item, a Plackett-Luce logging policy, a deterministic target list),
unbiasedness and coverage across repetitions, and the refusals."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pytest

from bstrec.monitoring.ope import estimate
from bstrec.monitoring.policy import inclusion_probabilities, logits, plackett_luce

K = 4


def logged_frame(requests: np.ndarray, users: np.ndarray, shown: np.ndarray,
                 propensity: np.ndarray, clicked: np.ndarray) -> pl.DataFrame:
    """Shown rows with ``clicked`` as join_clicks gives them: one per (request, position).
    requests, users: (N,); shown, propensity, clicked: (N, K)."""
    n, k = shown.shape
    return pl.DataFrame({
        "request_id": np.repeat(requests, k).astype(str),
        "user_id": np.repeat(users, k).astype(str),
        "model_version": "prod", "arm": "default",
        "position": np.tile(np.arange(k, dtype=np.int32), n),
        "item_id": shown.ravel().astype(str),
        "shown": True, "policy": "plackett_luce",
        "propensity": propensity.ravel(), "k": np.full(n * k, k, dtype=np.int32),
        "clicked": clicked.ravel(),
    })


def shadow_frame(requests: np.ndarray, users: np.ndarray, lists: np.ndarray,
                 version: str) -> pl.DataFrame:
    n, k = lists.shape
    return pl.DataFrame({
        "request_id": np.repeat(requests, k).astype(str),
        "user_id": np.repeat(users, k).astype(str),
        "model_version": version,
        "position": np.tile(np.arange(k, dtype=np.int32), n),
        "item_id": lists.ravel().astype(str), "shown": False,
    })


@dataclass
class World:
    """Users with fixed click probabilities per item, the logging ranker's scores, and the
    target bundle's (deterministic) lists."""

    click: np.ndarray  # (U, C) P(click | user, item), whatever the position
    scores: np.ndarray  # (U, C) the logging ranker's click probabilities
    propensity: np.ndarray  # (U, C) inclusion probabilities of the logging policy
    target: np.ndarray  # (U, K) the target's list for each user

    @classmethod
    def make(cls, rng: np.random.Generator, n_users: int = 150, n_items: int = 20,
             temperature: float = 1.0) -> World:
        logit = rng.normal(-2.0, 0.5, size=(n_users, 1)) + rng.normal(0.0, 0.8, size=n_items)
        click = 1.0 / (1.0 + np.exp(-logit))
        scores = 1.0 / (1.0 + np.exp(-(logit + rng.normal(0.0, 0.7, size=logit.shape))))
        propensity = np.stack([inclusion_probabilities(s, K, temperature) for s in scores])
        target = np.argsort(-(logit + rng.normal(0.0, 0.5, size=logit.shape)), axis=1)[:, :K]
        return cls(click, scores, propensity, target)

    def truth(self, users: np.ndarray) -> float:
        """The target's expected CTR per slot over these requests' users."""
        return float(np.take_along_axis(self.click[users], self.target[users], axis=1).mean())

    def log(self, rng: np.random.Generator, n_requests: int,
            temperature: float = 1.0) -> tuple[pl.DataFrame, pl.DataFrame, np.ndarray]:
        """A Plackett-Luce log (Gumbel top-K, the sampler's own form) and its shadow rows."""
        users = rng.integers(0, len(self.click), size=n_requests)
        perturbed = logits(self.scores[users].ravel(), temperature).reshape(n_requests, -1)
        perturbed += rng.gumbel(size=perturbed.shape)
        shown = np.argsort(-perturbed, axis=1)[:, :K]
        clicked = rng.random(shown.shape) < np.take_along_axis(self.click[users], shown, axis=1)
        requests = np.arange(n_requests)
        joined = logged_frame(requests, users, shown,
                              np.take_along_axis(self.propensity[users], shown, axis=1), clicked)
        shadow = pl.concat([
            shadow_frame(requests, users, self.target[users], "candidate"),
            # another shadow bundle in the same log: it must be ignored
            shadow_frame(requests, users, shown[:, ::-1], "other"),
        ])
        return joined, shadow, users


def test_a_hand_computed_log() -> None:
    joined = pl.DataFrame({
        "request_id": ["r1", "r1", "r2", "r2", "r3", "r3"],
        "user_id": ["u1", "u1", "u2", "u2", "u1", "u1"],
        "item_id": ["a", "b", "c", "d", "a", "b"],
        "propensity": [0.5, 0.8, 0.25, 1.0, 0.5, 0.5],
        "k": [2] * 6, "clicked": [True, False, True, False, True, True], "shown": [True] * 6,
    })
    shadow = pl.DataFrame({
        "request_id": ["r1", "r1", "r1", "r2", "r2", "r4", "r1"],
        "item_id": ["a", "c", "b", "c", "d", "a", "b"],
        "position": [0, 1, 2, 0, 1, 0, 0],  # r1's "b" at 2 is past k: not in its list
        "model_version": ["t", "t", "t", "t", "t", "t", "other"], "shown": [False] * 7,
    })
    result = estimate(joined, shadow, "t", n_boot=200)
    # r1: a shown (p 0.5, clicked): value 2 / 2, weight 2 / 2; r2: c (p 0.25, clicked) and d
    # (p 1, not clicked): value 4 / 2, weight 5 / 2. r3 has no target list, r4 no logged rows.
    assert result.ips == pytest.approx((1.0 + 2.0) / 2)
    assert result.snips == pytest.approx((1.0 + 2.0) / (1.0 + 2.5))
    assert result.ess == pytest.approx((1.0 + 2.5) ** 2 / (1.0 + 2.5**2))
    assert result.logged_ctr == pytest.approx(2 / 4)
    assert (result.n_requests, result.n_users, result.n_matched, result.n_unmatched) == (2, 2, 3, 1)
    assert result.ips_lo <= result.ips <= result.ips_hi
    assert result == estimate(joined, shadow, "t", n_boot=200)  # the seed fixes the intervals


def test_the_interval_covers_the_truth_with_the_served_sampler() -> None:
    """End to end with plackett_luce itself drawing each logged list and its propensities."""
    rng = np.random.default_rng(7)
    world = World.make(rng)
    n = 3_000
    users = rng.integers(0, len(world.click), size=n)
    shown = np.empty((n, K), dtype=np.int64)
    propensity = np.empty((n, K))
    for r, u in enumerate(users):
        shown[r], propensity[r] = plackett_luce(world.scores[u], K, 1.0, rng)
    clicked = rng.random(shown.shape) < np.take_along_axis(world.click[users], shown, axis=1)
    requests = np.arange(n)
    joined = logged_frame(requests, users, shown, propensity, clicked)
    shadow = shadow_frame(requests, users, world.target[users], "candidate")
    result = estimate(joined, shadow, "candidate", n_boot=1_000)
    truth = world.truth(users)
    assert result.ips_lo <= truth <= result.ips_hi
    assert result.snips_lo <= truth <= result.snips_hi
    assert result.n_requests == n and result.n_unmatched == 0
    assert 0 < result.ess < n and result.n_matched > 0


def test_unbiased_and_covering_across_repetitions() -> None:
    rng = np.random.default_rng(11)
    world = World.make(rng)
    reps, errors_ips, errors_snips, covered_ips, covered_snips = 200, [], [], 0, 0
    for rep in range(reps):
        joined, shadow, users = world.log(rng, 800)
        result = estimate(joined, shadow, "candidate", n_boot=200, seed=rep)
        truth = world.truth(users)
        errors_ips.append(result.ips - truth)
        errors_snips.append(result.snips - truth)
        covered_ips += result.ips_lo <= truth <= result.ips_hi
        covered_snips += result.snips_lo <= truth <= result.snips_hi
    for errors in (np.array(errors_ips), np.array(errors_snips)):
        se = errors.std(ddof=1) / np.sqrt(reps)
        assert abs(errors.mean()) < 3 * se, (errors.mean(), se)
    # nominal 95 %: a threshold some three binomial standard deviations below its count
    assert covered_ips >= 178 and covered_snips >= 178, (covered_ips, covered_snips)
    # the logged policy's own CTR is not the target's: the estimate is not a copy of it
    assert abs(np.mean(errors_ips)) < 0.5 * abs(result.logged_ctr - world.truth(users))


def test_a_greedy_log_is_refused() -> None:
    world = World.make(np.random.default_rng(0), n_users=10)
    joined, shadow, _ = world.log(np.random.default_rng(1), 50)
    greedy = joined.with_columns(propensity=pl.lit(None, dtype=pl.Float64),
                                 policy=pl.lit("greedy"))
    with pytest.raises(ValueError, match=r"200 of the 200 logged rows have no propensity"):
        estimate(greedy, shadow, "candidate")


def test_a_target_without_shadow_rows_is_refused() -> None:
    world = World.make(np.random.default_rng(0), n_users=10)
    joined, shadow, _ = world.log(np.random.default_rng(1), 50)
    with pytest.raises(ValueError, match=r"'missing' has no shadow rows.*\['candidate', 'other'\]"):
        estimate(joined, shadow, "missing")
    # shown rows of that version are not shadow rows
    with pytest.raises(ValueError, match="has no shadow rows"):
        estimate(joined, shadow.with_columns(shown=pl.lit(True)), "candidate")


def test_requests_without_a_match_are_refused() -> None:
    world = World.make(np.random.default_rng(0), n_users=10)
    joined, shadow, _ = world.log(np.random.default_rng(1), 50)
    elsewhere = shadow.with_columns(request_id=pl.lit("x-") + pl.col("request_id"))
    with pytest.raises(ValueError, match="none of the 50 requests"):
        estimate(joined, elsewhere, "candidate")
    never_shown = shadow.with_columns(item_id=pl.lit("not-a-candidate"))
    with pytest.raises(ValueError, match="no overlap"):
        estimate(joined, never_shown, "candidate")


def test_invalid_arguments_are_refused() -> None:
    world = World.make(np.random.default_rng(0), n_users=10)
    joined, shadow, _ = world.log(np.random.default_rng(1), 20)
    with pytest.raises(ValueError, match="lacks the columns"):
        estimate(joined.drop("propensity"), shadow, "candidate")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        estimate(joined.with_columns(propensity=pl.lit(0.0)), shadow, "candidate")
    with pytest.raises(ValueError, match="n_boot"):
        estimate(joined, shadow, "candidate", n_boot=0)
