"""The impression log: every /recommend answer (one row per shown item) and every ingested
event, appended to Parquet segments off the request path.

The request path only pickles its rows and appends them to a buffer. A sender thread passes
the buffer through a pipe to a writer process every ``_SEND_INTERVAL_S``, and the writer
batches the rows and writes. A batch is written when ``flush_rows`` rows wait or
``flush_interval_s`` passed since the last write, and on ``flush()``/``close()``.

Why a process: turning Python rows into Arrow holds the GIL throughout, and a writer thread in
the service's own process, doing it for batches of thousands, kept the request threads waiting
(the logging overhead in benchmarks/results/feedback.json as of commit e2fd40f, against the
same file now). In a process of its own it holds no
lock the requests need, and it runs at the lowest CPU priority (``_lower_priority``), so the
requests have the cores first. Nothing wakes per request either: the sender wakes on a timer.

Segments never exist half-written: each write goes to a hidden temp file in the same directory,
is fsynced, then ``os.replace``d onto the segment's name (atomic on POSIX), so a reader sees a
segment whole or not at all. A segment grows by being rewritten whole with the new batch
appended (its rows are kept in memory until it rotates), so a crash loses at most the batch not
yet written, never rows already on disk, and the number of files stays bounded. If the service
process dies, the writer reads the end of the pipe, writes what it holds and exits. A segment
rotates (the next batch starts a new one) once it holds ``max_segment_rows`` rows, its file
reaches ``max_segment_bytes`` or it is ``max_segment_age_s`` old; the rewrite cost is bounded by
those limits. Names sort by time: ``<kind>-<UTC start>-<pid>-<seq>.parquet`` (the writer
process's pid), which keeps the segments of several service workers sharing a directory apart.

Impressions are one row per (request, shown item), so that a click joins on
(request_id, item_id) or (user_id, item_id, time) without exploding list columns.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import math
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Mapping, MutableSequence, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Literal, TypedDict

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

Kind = Literal["impressions", "events"]
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
    # times), while quiet traffic still writes every flush_interval_s, which bounds what a
    # crash can lose.
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


Rows = Sequence[Mapping[str, object]]


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


# the writer's counters, shared with the service process (written by the writer only)
_WRITTEN_IMPRESSIONS, _WRITTEN_EVENTS, _LOST = range(3)
_WRITTEN = {"impressions": _WRITTEN_IMPRESSIONS, "events": _WRITTEN_EVENTS}
# the request path only appends to a buffer, waking nobody (a wake-up is a context switch, and
# on a VM often a signal between cores); the sender thread passes the buffer on this often
_SEND_INTERVAL_S = 0.05
_FLUSH, _CLOSE = "flush", "close"  # what the service asks of the writer besides rows
_RESTART_S = 5.0  # a writer that died is started again at most this often
# The writer converts rows to Arrow as they arrive, this many at a time (about a millisecond),
# rather than a whole batch at its write: a batch waits as compact columns instead of Python
# dicts (several times the memory), and the work comes in small pieces; below a few hundred rows
# a conversion's fixed cost dominates.
_CONVERT_ROWS = 512


class SegmentWriter:
    """Batches rows and appends them to segments; runs in the writer process (``_writer_main``),
    and directly in tests."""

    def __init__(self, config: ImpressionLogConfig, counters: MutableSequence[int]) -> None:
        self.config = config
        self.counters = counters
        self._seq = 0
        self._segments: dict[Kind, _Segment | None] = dict.fromkeys(KINDS)
        # the next batch: rows not yet converted, then the tables converted so far
        self._rows: dict[Kind, list[Mapping[str, object]]] = {k: [] for k in KINDS}
        self._tables: dict[Kind, list[pa.Table]] = {k: [] for k in KINDS}

    def add(self, kind: Kind, rows: Rows) -> bool:
        """Queue ``rows`` for the next batch; True when ``flush_rows`` of ``kind`` wait."""
        self._rows[kind].extend(rows)
        if len(self._rows[kind]) >= _CONVERT_ROWS:
            self._convert(kind)
        waiting: int = sum(t.num_rows for t in self._tables[kind]) + len(self._rows[kind])
        return waiting >= self.config.flush_rows

    def _convert(self, kind: Kind) -> None:
        rows, self._rows[kind] = self._rows[kind], []
        try:
            self._tables[kind].append(pa.Table.from_pylist(rows, schema=SCHEMAS[kind]))
        except Exception:  # a row the schema refuses loses its slice, not the writer
            self._lost(len(rows), kind, "not converted")

    def write_pending(self) -> None:
        for kind in KINDS:
            if self._rows[kind]:
                self._convert(kind)
            tables, self._tables[kind] = self._tables[kind], []
            n = sum(t.num_rows for t in tables)
            if not n:
                continue
            try:
                self._append(kind, pa.concat_tables(tables))
                self.counters[_WRITTEN[kind]] += n
            except Exception:
                # a full disk must not take the service down: the batch is lost, and said so
                self._lost(n, kind, "their write failed")

    def _lost(self, n: int, kind: Kind, why: str) -> None:
        self.counters[_LOST] += n
        log.exception("impression log: %d %s rows lost, %s", n, kind, why)

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


def _writer_main(conn: Connection, config: ImpressionLogConfig,
                 counters: MutableSequence[int]) -> None:
    """The writer process: rows from ``conn`` into segments until the service says close or
    its end of the pipe closes (the service exited or died), then the last batch. A message
    holds pickles one after another: (kind, rows) pairs, and flush or close, which are answered once
    every row before them is on disk."""
    # Ctrl-C and a service manager's SIGTERM reach the whole process group: the writer outlives
    # them until the service has sent its last rows (close) or is gone (end of the pipe)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _lower_priority()
    writer = SegmentWriter(config, counters)
    due = time.monotonic() + config.flush_interval_s
    while True:
        try:
            data = conn.recv_bytes() if conn.poll(max(0.0, due - time.monotonic())) else b""
        except (EOFError, OSError):
            writer.write_pending()
            return
        stream = io.BytesIO(data)
        while stream.tell() < len(data):
            message: tuple[Kind, Rows] | str = pickle.load(stream)
            if isinstance(message, tuple) and not writer.add(*message):
                continue
            writer.write_pending()
            due = time.monotonic() + config.flush_interval_s
            if message in (_FLUSH, _CLOSE):
                with contextlib.suppress(OSError):  # a service gone is the end of the pipe next
                    conn.send_bytes(b"")
                if message == _CLOSE:
                    return
        if time.monotonic() >= due:
            writer.write_pending()
            due = time.monotonic() + config.flush_interval_s


def _lower_priority() -> None:
    """Linux's SCHED_IDLE: the writer runs on CPU time no other process wants, and a request's
    thread waking up takes its core at once. Under a load that leaves no idle time it still gets
    a sliver, and past ``max_queued_rows`` rows the service drops and counts rather than wait.
    Elsewhere, the lowest nice value."""
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return
    with contextlib.suppress(OSError):
        os.nice(19)


@dataclass
class _Flush:
    done: threading.Event = field(default_factory=threading.Event)


class _Close:
    pass


class ImpressionLog:
    """Appends impression and event rows to Parquet segments under ``config.directory``, written
    by a process of its own (started here, with the ``spawn`` method: forking a process that
    runs threads is unsafe).

    ``log_impressions`` and ``log_events`` only pickle and append to a buffer (no I/O, no
    thread woken); thread-safe. A sender thread passes the buffer to the writer every
    ``_SEND_INTERVAL_S``. ``flush()`` waits until every row logged before it is on disk;
    ``close()`` flushes and stops the writer (rows logged after it are refused). A log not
    closed is closed at the interpreter's exit.
    """

    def __init__(self, config: ImpressionLogConfig) -> None:
        self.config = config
        config.directory.mkdir(parents=True, exist_ok=True)
        self._context = multiprocessing.get_context("spawn")
        self._counters = self._context.RawArray("q", 3)
        # what waits for the sender, in order: pickled (kind, rows) with their row count, and
        # flush or close requests
        self._buffer: list[tuple[bytes, int] | _Flush | _Close] = []
        self._queued = 0  # rows in the buffer
        self._lock = threading.Lock()
        self._wake = threading.Event()  # flush or close: send now
        self._closed = False
        self.rows_dropped = 0  # rows refused while max_queued_rows waited (logged once a minute)
        self._rows_unsent = 0  # rows lost because no writer process took them
        self._last_drop_warning = -math.inf
        self._writer: tuple[BaseProcess, Connection] | None = None
        self._last_start = -math.inf
        self._start_writer()
        self._thread = threading.Thread(target=self._send, name="bstrec-impression-log",
                                        daemon=True)
        self._thread.start()
        atexit.register(self.close)  # before multiprocessing's own exit handler, which waits
        # for the writer

    @property
    def rows_written(self) -> dict[Kind, int]:
        return {kind: int(self._counters[_WRITTEN[kind]]) for kind in KINDS}

    @property
    def rows_lost(self) -> int:
        """Rows whose write failed, or that no writer process took (logged): the service keeps
        answering."""
        return int(self._counters[_LOST]) + self._rows_unsent

    @property
    def writer_pid(self) -> int | None:
        return None if self._writer is None else self._writer[0].pid

    # --- the request path ------------------------------------------------------------------
    def log_impressions(self, rows: list[ImpressionRow]) -> None:
        self._put("impressions", rows)

    def log_events(self, rows: list[EventRow]) -> None:
        self._put("events", rows)

    def _put(self, kind: Kind, rows: Rows) -> None:
        if not rows:
            return
        # pickled here: the rows as they are now, and a few microseconds a request
        payload = pickle.dumps((kind, rows), pickle.HIGHEST_PROTOCOL)
        with self._lock:  # the close request is the buffer's last item
            if self._closed:
                raise RuntimeError(f"the impression log {self.config.directory} is closed")
            full = self._queued + len(rows) > self.config.max_queued_rows
            if full:
                self.rows_dropped += len(rows)
                now = time.monotonic()
                warn = now - self._last_drop_warning >= 60.0
                if warn:
                    self._last_drop_warning = now
            else:
                self._queued += len(rows)
                self._buffer.append((payload, len(rows)))
        if full and warn:
            log.warning("impression log: %d rows dropped so far: the writer is %d rows behind "
                        "(max_queued_rows)", self.rows_dropped, self.config.max_queued_rows)

    # --- control ---------------------------------------------------------------------------
    def flush(self, timeout_s: float | None = None) -> None:
        """Write every row logged before this call; raises TimeoutError past ``timeout_s``."""
        if self._closed:
            return
        request = _Flush()
        with self._lock:
            self._buffer.append(request)
        self._wake.set()
        if not request.done.wait(timeout_s):
            raise TimeoutError(f"impression log not flushed within {timeout_s} s")

    def close(self) -> None:
        """Flush and stop the writer; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._buffer.append(_Close())
        self._wake.set()
        atexit.unregister(self.close)
        self._thread.join()

    def __enter__(self) -> ImpressionLog:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- the sender thread -----------------------------------------------------------------
    def _send(self) -> None:
        """Every ``_SEND_INTERVAL_S``, or at once for flush and close: the buffer's rows go to
        the writer as one message, each request after the rows logged before it."""
        while True:
            self._wake.wait(_SEND_INTERVAL_S)
            self._wake.clear()
            with self._lock:
                items, self._buffer, self._queued = self._buffer, [], 0
            payloads: list[bytes] = []
            rows = 0
            for item in items:
                if isinstance(item, tuple):
                    payloads.append(item[0])
                    rows += item[1]
                    continue
                self._deliver(payloads, rows)
                payloads, rows = [], 0
                if isinstance(item, _Flush):
                    self._ask(_FLUSH)
                    item.done.set()
                else:
                    self._ask(_CLOSE)
                    self._stop_writer()
                    return
            self._deliver(payloads, rows)

    def _deliver(self, payloads: list[bytes], rows: int) -> None:
        if not payloads:
            return
        if self._writer is None and time.monotonic() - self._last_start >= _RESTART_S:
            self._start_writer()
        if self._writer is None:
            self._rows_unsent += rows
            return
        try:
            self._writer[1].send_bytes(b"".join(payloads))
        except OSError:
            log.exception("impression log: the writer process %s is gone; a new one starts "
                          "within %g s", self.writer_pid, _RESTART_S)
            self._stop_writer()
            self._rows_unsent += rows

    def _ask(self, request: str) -> None:
        """Sends flush or close and waits for the writer's answer."""
        if self._writer is None:
            return
        try:
            self._writer[1].send_bytes(pickle.dumps(request))
            self._writer[1].recv_bytes()
        except (OSError, EOFError):
            log.exception("impression log: the writer process %s is gone", self.writer_pid)
            self._stop_writer()

    def _start_writer(self) -> None:
        self._last_start = time.monotonic()
        ours, theirs = self._context.Pipe()
        process = self._context.Process(target=_writer_main, args=(theirs, self.config,
                                                                   self._counters),
                                        name="bstrec-impression-writer")
        try:
            process.start()
        except Exception:
            log.exception("impression log: the writer process did not start")
            ours.close()
            return
        finally:
            theirs.close()  # the writer's end lives in the writer: its exit reads as the end here
        self._writer = process, ours

    def _stop_writer(self) -> None:
        if self._writer is None:
            return
        process, conn = self._writer
        self._writer = None
        conn.close()  # the end of the pipe: a writer still running writes its batch and exits
        process.join()


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
