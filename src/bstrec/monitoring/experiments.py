"""A/B experiments: a deterministic split of users into arms, and each arm's click-through rate
with bootstrap intervals over users.

Users, not impressions, are the resampled unit: one user's impressions are correlated (the same
tastes, the same session), so an interval that resampled impressions would be too narrow.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]
Arm = Literal["A", "B"]

# Bootstrap replicates are drawn this many (replicate, user) index pairs at a time, to bound
# memory for large user counts while each chunk stays one vectorised draw
_CHUNK = 1 << 22


def arm_of(user_id: str, share_b: float, salt: str) -> Arm:
    """The arm of ``user_id``: "B" for a ``share_b`` share of users, the same answer in every
    process and release (BLAKE2b of the salt and the id, not Python's per-process ``hash``).

    A new ``salt`` per experiment gives an assignment independent of earlier ones, so that one
    experiment's B users are not also the next one's."""
    if not 0.0 <= share_b <= 1.0:
        raise ValueError(f"share_b must be in [0, 1], got {share_b}")
    # the separator keeps ("ab", "c") and ("a", "bc") apart
    digest = hashlib.blake2b(f"{salt}\x1f{user_id}".encode(), digest_size=8).digest()
    return "B" if int.from_bytes(digest, "big") / 2.0**64 < share_b else "A"


def bootstrap_sums(values: FloatArray, n_boot: int, rng: np.random.Generator) -> FloatArray:
    """Column sums (n_boot, m) of ``n_boot`` resamples with replacement of the rows (users) of
    ``values`` (U, m): per replicate, each user's multiplicity (a bincount of U uniform draws)
    times the per-user sums, as one matrix product per chunk of replicates."""
    u = values.shape[0]
    if u == 0:
        raise ValueError("no users to resample")
    out = np.empty((n_boot, values.shape[1]))
    chunk = max(1, _CHUNK // u)
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        draws = rng.integers(0, u, size=(rows, u)) + (np.arange(rows) * u)[:, None]
        counts = np.bincount(draws.ravel(), minlength=rows * u).reshape(rows, u)
        out[start:start + rows] = counts @ values
    return out


def _check(n_boot: int, level: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")


def percentile_interval(replicates: FloatArray, level: float) -> tuple[float, float]:
    """The percentile bootstrap interval of ``replicates`` (n_boot,) at ``level`` (replicates
    that are NaN, a ratio over an empty resample, are left out)."""
    tail = (1.0 - level) / 2.0
    lo, hi = np.nanquantile(replicates, [tail, 1.0 - tail])
    return float(lo), float(hi)


def _user_sums(joined: pl.DataFrame, arm: str) -> FloatArray:
    """(U, 2): per user of ``arm``, clicks and shown impressions."""
    missing = [c for c in ("user_id", "arm", "clicked") if c not in joined.columns]
    if missing:
        raise ValueError(f"joined lacks the columns {missing} (bstrec.monitoring.join.join_clicks "
                         "gives them)")
    rows = joined.filter(pl.col("arm") == arm)
    if "shown" in rows.columns:
        rows = rows.filter(pl.col("shown"))
    if rows.is_empty():
        arms = sorted(joined.get_column("arm").unique().to_list())
        raise ValueError(f"arm {arm!r} has no shown impressions (arms present: {arms})")
    per_user = rows.group_by("user_id").agg(
        pl.col("clicked").cast(pl.Float64).sum().alias("clicks"),
        pl.len().cast(pl.Float64).alias("impressions"))
    out: FloatArray = per_user.select("clicks", "impressions").to_numpy().astype(np.float64)
    return out


@dataclass(frozen=True)
class CTRInterval:
    """One arm's click-through rate (clicks / shown impressions) and its bootstrap interval."""

    arm: str
    ctr: float
    lo: float
    hi: float
    users: int
    impressions: int
    clicks: int
    level: float


@dataclass(frozen=True)
class ArmComparison:
    """B's CTR minus A's, with a percentile bootstrap interval over users."""

    arm_a: str
    arm_b: str
    ctr_a: float
    ctr_b: float
    diff: float  # ctr_b - ctr_a
    lo: float
    hi: float
    users_a: int
    users_b: int
    impressions_a: int
    impressions_b: int
    clicks_a: int
    clicks_b: int
    level: float


def ctr_interval(joined: pl.DataFrame, arm: str, *, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> CTRInterval:
    """The CTR of ``arm`` in ``joined`` (join_clicks' shown rows, with ``arm``, ``user_id`` and
    ``clicked``) and its percentile bootstrap interval, users resampled with replacement."""
    _check(n_boot, level)
    sums = _user_sums(joined, arm)
    total = sums.sum(axis=0)
    boot = bootstrap_sums(sums, n_boot, np.random.default_rng(seed))
    lo, hi = percentile_interval(boot[:, 0] / boot[:, 1], level)
    return CTRInterval(arm=arm, ctr=float(total[0] / total[1]), lo=lo, hi=hi, users=len(sums),
                       impressions=int(total[1]), clicks=int(total[0]), level=level)


def compare_arms(joined: pl.DataFrame, arm_a: str, arm_b: str, *, n_boot: int = 1000,
                 seed: int = 0, level: float = 0.95) -> ArmComparison:
    """CTR of ``arm_b`` minus that of ``arm_a`` with a percentile bootstrap interval: each arm's
    users are resampled with replacement independently and both ratios recomputed."""
    _check(n_boot, level)
    if arm_a == arm_b:
        raise ValueError(f"compare two different arms, got {arm_a!r} twice")
    a, b = _user_sums(joined, arm_a), _user_sums(joined, arm_b)
    rng = np.random.default_rng(seed)
    boot_a, boot_b = bootstrap_sums(a, n_boot, rng), bootstrap_sums(b, n_boot, rng)
    lo, hi = percentile_interval(boot_b[:, 0] / boot_b[:, 1] - boot_a[:, 0] / boot_a[:, 1],
                                 level)
    ta, tb = a.sum(axis=0), b.sum(axis=0)
    ctr_a, ctr_b = float(ta[0] / ta[1]), float(tb[0] / tb[1])
    return ArmComparison(arm_a=arm_a, arm_b=arm_b, ctr_a=ctr_a, ctr_b=ctr_b, diff=ctr_b - ctr_a,
                         lo=lo, hi=hi, users_a=len(a), users_b=len(b),
                         impressions_a=int(ta[1]), impressions_b=int(tb[1]),
                         clicks_a=int(ta[0]), clicks_b=int(tb[0]), level=level)
