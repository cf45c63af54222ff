"""The service's impression log (monitoring/impressions.py) against a real server: one row per
shown item with the answer's scores and positions, and the events that follow with the
request id they answer."""

from __future__ import annotations

from pathlib import Path

import pytest

from bstrec.monitoring.impressions import read_log, segments
from bstrec.serving.app import create_app
from bstrec.serving.server import BackgroundServer
from bstrec.serving.settings import Settings
from tests.serving.fixtures import Artifacts, http_client

KEY = "test-key"
AUTH = {"X-API-Key": KEY}
SLOW = 3_600.0  # a flush interval no test waits for: only the shutdown writes


def settings_for(artifacts: Artifacts, tmp_path: Path, **overrides: object) -> Settings:
    base: dict[str, object] = {"bundle": artifacts.bundle, "events_key": KEY,
                               "store_path": str(tmp_path / "store.sqlite"),
                               "seed_events": artifacts.samples}
    return Settings(**(base | overrides))  # type: ignore[arg-type]


def test_the_service_logs_what_it_showed_and_the_events_that_follow(artifacts: Artifacts,
                                                                    tmp_path: Path) -> None:
    logs = tmp_path / "log"
    settings = settings_for(artifacts, tmp_path, impression_log=logs, impression_flush_s=SLOW)
    app = create_app(settings)
    with BackgroundServer(app) as server, http_client(server.url) as client:
        r = client.get("/recommend", params={"user_id": 3, "k": 5, "now": 1_700_000_000})
        assert r.status_code == 200, r.text
        body = r.json()
        request_id = body["request_id"]
        assert r.headers["X-Request-ID"] == request_id and len(request_id) == 32
        other = client.get("/recommend", params={"user_id": 3, "k": 5}).json()["request_id"]
        assert other != request_id
        clicked = body["items"][1]["item_id"]
        r = client.post("/events", headers=AUTH, json={"events": [
            {"user_id": 3, "item_id": clicked, "timestamp": 1_700_000_010,
             "request_id": request_id},
            {"user_id": 3, "item_id": clicked, "timestamp": 1_700_000_020}]})
        assert r.status_code == 200, r.text
        assert segments(logs) == []  # the batch waits: the interval is an hour, 12 rows < 1000
    # the server's shutdown closed the service and so flushed the log

    shown = read_log(logs).filter(request_id=request_id).sort("position")
    assert shown["position"].to_list() == list(range(5))
    assert shown["item_id"].to_list() == [str(i["item_id"]) for i in body["items"]]
    assert shown["score"].to_list() == pytest.approx([i["score"] for i in body["items"]])
    assert shown["prerank_score"].to_list() == pytest.approx(
        [i["prerank_score"] for i in body["items"]])
    assert shown["sources"].to_list() == [i["sources"] for i in body["items"]]
    first = shown.row(0, named=True)
    assert (first["user_id"], first["ts"], first["model_version"], first["arm"],
            first["path"], first["degraded"]) == ("3", 1_700_000_000.0, "A", "default",
                                                   body["path"], body["degraded_reasons"])
    assert read_log(logs).filter(request_id=other).height == 5

    events = read_log(logs, "events")
    assert events["request_id"].to_list() == [request_id, None]
    assert events["item_id"].to_list() == [str(clicked)] * 2
    assert events["ts"].to_list() == [1_700_000_010.0, 1_700_000_020.0]
    assert events["event_id"].to_list() == [f"3:{clicked}:1700000010", f"3:{clicked}:1700000020"]
    # the click joins its impression on (request_id, item_id)
    joined = events.join(shown, on=["request_id", "item_id"], suffix="_shown")
    assert joined["position"].to_list() == [1]


def test_the_service_logs_nothing_without_a_directory(artifacts: Artifacts,
                                                      tmp_path: Path) -> None:
    settings = settings_for(artifacts, tmp_path)
    app = create_app(settings)
    assert settings.impression_log is None and app.state.service.impressions is None
    with BackgroundServer(app) as server, http_client(server.url) as client:
        r = client.get("/recommend", params={"user_id": 3, "k": 2})
        assert r.status_code == 200 and r.json()["request_id"] == r.headers["X-Request-ID"]
