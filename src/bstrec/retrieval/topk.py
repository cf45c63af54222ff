"""Top-k over catalog scores without the items a user has seen, and the P2 metrics of ranked lists.

Notation: Q queries, N catalog size (ids 0 and 1 reserved, never returned), K list length.
Missing entries of a list (fewer than K candidates) are id -1.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from bstrec.evaluation.metrics import ndcg_at_k, recall_at_k
from bstrec.features.spec import N_RESERVED

I64 = npt.NDArray[np.int64]
KS = (10, 50, 100, 200, 500)


def top_k(scores: Tensor, k: int, exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """scores (Q, N), exclude (Q, N) bool -> (Q, k) scores and ids, best first; reserved ids,
    excluded ids and -inf scores never come back (id -1 and score -inf in their place)."""
    s = scores.float().clone()
    s[:, :N_RESERVED] = -torch.inf
    if exclude is not None:
        s = s.masked_fill(exclude, -torch.inf)
    kk = min(k, s.shape[1])
    vals, ids = s.topk(kk, dim=1)
    ids = torch.where(torch.isfinite(vals), ids, -1)
    if kk < k:
        pad = k - kk
        vals = torch.cat([vals, vals.new_full((len(vals), pad), -torch.inf)], 1)
        ids = torch.cat([ids, ids.new_full((len(ids), pad), -1)], 1)
    return vals, ids


def drop_excluded(ids: I64, scores: npt.NDArray[np.float32], exclude: Tensor, k: int
                  ) -> tuple[npt.NDArray[np.float32], I64]:
    """Ranked ids (Q, K') from an index -> the first k per row that are neither excluded
    (Q, N bool), reserved nor missing, order kept; -1 / -inf pad rows that run short."""
    safe = np.clip(ids, 0, exclude.shape[1] - 1)
    bad = (ids < N_RESERVED) | exclude.numpy()[np.arange(len(ids))[:, None], safe]
    order = np.argsort(bad, axis=1, kind="stable")[:, :k]
    out_ids = np.take_along_axis(ids, order, 1)
    out_s = np.take_along_axis(scores, order, 1)
    gone = np.take_along_axis(bad, order, 1)
    out_ids = np.where(gone, -1, out_ids)
    out_s = np.where(gone, -np.inf, out_s).astype(np.float32)
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
