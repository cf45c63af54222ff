"""DIN's local activation unit (Zhou et al. 2018, section 4.3).

Notation: B batch, L sequence length, D width.

The weight of behaviour j for target t is ``a(e_j, v_t) = MLP([v_t, e_j, v_t - e_j, v_t * e_j])``
(the difference and product stand in for the paper's out product, as in its released code). The
user interest is ``sum_j a_j e_j``. Unlike softmax attention the weights are NOT normalised, so
that the interest's magnitude can tell how much of the history is relevant; padding gets weight 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bstrec.nn.mlp import MLP, Activation


class LocalActivationUnit(nn.Module):
    """target (B, D), keys (B, L, D), mask (B, L) bool -> interest (B, D)."""

    def __init__(self, dim: int, hidden: Sequence[int] = (80, 40),
                 act: Activation = "prelu") -> None:
        super().__init__()
        self.mlp = MLP(4 * dim, hidden, act=act, out_dim=1)

    def weights(self, target: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        """(B, D), (B, L, D), (B, L) -> (B, L) unnormalised weights, 0 at padding."""
        q = target.unsqueeze(1).expand_as(keys)  # (B, L, D)
        w: Tensor = self.mlp(torch.cat([q, keys, q - keys, q * keys], -1)).squeeze(-1)  # (B, L)
        return w * mask.to(w.dtype)

    def forward(self, target: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        w = self.weights(target, keys, mask)  # (B, L)
        return (w.unsqueeze(-1) * keys).sum(1)  # (B, D)
