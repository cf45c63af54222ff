"""torch-rechub's BST, DIN and WideDeep (their own model classes, pip `torch-rechub==0.9.0`,
the `peers` extra) fed our exact samples, so that they train in the same loop, on the same
batches, with the same optimizer and early stopping as our rankers.

Mapping of our batch contract (training/tensors.py) onto their feature objects:
- every categorical feature of the spec except the target's item and category -> SparseFeature;
- multi-hot features (e.g. the movie's genres) -> SequenceFeature with mean pooling;
- the target (item, category) -> target features; ``hist_item``/``hist_cat`` (right-aligned,
  0-padded) -> SequenceFeatures sharing the target's tables, padding index 0.
Widths match ours: history tokens 64 wide (item 32 + category 32; their BST adds a slot-index
position embedding instead of concatenating a time-difference one), other fields 16, MLP
1024-512-256 (their MLP adds BatchNorm; their defaults otherwise, initialisation included: their
feature tables start at std 1e-4 and their BST's position table at nn.Embedding's std 1, so its
tokens start as little more than their positions; on synthetic-order their BST stays at WDL's test
AUC, BENCHMARKS.md). Their models return sigmoid probabilities; the wrapper returns the logit of
the (clamped) probability so our BCE-with-logits loop trains them: d/dp of BCE through logit(p)
equals their own BCELoss gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bstrec.config import from_dict
from bstrec.features.spec import FeatureSpec

PEERS = ("torch_rechub_bst", "torch_rechub_din", "torch_rechub_widedeep")
EPS = 1e-7


@dataclass(frozen=True)
class PeerConfig:
    model: str = "torch_rechub_bst"
    item_dim: int = 32
    cat_dim: int = 32
    embed_dim: int = 16
    mlp: tuple[int, ...] = (1024, 512, 256)
    heads: int = 8
    dropout: float = 0.2


class RechubRanker(nn.Module):
    """Our ``forward(batch) -> logits (B,)`` around one torch-rechub ranking model."""

    def __init__(self, spec: FeatureSpec, config: PeerConfig) -> None:
        super().__init__()
        from torch_rechub.basic.features import SequenceFeature, SparseFeature
        from torch_rechub.models.ranking import BST, DIN, WideDeep

        self.config = c = config
        target_names = {"item", "category"}
        others: list[Any] = []
        for f in spec.features:
            if f.name in target_names:
                continue
            if f.kind == "categorical":
                others.append(SparseFeature(f.name, f.vocab_size, c.embed_dim))
            else:
                others.append(SequenceFeature(f.name, f.vocab_size, c.embed_dim, pooling="mean",
                                              padding_idx=0))
        item, cat = spec.feature("item"), spec.feature("category")
        target = [SparseFeature("item", item.vocab_size, c.item_dim),
                  SparseFeature("category", cat.vocab_size, c.cat_dim)]
        history = [
            SequenceFeature("hist_item", item.vocab_size, c.item_dim, pooling="concat",
                            shared_with="item", padding_idx=0),
            SequenceFeature("hist_cat", cat.vocab_size, c.cat_dim, pooling="concat",
                            shared_with="category", padding_idx=0),
        ]
        mlp = {"dims": list(c.mlp)}
        self.inner: nn.Module
        if c.model == "torch_rechub_bst":
            self.inner = BST(others, history, target, mlp, nhead=c.heads, dropout=c.dropout,
                             num_layers=1, max_seq_len=spec.max_len + 1)
        elif c.model == "torch_rechub_din":
            self.inner = DIN(others, history, target, mlp, attention_mlp_params={"dims": [36]})
        elif c.model == "torch_rechub_widedeep":
            # their WideDeep concatenates all fields before flattening: one width for all
            flat = [SparseFeature(f.name, f.vocab_size, c.embed_dim) for f in (item, cat)]
            sparse = [f for f in others if isinstance(f, SparseFeature)]
            self.inner = WideDeep(sparse + flat, others + flat, mlp)
        else:
            raise ValueError(f"unknown peer {c.model!r}; known: {PEERS}")
        self.names = [f.name for f in spec.features] + ["hist_item", "hist_cat"]

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        x = {name: batch[name] for name in self.names}
        p: Tensor = self.inner(x)  # (B,) probabilities
        return torch.logit(p.clamp(EPS, 1 - EPS))


def build_peer(name: str, spec: FeatureSpec, overrides: dict[str, Any]) -> nn.Module:
    """A checkpoint ``Builder`` (training/checkpoint.py) for the peers, by name."""
    if name not in PEERS:
        from bstrec.ranking import build_ranker

        return build_ranker(name, spec, overrides)
    data = {**overrides, "model": name}
    return RechubRanker(spec, from_dict(PeerConfig, data, where=f"peer.{name}"))


def peers_available() -> bool:
    try:
        import torch_rechub  # noqa: F401
    except ImportError:
        return False
    return True
