"""The embedded feature store: in-process, persisted to one SQLite file (WAL), the default.

Every write is a SQLite transaction (``BEGIN IMMEDIATE``), so a restart, even a crash of the
process, loses no committed append, and several processes may share the file: SQLite serialises
their writers (each waits up to ``busy_timeout_s``). Within a process one connection is shared
under a lock. Ids are stored with their type (SQLite keeps 7 and '7' apart) and ``ORDER BY
item_id`` sorts integers numerically and text bytewise, as the offline builder does.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from bstrec.features.store import (
    Behaviour,
    Event,
    Features,
    FeatureStore,
    ItemChanges,
    ItemId,
    ItemsVersion,
    StoreUnavailable,
    UserId,
    UserSnapshot,
    chunks,
    dumps,
    loads_features,
    new_epoch,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS behaviours (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- arrival: tells which rows a write added
    user_id NOT NULL,
    event_id TEXT NOT NULL,
    item_id NOT NULL,
    ts INTEGER NOT NULL,
    UNIQUE (user_id, event_id)
);
CREATE INDEX IF NOT EXISTS behaviours_order ON behaviours (user_id, ts, item_id, event_id);
CREATE TABLE IF NOT EXISTS profiles (user_id PRIMARY KEY, profile TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (item_id PRIMARY KEY, features TEXT NOT NULL,
                                  version INTEGER NOT NULL DEFAULT 0);
-- items_epoch and items_version (ItemsVersion, store.py), items.version: the put that wrote it
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value NOT NULL);
"""
_VERSION = "SELECT key, value FROM meta WHERE key IN ('items_epoch', 'items_version')"

# the behaviour order (store.py); event_id is TEXT, compared bytewise like Python compares str
_ORDER = "ts, item_id, event_id"
_ORDER_DESC = "ts DESC, item_id DESC, event_id DESC"


class EmbeddedStore(FeatureStore):
    """SQLite-backed store; thread-safe, and safe for several processes on one file."""

    def __init__(self, path: str | Path, *, max_events: int = 50, synchronous: str = "NORMAL",
                 busy_timeout_s: float = 10.0) -> None:
        if max_events < 1:
            raise ValueError(f"max_events must be >= 1, got {max_events}")
        self.max_events = max_events
        self.path = Path(path)
        self._lock = threading.Lock()
        # autocommit mode (isolation_level=None): transactions are the explicit BEGINs below
        self._db = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None,
                                   check_same_thread=False)
        with self._errors():
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'FULL' else 'NORMAL'}")
            with self._write() as cur:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        cur.execute(stmt)
                # a file from before item versions: its items are all of version 0
                if "version" not in {r[1] for r in cur.execute("PRAGMA table_info(items)")}:
                    cur.execute("ALTER TABLE items ADD COLUMN version INTEGER NOT NULL DEFAULT 0")
                cur.execute("CREATE INDEX IF NOT EXISTS items_by_version ON items (version)")
                cur.execute("INSERT OR IGNORE INTO meta VALUES ('items_epoch', ?), "
                            "('items_version', 0)", (new_epoch(),))

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as exc:
            # Another process held the write lock longer than busy_timeout_s: report it as the
            # store being unavailable, like Redis down, so that callers have one thing to catch.
            if "locked" in str(exc) or "busy" in str(exc):
                raise StoreUnavailable(f"feature store {self.path} is locked: {exc}") from exc
            raise

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Cursor]:
        with self._lock, self._errors():
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Cursor]:
        with self._lock, self._errors():
            cur = self._db.cursor()
            cur.execute("BEGIN")  # one read snapshot for all the queries inside
            try:
                yield cur
            finally:
                cur.execute("COMMIT")

    def _trim(self, cur: sqlite3.Cursor, users: Sequence[UserId]) -> None:
        """Keep each user's last max_events behaviours in the behaviour order."""
        cur.execute(
            f"""DELETE FROM behaviours WHERE seq IN (
                  SELECT seq FROM (
                    SELECT seq, ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY {_ORDER_DESC}) AS rn
                    FROM behaviours WHERE user_id IN (SELECT value FROM json_each(?)))
                  WHERE rn > ?)""", (json.dumps(list(users)), self.max_events))

    def _append_user(self, user_id: UserId, events: Sequence[Event]) -> list[bool]:
        with self._write() as cur:
            seqs: list[int | None] = []
            for e in events:
                cur.execute("INSERT OR IGNORE INTO behaviours (user_id, event_id, item_id, ts)"
                            " VALUES (?, ?, ?, ?)", (user_id, e.event_id, e.item_id, e.timestamp))
                seqs.append(cur.lastrowid if cur.rowcount == 1 else None)
            self._trim(cur, [user_id])
            kept = {r[0] for r in cur.execute("SELECT seq FROM behaviours WHERE user_id = ?",
                                              (user_id,))}
        return [s is not None and s in kept for s in seqs]

    def _append_bulk(self, groups: Sequence[tuple[UserId, Sequence[Event]]]) -> int:
        rows = [(u, e.event_id, e.item_id, e.timestamp) for u, evs in groups for e in evs]
        with self._write() as cur:
            last = cur.execute("SELECT COALESCE(MAX(seq), 0) FROM behaviours").fetchone()[0]
            cur.executemany("INSERT OR IGNORE INTO behaviours (user_id, event_id, item_id, ts)"
                            " VALUES (?, ?, ?, ?)", rows)
            self._trim(cur, [u for u, _ in groups])
            added: int = cur.execute("SELECT COUNT(*) FROM behaviours WHERE seq > ?",
                                     (last,)).fetchone()[0]
        return added

    def snapshot(self, user_id: UserId) -> UserSnapshot:
        with self._read() as cur:
            rows = cur.execute(f"SELECT item_id, ts, event_id FROM behaviours "
                               f"WHERE user_id = ? ORDER BY {_ORDER}", (user_id,)).fetchall()
            prof = cur.execute("SELECT profile FROM profiles WHERE user_id = ?",
                               (user_id,)).fetchone()
            version = self._version(cur)
        return UserSnapshot(user_id=user_id, behaviours=tuple(Behaviour(*r) for r in rows),
                            profile=None if prof is None else json.loads(prof[0]),
                            items_version=version)

    @staticmethod
    def _version(cur: sqlite3.Cursor) -> ItemsVersion:
        meta = dict(cur.execute(_VERSION).fetchall())
        return str(meta["items_epoch"]), int(meta["items_version"])

    def put_profiles(self, profiles: Mapping[UserId, Features]) -> None:
        with self._write() as cur:
            cur.executemany("INSERT OR REPLACE INTO profiles (user_id, profile) VALUES (?, ?)",
                            [(u, dumps(p)) for u, p in profiles.items()])

    def put_items(self, items: Mapping[ItemId, Features]) -> None:
        with self._write() as cur:
            cur.execute("UPDATE meta SET value = value + 1 WHERE key = 'items_version'")
            version = self._version(cur)[1]
            cur.executemany("INSERT OR REPLACE INTO items (item_id, features, version) "
                            "VALUES (?, ?, ?)", [(i, dumps(f), version) for i, f in items.items()])

    def items_changed(self, since: ItemsVersion | None) -> ItemChanges:
        with self._read() as cur:
            version = self._version(cur)
            full = since is None or since[0] != version[0]
            rows = cur.execute("SELECT item_id, features FROM items WHERE version > ?",
                               (-1 if full or since is None else since[1],)).fetchall()
        return ItemChanges(version, {i: loads_features(f) for i, f in rows}, full)

    def items(self, item_ids: Iterable[ItemId]) -> dict[ItemId, Features]:
        ids = list(dict.fromkeys(item_ids))
        out: dict[ItemId, Features] = {}
        with self._read() as cur:
            for part in chunks(ids, 10_000):
                for item, feats in cur.execute(
                        "SELECT item_id, features FROM items "
                        "WHERE item_id IN (SELECT value FROM json_each(?))", (json.dumps(list(part)),)):
                    out[item] = loads_features(feats)
        return out

    def ping(self) -> None:
        with self._read() as cur:
            cur.execute("SELECT 1").fetchone()

    def clear(self) -> None:
        with self._write() as cur:
            for table in ("behaviours", "profiles", "items"):
                cur.execute(f"DELETE FROM {table}")
            cur.execute("UPDATE meta SET value = ? WHERE key = 'items_epoch'", (new_epoch(),))
            cur.execute("UPDATE meta SET value = 0 WHERE key = 'items_version'")

    def close(self) -> None:
        with self._lock:
            self._db.close()
