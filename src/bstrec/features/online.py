"""Online features: the ranker's input rows for one request, from the feature store.

The rows are built by the offline builder's own functions (data/samples.py): ``sort_events`` for
the behaviour order, ``history_slices`` for the window, ``history_columns`` for the history lists,
``encode_users`` / ``encode_items`` for the profile and item columns, ``assemble_rows`` for the
joins, context columns and out-of-vocabulary filling. A request is a sample whose event is the
request itself: its history is the user's last ``max_len`` stored behaviours with timestamp <=
the request time, in the behaviour order, each with ``request time - behaviour time``.

Offline, a behaviour in the same second as the sample counts as history only when its item id
is smaller (P1's order). Online every stored behaviour happened before the request, so all of
them count; the skew test (tests/features/test_online.py) loads the store with exactly the
events that precede each sample and checks that the two agree field by field.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import torch

from bstrec.data.samples import (
    assemble_rows,
    encode_items,
    encode_users,
    history_columns,
    history_slices,
    list_series,
    sort_events,
)
from bstrec.features.spec import OOV, FeatureSpec
from bstrec.features.store import Features, FeatureStore, ItemId, UserId, UserSnapshot, check_id
from bstrec.features.vocab import Vocabularies
from bstrec.ranking.request import broadcast, item_names
from bstrec.training.tensors import Batch, pad_lists, to_tensors


@dataclass(frozen=True)
class FeatureColumns:
    """The raw user/item columns a FeatureSpec reads (the spec names them ``user_<f>``,
    ``item_<f>``): what a Dataset declares offline, recovered from the spec online."""

    user_features: tuple[str, ...]
    item_features: tuple[str, ...]
    item_multi_features: tuple[str, ...]

    @classmethod
    def from_spec(cls, spec: FeatureSpec) -> FeatureColumns:
        def raw(group: str, kind: str, skip: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(f.name.removeprefix(f"{group}_") for f in spec.features
                         if f.group == group and f.kind == kind and f.name not in skip)

        return cls(user_features=raw("user", "categorical", ("user",)),
                   item_features=raw("item", "categorical", ("item", "category")),
                   item_multi_features=raw("item", "multi", ()))


def _frame_from_rows(rows: list[tuple[Any, ...]], schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """Rows -> frame, column by column: list columns through Arrow offsets (polars' row-wise
    constructor is slow for them, and this runs per request)."""
    cols = []
    for c, (name, dtype) in enumerate(schema.items()):
        values = [r[c] for r in rows]
        if isinstance(dtype, pl.List):
            lengths = np.fromiter((len(v) for v in values), dtype=np.int64, count=len(values))
            offsets = np.zeros(len(values) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            flat = np.fromiter(itertools.chain.from_iterable(values), dtype=np.int64,
                               count=int(offsets[-1]))
            cols.append(list_series(name, offsets, flat).cast(dtype))
        else:
            cols.append(pl.Series(name, values, dtype=dtype))
    return pl.DataFrame(cols)


def _dtype(values: Sequence[UserId | ItemId]) -> pl.DataType:
    return pl.String() if values and isinstance(values[0], str) else pl.Int64()


class OnlineFeatures:
    """Encodes requests exactly as ``build_samples`` encodes samples (same vocabularies, spec)."""

    def __init__(self, vocabs: Vocabularies, spec: FeatureSpec, *, cache_size: int = 100_000) -> None:
        self.vocabs = vocabs
        self.spec = spec
        self.columns = FeatureColumns.from_spec(spec)
        self.item_names = item_names(spec)
        self.row_columns = ["user_id", "item_id", "timestamp", *(f.name for f in spec.features),
                            "hist_item", "hist_cat", "hist_dt"]
        # Encoded item rows and user tables, each kept with the raw features it was encoded
        # from and reused only while the store returns the same features: encoding is most of a
        # request's cost, and the catalogue and profiles change rarely.
        self.cache_size = cache_size
        self._items: OrderedDict[ItemId, tuple[Features, tuple[Any, ...]]] = OrderedDict()
        self._item_schema: dict[str, pl.DataType] | None = None
        self._users: OrderedDict[UserId, tuple[Features | None, pl.DataFrame]] = OrderedDict()
        self._lock = threading.Lock()

    def item_ids_needed(self, snapshot: UserSnapshot, candidates: Sequence[ItemId]) -> list[ItemId]:
        """The items whose features a request reads: the candidates and the history's items."""
        return list(dict.fromkeys([*candidates, *(b.item_id for b in snapshot.behaviours)]))

    def rows(self, snapshot: UserSnapshot, items: Mapping[ItemId, Features],
             candidates: Sequence[ItemId], request_ts: int) -> pl.DataFrame:
        """One encoded row per candidate, the columns of a sample table without ``label``.

        ``items``: features of (at least) the candidates and the history's items; an item
        missing there is out of vocabulary, as an item missing from the item table is offline.
        """
        for c in candidates:
            check_id(c, "candidate item_id")
        user = snapshot.user_id
        n_cand = len(candidates)
        behaviours = snapshot.behaviours
        all_ids = [*candidates, *(b.item_id for b in behaviours)]
        item_dtype, user_dtype = _dtype(all_ids), _dtype([user])

        # sort_events puts the behaviours in the offline order; full ties, identical as features,
        # keep the store's order as offline they keep file order
        events = sort_events(pl.DataFrame({
            "user_id": pl.Series([user] * len(behaviours), dtype=user_dtype),
            "item_id": pl.Series([b.item_id for b in behaviours], dtype=item_dtype),
            "timestamp": pl.Series([b.timestamp for b in behaviours], dtype=pl.Int64),
            "category": pl.Series([b.category for b in behaviours], dtype=pl.String),
        })).filter(pl.col("timestamp") <= request_ts)
        # the request is one more event after them: its window is the offline sample's window
        n = events.height
        first, lengths = history_slices(np.zeros(n + 1, dtype=np.int64), self.spec.max_len)
        item_enc = self._encoded_items([i for i in dict.fromkeys(all_ids) if i in items], items,
                                       item_dtype)
        hist = history_columns(events, item_enc, self.vocabs, np.full(n_cand, first[n]),
                               np.full(n_cand, lengths[n]),
                               np.full(n_cand, request_ts, dtype=np.int64))
        user_enc = self._encoded_user(user, snapshot.profile, user_dtype)
        samples = pl.DataFrame({
            "user_id": pl.Series([user] * n_cand, dtype=user_dtype),
            "item_id": pl.Series(list(candidates), dtype=item_dtype),
            "timestamp": pl.Series([request_ts] * n_cand, dtype=pl.Int64),
        }).with_columns(*hist)
        return assemble_rows(samples, user_enc, item_enc, self.vocabs, self.spec).select(
            self.row_columns)

    def _encoded_user(self, user: UserId, profile: Features | None,
                      dtype: pl.DataType) -> pl.DataFrame:
        with self._lock:
            hit = self._users.get(user)
            if hit is not None and hit[0] == profile:
                self._users.move_to_end(user)
                return hit[1]
        users = pl.DataFrame({"user_id": pl.Series([user], dtype=dtype)} | {
            f: [None if profile is None else profile.get(f)] for f in self.columns.user_features})
        if profile is None:
            users = users.clear()  # unknown user: absent from the user table, as offline
        enc = encode_users(users, self.columns, self.vocabs)
        self._remember(self._users, user, (profile, enc))
        return enc

    def _encoded_items(self, ids: list[ItemId], items: Mapping[ItemId, Features],
                       dtype: pl.DataType) -> pl.DataFrame:
        """encode_items over ``ids``, encoding only the items not cached with these features."""
        rows: dict[ItemId, tuple[Any, ...]] = {}
        with self._lock:
            for i in ids:
                hit = self._items.get(i)
                if hit is not None and hit[0] == items[i]:
                    rows[i] = hit[1]
                    self._items.move_to_end(i)
        missing = [i for i in ids if i not in rows]
        schema = self._item_schema
        if missing or schema is None:
            enc = encode_items(self._items_frame(missing, items, dtype), self.columns, self.vocabs)
            self._item_schema = schema = dict(enc.schema)
            for i, row in zip(missing, enc.iter_rows(), strict=True):
                rows[i] = row
                self._remember(self._items, i, (items[i], row))
            if len(missing) == len(ids):
                return enc
        return _frame_from_rows([rows[i] for i in ids], schema | {"item_id": dtype})

    def _remember(self, cache: OrderedDict[Any, Any], key: Any, value: Any) -> None:
        if self.cache_size <= 0:
            return
        with self._lock:
            cache[key] = value
            cache.move_to_end(key)
            while len(cache) > self.cache_size:
                cache.popitem(last=False)

    def _items_frame(self, ids: list[ItemId], items: Mapping[ItemId, Features],
                     dtype: pl.DataType) -> pl.DataFrame:
        cols: dict[str, pl.Series] = {
            "item_id": pl.Series(ids, dtype=dtype),
            "category": pl.Series([items[i].get("category") for i in ids], dtype=pl.String),
        }
        for f in self.columns.item_features:
            cols[f] = pl.Series([items[i].get(f) for i in ids])
        for f in self.columns.item_multi_features:
            cols[f] = pl.Series([items[i].get(f) or [] for i in ids], dtype=pl.List(pl.String))
        return pl.DataFrame(cols)

    def tensors(self, rows: pl.DataFrame) -> Batch:
        """Rows -> the ranker's batch contract (training/tensors.py), without ``label``."""
        batch = to_tensors(rows.with_columns(pl.lit(0.0, dtype=pl.Float32).alias("label")),
                           self.spec)
        del batch["label"]
        return batch

    def candidate_batch(self, query: Batch, items: Mapping[ItemId, Features],
                        candidates: Sequence[ItemId]) -> Batch:
        """``tensors(rows(snapshot, items, candidates, ts))`` from the request's query row.

        ``query``: ``tensors(rows(snapshot, items, [any item], ts))``, one row, for the same
        snapshot and time. Every user, context and history column of a request is the same for
        all its candidates (see ``rows``), so they are taken from the query row and repeated;
        only the target-item columns are encoded per candidate (``item_inputs``). Equal to the
        full path (tests/features/test_online.py), without its per-row history and profile work.
        """
        shared = {n: t[:1] for n, t in query.items() if n not in self.item_names}
        return {n: t.contiguous() for n, t in
                broadcast(shared, self.item_inputs(items, candidates)).items()}

    def item_inputs(self, items: Mapping[ItemId, Features], candidates: Sequence[ItemId]) -> Batch:
        """The candidates' target-item columns of the batch contract (``item``, ``category``,
        item features; multi-hot as wide as the longest list), as ``rows`` + ``tensors`` encode
        them; an item missing from ``items`` is out of vocabulary."""
        for c in candidates:
            check_id(c, "candidate item_id")
        n = len(candidates)
        item_dtype = _dtype(list(candidates))
        enc = self._encoded_items([i for i in dict.fromkeys(candidates) if i in items], items,
                                  item_dtype)
        item_feats = [f for f in self.spec.features if f.group == "item"]
        # rows' join and null filling, on the item columns alone
        frame = pl.DataFrame({"item_id": pl.Series(list(candidates), dtype=item_dtype)}).join(
            enc, on="item_id", how="left", maintain_order="left").with_columns(
            *[pl.col(f.name).fill_null(OOV if f.kind == "categorical" else [])
              for f in item_feats])
        batch: Batch = {}
        for f in item_feats:
            if f.kind == "categorical":
                batch[f.name] = torch.from_numpy(frame[f.name].to_numpy().astype(np.int64))
            else:  # multi-hot: the width to_tensors gives, the longest list of the batch
                longest = frame[f.name].list.len().max() if n else None
                width = max(1, int(longest or 1))  # type: ignore[arg-type]
                batch[f.name] = torch.from_numpy(pad_lists(frame[f.name], width,
                                                           right_align=False))
        return batch

    def rows_from_store(self, store: FeatureStore, user_id: UserId, candidates: Sequence[ItemId],
                        request_ts: int) -> pl.DataFrame:
        """Read the user and the items from ``store`` (two reads) and encode the request."""
        if store.max_events < self.spec.max_len:
            # the store would hold fewer behaviours than training histories had: skew
            raise ValueError(f"the store keeps {store.max_events} behaviours per user, fewer than "
                             f"the ranker's history length {self.spec.max_len}")
        snapshot = store.snapshot(user_id)
        items = store.items(self.item_ids_needed(snapshot, candidates))
        return self.rows(snapshot, items, candidates, request_ts)

    def batch_from_store(self, store: FeatureStore, user_id: UserId, candidates: Sequence[ItemId],
                         request_ts: int) -> Batch:
        return self.tensors(self.rows_from_store(store, user_id, candidates, request_ts))
