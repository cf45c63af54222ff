"""Merging candidate sources: per-source quotas, deduplication, seen-item removal, attribution.

Notation: Q queries, K_s length of source s's ranked list, K = sum of the quotas.

Each source hands a ranked list per query (-1 = no more). The merged list takes each source's
first ``quota`` valid items, interleaved in proportion to the quotas (source s's r-th item sits
at (r + 0.5) / quota_s on a common scale, so a 300-quota source gives three items for each one
of a 100-quota source), then, if duplicates or short lists left it under K, the sources' further
items in the same interleaving. An item offered by several sources takes one slot and keeps all
their names (a bit per source). Items the user has already seen, reserved ids and -1 are never
kept. Everything is vectorised over queries: one sort by position, one by (query, item).
"""

from __future__ import annotations

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


def seen_keys(rows: int, offsets: I64, items: I64, width: int) -> I64:
    """CSR seen items (Q+1 offsets, flat items) -> sorted keys ``row * width + item``."""
    row = np.repeat(np.arange(rows, dtype=np.int64), np.diff(offsets))
    return np.unique(row * width + items)


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
    pos, bits = [], []
    for n, a in zip(used, arrays, strict=True):
        r = np.arange(a.shape[1], dtype=np.float64)
        q = quotas[n]
        # beyond its quota a source only backfills: after every in-quota item of every source
        p = (r + 0.5) / q + np.where(r >= q, 1e6, 0.0) + 1e-9 * names.index(n)
        pos.append(np.broadcast_to(p, a.shape))
        bits.append(np.full(a.shape, 1 << names.index(n), dtype=np.int64))
    key = np.concatenate(pos, 1)
    src = np.concatenate(bits, 1)
    width = int(max(ids.max(initial=0), 0)) + 1
    bad = ids < N_RESERVED
    if seen_offsets is not None and seen_items is not None and len(seen_items):
        w2 = max(width, int(seen_items.max()) + 1)
        sk = seen_keys(Q, seen_offsets, seen_items, w2)
        bad |= np.isin(np.arange(Q, dtype=np.int64)[:, None] * w2 + np.maximum(ids, 0), sk)
    key = np.where(bad, np.inf, key)
    # one sort by (query, item, position): the first of each group is the item's best position
    row = np.broadcast_to(np.arange(Q, dtype=np.int64)[:, None], (Q, T)).ravel()
    flat_ids, flat_key, flat_src = ids.ravel(), key.ravel(), src.ravel()
    comp = row * width + np.maximum(flat_ids, 0)
    order = np.lexsort((flat_key, comp))
    comp_s = comp[order]
    first = np.r_[True, comp_s[1:] != comp_s[:-1]]
    starts = np.flatnonzero(first)
    union = np.bitwise_or.reduceat(flat_src[order], starts)  # every source that offered it
    keep_idx = order[starts]
    keep_key = flat_key[keep_idx]
    ok = np.isfinite(keep_key)
    keep_idx, keep_key, union = keep_idx[ok], keep_key[ok], union[ok]
    keep_row = row[keep_idx]
    # then by (query, position): the merged order; the first K of each query are kept
    o2 = np.lexsort((keep_key, keep_row))
    keep_idx, keep_row, union = keep_idx[o2], keep_row[o2], union[o2]
    row_start = np.searchsorted(keep_row, np.arange(Q))
    rank = np.arange(len(keep_row)) - row_start[keep_row]
    sel = rank < K
    out_ids = np.full((Q, K), -1, dtype=np.int64)
    out_src = np.zeros((Q, K), dtype=np.int64)
    out_ids[keep_row[sel], rank[sel]] = flat_ids[keep_idx[sel]]
    out_src[keep_row[sel], rank[sel]] = union[sel]
    return Candidates(out_ids, out_src, names)
