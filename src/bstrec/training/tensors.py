"""Samples as pre-built tensors, so that no Python runs per sample while training.

A split is loaded once into a dict of tensors (the batch contract every ranker reads):

- ``<feature>``: (N,) long for each categorical feature of the spec (user, item, category, ...);
- ``<feature>``: (N, M) long for each multi-hot feature, 0-padded on the right;
- ``hist_item``, ``hist_cat``: (N, L) long, RIGHT-aligned: the most recent behaviour sits at
  index L-1, padding (0) on the left, so that the target appended after it is always at L;
- ``hist_dt``: (N, L) long seconds between sample and behaviour (0 at padding); a model that
  reads time differences buckets them itself, with its config's ``time_buckets``
  (features/timebuckets.py), so no bucket count is fixed here;
- ``hist_mask``: (N, L) bool, True where a behaviour is present;
- ``label``: (N,) float; or (N, H) for a multi-task ranker, one column per head (``labels``
  of ``to_tensors``, e.g. ESMM's click and click x buy).

A batch is the same dict indexed by a tensor of row numbers: one gather per column.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from bstrec.features.spec import FeatureSpec

Batch = dict[str, torch.Tensor]


def pad_lists(col: pl.Series, width: int, *, right_align: bool, dtype: type = np.int64) -> np.ndarray:
    """(N,) list column -> (N, width) array, 0-padded; keeps the LAST ``width`` entries."""
    lengths = col.list.len().to_numpy().astype(np.int64)
    flat: np.ndarray = col.explode().drop_nulls().to_numpy().astype(dtype)
    return pad_flat(lengths, flat, width, right_align=right_align)


def pad_flat(lengths: np.ndarray, flat: np.ndarray, width: int, *, right_align: bool) -> np.ndarray:
    """``pad_lists`` on lists given as their lengths (N,) and concatenated values."""
    n = len(lengths)
    out: np.ndarray = np.zeros((n, width), dtype=flat.dtype)
    if flat.size == 0:
        return out
    if n == 1:  # a request's one row: a slice, not the gathers below
        k = min(int(lengths[0]), width)
        last = flat[int(lengths[0]) - k:int(lengths[0])]
        if right_align:
            out[0, width - k:] = last
        else:
            out[0, :k] = last
        return out
    ends = np.cumsum(lengths)
    keep = np.minimum(lengths, width)
    row = np.repeat(np.arange(n), keep)
    # position of each kept entry counted from the end of its list (0 = last)
    from_end = np.arange(keep.sum()) - np.repeat(np.cumsum(keep) - keep, keep)
    from_end = np.repeat(keep, keep) - 1 - from_end
    src = np.repeat(ends, keep) - 1 - from_end
    col_idx = (width - 1 - from_end) if right_align else (np.repeat(keep, keep) - 1 - from_end)
    out[row, col_idx] = flat[src]
    return out


def history_tensors(lengths: np.ndarray, hist_item: np.ndarray, hist_cat: np.ndarray,
                    hist_dt: np.ndarray, max_len: int) -> Batch:
    """Histories as lengths (N,) and flat values -> the contract's right-aligned ``hist_*``
    (N, L) tensors and mask."""
    L = max_len
    t: Batch = {name: torch.from_numpy(pad_flat(lengths, flat.astype(np.int64), L, right_align=True))
                for name, flat in (("hist_item", hist_item), ("hist_cat", hist_cat),
                                   ("hist_dt", hist_dt))}
    mask = np.arange(L)[None, :] >= (L - np.minimum(lengths, L))[:, None]
    t["hist_mask"] = torch.from_numpy(mask)
    return t


def to_tensors(frame: pl.DataFrame, spec: FeatureSpec,
               labels: tuple[str, ...] | None = None) -> Batch:
    """Encoded sample rows (see features/spec.py) -> the batch contract above. ``labels``:
    the columns that make ``label``, (N,) from one, (N, H) from H (None: ``label``)."""
    t: Batch = {}
    for f in spec.features:
        if f.kind == "categorical":
            t[f.name] = torch.from_numpy(frame[f.name].to_numpy().astype(np.int64))
        else:
            width = max(1, int(frame[f.name].list.len().max() or 1))  # type: ignore[arg-type]
            t[f.name] = torch.from_numpy(pad_lists(frame[f.name], width, right_align=False))
    item, cat, dt = (frame[name].explode().drop_nulls().to_numpy()
                     for name in ("hist_item", "hist_cat", "hist_dt"))
    t |= history_tensors(frame["hist_item"].list.len().to_numpy().astype(np.int64), item, cat,
                         dt, spec.max_len)
    if labels is None or len(labels) == 1:
        t["label"] = torch.from_numpy(frame[labels[0] if labels else "label"].to_numpy()
                                      .astype(np.float32))
    else:
        t["label"] = torch.from_numpy(np.stack([frame[c].to_numpy().astype(np.float32)
                                                for c in labels], 1))
    return t


@dataclass
class TensorSplit:
    """One split in memory, served as batches by row-index gathers."""

    tensors: Batch

    def __len__(self) -> int:
        return int(self.tensors["label"].shape[0])

    @classmethod
    def from_frame(cls, frame: pl.DataFrame, spec: FeatureSpec,
                   labels: tuple[str, ...] | None = None) -> TensorSplit:
        return cls(to_tensors(frame, spec, labels))

    def batch(self, rows: torch.Tensor) -> Batch:
        return {k: v[rows] for k, v in self.tensors.items()}

    def batches(self, batch_size: int, *, shuffle: bool = False,
                generator: torch.Generator | None = None, start: int = 0) -> Iterator[Batch]:
        """Batches in order (or a permutation drawn from ``generator``), from batch ``start``."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for i in range(start * batch_size, n, batch_size):
            yield self.batch(order[i:i + batch_size])
