"""Deep Interest Network (Zhou et al. 2018, arXiv 1706.06978).

Notation: B batch, L history length, D behaviour width (item + category embeddings), F fields.

Each behaviour is weighted by a local activation unit that sees the target, the behaviour, their
difference and product (released code: hidden 80-40); the weights are not softmax-normalised and
padding gets 0. The weighted sum (the user's interest in this target) is concatenated with the
target's and the other features' embeddings and fed to an MLP (paper: 200-80 with Dice).

The activation unit uses PReLU (the paper offers PReLU or Dice): Dice's batch statistics over
(B, L) would also count the padded positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bstrec.features.spec import FeatureSpec
from bstrec.nn.attention import LocalActivationUnit
from bstrec.nn.embeddings import FeatureEmbeddings, resolve_crosses
from bstrec.nn.mlp import MLP, Activation

Batch = dict[str, Tensor]


@dataclass(frozen=True)
class DINConfig:
    item_dim: int = 32
    cat_dim: int = 16
    embed_dim: int = 16
    attention: tuple[int, ...] = (80, 40)
    attention_act: Activation = "prelu"
    mlp: tuple[int, ...] = (200, 80)
    mlp_act: Activation = "dice"
    mlp_dropout: float = 0.0
    crosses: tuple[tuple[str, str], ...] | None = None  # None: gender x category if in the spec

    def __post_init__(self) -> None:
        if not 0.0 <= self.mlp_dropout < 1.0:
            raise ValueError("mlp_dropout must be in [0, 1)")


class DIN(nn.Module):
    """Deep Interest Network ranker: ``forward(batch) -> logits (B,)``."""

    def __init__(self, spec: FeatureSpec, config: DINConfig | None = None) -> None:
        super().__init__()
        c = self.config = config or DINConfig()
        self.embed = FeatureEmbeddings(
            spec, c.embed_dim, seq_dims={"hist_item": c.item_dim, "hist_cat": c.cat_dim},
            crosses=resolve_crosses(spec, c.crosses))
        D = c.item_dim + c.cat_dim
        self.unit = LocalActivationUnit(D, c.attention, act=c.attention_act)
        self.mlp = MLP(self.embed.n_fields * c.embed_dim + 2 * D, c.mlp, act=c.mlp_act,
                       dropout=c.mlp_dropout, out_dim=1)

    def forward(self, batch: Batch) -> Tensor:
        e = self.embed(batch)
        seq = torch.cat([e.seq["hist_item"], e.seq["hist_cat"]], -1)  # (B, L+1, D)
        target, hist = seq[:, -1], seq[:, :-1]  # (B, D), (B, L, D)
        interest = self.unit(target, hist, batch["hist_mask"])  # (B, D)
        x = torch.cat([e.fields.flatten(1), target, interest], 1)
        logits: Tensor = self.mlp(x).squeeze(-1)  # (B,)
        return logits
