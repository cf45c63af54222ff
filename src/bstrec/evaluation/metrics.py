"""Ranking, calibration and retrieval metrics on NumPy arrays (labels in {0, 1}, scores real).

Everything is vectorised: GAUC sorts once by (user, score) and sums ranks per user, the paired
bootstrap turns resamples into integer weights and computes every replicate's AUC from one sort.
Scores must be finite (NaN has no rank).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, tied values sharing their mean rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    boundary = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1], True])
    mean_rank = (boundary[:-1] + boundary[1:] + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, np.diff(boundary))
    return ranks


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula; ties count one half. NaN if one class."""
    y = np.asarray(labels).astype(bool)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(np.asarray(scores, dtype=np.float64))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _labels(labels: npt.ArrayLike) -> FloatArray:
    y = np.asarray(labels, dtype=np.float64).ravel()
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    return y


def logloss(labels: npt.ArrayLike, probs: npt.ArrayLike, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy (natural log), probabilities clipped to [eps, 1 - eps]."""
    y = _labels(labels)
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), eps, 1.0 - eps)
    if y.size != p.size:
        raise ValueError(f"{y.size} labels but {p.size} probabilities")
    if y.size == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def gauc(users: npt.ArrayLike, labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Group AUC: per-user AUC weighted by the user's sample count, over the users whose samples
    hold both labels (ties count one half). NaN if no user has both labels.

    One global sort by (user, score); tied blocks get their mean rank inside the user, and the
    positives' rank sums per user come from ``np.add.reduceat``. No Python loop per user.
    """
    y = _labels(labels)
    s = np.asarray(scores, dtype=np.float64).ravel()
    _, u = np.unique(np.asarray(users).ravel(), return_inverse=True)
    if not (y.size == s.size == u.size):
        raise ValueError(f"sizes differ: users {u.size}, labels {y.size}, scores {s.size}")
    if y.size == 0:
        return float("nan")
    order = np.lexsort((s, u))
    us, ss, ys = u[order], s[order], y[order]
    n = us.size
    new_user = np.r_[True, us[1:] != us[:-1]]
    new_block = new_user | np.r_[True, ss[1:] != ss[:-1]]
    user_start = np.flatnonzero(new_user)
    block_bounds = np.r_[np.flatnonzero(new_block), n]
    block_rank = (block_bounds[:-1] + block_bounds[1:] + 1) / 2.0  # global 1-based mean rank
    rank = np.repeat(block_rank, np.diff(block_bounds))
    start_of = np.repeat(user_start, np.diff(np.r_[user_start, n]))
    rank -= start_of  # rank inside the user
    n_all = np.diff(np.r_[user_start, n]).astype(np.float64)
    n_pos = np.add.reduceat(ys, user_start)
    rank_pos = np.add.reduceat(rank * ys, user_start)
    n_neg = n_all - n_pos
    ok = (n_pos > 0) & (n_neg > 0)
    if not ok.any():
        return float("nan")
    per_user = (rank_pos[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2) / (n_pos[ok] * n_neg[ok])
    return float(np.sum(per_user * n_all[ok]) / np.sum(n_all[ok]))


def rela_impr(auc_model: float, auc_base: float) -> float:
    """Relative AUC improvement in percent: ((auc_model - 0.5) / (auc_base - 0.5) - 1) * 100."""
    return ((auc_model - 0.5) / (auc_base - 0.5) - 1.0) * 100.0


class CalibrationCurve(NamedTuple):
    """Per equal-width probability bin: mean prediction and positive fraction (NaN when the bin
    is empty), and the number of samples."""

    mean_pred: FloatArray
    frac_pos: FloatArray
    counts: npt.NDArray[np.int64]


def calibration_curve(labels: npt.ArrayLike, probs: npt.ArrayLike,
                      n_bins: int = 10) -> CalibrationCurve:
    """Reliability curve over ``n_bins`` equal-width bins of [0, 1]; p = 1 falls in the last bin."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    y = _labels(labels)
    p = np.asarray(probs, dtype=np.float64).ravel()
    if y.size != p.size:
        raise ValueError(f"{y.size} labels but {p.size} probabilities")
    b = np.clip((p * n_bins).astype(np.int64), 0, n_bins - 1)
    count = np.bincount(b, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_pred = np.bincount(b, weights=p, minlength=n_bins) / count
        frac_pos = np.bincount(b, weights=y, minlength=n_bins) / count
    return CalibrationCurve(mean_pred, frac_pos, count.astype(np.int64))


def ece(labels: npt.ArrayLike, probs: npt.ArrayLike, n_bins: int = 10) -> float:
    """Expected calibration error: sum over bins of (bin share) x |positive rate - mean prob|."""
    curve = calibration_curve(labels, probs, n_bins)
    total = int(curve.counts.sum())
    if total == 0:
        return float("nan")
    ok = curve.counts > 0
    gap = np.abs(curve.frac_pos[ok] - curve.mean_pred[ok])
    return float(np.sum(curve.counts[ok] * gap) / total)


@dataclass(frozen=True)
class BucketAUC:
    """AUC of the samples of one bucket (NaN when the bucket lacks a class)."""

    name: str
    n: int
    n_pos: int
    auc: float


def auc_by_bucket(labels: npt.ArrayLike, scores: npt.ArrayLike, bucket_ids: npt.ArrayLike,
                  bucket_names: list[str]) -> list[BucketAUC]:
    """AUC per bucket; ``bucket_ids[i]`` indexes ``bucket_names`` (one entry per name, in order)."""
    y = _labels(labels)
    s = np.asarray(scores, dtype=np.float64).ravel()
    ids = np.asarray(bucket_ids).ravel()
    if not (y.size == s.size == ids.size):
        raise ValueError(f"sizes differ: labels {y.size}, scores {s.size}, buckets {ids.size}")
    out = []
    for k, name in enumerate(bucket_names):  # a handful of buckets, not one per sample
        m = ids == k
        out.append(BucketAUC(name, int(m.sum()), int(y[m].sum()), auc(y[m], s[m])))
    return out


class BootstrapDiff(NamedTuple):
    """Observed AUC(a) - AUC(b) on all samples and its 95% percentile bootstrap interval."""

    diff: float
    lo: float
    hi: float


def _weighted_auc(neg_sorted: FloatArray, pos_idx: npt.NDArray[np.intp],
                  pos_bounds: npt.NDArray[np.intp], w_sorted: FloatArray) -> FloatArray:
    """AUC per column of weights (n, B) whose rows are sorted by score.

    ``pos_idx``: sorted positions of the positives; ``pos_bounds``: (2, n_pos) start and end
    (exclusive) of each positive's tie block. A positive beats the negatives below its block and
    ties with half of those inside it: 0.5 x (negatives before start + negatives before end).
    """
    cum_neg = np.zeros((w_sorted.shape[0] + 1, w_sorted.shape[1]), dtype=np.float64)
    np.cumsum(w_sorted * neg_sorted[:, None], axis=0, out=cum_neg[1:])
    w_pos = w_sorted[pos_idx]  # (n_pos, B)
    num = 0.5 * np.einsum("pb,pb->b", w_pos, cum_neg[pos_bounds[0]] + cum_neg[pos_bounds[1]])
    den = w_pos.sum(axis=0) * cum_neg[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        out: FloatArray = num / den
    return out


def paired_bootstrap_auc_diff(labels: npt.ArrayLike, scores_a: npt.ArrayLike,
                              scores_b: npt.ArrayLike, n_boot: int = 1000, seed: int = 0,
                              groups: npt.ArrayLike | None = None,
                              chunk: int = 32) -> BootstrapDiff:
    """AUC(a) - AUC(b) with a paired 95% percentile bootstrap interval.

    Each replicate draws the samples (or, with ``groups``, e.g. user ids, whole groups) with
    replacement; both models are scored on the same draw. A draw is held as integer weights, so
    every replicate's AUC comes from the one sort of the scores. ``scores_a`` / ``scores_b`` may
    be (n,) or (S, n) for S seeds: the AUC of a model is then the mean of its seeds' AUCs.
    ``diff`` is the difference on all samples (not the mean of the replicates).
    """
    y = _labels(labels)
    a = np.atleast_2d(np.asarray(scores_a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(scores_b, dtype=np.float64))
    n = y.size
    if a.shape[1] != n or b.shape[1] != n:
        raise ValueError(f"{n} labels but scores of shape {a.shape} and {b.shape}")
    diff = float(np.mean([auc(y, r) for r in a]) - np.mean([auc(y, r) for r in b]))
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if n_boot < 1 or n == 0:
        return BootstrapDiff(diff, float("nan"), float("nan"))

    prepared = []  # (sign / S, order, sorted negatives, positives' places, their blocks)
    for rows, sign in ((a, 1.0), (b, -1.0)):
        for r in rows:
            order = np.argsort(r, kind="mergesort")
            rs, ys = r[order], y[order]
            bounds = np.r_[np.flatnonzero(np.r_[True, rs[1:] != rs[:-1]]), n]
            block = np.repeat(np.arange(bounds.size - 1), np.diff(bounds))
            pos_idx = np.flatnonzero(ys == 1.0)
            pos_bounds = np.stack([bounds[block[pos_idx]], bounds[block[pos_idx] + 1]])
            prepared.append((sign / len(rows), order, 1.0 - ys, pos_idx, pos_bounds))

    rng = np.random.default_rng(seed)
    if groups is None:
        group_of = None
        n_units = n
    else:
        _, group_of = np.unique(np.asarray(groups).ravel(), return_inverse=True)
        if group_of.size != n:
            raise ValueError(f"{n} labels but {group_of.size} groups")
        n_units = int(group_of.max()) + 1
    diffs = np.empty(n_boot, dtype=np.float64)
    for lo in range(0, n_boot, chunk):
        m = min(chunk, n_boot - lo)
        # (units, m) counts: how often each unit is drawn in each of m replicates
        draws = rng.integers(0, n_units, size=(m, n_units)) * m + np.arange(m)[:, None]
        counts = np.bincount(draws.ravel(), minlength=n_units * m).reshape(n_units, m)
        w = (counts if group_of is None else counts[group_of]).astype(np.float64)  # (n, m)
        acc = np.zeros(m, dtype=np.float64)
        for coef, order, neg_sorted, pos_idx, pos_bounds in prepared:
            acc += coef * _weighted_auc(neg_sorted, pos_idx, pos_bounds, w[order])
        diffs[lo:lo + m] = acc
    if np.isnan(diffs).all():
        return BootstrapDiff(diff, float("nan"), float("nan"))
    lo_q, hi_q = np.nanpercentile(diffs, [2.5, 97.5])
    return BootstrapDiff(diff, float(lo_q), float(hi_q))


def _hit_rank(ranked_ids: npt.ArrayLike, targets: npt.ArrayLike,
              k: int) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.intp]]:
    r = np.asarray(ranked_ids)
    t = np.asarray(targets).ravel()
    if r.ndim != 2 or r.shape[0] != t.size:
        raise ValueError(f"ranked_ids must be (Q, K) with Q = {t.size}, got {r.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    match = r[:, :k] == t[:, None]  # (Q, k)
    return match.any(axis=1), match.argmax(axis=1)


def recall_at_k(ranked_ids: npt.ArrayLike, targets: npt.ArrayLike, k: int) -> float:
    """Share of queries whose single target is among the first ``k`` of ``ranked_ids`` (Q, K)."""
    hit, _ = _hit_rank(ranked_ids, targets, k)
    return float(hit.mean()) if hit.size else float("nan")


def ndcg_at_k(ranked_ids: npt.ArrayLike, targets: npt.ArrayLike, k: int) -> float:
    """Mean NDCG@k with one relevant item: 1 / log2(rank + 2) for a hit at 0-based rank, else 0."""
    hit, rank = _hit_rank(ranked_ids, targets, k)
    if not hit.size:
        return float("nan")
    return float(np.mean(np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0)))


def mean_std(values: npt.ArrayLike) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value) of e.g. seed results."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return float("nan"), float("nan")
    std = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return float(v.mean()), std
