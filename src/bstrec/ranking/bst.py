"""Behavior Sequence Transformer (Chen et al. 2019, arXiv 1905.06874), as the paper defines it.

Notation: B batch, L history length (``spec.max_len``), D token width, F other-feature fields.

1. The target item is appended to the user's behaviour sequence: L+1 tokens, target last.
2. Each token is the concatenation (the paper concatenates, it does not add) of its item-id,
   category and position embeddings. Position = the time between the request and the behaviour,
   bucketed (features/timebuckets.py); the target's own is bucket 1 (dt = 0).
3. ``blocks`` Transformer blocks (paper: 1 block, 8 heads, dropout 0.2, LeakyReLU feed-forward).
4. The outputs of all L+1 positions (padding zeroed), or of the target position only, are
   concatenated with the embeddings of the other features (user profile, target item features,
   context, crosses such as gender x category), then an MLP 1024-512-256 (LeakyReLU) -> 1 logit.

Serving scores N candidates of one request, whose user, context and history inputs are all the
same: ``forward_request`` computes what they share once (see there).

Token width 64 = item 32 + category 16 + position 16: the item id carries most of what a token
says (thousands of values), the category (tens) and the time bucket (30) need few dimensions; 64
is the top of the paper's embedding sizes (4-64) and splits into 8 heads of 8. Ablations
(``position="none"``) drop the position part, leaving 48. The target's raw item and category
embeddings are also among the other features (the paper lists item id and category there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bstrec.features.spec import FeatureSpec
from bstrec.features.timebuckets import N_TIME_BUCKETS
from bstrec.nn.embeddings import Cross, FeatureEmbeddings, resolve_crosses
from bstrec.nn.mlp import MLP, Activation, Norm
from bstrec.nn.transformer import TransformerBlock
from bstrec.ranking.request import broadcast

Batch = dict[str, Tensor]
Position = Literal["time", "slot", "sinusoidal", "none"]
Output = Literal["concat", "target"]


def sinusoidal_table(n: int, dim: int) -> Tensor:
    """(n, dim) sin/cos encoding of positions 0..n-1 (Vaswani et al. 2017); ``dim`` even."""
    pos = torch.arange(n, dtype=torch.float32).unsqueeze(1)  # (n, 1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table


@dataclass(frozen=True)
class BSTConfig:
    item_dim: int = 32  # token part from the item id
    cat_dim: int = 16  # token part from the category
    pos_dim: int = 16  # token part from the position (absent when position="none")
    embed_dim: int = 16  # width of each other feature's embedding
    # Init scale of the token tables (item, category, position). 1.0 makes the attention learn
    # target/behaviour matches sooner on synthetic tasks, but one epoch of ML-1M gave valid AUC
    # 0.722 with 1.0 against 0.737 with 0.05 (the scale every other table starts at).
    token_init_std: float = 0.05
    position: Position = "time"  # time-difference bucket | index in sequence | sin/cos | none
    blocks: int = 1
    heads: int = 8
    ffn_mult: int = 4  # feed-forward width = ffn_mult * token width (the paper leaves it open)
    dropout: float = 0.2
    output: Output = "concat"  # all L+1 transformer outputs, or the target's only
    mlp: tuple[int, ...] = (1024, 512, 256)
    mlp_act: Activation = "leaky_relu"
    mlp_dropout: float = 0.0
    # the paper's MLP has no normalisation; "batch" is what torch-rechub's MLPs do
    mlp_norm: Norm = "none"
    crosses: tuple[tuple[str, str], ...] | None = None  # None: gender x category if in the spec
    time_buckets: int = N_TIME_BUCKETS

    @property
    def token_dim(self) -> int:
        return self.item_dim + self.cat_dim + (0 if self.position == "none" else self.pos_dim)

    def __post_init__(self) -> None:
        if self.position not in ("time", "slot", "sinusoidal", "none"):
            raise ValueError(f"position must be time|slot|sinusoidal|none, got {self.position!r}")
        if self.output not in ("concat", "target"):
            raise ValueError(f"output must be concat|target, got {self.output!r}")
        if self.blocks < 1 or self.heads < 1:
            raise ValueError("blocks and heads must be >= 1")
        if self.token_dim % self.heads:
            raise ValueError(f"token width {self.token_dim} is not divisible by {self.heads} heads")
        if self.position == "sinusoidal" and self.pos_dim % 2:
            raise ValueError("sinusoidal positions need an even pos_dim")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.mlp_dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")


class BST(nn.Module):
    """Behavior Sequence Transformer ranker: ``forward(batch) -> logits (B,)``, and
    ``forward_request(shared, items) -> logits (N,)`` for the N candidates of one request."""

    slots: Tensor
    sin_pos: Tensor
    shared_fields: Tensor
    item_fields: Tensor
    w1_shared_cols: Tensor
    w1_item_cols: Tensor

    def __init__(self, spec: FeatureSpec, config: BSTConfig | None = None) -> None:
        super().__init__()
        c = self.config = config or BSTConfig()
        L = self.max_len = spec.max_len
        crosses: tuple[Cross, ...] = resolve_crosses(spec, c.crosses)
        self.embed = FeatureEmbeddings(
            spec, c.embed_dim, seq_dims={"hist_item": c.item_dim, "hist_cat": c.cat_dim},
            crosses=crosses, seq_init_std=c.token_init_std)
        # Slot k = steps before the target (target 0): with right-aligned histories column j of
        # the sequence is always slot L - j, whatever the history's length.
        self.register_buffer("slots", torch.arange(L, -1, -1), persistent=False)  # (L+1,)
        self.pos: nn.Embedding | None = None
        if c.position == "time":
            self.pos = nn.Embedding(c.time_buckets, c.pos_dim, padding_idx=0)
        elif c.position == "slot":
            self.pos = nn.Embedding(L + 1, c.pos_dim)
        table = sinusoidal_table(L + 1, c.pos_dim)[self.slots] if c.position == "sinusoidal" \
            else torch.zeros(0)
        self.register_buffer("sin_pos", table, persistent=False)  # (L+1, pos_dim)
        if self.pos is not None:
            nn.init.normal_(self.pos.weight, std=c.token_init_std)
            if c.position == "time":
                with torch.no_grad():
                    self.pos.weight[0].zero_()
        D = c.token_dim
        self.blocks = nn.ModuleList(TransformerBlock(D, c.heads, c.ffn_mult * D, c.dropout)
                                    for _ in range(c.blocks))
        seq_out = (L + 1) * D if c.output == "concat" else D
        other = self.embed.n_fields * c.embed_dim + c.item_dim + c.cat_dim
        self.mlp = MLP(seq_out + other, c.mlp, act=c.mlp_act, dropout=c.mlp_dropout, out_dim=1,
                       norm=c.mlp_norm)
        # The MLP's input is [sequence output, fields, target item, target category]: which
        # fields (and so which columns of the first layer) depend on the candidate, for
        # forward_request. A cross such as gender x category does, through its item side.
        per_item = {f.name for f in spec.features if f.group == "item"}
        varies = [bool(per_item & set(self.embed.field_inputs(i)))
                  for i in range(self.embed.n_fields)]
        shared = [i for i, v in enumerate(varies) if not v]
        cols = torch.arange(seq_out + other)
        is_shared = torch.zeros(seq_out + other, dtype=torch.bool)
        for i in shared:
            is_shared[seq_out + i * c.embed_dim: seq_out + (i + 1) * c.embed_dim] = True
        for name, value in (("shared_fields", torch.tensor(shared, dtype=torch.long)),
                            ("item_fields", torch.tensor([i for i, v in enumerate(varies) if v],
                                                         dtype=torch.long)),
                            ("w1_shared_cols", cols[is_shared]), ("w1_item_cols", cols[~is_shared])):
            self.register_buffer(name, value, persistent=False)

    @property
    def request_shaped(self) -> bool:
        """Whether ``forward_request`` shares work across candidates: with the target's output
        only and one block, nothing candidate-specific flows into the history's positions."""
        return self.config.output == "target" and self.config.blocks == 1

    def _positions(self, hist_pos: Tensor) -> Tensor | None:
        """(B, L) time buckets -> (B, L+1, pos_dim) position part of the tokens, target last
        (its time bucket is 1: dt = 0); None when tokens have no position part."""
        B = hist_pos.shape[0]
        out: Tensor | None = None
        if self.pos is not None and self.config.position == "time":
            out = self.pos(torch.cat([hist_pos, hist_pos.new_ones(B, 1)], 1))
        elif self.pos is not None:
            out = self.pos(self.slots).expand(B, -1, -1)
        elif self.config.position == "sinusoidal":
            out = self.sin_pos.expand(B, -1, -1)
        return out

    def _tokens(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """-> tokens (B, L+1, D), keep (B, L+1) bool, other features (B, F*dim + item + cat)."""
        e = self.embed(batch)
        item, cat = e.seq["hist_item"], e.seq["hist_cat"]  # (B, L+1, item_dim), (..., cat_dim)
        B = item.shape[0]
        mask = batch["hist_mask"]  # (B, L)
        keep = torch.cat([mask, mask.new_ones(B, 1)], 1)  # (B, L+1): the target is always there
        parts = [item, cat]
        pos = self._positions(batch["hist_pos"])
        if pos is not None:
            parts.append(pos)
        other = torch.cat([e.fields.flatten(1), item[:, -1], cat[:, -1]], 1)
        return torch.cat(parts, -1), keep, other

    def forward(self, batch: Batch) -> Tensor:
        x, keep, other = self._tokens(batch)  # (B, L+1, D), (B, L+1), (B, F')
        for block in self.blocks:
            x = block(x, keep)  # (B, L+1, D)
        # (B, (L+1)*D) with padding zeroed, or the target's (B, D)
        seq = (x * keep.unsqueeze(-1).to(x.dtype)).flatten(1) if self.config.output == "concat" \
            else x[:, -1]
        logits: Tensor = self.mlp(torch.cat([seq, other], 1)).squeeze(-1)  # (B,)
        return logits

    def forward_request(self, shared: Batch, items: Batch) -> Tensor:
        """The N candidates of one request: ``shared`` holds the user, context and history
        inputs of the batch contract with batch 1, ``items`` the target-item inputs (item,
        category, item features) with batch N -> logits (N,), equal to ``forward`` on the
        expanded batch (tests/ranking/test_request.py).

        With ``request_shaped`` (target output, one block) the history tokens, their keys and
        values and the first MLP layer's product with the shared fields (user, context) are
        computed once per request; per candidate remain the target token's attention row over
        the L+1 keys, its feed-forward and the MLP on the candidate's columns. That is most of
        a request's FLOPs gone: the expanded batch repeats the history N times. Other configs
        broadcast the shared inputs and run ``forward`` (exact, nothing saved).
        """
        if not self.request_shaped:
            out: Tensor = self(broadcast(shared, items))
            return out
        emb = self.embed
        item_t = emb.seq_tables["hist_item"](items[emb.seq_targets["hist_item"]])  # (N, item)
        cat_t = emb.seq_tables["hist_cat"](items[emb.seq_targets["hist_cat"]])  # (N, cat)
        N = item_t.shape[0]
        context = [emb.seq_tables["hist_item"](shared["hist_item"]),
                   emb.seq_tables["hist_cat"](shared["hist_cat"])]  # (1, L, item), (1, L, cat)
        target = [item_t, cat_t]
        pos = self._positions(shared["hist_pos"])  # (1, L+1, pos_dim): the target's is last
        if pos is not None:
            context.append(pos[:, :-1])
            target.append(pos[:, -1].expand(N, -1))
        block = self.blocks[0]
        assert isinstance(block, TransformerBlock)
        seq = block.forward_last(torch.cat(context, -1), shared["hist_mask"],
                                 torch.cat(target, -1))  # (N, D)
        fields = emb.fields(broadcast(shared, items))  # (N, F, dim): lookups, no FLOPs
        first = self.mlp[0]
        assert isinstance(first, nn.Linear)
        z = F.linear(torch.cat([seq, fields.index_select(1, self.item_fields).flatten(1), item_t,
                                cat_t], 1),
                     first.weight[:, self.w1_item_cols], first.bias)  # (N, hidden)
        if len(self.shared_fields):
            z = z + F.linear(fields[:1].index_select(1, self.shared_fields).flatten(1),
                             first.weight[:, self.w1_shared_cols])  # (1, hidden), once
        for layer in list(self.mlp)[1:]:
            z = layer(z)
        return z.squeeze(-1)  # (N,)

    @torch.no_grad()
    def attention_maps(self, batch: Batch) -> Tensor:
        """(B, heads, L+1, L+1) attention weights of the first block (query rows, key columns)."""
        x, keep, _ = self._tokens(batch)
        first = self.blocks[0]
        assert isinstance(first, TransformerBlock)
        return first.attention_weights(x, keep)
