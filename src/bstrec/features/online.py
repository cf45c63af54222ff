"""Online features: the ranker's input rows for one request, from the feature store.

The rows are built by the offline builder's own functions (data/samples.py): ``sort_events`` for
the behaviour order, ``history_slices`` for the window, ``history_columns`` for the history lists,
``encode_users`` / ``encode_items`` for the profile and item columns, ``assemble_rows`` for the
joins, context columns and out-of-vocabulary filling. A request is a sample whose event is the
request itself: its history is the user's last ``max_len`` stored behaviours with timestamp <=
the request time, in the behaviour order, each with ``request time - behaviour time``.

A behaviour's category is its item's in the item features the request reads, the same
features as the candidates' (offline, both come from the item table): an item whose category
``put_items`` changed carries the new one in the history and as a candidate alike.

Offline, a behaviour in the same second as the sample counts as history only when its item id
is smaller (P1's order). Online every stored behaviour happened before the request, so all of
them count; the skew test (tests/features/test_online.py) loads the store with exactly the
events that precede each sample and checks that the two agree field by field.

``rows`` builds frames, as the offline builder does: the reference. Serving takes the same
values without frames, a few hundred microseconds per request instead of milliseconds:
``query_row`` (the user's one row) and ``item_inputs`` (the candidates' item columns), from the
builder's helpers on arrays and its encoders' cached codes; the skew test checks them too.
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
    behaviour_order,
    encode_items,
    encode_users,
    history_arrays,
    history_columns,
    history_slices,
    hour_and_weekday,
    list_series,
    sort_events,
)
from bstrec.features.spec import N_RESERVED, OOV, FeatureSpec
from bstrec.features.store import (
    Behaviour,
    Features,
    FeatureStore,
    ItemId,
    ItemsVersion,
    UserId,
    UserSnapshot,
    check_id,
)
from bstrec.features.vocab import Vocabularies
from bstrec.ranking.request import broadcast, item_names
from bstrec.training.tensors import Batch, history_tensors, pad_flat, to_tensors

I64 = np.ndarray


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


@dataclass(frozen=True)
class _ItemCodes:
    """One item's encode_items codes: categorical columns (``item``, ``category``,
    ``item_<f>``) in spec order, and each multi-hot column's codes."""

    cats: tuple[int, ...]
    multi: tuple[tuple[int, ...], ...]


_ItemEntry = tuple[Features, tuple[Any, ...], _ItemCodes]  # features, encode_items row, codes


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
        self._items: OrderedDict[ItemId, _ItemEntry] = OrderedDict()
        self._item_schema: dict[str, pl.DataType] | None = None
        self._users: OrderedDict[UserId, tuple[Features | None, pl.DataFrame]] = OrderedDict()
        self._user_codes: OrderedDict[UserId, tuple[Features | None, I64]] = OrderedDict()
        self._values: OrderedDict[tuple[Any, ...], int] = OrderedDict()  # see _user_code
        self._lock = threading.Lock()
        feats = spec.features
        self.item_cats = tuple(f.name for f in feats if f.group == "item" and f.kind == "categorical")
        self.item_multis = tuple(f.name for f in feats if f.group == "item" and f.kind == "multi")
        self.user_cats = tuple(f.name for f in feats if f.group == "user")
        if any(f.kind != "categorical" for f in feats if f.group != "item"):
            raise ValueError("multi-hot features are item features only (data/samples.py)")

    def item_ids_needed(self, snapshot: UserSnapshot, candidates: Sequence[ItemId],
                        request_ts: int | None = None) -> list[ItemId]:
        """The items whose features a request reads: the candidates and the history's items
        (with ``request_ts``, only those of the behaviours that are its history)."""
        hist = snapshot.behaviours if request_ts is None else self._history(snapshot, request_ts)
        return list(dict.fromkeys([*candidates, *(b.item_id for b in hist)]))

    def _history(self, snapshot: UserSnapshot, request_ts: int) -> list[Behaviour]:
        """The request's history, oldest first: the window ``rows`` takes (the last
        ``max_len`` behaviours at or before the request, in the behaviour order), computed
        with the offline builder's ``behaviour_order`` and ``history_slices`` on lists."""
        kept = [b for b in snapshot.behaviours if b.timestamp <= request_ts]
        order = behaviour_order([b.timestamp for b in kept], [b.item_id for b in kept])
        n = len(kept)
        first, lengths = history_slices(np.zeros(n + 1, dtype=np.int64), self.spec.max_len)
        return [kept[j] for j in order[first[n]:first[n] + lengths[n]]]

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
            "category": pl.Series([_category(items.get(b.item_id)) for b in behaviours],
                                  dtype=pl.String),
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
        rows, enc = self._item_rows(ids, items, dtype)
        if enc is not None and enc.height == len(ids):
            return enc
        assert self._item_schema is not None
        return _frame_from_rows([rows[i][1] for i in ids], self._item_schema | {"item_id": dtype})

    def _item_rows(self, ids: list[ItemId], items: Mapping[ItemId, Features], dtype: pl.DataType
                   ) -> tuple[dict[ItemId, _ItemEntry], pl.DataFrame | None]:
        """Each of ``ids``' cache entry (features, encode_items row, codes), cached while the
        store returns the same features, and the frame encode_items gave for the missing ones."""
        rows: dict[ItemId, _ItemEntry] = {}
        with self._lock:
            for i in ids:
                hit = self._items.get(i)
                if hit is not None and hit[0] == items[i]:
                    rows[i] = hit
                    self._items.move_to_end(i)
        missing = [i for i in ids if i not in rows]
        if not missing and self._item_schema is not None:
            return rows, None
        enc = encode_items(self._items_frame(missing, items, dtype), self.columns, self.vocabs)
        self._item_schema = dict(enc.schema)
        pos = {c: k for k, c in enumerate(enc.columns)}
        for i, row in zip(missing, enc.iter_rows(), strict=True):
            codes = _ItemCodes(tuple(row[pos[n]] for n in self.item_cats),
                               tuple(tuple(row[pos[n]] or ()) for n in self.item_multis))
            rows[i] = entry = (items[i], row, codes)
            self._remember(self._items, i, entry)
        return rows, enc

    def _item_codes(self, ids: Sequence[ItemId], items: Mapping[ItemId, Features]
                    ) -> dict[ItemId, _ItemEntry]:
        """The cache entries of those of ``ids`` that ``items`` holds (encoded if need be)."""
        present = [i for i in dict.fromkeys(ids) if i in items]
        return self._item_rows(present, items, _dtype(present))[0] if present else {}

    def warm(self, items: Mapping[ItemId, Features]) -> None:
        """Encode a catalogue's items at once (a bundle's, at start), so that requests find
        them cached as long as the store returns the same features (at most ``cache_size``:
        a larger catalogue's further items are encoded by the requests that need them)."""
        ids = list(itertools.islice(items, max(self.cache_size, 0)))
        if ids:
            self._item_rows(ids, items, _dtype(ids))

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
        them (the same encoder, cached as arrays); an item missing from ``items`` is out of
        vocabulary."""
        for c in candidates:
            check_id(c, "candidate item_id")
        entries = self._item_codes(candidates, items)
        # rows' left join and null filling: OOV codes and empty lists for unknown items
        absent = _ItemCodes((OOV,) * len(self.item_cats), ((),) * len(self.item_multis))
        per = [entries[c][2] if c in entries else absent for c in candidates]
        cats = np.array([p.cats for p in per], dtype=np.int64).reshape(len(per), len(self.item_cats))
        batch: Batch = {n: torch.from_numpy(cats[:, k].copy()) for k, n in enumerate(self.item_cats)}
        for k, n in enumerate(self.item_multis):
            lists = [p.multi[k] for p in per]
            lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
            flat = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64,
                               count=int(lengths.sum()))
            # the width to_tensors gives: the longest list of the batch, at least 1
            width = max(1, int(lengths.max())) if len(lengths) else 1
            batch[n] = torch.from_numpy(pad_flat(lengths, flat, width, right_align=False))
        return {f.name: batch[f.name] for f in self.spec.features if f.name in batch}

    def query_row(self, snapshot: UserSnapshot, items: Mapping[ItemId, Features] | ItemTable,
                  probe: ItemId, request_ts: int) -> Batch:
        """``tensors(rows(snapshot, items, [probe], request_ts))`` without frames: the user's
        one row (history, profile, context; ``probe`` as its target) by the offline builder's
        helpers on arrays: ``behaviour_order``, ``history_slices``, ``history_arrays``,
        ``hour_and_weekday``, the cached ``encode_items`` / ``encode_users`` codes and
        ``history_tensors``. Equal to the frame path (tests/features/test_online.py)."""
        hist = self._history(snapshot, request_ts)
        ids = [b.item_id for b in hist]
        if isinstance(items, ItemTable):
            ev_item, ev_cat = items.item_codes(ids), items.category_codes(ids)
        else:
            entries = self._item_codes(ids, items)
            item_pos = self.item_cats.index("item")
            ev_item = np.array([entries[i][2].cats[item_pos] if i in entries else OOV
                                for i in ids], dtype=np.int64)
            ev_cat = self.category_codes([items.get(i) for i in ids])
        ev_ts = np.array([b.timestamp for b in hist], dtype=np.int64)
        length = np.full(1, len(hist), dtype=np.int64)
        _, _, h_item, h_cat, h_dt = history_arrays(
            ev_item, ev_cat, ev_ts, np.zeros(1, dtype=np.int64), length,
            np.full(1, request_ts, dtype=np.int64))
        hour, dow = hour_and_weekday(request_ts)
        out: Batch = dict(zip(self.user_cats, torch.from_numpy(self._user_row(snapshot))[:, None],
                              strict=True))
        out |= items.inputs_of([probe]) if isinstance(items, ItemTable) \
            else self.item_inputs(items, [probe])
        out["hour"] = torch.tensor([self.vocabs["hour"].index.get(hour, OOV)])
        out["dow"] = torch.tensor([self.vocabs["dow"].index.get(dow, OOV)])
        batch = {f.name: out[f.name] for f in self.spec.features}
        return batch | history_tensors(length, h_item, h_cat, h_dt, self.spec.max_len)

    def category_codes(self, features: Sequence[Features | None]) -> I64:
        """(N,) the category codes of items' features (OOV: no features or no category), as
        the offline builder encodes a behaviour's category from the item table."""
        index = self.vocabs["category"].index
        return np.fromiter((OOV if (c := _category(f)) is None else index.get(c, OOV)
                            for f in features), dtype=np.int64, count=len(features))

    def _user_row(self, snapshot: UserSnapshot) -> I64:
        """(n_user_features,) codes of the user's columns as ``rows`` joins them: the profile
        encoded by encode_users, everything OOV for a user absent from the store's profiles."""
        user, profile = snapshot.user_id, snapshot.profile
        with self._lock:
            hit = self._user_codes.get(user)
            if hit is not None and hit[0] == profile:
                self._user_codes.move_to_end(user)
                return hit[1]
        codes = np.full(len(self.user_cats), OOV, dtype=np.int64)
        if profile is not None:
            for k, name in enumerate(self.user_cats):
                raw = user if name == "user" else profile.get(name.removeprefix("user_"))
                codes[k] = self._user_code(name, raw, user)
        self._remember(self._user_codes, user, (profile, codes))
        return codes

    def _user_code(self, name: str, raw: Any, user: UserId) -> int:
        """encode_users' code of one value of user column ``name``, memoised by (column, type,
        value): the encoder (a cast and a vocabulary lookup) maps values one by one, so one
        call per distinct value gives what it gives inside any user's row."""
        vocab = self.vocabs["user_id" if name == "user" else name]
        same_type = bool(vocab.values) and type(raw) in (int, str) \
            and type(raw) is type(vocab.values[0])
        if same_type and (name == "user" or type(raw) is str):
            # the encoder's cast is then a no-op (profile values are cast to strings, the id to
            # the vocabulary's type) and what remains is this lookup
            return vocab.index.get(raw, OOV)
        key = (name, type(raw), raw) if isinstance(raw, int | str | float | None) else None
        with self._lock:
            hit = self._values.get(key) if key is not None else None
        if hit is not None:
            return hit
        feature = name.removeprefix("user_")
        one = pl.DataFrame({"user_id": pl.Series([user], dtype=_dtype([user]))}
                           | ({} if name == "user" else {feature: [raw]}))
        cols = FeatureColumns(() if name == "user" else (feature,), (), ())
        code = int(encode_users(one, cols, self.vocabs)[name][0])
        if key is not None:
            self._remember(self._values, key, code)
        return code

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


def _category(features: Features | None) -> str | None:
    """An item's raw category as the item table's String column holds it."""
    cat = None if features is None else features.get("category")
    return None if cat is None else str(cat)


class ItemTable:
    """The catalogue's target-item inputs as arrays indexed by vocabulary index: what
    ``OnlineFeatures.item_inputs`` gives for those items, one fancy index per column a request
    instead of a feature read and a lookup per candidate. Built from features (the bundle's,
    overlaid with the store's); immutable: ``updated`` gives a new table (copy on write) that
    the caller swaps in, so readers never see half an update. ``version``: the store's item
    version it reflects (None: not read from a store). ``others``: the features of items
    outside the vocabulary, of which only the category is read (``category_codes``: a
    behaviour of such an item is out of vocabulary but keeps its category, as offline).

    Notation: V vocabulary size (reserved indices included), N candidates.
    """

    def __init__(self, online: OnlineFeatures, features: dict[int, Features],
                 version: ItemsVersion | None, others: dict[ItemId, Features] | None = None
                 ) -> None:
        self.online = online
        self.version = version
        self.vocab = online.vocabs["item_id"]
        self.features = features  # vocabulary index -> the features encoded (present items)
        self.others: dict[ItemId, Features] = others or {}
        self.other_cats: dict[ItemId, int] = dict(zip(
            self.others, online.category_codes(list(self.others.values())).tolist(),
            strict=True))
        v = len(self.vocab.values) + N_RESERVED
        absent = _ItemCodes((OOV,) * len(online.item_cats), ((),) * len(online.item_multis))
        idx = sorted(features)
        raw = [self.vocab.values[i - N_RESERVED] for i in idx]
        entries = online._item_codes(raw, {r: features[i] for r, i in zip(raw, idx, strict=True)})
        codes = [absent] * v
        for r, i in zip(raw, idx, strict=True):
            codes[i] = entries[r][2]
        self.present = np.zeros(v, dtype=bool)
        self.present[idx] = True
        self.cats = np.array([c.cats for c in codes], dtype=np.int64).reshape(
            v, len(online.item_cats))  # (V, n_cats)
        self.multi: list[tuple[np.ndarray, np.ndarray]] = []  # per multi column: (V,), (V, W)
        for k in range(len(online.item_multis)):
            lists = [c.multi[k] for c in codes]
            lengths = np.fromiter(map(len, lists), dtype=np.int64, count=v)
            flat = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64,
                               count=int(lengths.sum()))
            self.multi.append((lengths, pad_flat(lengths, flat, max(1, int(lengths.max())),
                                                 right_align=False)))
        cat: list[str | None] = [None] * v
        # (V,) each item's ``price`` feature (NaN: none), for the revenue objective: read from
        # the same features as the model's inputs, so that a price put through the store is
        # served with the table of that item version
        self.prices = np.full(v, np.nan)
        for i, f in features.items():
            c, p = f.get("category"), f.get("price")
            cat[i] = None if c is None else str(c)
            if p is not None:
                self.prices[i] = float(p)
        self.categories: list[str | None] = cat
        self.item_pos = online.item_cats.index("item")
        self.cat_pos = online.item_cats.index("category")

    @classmethod
    def build(cls, online: OnlineFeatures, items: Mapping[ItemId, Features],
              version: ItemsVersion | None = None) -> ItemTable:
        """The table of the vocabulary's items that ``items`` holds (others: out of vocabulary
        codes, as ``item_inputs`` gives items missing from its mapping)."""
        index = online.vocabs["item_id"].index
        feats = {index[i]: f for i, f in items.items() if i in index}
        return cls(online, feats, version, {i: f for i, f in items.items() if i not in index})

    def updated(self, items: Mapping[ItemId, Features], version: ItemsVersion | None, *,
                base: Mapping[ItemId, Features] | None = None) -> ItemTable:
        """A new table: ``items``' features replace the present ones; with ``base``, the table
        starts from ``base`` instead of this table's features (a full re-read)."""
        index = self.vocab.index
        feats = dict(self.features) if base is None else \
            {index[i]: f for i, f in base.items() if i in index}
        feats.update({index[i]: f for i, f in items.items() if i in index})
        others = dict(self.others) if base is None else \
            {i: f for i, f in base.items() if i not in index}
        others.update({i: f for i, f in items.items() if i not in index})
        return ItemTable(self.online, feats, version, others)

    def indices(self, ids: Sequence[ItemId]) -> I64:
        index = self.vocab.index
        return np.fromiter((index.get(i, OOV) for i in ids), dtype=np.int64, count=len(ids))

    def item_codes(self, ids: Sequence[ItemId]) -> I64:
        """(N,) the ``item`` column's codes of raw ids (OOV: unknown or without features)."""
        # items without features have the out-of-vocabulary row
        out: I64 = self.cats[self.indices(ids), self.item_pos]
        return out

    def category_codes(self, ids: Sequence[ItemId]) -> I64:
        """(N,) the category codes of raw ids' features (OOV: unknown or without a category):
        a behaviour's ``hist_cat``, from the same features as a candidate's ``category``."""
        idx = self.indices(ids)
        out: I64 = self.cats[idx, self.cat_pos]
        for k in np.flatnonzero(idx == OOV):  # outside the vocabulary: rare, a short loop
            out[k] = self.other_cats.get(ids[int(k)], OOV)
        return out

    def category_names(self, ids: Sequence[ItemId]) -> list[str | None]:
        """The raw categories of raw ids (None: unknown or without a category)."""
        return [self.categories[j] if j != OOV else _category(self.others.get(i))
                for i, j in zip(ids, self.indices(ids).tolist(), strict=True)]

    def inputs(self, idx: I64) -> Batch:
        """(N,) vocabulary indices -> the candidates' item inputs, as ``item_inputs`` gives
        them for those items (multi-hot as wide as the longest list, at least 1)."""
        cats = self.cats[idx]
        batch: Batch = {n: torch.from_numpy(np.ascontiguousarray(cats[:, k]))
                        for k, n in enumerate(self.online.item_cats)}
        for n, (lengths, padded) in zip(self.online.item_multis, self.multi, strict=True):
            width = max(1, int(lengths[idx].max())) if len(idx) else 1
            batch[n] = torch.from_numpy(np.ascontiguousarray(padded[idx, :width]))
        return {f.name: batch[f.name] for f in self.online.spec.features if f.name in batch}

    def inputs_of(self, ids: Sequence[ItemId]) -> Batch:
        """``inputs`` of raw ids (unknown ones: out of vocabulary codes)."""
        return self.inputs(self.indices(ids))
