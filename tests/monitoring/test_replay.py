"""The replay's schedule without HTTP (monitoring/replay.py: which events seed, the arrival order,
clicks, attribution, the fault injector) and its HTTP driver against an in-process fake service
(httpx.MockTransport): seeding before the first request, no event of the test period early,
errors counted, clear stops."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from bstrec.cli import app as cli
from bstrec.data.samples import SampleConfig, SampleSet, build_samples
from bstrec.data.schema import Dataset, normalize_events
from bstrec.monitoring.replay import (
    ClickOracle,
    ReplayConfig,
    ReplayError,
    period_start,
    run_schedule,
    seed_batches,
    split_log,
    with_event_ids,
)
from bstrec.monitoring.replay import replay as run_replay

T0 = 1_700_000_000
URL = "http://replay.test"


def small_dataset() -> Dataset:
    rng = np.random.default_rng(1)
    n = 200
    events = normalize_events(pl.DataFrame({
        "user_id": rng.integers(1, 7, n), "item_id": rng.integers(1, 16, n),
        "timestamp": T0 + np.sort(rng.integers(0, 5_000, n)),
        "value": rng.integers(1, 6, n).astype(float)}).with_columns(pl.lit("rating").alias("action")))
    return Dataset("small", events,
                   pl.DataFrame({"item_id": np.arange(1, 16), "category": ["a", "b", "c"] * 5}),
                   pl.DataFrame({"user_id": np.arange(1, 7)}))


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("replay") / "samples"
    build_samples(small_dataset(), SampleConfig(max_len=4)).save(out)
    return out


def test_the_log_splits_at_the_test_start_in_time_order(samples: Path) -> None:
    s = SampleSet.load(samples)
    assert s.dataset is not None
    start = period_start(s.manifest)
    history, arrivals = split_log(s.dataset, start)
    assert history.height + arrivals.height == s.dataset.events.height
    assert (history["timestamp"] < start).all() and (arrivals["timestamp"] >= start).all()
    # the test period is the test split's behaviours (P1: one sample per event)
    assert arrivals.height == s.splits["test"].height
    keys = arrivals.select("timestamp", "user_id", "item_id").rows()
    assert keys == sorted(keys)
    ids = with_event_ids(s.dataset.events)["event_id"]
    assert ids.n_unique() == ids.len()  # repeats of a triple get their own id, as the store's


def test_the_frozen_item_replaces_what_is_posted_not_what_is_clicked(samples: Path) -> None:
    s = SampleSet.load(samples)
    assert s.dataset is not None
    history, arrivals = split_log(s.dataset, period_start(s.manifest), freeze_item=7)
    assert set(history["item_id"]) == {7} and set(arrivals["item_id"]) == {7}
    assert arrivals["original_item"].n_unique() > 1
    with pytest.raises(ValueError, match="not in the dataset's item table"):
        split_log(s.dataset, period_start(s.manifest), freeze_item=999)


def test_clicks_fall_in_the_half_open_window() -> None:
    events = pl.DataFrame({"user_id": [1, 1, 1, 2], "item_id": [10, 11, 12, 10],
                           "timestamp": [100, 150, 200, 120]})
    oracle = ClickOracle(events, window_s=100)
    assert oracle.clicked(1, 100, [12, 11, 10, 13]) == [11, 10]  # 200 = t + window: too late
    assert oracle.clicked(1, 101, [10]) == []  # before t
    assert oracle.clicked(3, 100, [10]) == []


def test_the_schedule_asks_then_posts_the_behaviour() -> None:
    arrivals = pl.DataFrame({"user_id": [1, 1, 2], "item_id": [10, 11, 10],
                             "timestamp": [100, 130, 140], "event_id": ["a", "b", "c"],
                             "original_item": [10, 11, 10]})
    oracle = ClickOracle(arrivals, window_s=60)
    calls: list[tuple[str, Any]] = []

    def recommend(user: int | str, t: int) -> tuple[str | None, list[int | str], dict[str, Any]] | None:
        calls.append(("get", (user, t)))
        if user == 2:
            return None  # a failed call: the behaviour is still posted
        return f"r{t}", [11, 10, 12], {}

    steps = list(run_schedule(arrivals, oracle, recommend,
                              lambda events: calls.append(("post", events))))
    assert [c[0] for c in calls] == ["get", "post"] * 3
    assert steps[0].clicked == [11, 10]  # 10 at t, 11 at t + 30
    assert steps[1].clicked == [11]  # shown again: clicked in both answers (the log's rule)
    assert not steps[2].answered and steps[2].clicked == []
    # the behaviour as it happened, for no answer in particular
    assert steps[1].event == {"user_id": 1, "item_id": 11, "timestamp": 130, "event_id": "b"}


def test_seed_batches_are_bounded_and_in_time_order(samples: Path) -> None:
    s = SampleSet.load(samples)
    assert s.dataset is not None
    history, _ = split_log(s.dataset, period_start(s.manifest))
    batches = list(seed_batches(history, 7))
    assert all(len(b) <= 7 for b in batches) and sum(map(len, batches)) == history.height
    times = [e["timestamp"] for b in batches for e in b]
    assert times == sorted(times)


class FakeService:
    """/healthz, /recommend and /events in process: records what was asked."""

    def __init__(self, status: Callable[[httpx.Request], int] = lambda r: 200,
                 unknown: frozenset[int] = frozenset()) -> None:
        self.status = status
        self.unknown = unknown
        self.log: list[tuple[str, Any]] = []
        self.stored: list[dict[str, Any]] = []
        self.shown = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        code = self.status(request)
        if code != 200:
            return httpx.Response(code, json={"detail": f"fake {code}"})
        if request.url.path == "/healthz":
            return httpx.Response(200, json={"status": "ok", "pid": 1})
        if request.url.path == "/recommend":
            q = request.url.params
            self.log.append(("get", (q["user_id"], int(q["now"]))))
            seen = {e["item_id"] for e in self.stored if str(e["user_id"]) == q["user_id"]}
            items = [i for i in range(1, 16) if i not in seen][:int(q["k"])]
            self.shown += len(items)
            return httpx.Response(200, json={
                "request_id": f"r{len(self.log)}", "model_version": "A", "arm": "default",
                "items": [{"item_id": i} for i in items]})
        body = json.loads(request.content)
        unknown = [n for n, e in enumerate(body["events"]) if e["item_id"] in self.unknown]
        if unknown:  # all or nothing, each refused event named, as the service does
            return httpx.Response(422, json={"detail": [
                {"loc": ["body", "events", n, "item_id"], "msg": "unknown item",
                 "type": "value_error"} for n in unknown]})
        self.log.append(("post", (request.headers.get("X-API-Key"), len(body["events"]))))
        self.stored += body["events"]
        return httpx.Response(200, json={"received": len(body["events"]),
                                         "stored": len(body["events"]), "ignored": 0})


def client_of(service: FakeService) -> httpx.Client:
    return httpx.Client(base_url=URL, transport=httpx.MockTransport(service))


def test_replay_seeds_the_past_then_replays_the_test_period(samples: Path) -> None:
    s = SampleSet.load(samples)
    assert s.dataset is not None
    start = period_start(s.manifest)
    service = FakeService()
    cfg = ReplayConfig(k=5, window_s=600, api_key="key", batch_events=50)
    with client_of(service) as client:
        result = run_replay(samples, URL, cfg, client=client, progress=False)
    n_past = s.dataset.events.filter(pl.col("timestamp") < start).height
    n_test = s.dataset.events.height - n_past
    first_get = next(i for i, (kind, _) in enumerate(service.log) if kind == "get")
    seeded = service.stored[:n_past]
    assert all(e["timestamp"] < start for e in seeded)  # no leakage into the history
    assert sum(n for kind, (_, n) in service.log[:first_get] if kind == "post") == n_past
    assert all(key == "key" for kind, (key, _) in service.log if kind == "post")
    gets = [args for kind, args in service.log if kind == "get"]
    assert [t for _, t in gets] == sorted(t for _, t in gets)  # time order
    assert (result.seeded, result.events_posted, result.requests) == (n_past, n_test, n_test)
    assert result.shown == service.shown and result.errors == 0
    assert result.versions == {"A": n_test} and result.arms == {"default": n_test}
    # clicks, recomputed from the log: a shown item the user touched in [t, t + window)
    assert result.clicks > 0 and result.hits <= result.requests
    assert 0 < result.ctr <= 1
    assert not any("request_id" in e for e in service.stored[n_past:])

    limited = FakeService()
    with client_of(limited) as client:
        result = run_replay(samples, URL, ReplayConfig(limit=3, seed_history=False),
                            client=client, progress=False)
    assert (result.seeded, result.requests) == (0, 3)
    assert [kind for kind, _ in limited.log] == ["get", "post"] * 3
    later = FakeService()
    with client_of(later) as client:
        run_replay(samples, URL, ReplayConfig(skip=2, limit=1, seed_history=False),
                   client=client, progress=False)
    assert [e["event_id"] for e in later.stored] == [e["event_id"] for e in limited.stored[2:]]


def test_refused_events_are_dropped_from_their_batch_and_counted(samples: Path) -> None:
    s = SampleSet.load(samples)
    assert s.dataset is not None
    service = FakeService(unknown=frozenset({3}))
    with client_of(service) as client:
        result = run_replay(samples, URL, ReplayConfig(batch_events=40), client=client,
                            progress=False)
    n_unknown = s.dataset.events.filter(pl.col("item_id") == 3).height
    assert n_unknown > 0 and result.refused == n_unknown and result.errors == 0
    assert len(service.stored) == s.dataset.events.height - n_unknown
    assert result.stored == len(service.stored)


def test_replay_counts_errors_and_stops_after_too_many(samples: Path) -> None:
    flaky = FakeService(lambda r: 500 if r.url.path == "/recommend" else 200)
    with client_of(flaky) as client, pytest.raises(ReplayError, match="stopped after 4") as err:
        run_replay(samples, URL, ReplayConfig(max_errors=3, seed_history=False), client=client,
                   progress=False)
    assert err.value.result is not None and err.value.result.errors == 4
    assert "fake 500" in str(err.value)

    refused = FakeService(lambda r: 401 if r.url.path == "/events" else 200)
    with client_of(refused) as client, pytest.raises(ReplayError, match="events key"):
        run_replay(samples, URL, ReplayConfig(), client=client, progress=False)


def test_an_unreachable_service_is_said_so(samples: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ReplayError, match="unreachable"):
        run_replay(samples, f"http://127.0.0.1:{port}", ReplayConfig(timeout_s=5),
                   progress=False)
    res = CliRunner().invoke(cli, ["replay", "--samples", str(samples), "--service",
                                   f"http://127.0.0.1:{port}"])
    assert res.exit_code == 1 and "unreachable" in res.output
    res = CliRunner().invoke(cli, ["replay", "--samples", str(samples), "--service",
                                   f"http://127.0.0.1:{port}", "--freeze-item", "x"])
    assert res.exit_code == 2 and "integers" in res.output


def test_bad_configs_are_refused() -> None:
    for kwargs in ({"k": 0}, {"window_s": 0}, {"limit": -1}, {"skip": -1}, {"batch_events": 0}):
        with pytest.raises(ValueError):
            ReplayConfig(**kwargs)  # type: ignore[arg-type]
