"""The impression log: every /recommend answer (one row per shown item) and every ingested
event, appended to Parquet segments off the request path.

The request path only puts rows on a queue; one writer thread batches them and writes. A batch
is written when ``flush_rows`` rows wait or ``flush_interval_s`` passed since the last write,
and on ``flush()``/``close()``.

Segments never exist half-written: each write goes to a hidden temp file in the same directory,
is fsynced, then ``os.replace``d onto the segment's name (atomic on POSIX), so a reader sees a
segment whole or not at all. A segment grows by being rewritten whole with the new batch
appended (its rows are kept in memory until it rotates), so a crash loses at most the batch not
yet written, never rows already on disk, and the number of files stays bounded. A segment
rotates (the next batch starts a new one) once it holds ``max_segment_rows`` rows, its file
reaches ``max_segment_bytes`` or it is ``max_segment_age_s`` old; the rewrite cost is bounded by
those limits. Names sort by time: ``<kind>-<UTC start>-<pid>-<seq>.parquet``; the pid keeps
the segments of several worker processes sharing a directory apart.

Impressions are one row per (request, shown item), so that a click joins on
(request_id, item_id) or (user_id, item_id, time) without exploding list columns.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, TypedDict

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

Kind = Literal["impressions", "events"]
# the writer converts a batch this many rows at a time, pausing between slices (_to_table)
_CONVERT_ROWS = 100
_CONVERT_PAUSE_S = 0.0002
KINDS: tuple[Kind, ...] = ("impressions", "events")

IMPRESSION_SCHEMA = pa.schema([
    pa.field("request_id", pa.string(), nullable=False),
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("ts", pa.float64(), nullable=False),  # the request time the features were computed at
    pa.field("received_at", pa.float64(), nullable=False),  # the server clock when answered
    pa.field("model_version", pa.string(), nullable=False),
    pa.field("arm", pa.string(), nullable=False),
    pa.field("path", pa.string(), nullable=False),
    pa.field("degraded", pa.list_(pa.string()), nullable=False),
    pa.field("position", pa.int32(), nullable=False),  # 0 = the top item
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("score", pa.float64(), nullable=False),
    pa.field("prerank_score", pa.float64(), nullable=True),
    pa.field("sources", pa.list_(pa.string()), nullable=False),
    # False: a shadow bundle's ranking for the same request, logged and never shown
    pa.field("shown", pa.bool_(), nullable=False),
    pa.field("policy", pa.string(), nullable=False),  # greedy | plackett_luce
    # P(this item is in the shown list) under the stochastic policy; null under greedy
    pa.field("propensity", pa.float64(), nullable=True),
    pa.field("k", pa.int32(), nullable=False),  # the list length asked for
    pa.field("category", pa.string(), nullable=True),  # the item's
    # what the ranker read, for drift and freshness: the user's behaviours in the store, the
    # age of the newest at request time (null: none), its category, the profile's raw values
    pa.field("history_length", pa.int32(), nullable=False),
    pa.field("freshness_s", pa.float64(), nullable=True),
    pa.field("last_category", pa.string(), nullable=True),
    pa.field("user_features", pa.string(), nullable=False),  # JSON object, values as strings
    pa.field("candidates", pa.string(), nullable=False),  # JSON {source: merged candidates}
    pa.field("timings_ms", pa.string(), nullable=False),  # JSON {stage: milliseconds}
])
EVENT_SCHEMA = pa.schema([
    pa.field("request_id", pa.string(), nullable=True),  # the /recommend answer it follows
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("ts", pa.float64(), nullable=False),  # the event's own timestamp
    pa.field("event_id", pa.string(), nullable=False),
    pa.field("received_at", pa.float64(), nullable=False),
])
SCHEMAS: dict[Kind, pa.Schema] = {"impressions": IMPRESSION_SCHEMA, "events": EVENT_SCHEMA}


class ImpressionRow(TypedDict):
    request_id: str
    user_id: str
    ts: float
    received_at: float
    model_version: str
    arm: str
    path: str
    degraded: list[str]
    position: int
    item_id: str
    score: float
    prerank_score: float | None
    sources: list[str]
    shown: bool
    policy: str
    propensity: float | None
    k: int
    category: str | None
    history_length: int
    freshness_s: float | None
    last_category: str | None
    user_features: str
    candidates: str
    timings_ms: str


class EventRow(TypedDict):
    request_id: str | None
    user_id: str
    item_id: str
    ts: float
    event_id: str
    received_at: float


@dataclass(frozen=True)
class ImpressionLogConfig:
    directory: Path
    # A batch is written once flush_rows rows of one kind wait, or flush_interval_s after the
    # last write, whichever first. Every batch rewrites the open segment, so under steady
    # traffic a segment of n rows costs about n^2 / (2 * flush_rows) row writes: with batches
    # as large as a segment, busy traffic writes each row once (1,000-row batches wrote it 10
    # times, on the cores the requests need), while quiet traffic still writes every
    # flush_interval_s, which bounds what a crash can lose.
    flush_rows: int = 20_000
    flush_interval_s: float = 5.0
    # the writer's CPU per row grows with this limit (above): small segments are cheap, and
    # more files are their only price
    max_segment_rows: int = 20_000
    max_segment_bytes: int = 64 * 2**20  # checked after each write: a segment may pass it by a batch
    max_segment_age_s: float = 3_600.0
    # rows waiting for the writer at most: past it (a disk slower than the traffic) new rows are
    # dropped and counted rather than growing the service's memory without bound
    max_queued_rows: int = 200_000

    def __post_init__(self) -> None:
        for name in ("flush_rows", "max_segment_rows", "max_segment_bytes", "max_queued_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"ImpressionLogConfig.{name} must be >= 1, got "
                                 f"{getattr(self, name)}")
        for name in ("flush_interval_s", "max_segment_age_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ImpressionLogConfig.{name} must be > 0, got "
                                 f"{getattr(self, name)}")


def _utc_stamp(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y%m%dT%H%M%S%fZ")


def _fsync_dir(directory: Path) -> None:
    """Makes a rename durable: the new directory entry lives in the directory's own blocks."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _Segment:
    """The segment of one kind being grown: its rows so far, kept to rewrite it whole."""

    path: Path
    table: pa.Table
    started: float  # time.monotonic() at its first write
    size: int = 0

    def full(self, config: ImpressionLogConfig, now: float) -> bool:
        return (self.table.num_rows >= config.max_segment_rows
                or self.size >= config.max_segment_bytes
                or now - self.started >= config.max_segment_age_s)


@dataclass
class _Flush:
    done: threading.Event = field(default_factory=threading.Event)


class _Close:
    pass


Rows = Sequence[Mapping[str, object]]


class ImpressionLog:
    """Appends impression and event rows to Parquet segments under ``config.directory``.

    ``log_impressions`` and ``log_events`` only enqueue (no I/O, no lock held across I/O);
    thread-safe. ``flush()`` waits until every row enqueued before it is on disk; ``close()``
    flushes and stops the writer (rows logged after it are refused).
    """

    def __init__(self, config: ImpressionLogConfig) -> None:
        self.config = config
        config.directory.mkdir(parents=True, exist_ok=True)
        self._queue: queue.SimpleQueue[tuple[Kind, Rows] | _Flush | _Close] = queue.SimpleQueue()
        self._closed = False
        self._close_lock = threading.Lock()
        self._seq = 0
        self._segments: dict[Kind, _Segment | None] = dict.fromkeys(KINDS)
        self._pending: dict[Kind, list[Mapping[str, object]]] = {k: [] for k in KINDS}
        self.rows_written: dict[Kind, int] = dict.fromkeys(KINDS, 0)
        self.rows_lost = 0  # rows whose write failed (logged): the service keeps answering
        self.rows_dropped = 0  # rows refused while max_queued_rows waited (logged once a minute)
        self._queued = 0
        self._queued_lock = threading.Lock()
        self._last_drop_warning = -math.inf
        self._thread = threading.Thread(target=self._run, name="bstrec-impression-log",
                                        daemon=True)
        self._thread.start()

    # --- the request path ------------------------------------------------------------------
    def log_impressions(self, rows: list[ImpressionRow]) -> None:
        self._put("impressions", rows)

    def log_events(self, rows: list[EventRow]) -> None:
        self._put("events", rows)

    def _put(self, kind: Kind, rows: Rows) -> None:
        if self._closed:
            raise RuntimeError(f"the impression log {self.config.directory} is closed")
        if not rows:
            return
        with self._queued_lock:
            full = self._queued + len(rows) > self.config.max_queued_rows
            if full:
                self.rows_dropped += len(rows)
                now = time.monotonic()
                warn = now - self._last_drop_warning >= 60.0
                if warn:
                    self._last_drop_warning = now
            else:
                self._queued += len(rows)
        if not full:
            self._queue.put((kind, rows))
        elif warn:
            log.warning("impression log: %d rows dropped so far: the writer is %d rows behind "
                        "(max_queued_rows)", self.rows_dropped, self.config.max_queued_rows)

    # --- control ---------------------------------------------------------------------------
    def flush(self, timeout_s: float | None = None) -> None:
        """Write every row enqueued before this call; raises TimeoutError past ``timeout_s``."""
        if self._closed:
            return
        request = _Flush()
        self._queue.put(request)
        if not request.done.wait(timeout_s):
            raise TimeoutError(f"impression log not flushed within {timeout_s} s")

    def close(self) -> None:
        """Flush and stop the writer thread; idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(_Close())
        self._thread.join()

    def __enter__(self) -> ImpressionLog:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- the writer thread -----------------------------------------------------------------
    def _run(self) -> None:
        interval = self.config.flush_interval_s
        last_write = time.monotonic()
        while True:
            item: tuple[Kind, Rows] | _Flush | _Close | None
            try:
                item = self._queue.get(timeout=max(0.0, last_write + interval - time.monotonic()))
            except queue.Empty:
                item = None
            if isinstance(item, _Close):
                self._write_pending()
                return
            if isinstance(item, _Flush):
                self._write_pending()
                last_write = time.monotonic()
                item.done.set()
                continue
            if isinstance(item, tuple):
                kind, rows = item
                with self._queued_lock:
                    self._queued -= len(rows)
                self._pending[kind].extend(rows)
                if (len(self._pending[kind]) < self.config.flush_rows
                        and time.monotonic() - last_write < interval):
                    continue
            self._write_pending()
            last_write = time.monotonic()

    def _write_pending(self) -> None:
        for kind in KINDS:
            rows, self._pending[kind] = self._pending[kind], []
            if not rows:
                continue
            try:
                self._append(kind, self._to_table(rows, SCHEMAS[kind]))
                self.rows_written[kind] += len(rows)
            except Exception:
                # a full disk must not take the service down: the batch is lost, and said so
                self.rows_lost += len(rows)
                log.exception("impression log: %d %s rows lost, their write failed", len(rows),
                              kind)

    @staticmethod
    def _to_table(rows: Rows, schema: pa.Schema) -> pa.Table:
        """The batch as one table, converted a slice at a time with a pause between slices:
        converting Python objects holds the GIL throughout, so a batch of thousands converted
        at once would keep every request thread waiting until it is done; each pause hands them
        the GIL."""
        parts = []
        for lo in range(0, len(rows), _CONVERT_ROWS):
            if lo:
                time.sleep(_CONVERT_PAUSE_S)
            parts.append(pa.Table.from_pylist(rows[lo:lo + _CONVERT_ROWS], schema=schema))
        return pa.concat_tables(parts) if parts else schema.empty_table()

    def _append(self, kind: Kind, table: pa.Table) -> None:
        limit = self.config.max_segment_rows
        offset = 0
        while offset < table.num_rows:
            segment = self._segments[kind]
            if segment is None or segment.full(self.config, time.monotonic()):
                segment = self._segments[kind] = self._new_segment(kind, table.schema)
            take = min(limit - segment.table.num_rows, table.num_rows - offset)
            grown = pa.concat_tables([segment.table, table.slice(offset, take)])
            segment.size = self._write(segment.path, grown)
            segment.table = grown  # only once on disk: a failed write leaves the segment as it was
            offset += take

    def _new_segment(self, kind: Kind, schema: pa.Schema) -> _Segment:
        self._seq += 1
        name = f"{kind}-{_utc_stamp(time.time())}-{os.getpid()}-{self._seq:06d}.parquet"
        return _Segment(self.config.directory / name, schema.empty_table(), time.monotonic())

    @staticmethod
    def _write(path: Path, table: pa.Table) -> int:
        """``table`` to ``path`` whole or not at all; returns the file's size."""
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "wb") as f:
                pq.write_table(table, f, compression="zstd")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        return path.stat().st_size


def segments(directory: Path | str, kind: Kind = "impressions") -> list[Path]:
    """The complete segments of ``kind`` under ``directory``, oldest first (temp files, which
    start with a dot and end in ``.tmp``, are never listed)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return sorted(Path(directory).glob(f"{kind}-*.parquet"))


def read_log(directory: Path | str, kind: Kind = "impressions", since: float | None = None,
             until: float | None = None) -> pl.DataFrame:
    """The rows of ``kind`` with ``since <= ts < until`` (unix seconds; None: unbounded), from
    the complete segments only; an empty frame of the kind's schema when there are none."""
    paths = segments(directory, kind)  # refuses an unknown kind
    schema = SCHEMAS[kind]
    tables = [pq.read_table(p, schema=schema) for p in paths]
    frame = pl.from_arrow(pa.concat_tables(tables) if tables else schema.empty_table())
    assert isinstance(frame, pl.DataFrame)
    if since is not None:
        frame = frame.filter(pl.col("ts") >= since)
    if until is not None:
        frame = frame.filter(pl.col("ts") < until)
    return frame
