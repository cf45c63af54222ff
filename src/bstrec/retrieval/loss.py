"""Sampled softmax with logQ correction and temperature, for the two-tower retriever.

Notation: B batch, M extra negatives per row, D vector width.

Row i's logits are its user vector against every in-batch item (the other rows' positives are
its negatives) and against its own M extra negatives:

    logit_ij = <u_i, v_j> / temperature - log Q_j

with ``log Q_j`` the log of item j's expected count in the pool it came from (in-batch: B times
its share of training positives; extra negatives: the sampler's ``log_q``). The correction
applies to every logit, the positive's included, so that the softmax estimates the full-catalog
one without the sampler's bias towards popular items (Yi et al. 2019, "Sampling-bias-corrected
neural modeling"). An in-batch column holding the row's own positive item again (two rows with
the same item) is masked: it is not a negative.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sampled_softmax_loss(user: Tensor, items: Tensor, pos_ids: Tensor, *, temperature: float = 1.0,
                         log_q: Tensor | None = None, neg: Tensor | None = None,
                         neg_ids: Tensor | None = None, neg_log_q: Tensor | None = None) -> Tensor:
    """user (B, D), items (B, D) (row i's positive), pos_ids (B,), log_q (B,) of the in-batch
    items; neg (B, M, D), neg_ids (B, M), neg_log_q (B, M) -> mean cross-entropy (scalar)."""
    B = user.shape[0]
    logits = user @ items.T / temperature  # (B, B)
    if log_q is not None:
        logits = logits - log_q.unsqueeze(0)
    same = pos_ids.unsqueeze(0) == pos_ids.unsqueeze(1)  # (B, B)
    same.fill_diagonal_(False)
    logits = logits.masked_fill(same, float("-inf"))
    if neg is not None:
        if neg_ids is None:
            raise ValueError("neg_ids are needed with neg (to mask the positive)")
        nl = torch.einsum("bd,bmd->bm", user, neg) / temperature  # (B, M)
        if neg_log_q is not None:
            nl = nl - neg_log_q
        nl = nl.masked_fill(neg_ids == pos_ids.unsqueeze(1), float("-inf"))
        logits = torch.cat([logits, nl], 1)  # (B, B + M)
    return F.cross_entropy(logits, torch.arange(B, device=user.device))
