"""Merging candidate sources: per-source quotas, deduplication, seen-item removal, attribution.

Notation: Q queries, K_s length of source s's ranked list, K = sum of the quotas.

Each source hands a ranked list per query (-1 = no more). The merged list takes each source's
first ``quota`` valid items, interleaved in proportion to the quotas (source s's r-th item sits
at (r + 0.5) / quota_s on a common scale, so a 300-quota source gives three items for each one
of a 100-quota source), then, if duplicates or short lists left it under K, the sources' further
items in the same interleaving. An item offered by several sources takes one slot and keeps all
their names (a bit per source). Items the user has already seen, reserved ids and -1 are never
kept. Everything is vectorised over queries: one sort by (query, item, slot), one by
(query, slot).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from bstrec.features.spec import N_RESERVED

I64 = npt.NDArray[np.int64]


@dataclass
class Candidates:
    """Merged candidates: ``ids`` (Q, K) in merged order (-1 = none), ``sources`` (Q, K) bits
    (bit b = ``names[b]`` produced the candidate)."""

    ids: I64
    sources: npt.NDArray[np.int64]
    names: tuple[str, ...]

    def source_names(self, row: int, col: int) -> list[str]:
        bits = int(self.sources[row, col])
        return [n for b, n in enumerate(self.names) if bits >> b & 1]

    def from_source(self, name: str) -> npt.NDArray[np.bool_]:
        """(Q, K) True where ``name`` produced the candidate."""
        out: npt.NDArray[np.bool_] = (self.sources >> self.names.index(name) & 1).astype(bool)
        return out


def _pair_order(major: I64, minor: I64, minor_size: int) -> I64:
    """Indices sorting by (major, minor), ``0 <= minor < minor_size``, ``major >= 0``: one
    integer argsort of ``major * minor_size + minor`` (a two-key lexsort costs twice as much)
    unless that could overflow int64."""
    if int(major.max(initial=0)) < (1 << 62) // max(minor_size, 1):
        return np.argsort(major * minor_size + minor)
    return np.lexsort((minor, major))


@functools.lru_cache(maxsize=256)
def _slots(lengths: tuple[int, ...], quotas: tuple[int, ...], bits: tuple[int, ...]
           ) -> tuple[I64, I64]:
    """The concatenated lists' slots (T = sum of ``lengths``): each slot's rank in the merged
    interleaving (T,) and its source bit (T,). They depend on the list lengths and quotas only,
    so requests of one shape share them."""
    pos, src = [], []
    for n, q, b in zip(lengths, quotas, bits, strict=True):
        r = np.arange(n, dtype=np.float64)
        # beyond its quota a source only backfills: after every in-quota item of every source
        pos.append((r + 0.5) / q + np.where(r >= q, 1e6, 0.0) + 1e-9 * b)
        src.append(np.full(n, 1 << b, dtype=np.int64))
    key = np.concatenate(pos)
    rank = np.empty(len(key), dtype=np.int64)
    rank[np.argsort(key, kind="stable")] = np.arange(len(key))
    bit = np.concatenate(src)
    rank.flags.writeable = bit.flags.writeable = False  # shared by every later call
    return rank, bit


def merge(lists: Mapping[str, npt.ArrayLike], quotas: Mapping[str, int], *,
          seen_offsets: I64 | None = None, seen_items: I64 | None = None,
          names: tuple[str, ...] | None = None) -> Candidates:
    """Merge ranked lists (name -> (Q, K_s) ids) under ``quotas`` (name -> slots); sources
    without a quota are not used. ``seen_offsets`` (Q+1,) / ``seen_items`` list per query the
    items to remove. ``names`` fixes the bit order (default: the quotas' order)."""
    names = names or tuple(quotas)
    used = [n for n in names if quotas.get(n, 0) > 0 and n in lists]
    arrays = [np.asarray(lists[n], dtype=np.int64) for n in used]
    if not arrays:
        raise ValueError(f"no source with a quota among {list(lists)}")
    Q = arrays[0].shape[0]
    K = sum(quotas[n] for n in used)
    ids = np.concatenate(arrays, 1)  # (Q, T)
    T = ids.shape[1]
    slot_rank, slot_bit = _slots(tuple(a.shape[1] for a in arrays),
                                 tuple(quotas[n] for n in used),
                                 tuple(names.index(n) for n in used))
    width = int(max(ids.max(initial=0), 0)) + 1
    safe = np.maximum(ids, 0)
    bad = ids < N_RESERVED
    if seen_offsets is not None and seen_items is not None and len(seen_items):
        w2 = max(width, int(seen_items.max()) + 1)
        seen = np.sort(np.repeat(np.arange(Q, dtype=np.int64), np.diff(seen_offsets)) * w2
                       + seen_items)
        keys = np.arange(Q, dtype=np.int64)[:, None] * w2 + safe
        at = np.minimum(np.searchsorted(seen, keys), len(seen) - 1)
        bad |= seen[at] == keys
    rank = np.where(bad, T, slot_rank).ravel()  # rank T: never kept
    # one sort by (query, item, rank): the first of each group is the item's best slot
    row = np.repeat(np.arange(Q, dtype=np.int64), T)
    flat_ids = ids.ravel()
    comp = row * width + safe.ravel()
    order = _pair_order(comp, rank, T + 1)
    comp_s = comp[order]
    starts = np.flatnonzero(np.r_[True, comp_s[1:] != comp_s[:-1]])
    # every source that offered the item
    union = np.bitwise_or.reduceat(np.tile(slot_bit, Q)[order], starts)
    keep_idx = order[starts]
    keep_rank = rank[keep_idx]
    ok = keep_rank < T
    keep_idx, keep_rank, union = keep_idx[ok], keep_rank[ok], union[ok]
    keep_row = row[keep_idx]
    # then by (query, rank): the merged order; the first K of each query are kept
    o2 = _pair_order(keep_row, keep_rank, T + 1)
    keep_idx, keep_row, union = keep_idx[o2], keep_row[o2], union[o2]
    row_start = np.searchsorted(keep_row, np.arange(Q))
    pos = np.arange(len(keep_row)) - row_start[keep_row]
    sel = pos < K
    out_ids = np.full((Q, K), -1, dtype=np.int64)
    out_src = np.zeros((Q, K), dtype=np.int64)
    out_ids[keep_row[sel], pos[sel]] = flat_ids[keep_idx[sel]]
    out_src[keep_row[sel], pos[sel]] = union[sel]
    return Candidates(out_ids, out_src, names)
