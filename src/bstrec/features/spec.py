"""The feature specification: the one contract between sample building, models and serving.

Encoded sample tables (``samples/{train,valid,test}.parquet``) hold one row per sample with:

- ``label`` (Float32), ``timestamp`` (Int64), raw ``user_id`` / ``item_id`` (for GAUC and tracing);
- one Int32 column per categorical feature (``Feature.kind == "categorical"``);
- one List[Int32] column per multi-hot feature (``"multi"``);
- the behaviour sequence, oldest first, at most ``max_len`` entries: ``hist_item`` and ``hist_cat``
  (List[Int32], ids encoded like the target's) and ``hist_dt`` (List[Int64], seconds between the
  sample time and the behaviour time, >= 0).

Index convention for every vocabulary: 0 = padding, 1 = out of vocabulary, 2.. = values seen in
the train split, in the order the vocabulary lists them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

PAD = 0
OOV = 1
N_RESERVED = 2

Kind = Literal["categorical", "multi"]
Group = Literal["user", "item", "context"]


@dataclass(frozen=True)
class Feature:
    """One encoded input column. ``vocab_size`` counts padding and OOV slots."""

    name: str
    kind: Kind
    group: Group
    vocab_size: int
    vocab: str  # name of the vocabulary it indexes (shared by target and history columns)


@dataclass(frozen=True)
class FeatureSpec:
    features: tuple[Feature, ...]
    max_len: int
    # Vocabularies the sequence columns index: hist_item uses the target item's, hist_cat the
    # target category's, so one embedding table serves both.
    sequence_vocabs: dict[str, str] = field(default_factory=lambda: {
        "hist_item": "item_id", "hist_cat": "category"})

    def feature(self, name: str) -> Feature:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"no feature {name!r} in spec (have {[f.name for f in self.features]})")

    def vocab_size(self, vocab: str) -> int:
        for f in self.features:
            if f.vocab == vocab:
                return f.vocab_size
        raise KeyError(f"no vocabulary {vocab!r} in spec")

    def to_dict(self) -> dict[str, object]:
        return {"features": [asdict(f) for f in self.features], "max_len": self.max_len,
                "sequence_vocabs": dict(self.sequence_vocabs)}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> FeatureSpec:
        feats = d["features"]
        assert isinstance(feats, list)
        max_len = d["max_len"]
        assert isinstance(max_len, int)
        seq = d.get("sequence_vocabs", {"hist_item": "item_id", "hist_cat": "category"})
        assert isinstance(seq, dict)
        return cls(features=tuple(Feature(**f) for f in feats), max_len=max_len,
                   sequence_vocabs=dict(seq))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> FeatureSpec:
        return cls.from_dict(json.loads(Path(path).read_text()))
