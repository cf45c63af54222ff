"""Wide & Deep (Cheng et al. 2016) and WDL(+Seq), the baselines of BST's paper.

Notation: B batch, L history length, D behaviour width (item + category embeddings), F fields.

- wide: a linear model over the categorical ids and their crosses (one weight per id, summed);
- deep: the embeddings of the same features -> MLP (paper: 1024-512-256, ReLU);
- ``use_seq`` (WDL(+Seq)): the mean of the history's item+category embeddings joins the deep
  input, so the sequence is used but its order is not.

The target item and category use tables as wide as BST's token parts, so that the baselines
differ from BST only in how they use the behaviour sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bstrec.features.spec import FeatureSpec
from bstrec.nn.embeddings import FeatureEmbeddings, masked_mean, resolve_crosses
from bstrec.nn.mlp import MLP, Activation

Batch = dict[str, Tensor]


@dataclass(frozen=True)
class WDLConfig:
    use_seq: bool = False  # True: WDL(+Seq), registered as "wdl_seq"
    item_dim: int = 32
    cat_dim: int = 16
    embed_dim: int = 16
    mlp: tuple[int, ...] = (1024, 512, 256)
    mlp_act: Activation = "relu"
    mlp_dropout: float = 0.0
    crosses: tuple[tuple[str, str], ...] | None = None  # None: gender x category if in the spec

    def __post_init__(self) -> None:
        if not 0.0 <= self.mlp_dropout < 1.0:
            raise ValueError("mlp_dropout must be in [0, 1)")


class WDL(nn.Module):
    """Wide & Deep ranker (optionally with the pooled sequence): ``forward(batch) -> (B,)``."""

    def __init__(self, spec: FeatureSpec, config: WDLConfig | None = None) -> None:
        super().__init__()
        c = self.config = config or WDLConfig()
        crosses = resolve_crosses(spec, c.crosses)
        self.wide = FeatureEmbeddings(spec, 1, crosses=crosses)
        self.wide_bias = nn.Parameter(torch.zeros(()))
        self.embed = FeatureEmbeddings(
            spec, c.embed_dim, seq_dims={"hist_item": c.item_dim, "hist_cat": c.cat_dim},
            crosses=crosses, history=c.use_seq)
        D = c.item_dim + c.cat_dim
        deep_in = self.embed.n_fields * c.embed_dim + D * (2 if c.use_seq else 1)
        self.mlp = MLP(deep_in, c.mlp, act=c.mlp_act, dropout=c.mlp_dropout, out_dim=1)

    def forward(self, batch: Batch) -> Tensor:
        wide: Tensor = self.wide(batch).fields.sum((1, 2)) + self.wide_bias  # (B,)
        e = self.embed(batch)
        seq = torch.cat([e.seq["hist_item"], e.seq["hist_cat"]], -1)  # (B, L+1 or 1, D)
        parts = [e.fields.flatten(1), seq[:, -1]]
        if self.config.use_seq:
            parts.append(masked_mean(seq[:, :-1], batch["hist_mask"]))  # (B, D)
        deep: Tensor = self.mlp(torch.cat(parts, 1)).squeeze(-1)  # (B,)
        return wide + deep
