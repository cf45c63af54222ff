"""The HTTP service against a real uvicorn server on a loopback port: validation and auth, hot
reload under traffic, Redis down and back."""

from __future__ import annotations

import gc
import os
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from bstrec.serving.app import Service, settle_heap
from bstrec.serving.settings import Settings
from tests.serving.fixtures import Artifacts, RedisServer, http_client, running

KEY = "test-key"
AUTH = {"X-API-Key": KEY}
# the module's server has a key per scope (settings_for's servers have one API_KEY for both)
ADMIN = {"X-API-Key": "admin-key"}
READ = {"X-API-Key": "read-key"}


def settings_for(artifacts: Artifacts, tmp_path: Path, **overrides: object) -> Settings:
    """One key (``api_key``) for events, admin and histories; histories public unless the test
    says otherwise (test_web.py: the page sends its key field with the history call)."""
    base: dict[str, object] = {
        "bundle": artifacts.bundle, "store_path": str(tmp_path / "store.sqlite"),
        "seed_events": artifacts.samples, "api_key": KEY, "max_batch_events": 5,
        "max_body_bytes": 2048, "store_retry_s": 0.2, "k_max": 50, "public_history": True}
    return Settings(**(base | overrides))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def client(artifacts: Artifacts, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[httpx.Client]:
    settings = settings_for(artifacts, tmp_path_factory.mktemp("api"), api_key=None,
                            events_key=KEY, admin_key="admin-key", read_key="read-key",
                            public_history=False)
    with running(settings) as (_, c):
        yield c


def test_openapi_schema_is_published(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/recommend", "/events", "/items/{item_id}/similar", "/healthz", "/readyz",
            "/metrics", "/admin/reload"} <= set(paths)
    # the query model of /recommend appears as its plain parameters, with their bounds
    params = {p["name"]: p for p in paths["/recommend"]["get"]["parameters"]}
    assert set(params) == {"user_id", "k", "now"} and params["user_id"]["required"]
    assert params["k"]["schema"]["maximum"] == 50 and params["k"]["schema"]["minimum"] == 1
    assert client.get("/healthz").json() == {"status": "ok", "pid": os.getpid()}


def test_recommend_known_and_unknown_users(client: httpx.Client) -> None:
    r = client.get("/recommend", params={"user_id": 3, "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == "A" and len(body["items"]) == 5 and body["path"] == "regular"
    assert all(i["sources"] and i["model_version"] == "A" for i in body["items"])
    assert set(body["timings_ms"]) >= {"retrieve", "prerank", "rank", "rules"}
    cold = client.get("/recommend", params={"user_id": 987654321}).json()
    assert cold["path"] == "cold" and not cold["known_user"] and len(cold["items"]) == 10


def test_requests_on_the_event_loop_or_threads_answer_the_same(artifacts: Artifacts,
                                                                tmp_path: Path) -> None:
    """request_threads 0 runs the pipeline on the event loop, n on n threads (the others wait):
    the answers are the same, concurrent requests all succeed."""
    bodies = []
    for threads in (0, 2):
        settings = settings_for(artifacts, tmp_path / str(threads), request_threads=threads)
        with running(settings) as (url, c):
            params = {"user_id": 3, "k": 5, "now": 1_800_000_000}
            bodies.append(c.get("/recommend", params=params).json())

            def call(_: int, url: str = url) -> int:
                with http_client(url) as own:
                    return own.get("/recommend", params={"user_id": 5}).status_code

            with ThreadPoolExecutor(6) as pool:
                assert set(pool.map(call, range(12))) == {200}
            assert c.post("/events", json={"user_id": 3, "item_id": 5},
                          headers=AUTH).json()["received"] == 1
    assert bodies[0]["request_id"] != bodies[1]["request_id"]  # one per answer
    for b in bodies:
        del b["timings_ms"], b["request_id"]
    assert bodies[0] == bodies[1] and len(bodies[0]["items"]) == 5


@pytest.mark.parametrize("params, message", [
    ({"user_id": 3, "k": 0}, "greater than or equal to 1"),
    ({"user_id": 3, "k": 51}, "less than or equal to 50"),
    ({"user_id": 3, "k": "ten"}, "valid integer"),
    ({"k": 5}, "Field required"),
    ({"user_id": "abc"}, "should match pattern"),  # this bundle's ids are integers
    ({"user_id": 3, "kk": 5}, "unknown query parameter 'kk': /recommend takes k, now, user_id"),
    ({"user_id": 3, "now": 10**20}, "less than or equal to 4102444800"),
    ({"user_id": 3, "now": -1}, "greater than or equal to 0"),
])
def test_recommend_rejects_bad_queries(client: httpx.Client, params: dict[str, object],
                                       message: str) -> None:
    r = client.get("/recommend", params=params)  # type: ignore[arg-type]
    assert r.status_code == 422 and message in r.text


def test_events_need_the_api_key(client: httpx.Client) -> None:
    event = {"user_id": 3, "item_id": 5}
    r = client.post("/events", json=event)
    assert r.status_code == 401 and "missing API key" in r.text
    assert client.post("/events", json=event, headers={"X-API-Key": "wrong"}).status_code == 403
    assert client.post("/admin/reload", json={}).status_code == 401


def test_each_key_opens_its_own_routes(client: httpx.Client) -> None:
    """The events key cannot reload (the key handed to every producer must not swap the model),
    the admin key cannot write events; a history needs the read or the admin key."""
    r = client.post("/admin/reload", json={}, headers=AUTH)
    assert r.status_code == 403 and "invalid API key" in r.text
    r = client.post("/events", json={"user_id": 3, "item_id": 5}, headers=ADMIN)
    assert r.status_code == 403 and "invalid API key" in r.text
    r = client.get("/users/3/history")
    assert r.status_code == 401 and "missing API key" in r.text
    assert client.get("/users/3/history", headers=AUTH).status_code == 403
    for key in (READ, ADMIN):
        r = client.get("/users/3/history", params={"n": 2}, headers=key)
        assert r.status_code == 200 and len(r.json()["behaviours"]) == 2
    # the OpenAPI schema says which routes take the key
    paths = client.get("/openapi.json").json()["paths"]
    assert paths["/users/{user_id}/history"]["get"]["security"]
    assert "security" not in paths["/recommend"]["get"]


def test_a_scope_without_a_key_is_closed(artifacts: Artifacts, tmp_path: Path) -> None:
    """No admin key and no api_key: reload is closed (403) whatever the caller sends, while
    events take their own key; histories without any read or admin key are closed too."""
    settings = settings_for(artifacts, tmp_path, api_key=None, events_key=KEY,
                            public_history=False)
    with running(settings) as (_, c):
        r = c.post("/admin/reload", json={}, headers=AUTH)
        assert r.status_code == 403 and "admin is disabled" in r.text
        r = c.get("/users/3/history", headers=AUTH)
        assert r.status_code == 403 and "reading histories is disabled" in r.text
        assert c.post("/events", json={"user_id": 3, "item_id": 5}, headers=AUTH).status_code == 200


def test_events_one_or_a_batch_then_visible(client: httpx.Client) -> None:
    user = 55_555
    r = client.post("/events", json={"user_id": user, "item_id": 5, "timestamp": 1_700_000_000},
                    headers=AUTH)
    assert r.status_code == 200 and r.json() == {"received": 1, "stored": 1, "ignored": 0}
    batch = {"events": [{"user_id": str(user), "item_id": i, "event_id": f"e{i}"}
                        for i in (6, 7)]}
    assert client.post("/events", json=batch, headers=AUTH).json()["stored"] == 2
    rec = client.get("/recommend", params={"user_id": user}).json()
    assert rec["known_user"] and rec["history_length"] == 3
    assert not {5, 6, 7} & {i["item_id"] for i in rec["items"]}


@pytest.mark.parametrize("body, status, message", [
    ({"user_id": 3, "item_id": 123_456_789}, 422, "unknown item 123456789"),
    ({"user_id": 3, "item_id": 5, "timestamp": 2**40}, 422, "s in the future"),
    ({"user_id": 3, "item_id": 5, "timestamp": -5}, 422, "greater than or equal to 0"),
    ({"user_id": 3}, 422, "Field required"),
    ({"user_id": 3, "item_id": 5, "timestamp": "yesterday"}, 422, "valid integer"),
    ({"user_id": 3, "item_id": 5, "colour": "red"}, 422, "Extra inputs are not permitted"),
    ({"events": []}, 422, "at least 1 item"),
    ({"events": [{"user_id": 3, "item_id": 5}] * 6}, 413, "over the limit of 5"),
    ({"events": [{"user_id": 3, "item_id": 5, "event_id": "x" * 3000}]}, 413, "over the limit"),
])
def test_events_reject_bad_bodies(client: httpx.Client, body: object, status: int,
                                  message: str) -> None:
    r = client.post("/events", json=body, headers=AUTH)
    assert r.status_code == status and message in r.text, r.text


def test_malformed_json_is_a_422(client: httpx.Client) -> None:
    r = client.post("/events", content=b'{"user_id": 3,', headers=AUTH | {
        "content-type": "application/json"})
    assert r.status_code == 422 and "json" in r.text.lower()


def test_similar_items_and_unknown_item(client: httpx.Client) -> None:
    r = client.get("/items/5/similar", params={"k": 3})
    assert r.status_code == 200 and len(r.json()["items"]) == 3
    r = client.get("/items/123456789/similar")
    assert r.status_code == 404 and "unknown item 123456789" in r.text


def test_metrics_count_requests_stages_and_sources(client: httpx.Client) -> None:
    client.get("/recommend", params={"user_id": 3})
    text = client.get("/metrics").text
    assert 'bstrec_requests_total{method="GET",route="/recommend",status="200"}' in text
    for stage in ("retrieve", "prerank", "rank", "rules"):
        assert f'bstrec_stage_seconds_count{{stage="{stage}"}}' in text
    for source in ("two_tower", "item_cf", "popular"):
        assert f'bstrec_candidates_count{{source="{source}"}}' in text
    assert 'bstrec_bundle_info{version="A"} 1.0' in text


def test_hot_reload_under_traffic_fails_no_request(artifacts: Artifacts, tmp_path: Path) -> None:
    statuses: list[int] = []
    versions: list[str] = []
    stop = threading.Event()

    def traffic(url: str, user: int) -> None:
        with http_client(url) as c:
            while not stop.is_set():
                r = c.get("/recommend", params={"user_id": user, "k": 5})
                statuses.append(r.status_code)
                if r.status_code == 200:
                    versions.append(r.json()["model_version"])

    def wait_for(version: str) -> None:
        deadline = time.monotonic() + 20
        n = len(versions)
        while not versions[n:] or versions[-1] != version:
            assert time.monotonic() < deadline, f"never served {version}"
            time.sleep(0.02)

    with running(settings_for(artifacts, tmp_path)) as (url, admin):
        threads = [threading.Thread(target=traffic, args=(url, u)) for u in (3, 4, 999_999)]
        for t in threads:
            t.start()
        try:
            wait_for("A")
            r = admin.post("/admin/reload", json={"bundle": str(artifacts.bundle_b)}, headers=AUTH)
            assert r.status_code == 200 and r.json()["previous_version"] == "A", r.text
            wait_for("B")
            r = admin.post("/admin/reload", json={"bundle": str(artifacts.broken)}, headers=AUTH)
            assert r.status_code == 409 and "still serving B" in r.text
            assert "ranker.onnx is corrupted" in r.json()["detail"]
            wait_for("B")
            r = admin.post("/admin/reload", headers=AUTH)  # the configured bundle: A again
            assert r.status_code == 200 and r.json()["model_version"] == "A"
            wait_for("A")
        finally:
            stop.set()
            for t in threads:
                t.join()
        metrics = admin.get("/metrics").text
    assert len(statuses) > 20 and set(statuses) == {200}
    assert set(versions) == {"A", "B"}
    assert 'bstrec_reloads_total{outcome="ok"} 2.0' in metrics
    assert 'bstrec_reloads_total{outcome="refused"} 1.0' in metrics


def test_redis_down_degrades_then_recovers(artifacts: Artifacts, tmp_path: Path,
                                           redis_server: RedisServer) -> None:
    settings = settings_for(artifacts, tmp_path, store="redis", redis_url=redis_server.url,
                            redis_prefix=f"t{uuid.uuid4().hex[:8]}")
    with running(settings) as (_, c):
        up = c.get("/recommend", params={"user_id": 3}).json()
        assert not up["degraded"] and up["history_length"] > 0
        assert c.get("/readyz").json()["store"]["ok"]

        redis_server.stop()
        # a request must not hang on the dead store (the client's timeout is the guard)
        down = c.get("/recommend", params={"user_id": 3}, timeout=30)
        assert down.status_code == 200
        body = down.json()
        assert body["degraded"] and body["path"] == "cold" and len(body["items"]) == 10
        assert "feature store unavailable" in body["degraded_reasons"][0]
        ready = c.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["degraded"] and not ready.json()["store"]["ok"]
        assert ready.json()["store"]["error"]
        r = c.post("/events", json={"user_id": 3, "item_id": 5}, headers=AUTH)
        assert r.status_code == 503 and "retry later" in r.text and "retry-after" in r.headers
        assert "bstrec_store_up 0.0" in c.get("/metrics").text

        redis_server.start()  # same port, empty (no persistence)
        deadline = time.monotonic() + 10
        while c.get("/recommend", params={"user_id": 3}).json()["degraded"]:
            assert time.monotonic() < deadline, "did not recover after Redis came back"
            time.sleep(0.1)
        assert not c.get("/readyz").json()["degraded"]
        r = c.post("/events", json={"user_id": 3, "item_id": 5}, headers=AUTH)
        assert r.status_code == 200 and r.json()["stored"] == 1
        assert c.get("/recommend", params={"user_id": 3}).json()["history_length"] == 1


def test_a_static_page_mounts_at_root_without_hiding_the_api(artifacts: Artifacts,
                                                              tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<h1>bstrec demo</h1>")
    with running(settings_for(artifacts, tmp_path, static_dir=site)) as (_, c):
        assert "bstrec demo" in c.get("/").text
        assert c.get("/recommend", params={"user_id": 3}).status_code == 200
        assert c.get("/healthz").json()["status"] == "ok"
        # public_history: the page reads a history without a key
        assert c.get("/users/3/history").status_code == 200
        # a wrong method on an API path is the API's 405, not the page's
        r = c.request("OPTIONS", "/events")
        assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_loaded_pipeline_is_kept_out_of_full_collections(artifacts: Artifacts,
                                                         tmp_path: Path) -> None:
    """After loading (and after a reload) the live objects are frozen, so a full collection
    does not walk the bundle; a reload unfreezes first, so that garbage of the old pipeline
    (here a reference cycle hanging off it, frozen with it) is collected."""

    class Cycle:
        me: object

    svc = Service(settings_for(artifacts, tmp_path))
    try:
        assert gc.get_freeze_count() > 10_000
        cycle = Cycle()
        cycle.me = cycle
        svc.pipeline.probe = cycle  # type: ignore[attr-defined]
        settle_heap()  # as if the cycle had been there at load
        gone = weakref.ref(cycle)
        del cycle
        svc.reload(Path(artifacts.bundle_b))
        assert svc.pipeline.version == "B" and gc.get_freeze_count() > 10_000
        assert gone() is None
    finally:
        svc.close()


def test_seed_until_a_time_keeps_only_the_earlier_events(artifacts: Artifacts,
                                                         tmp_path: Path) -> None:
    from bstrec.data.schema import Dataset

    events = Dataset.load(Path(artifacts.samples) / "dataset").events
    cut = int(events["timestamp"].median())  # type: ignore[arg-type]
    svc = Service(settings_for(artifacts, tmp_path, seed_until=cut))
    try:
        svc.seed()
        users = events["user_id"].unique().to_list()
        stored = [b.timestamp for u in users for b in svc.store.behaviours(u)]
        assert stored and max(stored) < cut
        # every user's history up to the cut, as far as max_events keeps it
        before = events.filter(events["timestamp"] < cut)
        user = before["user_id"][0]
        kept = svc.store.behaviours(user)
        assert kept[-1].timestamp == before.filter(before["user_id"] == user)["timestamp"].max()
    finally:
        svc.close()
