"""The catalog (what can be retrieved) and the retrieval queries of protocol P2.

Items are named by their encoded index (``features/spec.py``: 0 = padding, 1 = out of
vocabulary, 2.. = items seen in train), so that every source, the index and the ranker share one
id space. The catalog of P2 is every item of the train vocabulary: ids ``2 .. N-1``.

Notation: N catalog size including the two reserved rows, Q queries, L history length.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import polars as pl
import torch

from bstrec.data.samples import SPLITS, SampleSet, gather_lists, history_slices
from bstrec.features.spec import N_RESERVED, OOV, FeatureSpec
from bstrec.features.vocab import Vocabularies
from bstrec.training.tensors import Batch, TensorSplit, pad_lists

I64 = npt.NDArray[np.int64]


def item_feature_names(spec: FeatureSpec) -> list[str]:
    """The item-group features of the spec (``item``, ``category``, ``item_*``), spec order."""
    return [f.name for f in spec.features if f.group == "item"]


@dataclass
class Catalog:
    """Encoded item features by item index: row i describes item i (rows 0 and 1 reserved).

    ``features[name]`` is (N,) long for categorical and (N, M) long for multi-hot features,
    exactly the item columns of the batch contract, so ``batch(ids)`` feeds an item tower.
    """

    spec: FeatureSpec
    features: dict[str, torch.Tensor]

    @property
    def size(self) -> int:
        return int(self.features["item"].shape[0])

    @property
    def candidates(self) -> I64:
        """Ids that may be recommended: every item of the train vocabulary."""
        return np.arange(N_RESERVED, self.size, dtype=np.int64)

    def batch(self, ids: torch.Tensor) -> Batch:
        """(...,) item ids -> the item columns of the batch contract for those items."""
        return {name: t[ids] for name, t in self.features.items()}

    @classmethod
    def from_frame(cls, frame: pl.DataFrame, spec: FeatureSpec, size: int) -> Catalog:
        """Item features from encoded sample rows (each train item appears in some train row)."""
        names = item_feature_names(spec)
        rows = frame.select(names).unique(subset="item", keep="first").sort("item")
        item = rows["item"].to_numpy().astype(np.int64)
        feats: dict[str, torch.Tensor] = {}
        for f in spec.features:
            if f.group != "item":
                continue
            if f.kind == "categorical":
                col = np.zeros(size, dtype=np.int64)
                col[item] = rows[f.name].to_numpy()
            else:
                width = max(1, int(frame[f.name].list.len().max() or 1))  # type: ignore[arg-type]
                col = np.zeros((size, width), dtype=np.int64)
                col[item] = pad_lists(rows[f.name], width, right_align=False)
            feats[f.name] = torch.from_numpy(col)
        feats["item"] = torch.arange(size, dtype=torch.long)
        # the OOV row: an item known by its content only (cold start), no category known
        feats["item"][OOV] = OOV
        return cls(spec, feats)

    @classmethod
    def from_samples(cls, samples: SampleSet) -> Catalog:
        return cls.from_frame(samples.splits["train"], samples.spec,
                              samples.spec.vocab_size("item_id"))

    def save(self, path: str | Path) -> None:
        cols = {}
        for name, t in self.features.items():
            cols[name] = t.numpy().tolist() if t.ndim == 2 else t.numpy()
        pl.DataFrame(cols).write_parquet(path)

    @classmethod
    def load(cls, path: str | Path, spec: FeatureSpec) -> Catalog:
        frame = pl.read_parquet(path)
        feats: dict[str, torch.Tensor] = {}
        for name in frame.columns:
            col = frame[name]
            arr = np.array(col.to_list(), dtype=np.int64) if isinstance(col.dtype, pl.List) \
                else col.to_numpy().astype(np.int64)
            feats[name] = torch.from_numpy(arr)
        return cls(spec, feats)


def encode_new_items(items: pl.DataFrame, spec: FeatureSpec, vocabs: Vocabularies,
                     multi_width: int) -> Batch:
    """Raw item rows (``category`` and attribute columns named as in the dataset, e.g. ``year``,
    ``genres``) -> item columns of the batch contract with ``item`` = OOV: a new item is known by
    its content only. Unknown attribute values are OOV too."""
    out: Batch = {"item": torch.full((items.height,), OOV, dtype=torch.long)}
    for f in spec.features:
        if f.group != "item" or f.name == "item":
            continue
        raw = f.name.removeprefix("item_") if f.name.startswith("item_") else f.name
        if raw not in items.columns:
            raise ValueError(f"new items lack column {raw!r} (feature {f.name!r})")
        src = items[raw]
        vocab = vocabs[f.vocab]
        if f.kind == "multi":
            enc = vocab.encode(src.cast(pl.List(pl.String)))
            out[f.name] = torch.from_numpy(pad_lists(enc, multi_width, right_align=False))
        else:
            cast = src if f.name == "category" else src.cast(pl.String)
            out[f.name] = torch.from_numpy(vocab.encode(cast).to_numpy().astype(np.int64))
    return out


@dataclass
class QuerySet:
    """P2 queries: each sample of a split with label 1, as the system sees it at that time.

    ``data`` holds the query samples in the batch contract (history, profile, context; the
    target's own columns are there too, and no source may read them); ``targets`` (Q,) are the
    items to find (OOV = never rated in train: a miss for every source); ``seen_offsets`` (Q+1,)
    and ``seen_items`` list, per query, the catalog items the user rated before it (in the P1
    order: earlier timestamp, or the same timestamp and a smaller item id).
    """

    data: TensorSplit
    targets: I64
    users: npt.NDArray[np.generic]
    seen_offsets: I64
    seen_items: I64

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def seen_mask(self, rows: I64, size: int) -> npt.NDArray[np.bool_]:
        """(q,) query rows -> (q, size) bool, True at the items each user has seen."""
        lo, hi = self.seen_offsets[rows], self.seen_offsets[rows + 1]
        offsets, flat = gather_lists(lo, hi - lo)
        r = np.repeat(np.arange(len(rows)), np.diff(offsets))
        mask = np.zeros((len(rows), size), dtype=np.bool_)
        mask[r, self.seen_items[flat]] = True
        return mask

    def seen_count(self) -> I64:
        return np.diff(self.seen_offsets)

    def subset(self, rows: I64) -> QuerySet:
        lo, hi = self.seen_offsets[rows], self.seen_offsets[rows + 1]
        offsets, flat = gather_lists(lo, hi - lo)
        return QuerySet(TensorSplit(self.data.batch(torch.from_numpy(rows))), self.targets[rows],
                        self.users[rows], offsets, self.seen_items[flat])

    @classmethod
    def from_samples(cls, samples: SampleSet, split: str = "test") -> QuerySet:
        """The P2 queries of ``split``; ``samples`` must hold every split (for the seen items)."""
        missing = [s for s in SPLITS if s not in samples.splits]
        if missing:
            raise ValueError(f"the seen items need every split; samples lack {missing}")
        # Every event is a sample of exactly one split, so the splits together are the whole log.
        cols = ["user_id", "item_id", "timestamp", "item"]
        log = (pl.concat([samples.splits[s].select(cols) for s in SPLITS])
               .sort(["user_id", "timestamp", "item_id"]).with_row_index("_pos"))
        user_codes = log["user_id"].rank("dense").to_numpy()
        first, lengths = history_slices(user_codes, len(log))
        frame = samples.splits[split].filter(pl.col("label") == 1)
        pos = frame.select("user_id", "item_id", "timestamp").join(
            log.select("user_id", "item_id", "timestamp", "_pos"),
            on=["user_id", "item_id", "timestamp"], how="left", maintain_order="left")["_pos"]
        if pos.null_count():
            raise ValueError("some queries are not in the event log")
        p = pos.to_numpy().astype(np.int64)
        offsets, flat = gather_lists(first[p], lengths[p])
        items = log["item"].to_numpy().astype(np.int64)[flat]
        keep = items >= N_RESERVED  # items never rated in train cannot be candidates anyway
        cum = np.concatenate([[0], np.cumsum(keep)]).astype(np.int64)
        seen_offsets = cum[offsets]  # (Q+1,): the kept entries before each query's slice
        return cls(
            data=TensorSplit.from_frame(frame, samples.spec),
            targets=frame["item"].to_numpy().astype(np.int64),
            users=frame["user_id"].to_numpy(),
            seen_offsets=seen_offsets,
            seen_items=items[keep],
        )
