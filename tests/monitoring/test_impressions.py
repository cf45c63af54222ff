"""The impression log: batching, rotation, durability (temp then rename), concurrency, failed
writes, settings. The service writing it: tests/serving/test_impression_log.py (beside the
serving tests' trained bundle, which a fixture of this directory would train a second time)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bstrec.monitoring.impressions import (
    _CONVERT_ROWS,
    EventRow,
    ImpressionLog,
    ImpressionLogConfig,
    ImpressionRow,
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


def test_a_batch_converted_in_slices_keeps_every_row_in_order(tmp_path: Path) -> None:
    # the writer converts a batch a slice at a time (handing the GIL back in between)
    n = 2 * _CONVERT_ROWS + 7
    rows = [impression(f"r{i}", i % 10, ts=float(i)) for i in range(n)]
    with ImpressionLog(config(tmp_path, flush_rows=n)) as log:
        log.log_impressions(rows)
        wait_for(lambda: log.rows_written["impressions"] == n)
    assert read_log(tmp_path).to_dicts() == [{**r} for r in rows]


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
    """A write that fails (a full disk) drops its batch, counted, and the writer goes on."""
    real = ImpressionLog._write
    calls = []

    def fail_first(path: Path, table: object) -> int:
        calls.append(path)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real(path, table)  # type: ignore[arg-type]

    monkeypatch.setattr(ImpressionLog, "_write", staticmethod(fail_first))
    with ImpressionLog(config(tmp_path)) as log:
        log.log_impressions([impression("lost", p) for p in range(2)])
        log.flush()
        log.log_impressions([impression("kept", 0)])
        log.flush()
        assert log.rows_lost == 2 and log.rows_written["impressions"] == 1
    assert read_log(tmp_path)["request_id"].to_list() == ["kept"]


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
    log = ImpressionLog(ImpressionLogConfig(tmp_path, max_queued_rows=3))
    gate = threading.Event()
    real = log._write_pending

    def slow_writer() -> None:  # the writer is stuck behind a slow disk until the gate opens
        gate.wait(10.0)
        real()

    log._write_pending = slow_writer  # type: ignore[method-assign]
    log.log_impressions([impression("first", 0)])
    flushing = threading.Thread(target=log.flush)  # the writer takes it, then blocks writing
    flushing.start()
    time.sleep(0.3)
    log.log_impressions([impression("queued", p) for p in range(3)])
    log.log_impressions([impression("dropped", p) for p in range(2)])
    assert log.rows_dropped == 2
    gate.set()
    flushing.join()
    log.close()
    assert sorted(set(read_log(tmp_path)["request_id"].to_list())) == ["first", "queued"]
    assert log.rows_written["impressions"] == 4
    with pytest.raises(ValueError, match="max_queued_rows"):
        ImpressionLogConfig(tmp_path, max_queued_rows=0)
