"""Two-tower retriever: a user tower over the behaviour sequence and profile, an item tower over
the item id and its content, scored by inner product (YouTube DNN / sampled-softmax two-tower).

Notation: B batch, L history length (``spec.max_len``), d token width, D output width.

User tower:
1. each behaviour is a token: item-id + category + time-difference bucket embeddings, summed
   (``hist_dt`` seconds bucketed here into the config's ``time_buckets``, as BST's positions:
   features/timebuckets.py); a learned summary token is
   appended after the most recent behaviour, so a user with no history still has one token;
2. ``encoder="mean"`` (default): the mean of the behaviour tokens and the most recent one (the
   order enters through the time buckets and the recency slot); ``"transformer"``: Transformer
   blocks over the L+1 tokens (padding masked), then the summary token's output and the mean of
   the behaviours' outputs, about five times slower to train on CPU and no better on ML-100K
   (BENCHMARKS.md, two-tower variants);
3. concatenated with the profile embeddings (gender, age, ... and optionally the user id and the
   request context), an MLP -> (B, D), L2-normalised.

Item tower: the item-id embedding (the same table as the history's, so a behaviour and a
candidate live in one space) concatenated with the content embeddings (category, attributes,
multi-hot genres mean-pooled), an MLP -> (B, D), L2-normalised. While training, a share
``item_id_dropout`` of the ids is replaced by the out-of-vocabulary id, so that the OOV row
and the content path learn to place an item from its content alone: a new item, which has no id
embedding, then gets a usable vector (cold start).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bstrec.features.spec import OOV, FeatureSpec
from bstrec.features.timebuckets import N_TIME_BUCKETS, TimeBuckets
from bstrec.nn.embeddings import FeatureEmbeddings, masked_mean
from bstrec.nn.mlp import MLP
from bstrec.nn.transformer import TransformerBlock

Batch = dict[str, Tensor]
Encoder = Literal["transformer", "mean"]


@dataclass(frozen=True)
class TwoTowerConfig:
    dim: int = 64  # output vector width (what the index stores)
    token_dim: int = 64  # item-id / category / time embeddings of the sequence
    feat_dim: int = 16  # width of each profile, context and content embedding
    # "transformer" trains several times slower on CPU for no recall gained
    # (benchmarks/results/retrieval_ablation_ml100k-retrieval.json)
    encoder: Encoder = "mean"
    blocks: int = 1
    heads: int = 4
    dropout: float = 0.1
    use_time: bool = True  # add the time-difference bucket to each behaviour token
    profile: bool = True  # user features other than the id (gender, age, occupation, zip)
    user_id: bool = False  # the user-id embedding (memorises known users; none for new ones)
    context: bool = False  # hour of day and day of week of the request
    user_hidden: tuple[int, ...] = (256,)
    item_hidden: tuple[int, ...] = (256,)
    item_id_dropout: float = 0.1
    normalize: bool = True  # cosine scores; the temperature of the loss sets their sharpness
    init_std: float = 0.05
    # log2-spaced buckets of hist_dt (use_time): the last one takes every dt from
    # 2^(time_buckets-2) - 1 seconds on
    time_buckets: int = N_TIME_BUCKETS

    def __post_init__(self) -> None:
        if self.encoder not in ("transformer", "mean"):
            raise ValueError(f"encoder must be transformer|mean, got {self.encoder!r}")
        if self.encoder == "transformer" and self.token_dim % self.heads:
            raise ValueError(f"token_dim {self.token_dim} is not divisible by {self.heads} heads")
        if not 0.0 <= self.item_id_dropout < 1.0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout rates must be in [0, 1)")
        if self.dim < 1 or self.token_dim < 1 or self.feat_dim < 1:
            raise ValueError("widths must be >= 1")
        if self.time_buckets < 2:
            raise ValueError(f"time_buckets must be >= 2 (padding and dt = 0), got "
                             f"{self.time_buckets}")


def _sub_spec(spec: FeatureSpec, names: list[str]) -> FeatureSpec:
    return FeatureSpec(features=tuple(spec.feature(n) for n in names), max_len=spec.max_len)


class TwoTower(nn.Module):
    """``encode_users(batch) -> (B, D)``, ``encode_items(item columns) -> (N, D)``."""

    def __init__(self, spec: FeatureSpec, config: TwoTowerConfig | None = None) -> None:
        super().__init__()
        c = self.config = config or TwoTowerConfig()
        d = c.token_dim
        self.item_emb = nn.Embedding(spec.vocab_size("item_id"), d, padding_idx=0)
        self.cat_emb = nn.Embedding(spec.vocab_size("category"), d, padding_idx=0)
        self.time_emb = nn.Embedding(c.time_buckets, d, padding_idx=0) if c.use_time else None
        self.buckets = TimeBuckets(c.time_buckets) if c.use_time else None
        self.summary = nn.Parameter(torch.zeros(1, 1, d))
        for t in (self.item_emb, self.cat_emb, self.time_emb):
            if t is not None:
                nn.init.normal_(t.weight, std=c.init_std)
                with torch.no_grad():
                    t.weight[0].zero_()
        nn.init.normal_(self.summary, std=c.init_std)
        self.blocks = nn.ModuleList(
            TransformerBlock(d, c.heads, 4 * d, c.dropout) for _ in range(c.blocks)
        ) if c.encoder == "transformer" else nn.ModuleList()

        groups = {f.name: f.group for f in spec.features}
        user_names = [n for n, g in groups.items() if g == "user"
                      and ((n == "user" and c.user_id) or (n != "user" and c.profile))]
        user_names += [n for n, g in groups.items() if g == "context" and c.context]
        # the feature columns encode_users reads besides the history (an exported user tower's
        # inputs: retrieval/export.py)
        self.user_features: tuple[str, ...] = tuple(user_names)
        self.user_fields = FeatureEmbeddings(_sub_spec(spec, user_names), c.feat_dim,
                                             init_std=c.init_std) if user_names else None
        n_user = len(user_names) * c.feat_dim
        content = [n for n, g in groups.items() if g == "item" and n != "item"]
        self.item_fields = FeatureEmbeddings(_sub_spec(spec, content), c.feat_dim,
                                             init_std=c.init_std) if content else None
        n_item = len(content) * c.feat_dim
        self.user_mlp = MLP(2 * d + n_user, c.user_hidden, act="relu", dropout=c.dropout,
                            out_dim=c.dim)
        self.item_mlp = MLP(d + n_item, c.item_hidden, act="relu", dropout=c.dropout,
                            out_dim=c.dim)

    def _norm(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1) if self.config.normalize else x

    def encode_users(self, batch: Batch) -> Tensor:
        """Batch contract (history, profile, context; never the target) -> (B, D)."""
        mask = batch["hist_mask"]  # (B, L)
        tok = self.item_emb(batch["hist_item"]) + self.cat_emb(batch["hist_cat"])  # (B, L, d)
        if self.time_emb is not None and self.buckets is not None:
            tok = tok + self.time_emb(self.buckets(batch["hist_dt"], mask))
        B = tok.shape[0]
        if self.config.encoder == "transformer":
            x = torch.cat([tok, self.summary.expand(B, -1, -1)], 1)  # (B, L+1, d)
            keep = torch.cat([mask, mask.new_ones(B, 1)], 1)  # (B, L+1)
            for block in self.blocks:
                x = block(x, keep)
            seq = torch.cat([x[:, -1], masked_mean(x[:, :-1], mask)], 1)  # (B, 2d)
        else:
            # right-aligned histories: the most recent behaviour sits at L-1 (0 when empty)
            seq = torch.cat([masked_mean(tok, mask), tok[:, -1]], 1)  # (B, 2d)
        parts = [seq]
        if self.user_fields is not None:
            parts.append(self.user_fields.fields(batch).flatten(1))  # (B, F*feat_dim)
        return self._norm(self.user_mlp(torch.cat(parts, 1)))  # (B, D)

    def encode_items(self, items: Batch) -> Tensor:
        """Item columns of the batch contract (``item``, ``category``, ``item_*``) -> (N, D)."""
        ids = items["item"]
        if self.training and self.config.item_id_dropout > 0:
            drop = torch.rand(ids.shape, device=ids.device) < self.config.item_id_dropout
            ids = torch.where(drop, torch.full_like(ids, OOV), ids)
        parts = [self.item_emb(ids)]
        if self.item_fields is not None:
            parts.append(self.item_fields.fields(items).flatten(1))
        return self._norm(self.item_mlp(torch.cat(parts, 1)))  # (N, D)

    def forward(self, batch: Batch) -> Tensor:
        """Score of each row's own target item: (B,) inner products (for inspection)."""
        return (self.encode_users(batch) * self.encode_items(batch)).sum(-1)
