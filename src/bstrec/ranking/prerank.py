"""Distilled pre-ranker: a small network on pooled features, no attention (issue 25).

Notation: B batch, L history length, N candidates of one request, H vector width.

The first layer of a three-layer funnel (pre-rank -> light ranker -> BST) scores every merged
candidate of a request, hundreds of them, so its cost per candidate must be a tiny MLP (DESIGN.md,
"Pre-rank"). It is trained to reproduce BST's logits (training/distill.py), not the labels alone:
what the funnel needs from it is BST's order on the candidates BST will not see.

1. user side: the user and context fields' embeddings and the MEAN of the history's item and
   category embeddings (pooled: order and recency are BST's job) -> linear -> u (B, H);
2. item side: the target item's id, category and item-feature embeddings -> linear -> v (B, H);
3. score: an MLP over [u * v, u + v] -> 1 logit. u is computed once per request and v is
   cached per catalogue item (``item_parts``, like BST's); per candidate remain an element-wise
   product, a sum and the MLP.

No cross features (gender x category): a cross reads both sides, which would put an embedding
lookup per candidate back into the request.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bstrec.features.spec import FeatureSpec
from bstrec.nn.embeddings import FeatureEmbeddings, masked_mean
from bstrec.nn.mlp import MLP, Activation

Batch = dict[str, Tensor]


@dataclass(frozen=True)
class PreRankConfig:
    item_dim: int = 16  # item id embedding (history and target share the table)
    cat_dim: int = 8  # category embedding
    embed_dim: int = 8  # width of each other feature's embedding
    hidden: int = 32  # H: width of the user and item vectors
    mlp: tuple[int, ...] = (32,)
    mlp_act: Activation = "relu"

    def __post_init__(self) -> None:
        for name in ("item_dim", "cat_dim", "embed_dim", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if any(w < 1 for w in self.mlp):
            raise ValueError(f"mlp widths must be >= 1, got {self.mlp}")


class PreRanker(nn.Module):
    """Pre-ranker: ``forward(batch) -> logits (B,)``; ``forward_request(shared, items) -> (N,)``
    computes the user side once for a request's N candidates."""

    user_fields: Tensor
    item_fields: Tensor

    def __init__(self, spec: FeatureSpec, config: PreRankConfig | None = None) -> None:
        super().__init__()
        c = self.config = config or PreRankConfig()
        self.embed = FeatureEmbeddings(
            spec, c.embed_dim, seq_dims={"hist_item": c.item_dim, "hist_cat": c.cat_dim},
            crosses=())
        per_item = {f.name for f in spec.features if f.group == "item"}
        item_ids = [i for i in range(self.embed.n_fields)
                    if set(self.embed.field_inputs(i)) <= per_item]
        user_ids = [i for i in range(self.embed.n_fields) if i not in item_ids]
        self.register_buffer("user_fields", torch.tensor(user_ids, dtype=torch.long),
                             persistent=False)
        self.register_buffer("item_fields", torch.tensor(item_ids, dtype=torch.long),
                             persistent=False)
        D = c.item_dim + c.cat_dim
        self.user = nn.Linear(len(user_ids) * c.embed_dim + D, c.hidden)
        self.item = nn.Linear(len(item_ids) * c.embed_dim + D, c.hidden)
        self.mlp = MLP(2 * c.hidden, c.mlp, act=c.mlp_act, out_dim=1)

    def encode_users(self, batch: Batch) -> Tensor:
        """User, context and history inputs (B rows) -> u (B, H)."""
        emb = self.embed
        hist = torch.cat([emb.seq_tables["hist_item"](batch["hist_item"]),
                          emb.seq_tables["hist_cat"](batch["hist_cat"])], -1)  # (B, L, D)
        pooled = masked_mean(hist, batch["hist_mask"])  # (B, D)
        fields = emb.fields(batch).index_select(1, self.user_fields).flatten(1)  # (B, Fu*dim)
        out: Tensor = self.user(torch.cat([fields, pooled], 1))
        return out

    def encode_items(self, batch: Batch) -> Tensor:
        """Target-item inputs (B rows) -> v (B, H)."""
        emb = self.embed
        item = emb.seq_tables["hist_item"](batch[emb.seq_targets["hist_item"]])  # (B, item_dim)
        cat = emb.seq_tables["hist_cat"](batch[emb.seq_targets["hist_cat"]])  # (B, cat_dim)
        fields = emb.fields(batch).index_select(1, self.item_fields).flatten(1)  # (B, Fi*dim)
        out: Tensor = self.item(torch.cat([fields, item, cat], 1))
        return out

    def score(self, u: Tensor, v: Tensor) -> Tensor:
        """u (B or 1, H), v (B, H) -> logits (B,)."""
        u = u.expand_as(v)
        out: Tensor = self.mlp(torch.cat([u * v, u + v], 1)).squeeze(-1)
        return out

    def forward(self, batch: Batch) -> Tensor:
        return self.score(self.encode_users(batch), self.encode_items(batch))

    # The serving split (ranking/export.py export_request_parts): v is the item part, cached
    # per catalogue item by the pipeline; a request computes u once and scores the rows of v.
    request_shaped = True
    mixed_item_inputs: tuple[str, ...] = ()  # no cross reads both sides

    @property
    def part_sizes(self) -> tuple[int, ...]:
        return (self.config.hidden,)

    def _filled(self, known: Batch, n: int) -> Batch:
        """``known`` with every other raw input as padding, n rows: fields() reads every raw
        input, and the index_select of each encoder drops the other side's."""
        zero = next(iter(known.values())).new_zeros(n, dtype=torch.long)
        return {**{k: zero for k in self.embed.raw_names},
                **{k: zero[:, None] for k in self.embed.multi_names}, **known}

    def item_parts(self, items: Batch) -> Tensor:
        """(N,) target-item inputs -> v (N, H)."""
        n = items[self.embed.seq_targets["hist_item"]].shape[0]
        return self.encode_items(self._filled(items, n))

    def forward_parts(self, shared: Batch, parts: Tensor, items: Batch | None = None) -> Tensor:
        """``shared`` user/context/history inputs with batch 1 and the candidates'
        ``item_parts`` (N, H) -> logits (N,)."""
        return self.score(self.encode_users(self._filled(shared, 1)), parts)

    def forward_request(self, shared: Batch, items: Batch) -> Tensor:
        """``shared`` user/context/history inputs with batch 1, ``items`` the N candidates' item
        inputs -> logits (N,), equal to ``forward`` on the broadcast batch."""
        return self.forward_parts(shared, self.item_parts(items))
