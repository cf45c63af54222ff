"""The online feature store: what the ranker needs about a user and the candidates at request time.

One interface, three backends (``store_embedded.py``: SQLite in-process, the default;
``store_redis.py``: a Redis server, or a Redis Cluster whose shards each hold whole users). Per
user it holds the last ``max_events`` behaviours and a profile; per item its features
(``category`` and the attributes the feature spec reads).

The behaviour order is the offline one (data/samples.py, protocol P1): by timestamp, then item
id. Full ties (same second, same item) are broken by event id where the offline builder keeps file
order; such behaviours are identical as features, and an order that does not depend on arrival
keeps the store deterministic under concurrent writers. The cap keeps the ``max_events`` LAST
behaviours in that order, so an event that arrives late with an old timestamp never evicts a
newer one.

A behaviour is stored without its item's category: the request reads it from the same item
features as the candidates' (features/online.py), as the offline builder takes both from the
item table, so that changing an item's category (``put_items``) changes it for a behaviour
and a candidate alike, never for one of them only.

Appending is atomic per user (a SQLite transaction, a Redis Lua script) and idempotent by event
id: an id already in the user's sequence is ignored. Ids of behaviours pushed out by the cap are
forgotten, which keeps the store bounded and stays idempotent: a full sequence only moves forward
in the order, so an evicted event that comes again is older than all that is kept and is evicted
again at once (``append`` returns False for it).
"""

from __future__ import annotations

import functools
import json
import logging
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import polars as pl

    from bstrec.data.schema import Dataset

log = logging.getLogger(__name__)

UserId = int | str
ItemId = int | str
Features = dict[str, Any]
# The version of a store's item features: (epoch, counter). Every put_items raises the counter;
# clear() (or a Redis that lost its keys) starts a new epoch. Equal versions: equal features.
ItemsVersion = tuple[str, int]


class StoreError(RuntimeError):
    """Base class of the feature store's errors."""


class StoreUnavailable(StoreError):
    """The store's backend cannot be reached (Redis down, timed out). The caller may fall back;
    the store reconnects by itself on a later call once the backend is back."""


@dataclass(frozen=True)
class Event:
    """One behaviour as it arrives (POST /events). It carries no category: a behaviour's
    category is its item's at request time (see the module doc)."""

    user_id: UserId
    item_id: ItemId
    timestamp: int
    event_id: str


@dataclass(frozen=True)
class Behaviour:
    """One stored behaviour of a user (its category: its item's features, at request time)."""

    item_id: ItemId
    timestamp: int
    event_id: str


@dataclass(frozen=True)
class UserSnapshot:
    """A user's state read in one go: behaviours oldest first; profile None = unknown user;
    ``items_version`` the item features' version at that moment (None: not read), so that a
    reader caching item features knows, without reading them, whether they changed."""

    user_id: UserId
    behaviours: tuple[Behaviour, ...]
    profile: Features | None
    items_version: ItemsVersion | None = None


@dataclass(frozen=True)
class ItemChanges:
    """What ``items_changed(since)`` read: the items written after ``since`` (``full``: every
    item of the store, since is of another epoch or None; items absent are not in the store)
    and the version they bring the reader to."""

    version: ItemsVersion
    items: dict[ItemId, Features]
    full: bool


def new_epoch() -> str:
    return secrets.token_hex(8)


@dataclass(frozen=True)
class LoadReport:
    users: int
    items: int
    behaviours: int
    seconds: float


@dataclass(frozen=True)
class StoreConfig:
    """Which store and how (``bstrec.config.from_dict`` fills it; unknown keys are errors)."""

    # redis_cluster: a Redis Cluster; ``url`` names one node or several, comma-separated
    backend: Literal["embedded", "redis", "redis_cluster"] = "embedded"
    # Behaviours kept per user: at least the ranker's max_len (20), with room for replays.
    max_events: int = 50
    # embedded: the SQLite file (WAL). "NORMAL" survives a crash of the process, "FULL" also one
    # of the machine, at an fsync per append.
    path: str = "artifacts/feature_store.sqlite"
    synchronous: Literal["NORMAL", "FULL"] = "NORMAL"
    # redis
    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "bstrec"
    # Short timeouts: a request must fall back quickly rather than wait for a dead server.
    connect_timeout_s: float = 0.5
    timeout_s: float = 1.0

    def __post_init__(self) -> None:
        if self.max_events < 1:
            raise ValueError(f"max_events must be >= 1, got {self.max_events}")
        if self.backend not in ("embedded", "redis", "redis_cluster"):
            raise ValueError("backend must be 'embedded', 'redis' or 'redis_cluster', got "
                             f"{self.backend!r}")
        if self.synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', got {self.synchronous!r}")


def order_key(b: Behaviour) -> tuple[int, ItemId, str]:
    """The behaviour order: (timestamp, item id) as offline, then event id (see the module doc)."""
    return (b.timestamp, b.item_id, b.event_id)


def check_id(value: object, what: str) -> None:
    # bool is an int subclass, and 1.0 == 1 would silently alias two ids: only int and str pass.
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"{what} must be int or str, got {type(value).__name__} {value!r}")


def id_key(value: UserId | ItemId) -> str:
    """A string key that keeps 7 and "7" apart and sorts like the ids do (ints numerically,
    strings bytewise), so that a backend sorting keys bytewise sorts ids in the behaviour order."""
    if isinstance(value, str):
        # hex of the UTF-8 bytes: bytewise order kept, and no byte below '0' that would sort
        # before the separators a backend puts after the key
        return "s" + value.encode().hex()
    return f"i{value + 2**63:020d}"  # shifted into 0..2^64-1: 20 digits sort as numbers do


def key_id(key: str) -> UserId | ItemId:
    return bytes.fromhex(key[1:]).decode() if key[0] == "s" else int(key[1:]) - 2**63


def dumps(obj: object) -> str:
    # default=str: a date attribute becomes its ISO text, which is what encoding casts it to anyway
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, default=str)


def loads_features(text: str | bytes) -> Features:
    """An item's stored JSON -> its features. Every request reads a few hundred items whose
    text rarely changes, so parses are memoised by the text (a changed item has another text,
    so it is parsed anew); the dict is a copy, values such as lists are shared: read-only."""
    return dict(_parse(text))


@functools.lru_cache(maxsize=1 << 16)
def _parse(text: str | bytes) -> Features:
    out: Features = json.loads(text)
    return out


class FeatureStore(ABC):
    """The store interface. Backends implement the primitives; the shared logic lives here."""

    max_events: int

    # --- backend primitives -------------------------------------------------------------------
    @abstractmethod
    def _append_user(self, user_id: UserId, events: Sequence[Event]) -> list[bool]:
        """Atomically add ``events`` (one user) and cap the sequence; per event,
        True if it is new and still in the sequence after the cap."""

    def _append_bulk(self, groups: Sequence[tuple[UserId, Sequence[Event]]]) -> int:
        """Many users at once (bulk load); returns how many behaviours were added."""
        return sum(sum(self._append_user(u, evs)) for u, evs in groups)

    @abstractmethod
    def snapshot(self, user_id: UserId) -> UserSnapshot:
        """The user's behaviours (oldest first) and profile, read consistently."""

    @abstractmethod
    def put_profiles(self, profiles: Mapping[UserId, Features]) -> None:
        """Set (replace) user profiles."""

    @abstractmethod
    def put_items(self, items: Mapping[ItemId, Features]) -> None:
        """Set (replace) item features: ``category`` and attributes, JSON values."""

    @abstractmethod
    def items(self, item_ids: Iterable[ItemId]) -> dict[ItemId, Features]:
        """Features of the given items; unknown items are absent from the result."""

    @abstractmethod
    def items_changed(self, since: ItemsVersion | None) -> ItemChanges:
        """The items put after version ``since`` (all of them when ``since`` is None or of an
        older epoch), read consistently with the version returned."""

    @abstractmethod
    def ping(self) -> None:
        """Raise StoreUnavailable when the backend cannot be reached."""

    @abstractmethod
    def clear(self) -> None:
        """Remove everything this store holds."""

    @abstractmethod
    def close(self) -> None: ...

    def shard_of(self, user_id: UserId | None) -> str:
        """Which part of the backend serves ``user_id``'s keys (None: the item keys), so that
        the service's breaker fails fast for that part alone; "" when one server holds
        everything or the layout is not known yet."""
        return ""

    # --- shared logic -------------------------------------------------------------------------
    def append(self, event: Event) -> bool:
        """Add one behaviour; False if its id is already stored or the cap drops it at once."""
        return self.append_many([event])[0]

    def append_many(self, events: Sequence[Event]) -> list[bool]:
        """Add behaviours (atomic per user), in the given order; one flag per event."""
        for e in events:
            check_id(e.user_id, "user_id")
            check_id(e.item_id, "item_id")
            if not e.event_id:
                raise ValueError(f"event {e} has no event_id: appends are idempotent by event id")
        by_user: dict[UserId, list[int]] = {}
        for i, e in enumerate(events):
            by_user.setdefault(e.user_id, []).append(i)
        out = [False] * len(events)
        for user, idx in by_user.items():
            for i, ok in zip(idx, self._append_user(user, [events[i] for i in idx]), strict=True):
                out[i] = ok
        return out

    def behaviours(self, user_id: UserId) -> tuple[Behaviour, ...]:
        return self.snapshot(user_id).behaviours

    def profile(self, user_id: UserId) -> Features | None:
        return self.snapshot(user_id).profile

    def load_dataset(self, dataset: Dataset, until: int | None = None, *,
                     batch_users: int = 500) -> LoadReport:
        """Seed the store from a canonical Dataset: every profile and item, and each user's last
        ``max_events`` events with timestamp < ``until`` (all when None), in the behaviour order.

        Events without an ``event_id`` get ``"<user>:<item>:<timestamp>:<k>"`` (k = 0, 1, ... over
        repeats of the same triple), so that loading the same log twice adds nothing.
        """
        import polars as pl  # only the bulk path needs frames

        from bstrec.data.samples import prepare_events

        t0 = time.perf_counter()
        profiles = _records(dataset.users, "user_id")
        self.put_profiles(profiles)
        items = _records(dataset.items, "item_id")
        self.put_items(items)
        # the events the samples were built from (implicit logs: exact duplicates dropped), so
        # that a served history is a trained one
        events = prepare_events(dataset)
        if until is not None:
            events = events.filter(pl.col("timestamp") < until)
        triple = ["user_id", "item_id", "timestamp"]
        events = (events
                  .with_columns(pl.coalesce(
                      pl.col("event_id"),
                      pl.concat_str([*(pl.col(c).cast(pl.String) for c in triple),
                                     pl.int_range(pl.len()).over(triple).cast(pl.String)],
                                    separator=":")).alias("event_id"))
                  # the last max_events per user in the store's order: the rest would be capped
                  .sort(["user_id", "timestamp", "item_id", "event_id"], maintain_order=True)
                  # (Int64: pl.len() is unsigned, and len - max_events may be negative)
                  .filter(pl.int_range(pl.len(), dtype=pl.Int64).over("user_id")
                          >= pl.len().over("user_id").cast(pl.Int64) - self.max_events))
        # sorted by user: one pass cuts the rows into per-user runs, batch_users runs a write
        added = 0
        group: list[tuple[UserId, list[Event]]] = []
        for user, item, ts, eid in events.select(
                "user_id", "item_id", "timestamp", "event_id").iter_rows():
            if not group or group[-1][0] != user:
                if len(group) >= batch_users:
                    added += self._append_bulk(group)
                    group = []
                check_id(user, "user_id")
                group.append((user, []))
            group[-1][1].append(Event(user, item, ts, eid))
        if group:
            added += self._append_bulk(group)
        report = LoadReport(users=len(profiles), items=len(items), behaviours=added,
                            seconds=time.perf_counter() - t0)
        log.info("feature store loaded: %s", report)
        return report

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _records(frame: pl.DataFrame, key: str) -> dict[Any, Features]:
    """Rows of a users/items table as {id: {column: value}} (JSON-ready values)."""
    cols = [c for c in frame.columns if c != key]
    out: dict[Any, Features] = {}
    for row in frame.iter_rows(named=True):
        out[row[key]] = {c: row[c] for c in cols}
    return out


def chunks(seq: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


def open_store(cfg: StoreConfig) -> FeatureStore:
    """The backend ``cfg`` names (imports redis only when asked for)."""
    if cfg.backend in ("redis", "redis_cluster"):
        from bstrec.features.store_redis import RedisStore

        return RedisStore(cfg.url, max_events=cfg.max_events, prefix=cfg.prefix,
                          connect_timeout_s=cfg.connect_timeout_s, timeout_s=cfg.timeout_s,
                          cluster=cfg.backend == "redis_cluster")
    from bstrec.features.store_embedded import EmbeddedStore

    Path(cfg.path).parent.mkdir(parents=True, exist_ok=True)
    return EmbeddedStore(cfg.path, max_events=cfg.max_events, synchronous=cfg.synchronous)
