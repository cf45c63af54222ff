"""A/B split and arm comparison: the split's stability, share and salt independence; the
bootstrap intervals against simulations with a known truth; refusals."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import polars as pl
import pytest

from bstrec.monitoring.experiments import (
    arm_of,
    bootstrap_sums,
    compare_arms,
    ctr_interval,
)


def test_arm_of_is_stable_and_deterministic() -> None:
    users = [f"user-{i}" for i in range(1_000)]
    first = [arm_of(u, 0.3, "exp-1") for u in users]
    assert first == [arm_of(u, 0.3, "exp-1") for u in users]
    # pinned: the same answer in every process and release (no per-process hash seed)
    assert [arm_of(f"user-{i}", 0.5, "exp-1") for i in range(8)] == [
        "B", "A", "B", "A", "A", "A", "B", "A"]


def test_arm_of_gives_the_same_answer_in_another_process() -> None:
    code = ("from bstrec.monitoring.experiments import arm_of; "
            "print(''.join(arm_of(f'user-{i}', 0.5, 'exp-1') for i in range(64)))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={"PYTHONHASHSEED": "123"}).stdout.strip()
    assert other == "".join(arm_of(f"user-{i}", 0.5, "exp-1") for i in range(64))


@pytest.mark.parametrize("share_b", [0.0, 0.05, 0.5, 0.9, 1.0])
def test_the_share_of_b_is_near_share_b(share_b: float) -> None:
    n = 100_000
    b = sum(arm_of(str(i), share_b, "salt") == "B" for i in range(n))
    # binomial standard error; exact at the ends
    assert abs(b / n - share_b) <= 5 * np.sqrt(share_b * (1 - share_b) / n)


def test_salts_decorrelate_the_assignments() -> None:
    n = 20_000
    one = np.array([arm_of(str(i), 0.5, "exp-1") == "B" for i in range(n)], dtype=float)
    two = np.array([arm_of(str(i), 0.5, "exp-2") == "B" for i in range(n)], dtype=float)
    assert abs(np.corrcoef(one, two)[0, 1]) < 5 / np.sqrt(n)
    # and a larger share keeps the smaller share's B users (the same hash, one threshold)
    wider = np.array([arm_of(str(i), 0.7, "exp-1") == "B" for i in range(n)])
    assert np.all(wider[one == 1])


def test_arm_of_refuses_a_share_outside_the_unit_interval() -> None:
    for share in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="share_b"):
            arm_of("u", share, "s")


def simulate(rng: np.random.Generator, n_users: int, ctr: float, arm: str,
             prefix: str) -> tuple[pl.DataFrame, float]:
    """Users with heterogeneous CTRs (Beta around ``ctr``) and impression counts; returns
    the rows and the arm's expected CTR (impression-weighted over the population)."""
    user_ctr = rng.beta(2.0, 2.0 * (1 - ctr) / ctr, size=n_users)
    impressions = rng.integers(1, 40, size=n_users)
    clicks = rng.binomial(impressions, user_ctr)
    users = np.repeat(np.arange(n_users), impressions)
    clicked = np.concatenate([np.arange(m) < c for m, c in zip(impressions, clicks, strict=True)])
    frame = pl.DataFrame({"user_id": [f"{prefix}{u}" for u in users], "arm": arm,
                          "clicked": clicked, "shown": True})
    # impressions and CTR independent: the population CTR is the mean user CTR's expectation
    return frame, 2.0 / (2.0 + 2.0 * (1 - ctr) / ctr)


def test_compare_arms_covers_the_true_difference_in_most_simulations() -> None:
    rng = np.random.default_rng(0)
    covered, diffs = 0, []
    reps = 100
    for rep in range(reps):
        a, true_a = simulate(rng, 400, 0.10, "control", "a")
        b, true_b = simulate(rng, 400, 0.12, "treatment", "b")
        result = compare_arms(pl.concat([a, b]), "control", "treatment", n_boot=400, seed=rep)
        covered += result.lo <= true_b - true_a <= result.hi
        diffs.append(result.diff)
        assert result.lo <= result.diff <= result.hi
    # nominal 95 %: a threshold some three binomial standard deviations below its count
    assert covered >= 88
    assert np.mean(diffs) == pytest.approx(0.02, abs=3 * np.std(diffs) / np.sqrt(reps))


def test_compare_arms_counts_and_point_estimates() -> None:
    frame = pl.DataFrame({
        "user_id": ["u1", "u1", "u2", "u3", "u3", "u3", "u4"],
        "arm": ["A", "A", "A", "B", "B", "B", "B"],
        "clicked": [True, False, False, True, True, False, False],
        "shown": [True] * 7,
    })
    result = compare_arms(frame, "A", "B", n_boot=200)
    assert result.ctr_a == pytest.approx(1 / 3) and result.ctr_b == pytest.approx(2 / 4)
    assert result.diff == pytest.approx(2 / 4 - 1 / 3)
    assert (result.users_a, result.users_b) == (2, 2)
    assert (result.impressions_a, result.impressions_b, result.clicks_a, result.clicks_b) == (
        3, 4, 1, 2)
    assert result == compare_arms(frame, "A", "B", n_boot=200)  # the seed fixes the interval


def test_identical_arms_give_an_interval_around_zero() -> None:
    rng = np.random.default_rng(1)
    a, _ = simulate(rng, 2_000, 0.1, "A", "a")
    b, _ = simulate(rng, 2_000, 0.1, "B", "b")
    result = compare_arms(pl.concat([a, b]), "A", "B", n_boot=1_000, seed=3)
    assert result.lo < 0 < result.hi
    assert result.hi - result.lo < 0.02  # narrow with 2,000 users an arm
    # the same rows on both sides: the point difference is exactly zero
    same = pl.concat([a, a.with_columns(arm=pl.lit("A2"))])
    mirrored = compare_arms(same, "A", "A2", n_boot=500)
    assert mirrored.diff == 0.0 and mirrored.lo < 0 < mirrored.hi


def test_ctr_interval_covers_the_truth_in_most_simulations() -> None:
    rng = np.random.default_rng(2)
    covered = 0
    for rep in range(100):
        frame, truth = simulate(rng, 300, 0.08, "A", "a")
        result = ctr_interval(frame, "A", n_boot=400, seed=rep)
        covered += result.lo <= truth <= result.hi
        assert result.lo < result.ctr < result.hi
        assert result.users == 300 and result.impressions == frame.height
    assert covered >= 88  # nominal 95 %, as above


def test_an_arm_without_rows_is_refused() -> None:
    frame = pl.DataFrame({"user_id": ["u1"], "arm": ["A"], "clicked": [True], "shown": [True]})
    with pytest.raises(ValueError, match=r"arm 'B' has no shown impressions \(arms present"):
        compare_arms(frame, "A", "B")
    with pytest.raises(ValueError, match="has no shown"):
        ctr_interval(frame.with_columns(shown=pl.lit(False)), "A")
    with pytest.raises(ValueError, match="two different arms"):
        compare_arms(frame, "A", "A")
    with pytest.raises(ValueError, match="lacks the columns"):
        ctr_interval(frame.drop("clicked"), "A")
    with pytest.raises(ValueError, match="level"):
        ctr_interval(frame, "A", level=1.0)


def test_bootstrap_sums_resample_users_with_replacement() -> None:
    values = np.array([[1.0, 1.0], [0.0, 1.0], [5.0, 1.0]])
    boot = bootstrap_sums(values, 20_000, np.random.default_rng(0))
    assert np.all(boot[:, 1] == 3.0)  # each replicate holds as many users as the data
    # each replicate sums three of the rows: totals from {0, 1, 5} three times
    assert np.mean(boot[:, 0]) == pytest.approx(6.0, abs=0.1)
    assert np.var(boot[:, 0]) == pytest.approx(3 * np.var([1.0, 0.0, 5.0]), rel=0.05)
    # chunks (bounded memory) give the same distribution as one draw
    many = np.ones((300_000, 1))
    assert np.all(bootstrap_sums(many, 30, np.random.default_rng(0)) == 300_000)
