"""Embedding tables built from a FeatureSpec, with one lookup per table per batch.

Notation: B batch, L sequence length (``spec.max_len``), F number of fields, D width.

Two kinds of tables:

- one fused table (width ``dim``) holds every vocabulary of the "other" features: categorical
  features, multi-hot features (mean-pooled over their non-padding entries) and cross features
  (the pair ``(a, b)`` indexes row ``a * size_b + b`` of its own vocabulary). Each vocabulary owns
  a range of rows starting at its offset, so all fields are looked up with a single gather, as in
  TorchRec's fused embedding collections. Row 0 is a shared zero row for multi-hot padding.
- one table per sequence column (``seq_dims``, e.g. ``{"hist_item": 32, "hist_cat": 16}``), of the
  vocabulary ``spec.sequence_vocabs`` names. The target feature of that vocabulary (``item`` for
  ``hist_item``) is appended after the history, so the lookup returns (B, L+1, d) with the target
  at index L: exactly BST's sequence, and the target's own embedding for the other models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from bstrec.features.spec import FeatureSpec

Cross = tuple[str, str]
# Crosses used when a model's config leaves ``crosses`` unset, kept only where the spec has both
# features (BST's paper lists gender x category among its cross features).
DEFAULT_CROSSES: tuple[Cross, ...] = (("user_gender", "category"),)


def resolve_crosses(spec: FeatureSpec, crosses: Sequence[Cross] | None) -> tuple[Cross, ...]:
    """``None`` -> the DEFAULT_CROSSES whose features exist; explicit crosses must all exist."""
    names = {f.name for f in spec.features if f.kind == "categorical"}
    if crosses is None:
        return tuple(c for c in DEFAULT_CROSSES if c[0] in names and c[1] in names)
    for a, b in crosses:
        for n in (a, b):
            if n not in names:
                raise ValueError(f"cross ({a!r}, {b!r}): {n!r} is not a categorical feature of "
                                 f"the spec (have {sorted(names)})")
    return tuple((a, b) for a, b in crosses)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """(B, L, D), (B, L) bool -> (B, D) mean over present entries (zeros when none)."""
    m = mask.unsqueeze(-1).to(x.dtype)  # (B, L, 1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class Embedded(NamedTuple):
    fields: Tensor  # (B, F, dim): categorical, cross, then pooled multi-hot fields
    seq: dict[str, Tensor]  # column -> (B, L+1, d_column): history, then the target at L


class FeatureEmbeddings(nn.Module):
    """All embedding tables of a model. ``forward(batch) -> Embedded``."""

    single_idx: Tensor
    cross_a: Tensor
    cross_b: Tensor
    cross_size_b: Tensor
    offsets: Tensor
    multi_offsets: Tensor

    def __init__(self, spec: FeatureSpec, dim: int, *, seq_dims: Mapping[str, int] | None = None,
                 crosses: Sequence[Cross] = (), history: bool = True, init_std: float = 0.05,
                 seq_init_std: float = 0.05) -> None:
        super().__init__()
        # history=False: the sequence tables embed the target only (B, 1, d), e.g. for Wide&Deep
        # without the behaviour sequence but with the same item/category tables as BST.
        self.history = history
        seq_dims = dict(seq_dims or {})
        cats = {f.name: f for f in spec.features if f.kind == "categorical"}
        seq_vocabs = {spec.sequence_vocabs[c] for c in seq_dims}

        # Sequence tables and their target features.
        self.seq_columns: tuple[str, ...] = tuple(seq_dims)
        self.seq_targets: dict[str, str] = {}
        self.seq_tables = nn.ModuleDict()
        for col, d in seq_dims.items():
            if col not in spec.sequence_vocabs:
                raise ValueError(f"{col!r} is not a sequence column of the spec "
                                 f"(have {sorted(spec.sequence_vocabs)})")
            vocab = spec.sequence_vocabs[col]
            users = [f.name for f in cats.values() if f.vocab == vocab]
            if len(users) != 1:
                raise ValueError(f"sequence column {col!r} needs exactly one categorical target "
                                 f"feature of vocabulary {vocab!r}, found {users}")
            self.seq_targets[col] = users[0]
            self.seq_tables[col] = nn.Embedding(spec.vocab_size(vocab), d, padding_idx=0)

        # Fused table: vocabulary -> (offset, size); row 0 is the shared padding row.
        offsets: dict[str, int] = {}
        total = 1

        def add(vocab: str, size: int) -> int:
            nonlocal total
            if vocab not in offsets:
                offsets[vocab] = total
                total += size
            return offsets[vocab]

        singles = [f for f in cats.values() if f.vocab not in seq_vocabs]
        multis = [f for f in spec.features if f.kind == "multi"]
        raw = list(dict.fromkeys([f.name for f in singles] + [n for c in crosses for n in c]))
        single_off = [add(f.vocab, f.vocab_size) for f in singles]
        cross_off = [add(f"{a}_x_{b}", cats[a].vocab_size * cats[b].vocab_size)
                     for a, b in crosses]
        self.multi_names: tuple[str, ...] = tuple(f.name for f in multis)
        multi_off = [add(f.vocab, f.vocab_size) for f in multis]

        self.raw_names: tuple[str, ...] = tuple(raw)
        # each cross field's (input a, input b, size of b's vocabulary, offset), as plain values
        # for cross_fields (tensors would be data that a traced graph cannot branch on)
        self.cross_specs: tuple[tuple[str, str, int, int], ...] = tuple(
            (a, b, cats[b].vocab_size, off) for (a, b), off in zip(crosses, cross_off, strict=True))
        self.field_names: tuple[str, ...] = (
            *(f.name for f in singles), *(f"{a}_x_{b}" for a, b in crosses), *self.multi_names)
        self.dim = dim
        self.register_buffer("single_idx", torch.tensor([raw.index(f.name) for f in singles],
                                                        dtype=torch.long), persistent=False)
        self.register_buffer("cross_a", torch.tensor([raw.index(a) for a, _ in crosses],
                                                     dtype=torch.long), persistent=False)
        self.register_buffer("cross_b", torch.tensor([raw.index(b) for _, b in crosses],
                                                     dtype=torch.long), persistent=False)
        self.register_buffer("cross_size_b", torch.tensor(
            [cats[b].vocab_size for _, b in crosses], dtype=torch.long), persistent=False)
        self.register_buffer("offsets", torch.tensor(single_off + cross_off, dtype=torch.long),
                             persistent=False)
        self.register_buffer("multi_offsets", torch.tensor(multi_off, dtype=torch.long),
                             persistent=False)
        self.table = nn.Embedding(total, dim, padding_idx=0)
        for t, std in ((self.table, init_std),
                       *((t, seq_init_std) for t in self.seq_tables.values())):
            assert isinstance(t, nn.Embedding)
            nn.init.normal_(t.weight, std=std)
            with torch.no_grad():
                t.weight[0].zero_()

    @property
    def n_fields(self) -> int:
        return len(self.field_names)

    def field_inputs(self, field: int) -> tuple[str, ...]:
        """The batch features field ``field`` (an index into ``field_names``) is computed from."""
        n_single = len(self.single_idx)
        if field < n_single:
            return (self.raw_names[int(self.single_idx[field])],)
        if field < n_single + len(self.cross_a):
            c = field - n_single
            return (self.raw_names[int(self.cross_a[c])], self.raw_names[int(self.cross_b[c])])
        return (self.multi_names[field - n_single - len(self.cross_a)],)

    def forward(self, batch: Mapping[str, Tensor]) -> Embedded:
        """Batch contract (training/tensors.py) -> fields (B, F, dim) and sequences (B, L+1, d)."""
        seq: dict[str, Tensor] = {}
        for col in self.seq_columns:
            ids = batch[self.seq_targets[col]].unsqueeze(1)  # (B, 1)
            if self.history:
                ids = torch.cat([batch[col], ids], 1)  # (B, L+1)
            seq[col] = self.seq_tables[col](ids)  # (B, L+1, d), or (B, 1, d) without history
        return Embedded(self.fields(batch), seq)

    def cross_fields(self, batch: Mapping[str, Tensor], fields: Sequence[int]) -> Tensor:
        """(B, len(fields), dim): the cross fields ``fields`` (indices into ``field_names``) of
        ``fields(batch)``, from their two inputs only, which broadcast: a request's (1,)
        user side against its (N,) candidates' item side."""
        n_single = len(self.single_idx)
        rows = []
        for f in fields:
            if not 0 <= f - n_single < len(self.cross_specs):
                raise ValueError(f"field {f} ({self.field_names[f]}) is not a cross")
            a, b, size_b, offset = self.cross_specs[f - n_single]
            rows.append(batch[a] * size_b + batch[b] + offset)
        out: Tensor = self.table(torch.stack(torch.broadcast_tensors(*rows), 1))  # type: ignore[no-untyped-call]
        return out

    def fields(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Batch contract -> (B, F, dim): the fields of ``forward`` without the sequences."""
        parts: list[Tensor] = []
        if self.raw_names:
            raw = torch.stack([batch[n] for n in self.raw_names], 1)  # (B, R)
            # index_select, not raw[:, idx]: one Gather in an exported graph, not a GatherND
            # and transposes
            cross = raw.index_select(1, self.cross_a) * self.cross_size_b \
                + raw.index_select(1, self.cross_b)  # (B, C)
            parts.append(torch.cat([raw.index_select(1, self.single_idx), cross], 1)
                         + self.offsets)
        widths = []
        for i, name in enumerate(self.multi_names):
            ids = batch[name]  # (B, M), 0 = padding -> shared zero row
            parts.append(torch.where(ids > 0, ids + self.multi_offsets[i], 0))
            widths.append(ids.shape[1])
        if not parts:  # a spec whose only features feed the sequence tables
            parts.append(batch[self.seq_targets[self.seq_columns[0]]].unsqueeze(1)[:, :0])
        e = self.table(torch.cat(parts, 1))  # (B, S + C + sum M, dim): the one fused lookup
        n_sc = e.shape[1] - sum(widths)
        fields = [e[:, :n_sc]]
        start = n_sc
        for i, w in enumerate(widths):
            count = (parts[len(parts) - len(widths) + i] > 0).sum(1, keepdim=True)  # (B, 1)
            pooled = e[:, start:start + w].sum(1) / count.clamp(min=1).to(e.dtype)  # (B, dim)
            fields.append(pooled.unsqueeze(1))
            start += w
        return torch.cat(fields, 1)
