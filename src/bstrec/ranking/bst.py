"""Behavior Sequence Transformer (Chen et al. 2019, arXiv 1905.06874), as the paper defines it.

Notation: B batch, L history length (``spec.max_len``), D token width, F other-feature fields.

1. The target item is appended to the user's behaviour sequence: L+1 tokens, target last.
2. Each token is the concatenation (the paper concatenates, it does not add) of its item-id,
   category and position embeddings. Position = the time between the request and the behaviour
   (``hist_dt``, seconds), bucketed here into the config's ``time_buckets``
   (features/timebuckets.py); the target's own is bucket 1 (dt = 0).
3. ``blocks`` Transformer blocks (paper: 1 block, 8 heads, dropout 0.2, LeakyReLU feed-forward).
4. The outputs of all L+1 positions (padding zeroed), or of the target position only, are
   concatenated with the embeddings of the other features (user profile, target item features,
   context, crosses such as gender x category), then an MLP 1024-512-256 (LeakyReLU) -> 1 logit.

Serving scores N candidates of one request, whose user, context and history inputs are all the
same: ``forward_request`` computes what they share once, and what each candidate contributes
from its item alone is ``item_parts``, which serving computes once per catalogue item
(``forward_parts`` takes them; see there).

Token width 64 = item 32 + category 16 + position 16: the item id carries most of what a token
says (thousands of values), the category (tens) and the time bucket (``time_buckets``, 30 by
default) need few dimensions; 64 is the top of the paper's embedding sizes (4-64) and splits
into 8 heads of 8. Ablations (``position="none"``) drop the position part, leaving 48. The
target's raw item and category embeddings are also among the other features (the paper lists
item id and category there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bstrec.features.spec import FeatureSpec
from bstrec.features.timebuckets import N_TIME_BUCKETS, TimeBuckets
from bstrec.nn.embeddings import Cross, FeatureEmbeddings, resolve_crosses
from bstrec.nn.mlp import MLP, Activation, Norm
from bstrec.nn.transformer import TransformerBlock
from bstrec.ranking.request import broadcast

Batch = dict[str, Tensor]
Position = Literal["time", "slot", "sinusoidal", "none"]
Output = Literal["concat", "target"]
ConcatScale = Literal["none", "sqrt", "length"]


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
    # target/behaviour matches sooner on synthetic tasks, but was below 0.05 (the scale every
    # other table starts at) on ML-1M valid.
    token_init_std: float = 0.05
    # Init scale of the other features' table. torch-rechub starts every table at std 1e-4 (an
    # id seen rarely then stays near zero, not random); on ML-1M valid that, with the tokens at
    # 1e-4 too, was below 0.05 (trial target_bn_init against target_bn in
    # benchmarks/results/tune_bst_ml1m-ctr.json).
    embed_init_std: float = 0.05
    position: Position = "time"  # time-difference bucket | index in sequence | sin/cos | none
    blocks: int = 1
    heads: int = 8
    ffn_mult: int = 4  # feed-forward width = ffn_mult * token width (the paper leaves it open)
    dropout: float = 0.2
    output: Output = "concat"  # all L+1 transformer outputs, or the target's only
    # Not in the paper: output="concat" divided by sqrt(L+1) ("sqrt") or by L+1 ("length").
    # Adam moves every weight by about lr per step whatever its gradient, so a first-layer unit
    # reading the (L+1)*D LayerNorm'd inputs of the concatenation moves (L+1) times as far per
    # step as one reading the target's output alone when the moves share a sign, sqrt(L+1)
    # times when they do not. On the taobao_like variant of synthetic-implicit the moves shared
    # a sign (the units' mean pre-activation drifted negative, most into LeakyReLU's flat side)
    # and valid AUC stayed at chance for hundreds of steps; "sqrt" shortened that, "length"
    # removed it (issue 23, benchmarks/results/stall_synthetic-implicit.json).
    concat_scale: ConcatScale = "none"
    mlp: tuple[int, ...] = (1024, 512, 256)
    mlp_act: Activation = "leaky_relu"
    mlp_dropout: float = 0.0
    # Training only: each behaviour is left out of the sequence (as if padding) with this
    # probability, so that the model does not lean on any one entry of the history. On ML-1M
    # valid 0.2 was level with none (trial target_bn_hdrop in
    # benchmarks/results/tune_bst_ml1m-ctr.json).
    history_dropout: float = 0.0
    # the paper's MLP has no normalisation; "batch" is what torch-rechub's MLPs do
    mlp_norm: Norm = "none"
    # Not in the paper: a linear term over the other features' embeddings added to the logit,
    # the "wide" part of torch-rechub's WideDeep (a linear model over the same embeddings the
    # MLP reads), so that additive effects of user, item and context need not pass the MLP. On
    # ML-1M valid it did not help target_bn (trial target_bn_wide in
    # benchmarks/results/tune_bst_ml1m-ctr.json). Serving scores such a model on the broadcast
    # batch (no request sharing).
    wide: bool = False
    crosses: tuple[tuple[str, str], ...] | None = None  # None: gender x category if in the spec
    # log2-spaced buckets of hist_dt (position="time"): the last one takes every dt from
    # 2^(time_buckets-2) - 1 seconds on, so fewer buckets merge all older behaviours
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
        if self.time_buckets < 2:
            raise ValueError(f"time_buckets must be >= 2 (padding and dt = 0), got "
                             f"{self.time_buckets}")
        if self.position == "sinusoidal" and self.pos_dim % 2:
            raise ValueError("sinusoidal positions need an even pos_dim")
        for name in ("dropout", "mlp_dropout", "history_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")


class BST(nn.Module):
    """Behavior Sequence Transformer ranker: ``forward(batch) -> logits (B,)``, and
    ``forward_request(shared, items) -> logits (N,)`` for the N candidates of one request."""

    slots: Tensor
    sin_pos: Tensor
    shared_fields: Tensor
    item_fields: Tensor
    w1_seq_cols: Tensor
    w1_shared_cols: Tensor
    w1_item_cols: Tensor
    w1_mixed_cols: Tensor

    def __init__(self, spec: FeatureSpec, config: BSTConfig | None = None) -> None:
        super().__init__()
        c = self.config = config or BSTConfig()
        L = self.max_len = spec.max_len
        crosses: tuple[Cross, ...] = resolve_crosses(spec, c.crosses)
        self.embed = FeatureEmbeddings(
            spec, c.embed_dim, seq_dims={"hist_item": c.item_dim, "hist_cat": c.cat_dim},
            crosses=crosses, init_std=c.embed_init_std, seq_init_std=c.token_init_std)
        # Slot k = steps before the target (target 0): with right-aligned histories column j of
        # the sequence is always slot L - j, whatever the history's length.
        self.register_buffer("slots", torch.arange(L, -1, -1), persistent=False)  # (L+1,)
        self.pos: nn.Embedding | None = None
        self.buckets: TimeBuckets | None = None
        if c.position == "time":
            self.buckets = TimeBuckets(c.time_buckets)
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
        self.wide = nn.Linear(other, 1) if c.wide else None
        # The MLP's input is [sequence output, fields, target item, target category]. For
        # forward_parts: which fields read only the user and context (shared by a request's
        # candidates), only the target item (computable per catalogue item, item_parts), or
        # both (a cross such as gender x category), and the first layer's columns of each.
        per_item = {f.name for f in spec.features if f.group == "item"}
        reads = [set(self.embed.field_inputs(i)) for i in range(self.embed.n_fields)]
        kinds = ["item" if r <= per_item else "mixed" if r & per_item else "shared" for r in reads]
        fields = {k: [i for i, v in enumerate(kinds) if v == k] for k in ("shared", "item", "mixed")}

        def cols(ids: list[int]) -> list[int]:
            return [seq_out + i * c.embed_dim + j for i in ids for j in range(c.embed_dim)]

        target_cols = list(range(seq_out + self.embed.n_fields * c.embed_dim, seq_out + other))
        for name, value in (("shared_fields", fields["shared"]), ("item_fields", fields["item"]),
                            ("w1_seq_cols", list(range(seq_out))),
                            ("w1_shared_cols", cols(fields["shared"])),
                            ("w1_item_cols", cols(fields["item"]) + target_cols),
                            ("w1_mixed_cols", cols(fields["mixed"]))):
            self.register_buffer(name, torch.tensor(value, dtype=torch.long), persistent=False)
        # plain ints, not a buffer: a traced graph unrolls the crosses over them
        self.mixed_field_ids: tuple[int, ...] = tuple(fields["mixed"])
        # the item inputs forward_parts reads beside the precomputed parts (crosses' item side)
        self.mixed_item_inputs: tuple[str, ...] = tuple(dict.fromkeys(
            n for i in fields["mixed"] for n in self.embed.field_inputs(i) if n in per_item))

    @property
    def request_shaped(self) -> bool:
        """Whether ``forward_request`` shares work across candidates: with the target's output
        only and one block, nothing candidate-specific flows into the history's positions."""
        c = self.config
        return c.output == "target" and c.blocks == 1 and not c.wide

    def _positions(self, hist_dt: Tensor, hist_mask: Tensor) -> Tensor | None:
        """(B, L) seconds, (B, L) mask -> (B, L+1, pos_dim) position part of the tokens,
        target last (its time bucket is 1: dt = 0); None when tokens have no position part."""
        B = hist_dt.shape[0]
        out: Tensor | None = None
        if self.pos is not None and self.buckets is not None:
            pos = self.buckets(hist_dt, hist_mask)  # (B, L), padding 0
            out = self.pos(torch.cat([pos, pos.new_ones(B, 1)], 1))
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
        if self.training and self.config.history_dropout > 0:
            mask = mask & (torch.rand(mask.shape, device=mask.device)
                           >= self.config.history_dropout)
        keep = torch.cat([mask, mask.new_ones(B, 1)], 1)  # (B, L+1): the target is always there
        parts = [item, cat]
        pos = self._positions(batch["hist_dt"], batch["hist_mask"])
        if pos is not None:
            parts.append(pos)
        other = torch.cat([e.fields.flatten(1), item[:, -1], cat[:, -1]], 1)
        return torch.cat(parts, -1), keep, other

    def forward(self, batch: Batch) -> Tensor:
        x, keep, other = self._tokens(batch)  # (B, L+1, D), (B, L+1), (B, F')
        for block in self.blocks:
            x = block(x, keep)  # (B, L+1, D)
        # (B, (L+1)*D) with padding zeroed, or the target's (B, D)
        if self.config.output == "concat":
            seq = (x * keep.unsqueeze(-1).to(x.dtype)).flatten(1)
            if self.config.concat_scale == "sqrt":
                seq = seq / math.sqrt(self.max_len + 1)
            elif self.config.concat_scale == "length":
                seq = seq / (self.max_len + 1)
        else:
            seq = x[:, -1]
        logits: Tensor = self.mlp(torch.cat([seq, other], 1)).squeeze(-1)  # (B,)
        if self.wide is not None:
            logits = logits + self.wide(other).squeeze(-1)
        return logits

    def forward_request(self, shared: Batch, items: Batch) -> Tensor:
        """The N candidates of one request: ``shared`` holds the user, context and history
        inputs of the batch contract with batch 1, ``items`` the target-item inputs (item,
        category, item features) with batch N -> logits (N,), equal to ``forward`` on the
        expanded batch (tests/ranking/test_request.py).

        With ``request_shaped`` (target output, one block) this is ``forward_parts`` on the
        candidates' ``item_parts``; other configs broadcast the shared inputs and run
        ``forward`` (exact, nothing saved).
        """
        if not self.request_shaped:
            out: Tensor = self(broadcast(shared, items))
            return out
        return self.forward_parts(shared, self.item_parts(items), items)

    def _fields_from(self, known: Batch, n: int) -> Tensor:
        """(n, F, dim) ``embed.fields`` with zeros for the inputs ``known`` lacks: right for the
        fields that read only ``known`` (an item's alone, or a request's shared ones)."""
        emb = self.embed
        zero = next(iter(known.values())).new_zeros(n, dtype=torch.long)
        return emb.fields({m: known.get(m, zero) for m in emb.raw_names}
                          | {m: known.get(m, zero[:, None]) for m in emb.multi_names})

    @property
    def part_sizes(self) -> tuple[int, ...]:
        """Widths of ``item_parts``' pieces: target token, its scaled query, its value, its
        attention score on itself (one per head), the first MLP layer's item columns."""
        D, first = self.config.token_dim, self.mlp[0]
        assert isinstance(first, nn.Linear)
        return D, D, D, self.config.heads, first.out_features

    def item_parts(self, items: Batch) -> Tensor:
        """(N,) target-item inputs -> (N, sum(part_sizes)): everything a candidate contributes
        to ``forward_parts`` that depends on the item alone, so that serving computes it once
        per catalogue item instead of once per request (serving/pipeline.py)."""
        if not self.request_shaped:
            raise ValueError("item parts need the target output and one block (request_shaped)")
        emb = self.embed
        item_t = emb.seq_tables["hist_item"](items[emb.seq_targets["hist_item"]])  # (N, item)
        cat_t = emb.seq_tables["hist_cat"](items[emb.seq_targets["hist_cat"]])  # (N, cat)
        N = item_t.shape[0]
        parts = [item_t, cat_t]
        # the target's position does not depend on the history (time bucket 1, slot 0)
        none = self.slots.new_zeros(1, self.max_len)
        pos = self._positions(none, none.bool())
        if pos is not None:
            parts.append(pos[:, -1].expand(N, -1))
        token = torch.cat(parts, -1)  # (N, D)
        block = self.blocks[0]
        assert isinstance(block, TransformerBlock)
        q, v, s_self = block.last_parts(token)
        fields = self._fields_from(items, N)
        first = self.mlp[0]
        assert isinstance(first, nn.Linear)
        z_item = F.linear(torch.cat([fields.index_select(1, self.item_fields).flatten(1), item_t,
                                     cat_t], 1), first.weight[:, self.w1_item_cols],
                          first.bias)  # (N, hidden)
        return torch.cat([token, q, v, s_self, z_item], 1)

    def forward_parts(self, shared: Batch, parts: Tensor, items: Batch) -> Tensor:
        """One request from its candidates' ``item_parts`` (N, P): ``shared`` as in
        ``forward_request``, ``items`` (N,) the item inputs of ``mixed_item_inputs`` (others
        are ignored) -> logits (N,).

        The history tokens, their keys and values and the first MLP layer's product with the
        shared fields are computed once per request; per candidate remain its attention row
        over the history (two plain matrix products), the feed-forward, the crosses that read
        both user and item, and the MLP. The expanded batch would repeat the history N times.
        """
        emb = self.embed
        token, q, v, s_self, z_item = torch.split(parts, list(self.part_sizes), 1)
        context = [emb.seq_tables["hist_item"](shared["hist_item"]),
                   emb.seq_tables["hist_cat"](shared["hist_cat"])]  # (1, L, item), (1, L, cat)
        pos = self._positions(shared["hist_dt"], shared["hist_mask"])  # (1, L+1, pos_dim)
        if pos is not None:
            context.append(pos[:, :-1])
        block = self.blocks[0]
        assert isinstance(block, TransformerBlock)
        seq = block.forward_last(torch.cat(context, -1), shared["hist_mask"], token,
                                 parts=(q, v, s_self))  # (N, D)
        first = self.mlp[0]
        assert isinstance(first, nn.Linear)
        w = first.weight
        z = z_item + F.linear(seq, w[:, self.w1_seq_cols])  # (N, hidden)
        if self.mixed_field_ids:
            crosses = emb.cross_fields(shared | {n: items[n] for n in self.mixed_item_inputs},
                                       self.mixed_field_ids)  # (N, C, dim)
            z = z + F.linear(crosses.flatten(1), w[:, self.w1_mixed_cols])
        if len(self.shared_fields):
            z = z + F.linear(self._fields_from(shared, 1).index_select(1, self.shared_fields)
                             .flatten(1), w[:, self.w1_shared_cols])  # (1, hidden), once
        for layer in list(self.mlp)[1:]:
            z = layer(z)
        out: Tensor = z.squeeze(-1)  # (N,)
        return out

    @torch.no_grad()
    def attention_maps(self, batch: Batch) -> Tensor:
        """(B, heads, L+1, L+1) attention weights of the first block (query rows, key columns)."""
        x, keep, _ = self._tokens(batch)
        first = self.blocks[0]
        assert isinstance(first, TransformerBlock)
        return first.attention_weights(x, keep)
