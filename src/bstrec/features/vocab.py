"""Vocabularies fitted on the train split, and the encoders that apply them offline and online."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from bstrec.features.spec import N_RESERVED, OOV

Value = int | str


class Vocabulary:
    """Values seen in train, indexed from 2 (0 = padding, 1 = out of vocabulary)."""

    def __init__(self, values: Sequence[Value]) -> None:
        self.values: list[Value] = list(values)
        self.index: dict[Value, int] = {v: i + N_RESERVED for i, v in enumerate(self.values)}
        if len(self.index) != len(self.values):
            raise ValueError("vocabulary values must be unique")

    @classmethod
    def fit(cls, values: pl.Series) -> Vocabulary:
        """Sorted unique non-null values (sorted so that the same data gives the same indices)."""
        uniq = values.drop_nulls().unique().sort()
        return cls(uniq.to_list())

    def __len__(self) -> int:
        """Embedding table size: the values plus padding and OOV."""
        return len(self.values) + N_RESERVED

    def encode(self, values: pl.Series) -> pl.Series:
        """Map a Series (or a List Series) of raw values to Int32 indices; unknown -> OOV."""
        if isinstance(values.dtype, pl.List):
            return values.list.eval(self._expr(pl.element())).alias(values.name)
        return values.to_frame().select(self._expr(pl.col(values.name))).to_series()

    def _expr(self, col: pl.Expr) -> pl.Expr:
        if not self.values:
            return pl.when(col.is_null()).then(OOV).otherwise(OOV).cast(pl.Int32)
        old = pl.Series(self.values)
        new = pl.Series(np.arange(N_RESERVED, len(self), dtype=np.int32))
        # A value of another dtype than the vocabulary's (e.g. "7" for an Int64 id) is unseen.
        return col.cast(old.dtype, strict=False).replace_strict(
            old, new, default=OOV, return_dtype=pl.Int32)

    def encode_values(self, values: Iterable[Value]) -> list[int]:
        """The per-request path (serving): plain dictionary lookups, no frame overhead."""
        return [self.index.get(v, OOV) for v in values]


class Vocabularies(dict[str, Vocabulary]):
    """Named vocabularies, saved as one JSON file of value lists."""

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({k: v.values for k, v in self.items()}))

    @classmethod
    def load(cls, path: str | Path) -> Vocabularies:
        raw = json.loads(Path(path).read_text())
        return cls({k: Vocabulary(v) for k, v in raw.items()})
