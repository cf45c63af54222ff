"""Top-k over catalog scores without the items a user has seen, and the P2 metrics of ranked lists.

Notation: Q queries, N catalog size (ids 0 and 1 reserved, never returned), K list length.
Missing entries of a list (fewer than K candidates) are id -1.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from bstrec.evaluation.metrics import ndcg_at_k, recall_at_k
from bstrec.features.spec import N_RESERVED

I64 = npt.NDArray[np.int64]
KS = (10, 50, 100, 200, 500)


def best_k(scores: npt.NDArray[np.floating], k: int) -> tuple[npt.NDArray[np.floating], I64]:
    """(Q, N) -> each row's k largest scores and their column positions (Q, k), best first,
    ties by the smaller position; -inf scores come back as position -1, and rows with fewer
    than k columns are padded with -1 / -inf. NumPy throughout, few calls: a request is one
    row, where a call's overhead costs more than its work."""
    Q, n = scores.shape
    kk = min(k, n)
    rows = np.arange(Q)[:, None]
    if kk < n:
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        vals = scores[rows, part]
        # argpartition keeps an arbitrary subset of the values tied with the k-th: rows where
        # it left some out take the tied ones by position (rare with float scores, so a loop)
        kth = vals.min(axis=1)
        short = ((scores == kth[:, None]).sum(1) > (vals == kth[:, None]).sum(1)) \
            & (kth > -np.inf)
        for q in np.flatnonzero(short):
            above = np.flatnonzero(scores[q] > kth[q])
            tied = np.flatnonzero(scores[q] == kth[q])[:kk - len(above)]
            part[q] = np.concatenate([above, tied])
            vals[q] = scores[q, part[q]]
    else:
        part = np.broadcast_to(np.arange(n), (Q, n))
        vals = scores[rows, part]
    order = np.lexsort((part, -vals))  # by score, descending, then by position
    vals, pos = vals[rows, order], part[rows, order]
    pos = np.where(vals == -np.inf, -1, pos)
    if kk < k:
        pad = ((0, 0), (0, k - kk))
        vals = np.pad(vals, pad, constant_values=-np.inf)
        pos = np.pad(pos, pad, constant_values=-1)
    return vals, pos.astype(np.int64, copy=False)


def top_k(scores: npt.ArrayLike, k: int, exclude: npt.NDArray[np.bool_] | None = None
          ) -> tuple[npt.NDArray[np.floating], I64]:
    """scores (Q, N), exclude (Q, N) bool -> (Q, k) scores and ids, best first, ties by the
    smaller id; reserved ids, excluded ids and -inf scores never come back (id -1 and score
    -inf in their place)."""
    s = np.array(scores, dtype=np.result_type(np.asarray(scores).dtype, np.float32))  # a copy
    s[:, :N_RESERVED] = -np.inf
    if exclude is not None:
        np.putmask(s, exclude, -np.inf)
    return best_k(s, k)


def first_k_without(order: I64, exclude: npt.NDArray[np.bool_], k: int) -> I64:
    """A ranking (n,) of ids, best first, shared by every row -> each row's first k ids that
    ``exclude`` (Q, N bool) does not mark, (Q, k), -1 where the ranking runs out: ``top_k`` of
    rows whose scores are all the same, ranked once instead of once per row."""
    out = np.full((len(exclude), k), -1, dtype=np.int64)
    if len(exclude) == 1:  # a request: one boolean gather
        got = order[~exclude[0, order]][:k]
        out[0, :len(got)] = got
        return out
    keep = ~exclude[:, order]  # (Q, n)
    rank = np.cumsum(keep, 1) - 1
    rows, cols = np.nonzero(keep & (rank < k))
    out[rows, rank[rows, cols]] = order[cols]
    return out


def drop_excluded(ids: I64, scores: npt.NDArray[np.float32], exclude: npt.NDArray[np.bool_], k: int
                  ) -> tuple[npt.NDArray[np.float32], I64]:
    """Ranked ids (Q, K') from an index -> the first k per row that are neither excluded
    (Q, N bool), reserved nor missing, order kept; -1 / -inf pad rows that run short."""
    rows = np.arange(len(ids))[:, None]
    bad = (ids < N_RESERVED) | exclude[rows, np.clip(ids, 0, exclude.shape[1] - 1)]
    order = np.argsort(bad, axis=1, kind="stable")[:, :k]
    gone = bad[rows, order]
    out_ids = np.where(gone, -1, ids[rows, order])
    out_s = np.where(gone, -np.inf, scores[rows, order]).astype(np.float32)
    if out_ids.shape[1] < k:
        pad = k - out_ids.shape[1]
        out_ids = np.pad(out_ids, ((0, 0), (0, pad)), constant_values=-1)
        out_s = np.pad(out_s, ((0, 0), (0, pad)), constant_values=-np.inf)
    return out_s, out_ids


def list_metrics(ids: npt.ArrayLike, targets: npt.ArrayLike, ks: tuple[int, ...] = KS
                 ) -> dict[str, float]:
    """Recall@k for each k (k larger than the lists: their full length) and NDCG@10."""
    r = np.asarray(ids)
    out = {f"recall@{k}": recall_at_k(r, targets, min(k, r.shape[1])) for k in ks}
    out["ndcg@10"] = ndcg_at_k(r, targets, min(10, r.shape[1]))
    return out
