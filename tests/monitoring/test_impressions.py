"""The impression log: batching, rotation, durability (temp then rename), concurrency, failed
writes, settings. The service writing it: tests/serving/test_impression_log.py (beside the
serving tests' trained bundle, which a fixture of this directory would train a second time)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bstrec.monitoring.impressions import (
    _CONVERT_ROWS,
    EventRow,
    ImpressionLog,
    ImpressionLogConfig,
    ImpressionRow,
    SegmentWriter,
    read_log,
    segments,
)
from bstrec.serving.settings import Settings

SLOW = 3_600.0  # an interval no test waits for: only row counts, flush() or close() write


def impression(request: str, position: int, ts: float = 100.0) -> ImpressionRow:
    return ImpressionRow(request_id=request, user_id="7", ts=ts, received_at=ts + 0.5,
                         model_version="A", arm="default", path="regular", degraded=[],
                         position=position, item_id=f"i{position}", score=0.5 - position / 100,
                         prerank_score=None if position else 1.5, sources=["two_tower", "popular"],
                         shown=True, policy="greedy", propensity=None, k=10, category="c",
                         history_length=3, freshness_s=60.0, last_category="c",
                         user_features="{}", candidates='{"popular": 50}',
                         timings_ms='{"rank": 1.0}')


def event(n: int, request: str | None = None) -> EventRow:
    return EventRow(request_id=request, user_id="7", item_id=f"i{n}", ts=float(n),
                    event_id=f"e{n}", received_at=float(n) + 1)


def config(tmp_path: Path, **overrides: object) -> ImpressionLogConfig:
    base: dict[str, object] = {"flush_rows": 1_000, "flush_interval_s": SLOW}
    return ImpressionLogConfig(tmp_path, **(base | overrides))  # type: ignore[arg-type]


def wait_for(condition: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_rows_wait_for_a_full_batch_then_are_written(tmp_path: Path) -> None:
    with ImpressionLog(config(tmp_path, flush_rows=5)) as log:
        log.log_impressions([impression("r1", p) for p in range(3)])
        time.sleep(0.2)  # the writer had its chance: 3 rows are under the batch size
        assert segments(tmp_path) == [] and log.rows_written["impressions"] == 0
        log.log_impressions([impression("r2", p) for p in range(2)])
        wait_for(lambda: log.rows_written["impressions"] == 5)
        frame = read_log(tmp_path)
        assert frame.height == 5 and frame["request_id"].to_list() == ["r1"] * 3 + ["r2"] * 2
        row = frame.row(0, named=True)
        assert row == {**impression("r1", 0)}  # every column round-trips, lists and nulls too
        assert frame["prerank_score"].null_count() == 3  # positions 1, 2 of r1 and 1 of r2


def test_the_rows_are_written_by_a_process_of_their_own(tmp_path: Path) -> None:
    """Converting and compressing hold the GIL or the cores: a writer process keeps them off
    the request threads. Its pid names the segments."""
    rows = [impression(f"r{i}", i % 10, ts=float(i)) for i in range(2_345)]
    with ImpressionLog(config(tmp_path, flush_rows=len(rows))) as log:
        pid = log.writer_pid
        assert pid is not None and pid != os.getpid()
        log.log_impressions(rows)
        wait_for(lambda: log.rows_written["impressions"] == len(rows))
    assert read_log(tmp_path).to_dicts() == [{**r} for r in rows]
    assert [p.name.split("-")[2] for p in segments(tmp_path)] == [str(pid)]


def test_the_interval_writes_a_partial_batch(tmp_path: Path) -> None:
    with ImpressionLog(config(tmp_path, flush_interval_s=0.1)) as log:
        log.log_events([event(1, "r1")])
        wait_for(lambda: log.rows_written["events"] == 1)
        assert read_log(tmp_path, "events")["request_id"].to_list() == ["r1"]


def test_close_flushes_and_refuses_later_rows(tmp_path: Path) -> None:
    log = ImpressionLog(config(tmp_path))
    log.log_impressions([impression("r1", p) for p in range(4)])
    log.log_events([event(1), event(2, "r1")])
    log.close()
    log.close()  # idempotent
    assert read_log(tmp_path).height == 4
    events = read_log(tmp_path, "events")
    assert events["request_id"].to_list() == [None, "r1"]
    with pytest.raises(RuntimeError, match="closed"):
        log.log_impressions([impression("r2", 0)])


def test_batches_grow_one_segment_until_it_rotates_by_rows(tmp_path: Path) -> None:
    """Each write rewrites the open segment with the batch appended; at max_segment_rows the
    next rows start a new one (a batch that crosses the limit is split)."""
    with ImpressionLog(config(tmp_path, max_segment_rows=5)) as log:
        for r in range(3):
            log.log_impressions([impression(f"r{r}", p) for p in range(2)])
            log.flush()
        assert len(segments(tmp_path)) == 2  # 4 + 2 rows -> 5 | 1
        log.log_impressions([impression("big", p) for p in range(9)])
        log.flush()
    paths = segments(tmp_path)
    assert [pq.read_metadata(p).num_rows for p in paths] == [5, 5, 5]
    assert read_log(tmp_path).height == 15
    assert all(p.name.startswith("impressions-") for p in paths)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_segments_rotate_by_bytes_and_by_age(tmp_path: Path) -> None:
    by_bytes = tmp_path / "bytes"
    with ImpressionLog(config(by_bytes, max_segment_bytes=1)) as log:
        for r in range(3):
            log.log_impressions([impression(f"r{r}", 0)])
            log.flush()
    assert len(segments(by_bytes)) == 3  # every file is over 1 byte: one write each

    by_age = tmp_path / "age"
    with ImpressionLog(config(by_age, max_segment_age_s=0.5)) as log:
        log.log_impressions([impression("r0", 0)])
        log.flush()
        log.log_impressions([impression("r1", 0)])
        log.flush()
        assert len(segments(by_age)) == 1  # younger than 0.5 s: grown
        time.sleep(0.6)
        log.log_impressions([impression("r2", 0)])
        log.flush()
    assert [pq.read_metadata(p).num_rows for p in segments(by_age)] == [2, 1]


def test_a_write_killed_before_its_rename_leaves_complete_segments_only(tmp_path: Path) -> None:
    """A crash between writing the temp file and renaming it leaves a half-written temp file:
    readers never see it, and the segments written before it read whole."""
    with ImpressionLog(config(tmp_path)) as log:
        log.log_impressions([impression("r1", p) for p in range(3)])
    done = segments(tmp_path)[0]
    # what a killed writer leaves: the head of a Parquet file under the temp name
    (tmp_path / f".{done.name}.tmp").write_bytes(done.read_bytes()[:40])
    (tmp_path / ".impressions-20990101T000000000000Z-1-000001.parquet.tmp").write_bytes(b"PAR1")
    assert segments(tmp_path) == [done]
    frame = read_log(tmp_path)
    assert frame.height == 3 and frame["request_id"].unique().to_list() == ["r1"]
    # a new writer in the same directory starts segments of its own beside the leftovers
    with ImpressionLog(config(tmp_path)) as log:
        log.log_impressions([impression("r2", 0)])
    assert read_log(tmp_path).height == 4 and len(segments(tmp_path)) == 2


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    threads, requests, items = 8, 50, 4
    with ImpressionLog(config(tmp_path, flush_rows=37, max_segment_rows=300)) as log:
        def serve(t: int) -> None:
            for r in range(requests):
                log.log_impressions([impression(f"t{t}-r{r}", p) for p in range(items)])
                log.log_events([event(r, f"t{t}-r{r}")])

        workers = [threading.Thread(target=serve, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    frame = read_log(tmp_path)
    assert frame.height == threads * requests * items
    assert frame.select("request_id", "position").unique().height == frame.height
    assert read_log(tmp_path, "events")["request_id"].n_unique() == threads * requests
    assert len(segments(tmp_path)) == threads * requests * items // 300 + 1


def test_read_log_filters_by_time_and_checks_the_kind(tmp_path: Path) -> None:
    assert read_log(tmp_path).height == 0  # no segment yet: an empty frame with the columns
    assert "prerank_score" in read_log(tmp_path).columns
    with ImpressionLog(config(tmp_path)) as log:
        log.log_impressions([impression(f"r{t}", 0, ts=float(t)) for t in range(10)])
    assert read_log(tmp_path, since=3, until=6)["ts"].to_list() == [3.0, 4.0, 5.0]
    with pytest.raises(ValueError, match="kind"):
        read_log(tmp_path, "clicks")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="flush_rows"):
        ImpressionLogConfig(tmp_path, flush_rows=0)


def test_a_failed_write_loses_its_batch_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    """A write that fails (a full disk) drops its batch, counted, and the writer goes on; the
    writer class runs here in the test's process, where the failure can be injected."""
    real = SegmentWriter._write
    calls = []

    def fail_first(path: Path, table: pa.Table) -> int:
        calls.append(path)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real(path, table)

    monkeypatch.setattr(SegmentWriter, "_write", staticmethod(fail_first))
    counters = [0, 0, 0]  # written impressions, written events, lost
    writer = SegmentWriter(config(tmp_path), counters)
    assert not writer.add("impressions", [impression("lost", p) for p in range(2)])
    writer.write_pending()
    writer.add("impressions", [impression("kept", 0)])
    writer.write_pending()
    assert counters == [1, 0, 2]
    assert read_log(tmp_path)["request_id"].to_list() == ["kept"]


def test_rows_are_converted_as_they_arrive_and_a_bad_slice_is_lost_alone(tmp_path: Path
                                                                          ) -> None:
    counters = [0, 0, 0]
    writer = SegmentWriter(config(tmp_path, flush_rows=3 * _CONVERT_ROWS), counters)
    good = [impression(f"r{i}", 0, ts=float(i)) for i in range(2 * _CONVERT_ROWS)]
    bad = [impression("bad", 0) | {"score": "high"} for _ in range(_CONVERT_ROWS)]
    assert not writer.add("impressions", good[:_CONVERT_ROWS])  # converted now: 1 slice waits
    assert not writer.add("impressions", bad)  # refused by the schema: lost, counted
    assert counters[2] == _CONVERT_ROWS
    assert not writer.add("impressions", good[_CONVERT_ROWS:-1])
    assert writer.add("impressions", good[-1:] + good[:_CONVERT_ROWS])  # the batch is full
    writer.write_pending()
    assert counters == [3 * _CONVERT_ROWS, 0, _CONVERT_ROWS]
    assert read_log(tmp_path)["request_id"].to_list() == [
        r["request_id"] for r in good + good[:_CONVERT_ROWS]]


def test_settings_from_the_environment_configure_the_log(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BSTREC_IMPRESSION_LOG", str(tmp_path / "log"))
    monkeypatch.setenv("BSTREC_IMPRESSION_FLUSH_ROWS", "17")
    monkeypatch.setenv("BSTREC_IMPRESSION_FLUSH_S", "0.5")
    settings = Settings(bundle=tmp_path / "bundle")
    assert settings.impression_log_config() == ImpressionLogConfig(
        tmp_path / "log", flush_rows=17, flush_interval_s=0.5)
    monkeypatch.delenv("BSTREC_IMPRESSION_LOG")
    assert Settings(bundle=tmp_path / "bundle").impression_log_config() is None


def test_rows_past_max_queued_rows_are_dropped_and_counted(tmp_path: Path) -> None:
    """A writer that cannot keep up (stopped here, as by a stuck disk) fills the pipe, then the
    queue; past max_queued_rows new rows are dropped and counted, and the service goes on."""
    n = 3_000  # far more than a pipe's buffer holds
    log = ImpressionLog(config(tmp_path, max_queued_rows=3))
    assert log.writer_pid is not None
    os.kill(log.writer_pid, signal.SIGSTOP)
    try:
        for r in range(n):
            log.log_impressions([impression(f"r{r}", 0)])
        wait_for(lambda: log.rows_dropped > 0)
    finally:
        os.kill(log.writer_pid, signal.SIGCONT)
    log.close()
    assert log.rows_written["impressions"] + log.rows_dropped == n
    assert read_log(tmp_path).height == log.rows_written["impressions"] > 0
    with pytest.raises(ValueError, match="max_queued_rows"):
        ImpressionLogConfig(tmp_path, max_queued_rows=0)


def test_a_dead_writer_is_replaced_and_its_rows_counted(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bstrec.monitoring.impressions._RESTART_S", 0.0)
    with ImpressionLog(config(tmp_path)) as log:
        first = log.writer_pid
        assert first is not None
        log.log_impressions([impression("before", 0)])
        log.flush()
        os.kill(first, signal.SIGKILL)
        # reaped: every thread of it gone, its end of the pipe closed with them (a leader that
        # is already a zombie may have threads still holding it)
        wait_for(lambda: first not in [p.pid for p in multiprocessing.active_children()])
        log.log_impressions([impression("unsent", 0)])
        log.flush()  # sent to a broken pipe: lost, counted
        log.log_impressions([impression("after", 0)])
        log.flush()  # a new writer took it
        assert log.writer_pid not in (None, first)
        assert log.rows_lost == 1
    assert read_log(tmp_path)["request_id"].to_list() == ["before", "after"]


def test_a_service_that_dies_leaves_its_batch_written(tmp_path: Path) -> None:
    """The writer reads the end of the pipe when the service process is killed, and writes the
    batch it holds before exiting."""
    script = f"""
import os, signal, sys, time
sys.path.insert(0, {str(Path(__file__).parents[2])!r})
from pathlib import Path
from bstrec.monitoring.impressions import _SEND_INTERVAL_S, ImpressionLog, ImpressionLogConfig
from tests.monitoring.test_impressions import impression
log = ImpressionLog(ImpressionLogConfig(Path({str(tmp_path)!r}), flush_interval_s=3600.0))
log.log_impressions([impression("r1", p) for p in range(3)])
time.sleep(20 * _SEND_INTERVAL_S)  # the sender has passed the rows on to the writer
print(log.writer_pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    writer = int(done.stdout)
    wait_for(lambda: not _alive(writer))
    assert read_log(tmp_path)["request_id"].to_list() == ["r1"] * 3


def _alive(pid: int) -> bool:
    """Its main thread is running (not a zombie waiting to be reaped, as a process whose parent
    was killed can stay in a container without an init reaping orphans)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
