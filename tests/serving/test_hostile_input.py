"""The HTTP API under hostile input, against a real server: bodies over the limit however they
are framed, keys checked before a body is read, unknown query parameters, reload paths outside
the bundle root, and late, duplicate, future-dated and unknown-item events from several clients
at once."""

from __future__ import annotations

import random
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import HTTPException
from pydantic import SecretStr

from bstrec.serving.app import Service, key_check
from bstrec.serving.bundle import Bundle
from bstrec.serving.pipeline import EventsRefused, IncomingEvent
from tests.serving.fixtures import Artifacts, http_client, running
from tests.serving.test_service import AUTH, settings_for

TOTAL = 50_000_000  # bytes a hostile client offers


@pytest.fixture(scope="module")
def server(artifacts: Artifacts, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[str, httpx.Client]]:
    """settings_for's server: 2048-byte bodies, batches of 5, one key for events and admin."""
    with running(settings_for(artifacts, tmp_path_factory.mktemp("hostile"))) as (url, c):
        yield url, c


class Offer:
    """A chunked request body of TOTAL bytes that counts what the client got to send."""

    def __init__(self, chunk: int = 64_000) -> None:
        self.sent = 0
        self.chunk = chunk

    def __iter__(self) -> Iterator[bytes]:
        while self.sent < TOTAL:
            self.sent += self.chunk
            yield b"x" * self.chunk


@pytest.mark.parametrize("headers, status, message", [
    (AUTH, 413, "over the limit of 2048"),
    # without the key: refused for the key, not for the size, so before the body was read
    ({}, 401, "missing API key"),
    ({"X-API-Key": "wrong"}, 403, "invalid API key"),
])
def test_a_chunked_body_is_refused_while_it_streams(server: tuple[str, httpx.Client],
                                                    headers: dict[str, str], status: int,
                                                    message: str) -> None:
    url, client = server
    body = Offer()
    # a generator body goes out chunked: no Content-Length for the server to judge it by
    with http_client(url) as own:
        r = own.post("/events", content=body, headers=headers | {
            "content-type": "application/json"})
    assert r.status_code == status and message in r.json()["detail"], r.text
    assert r.headers["connection"] == "close"  # the rest of the body is not read
    assert "content-length" not in r.request.headers
    # the server answered and hung up long before the client could send it all (what it did
    # send went into socket buffers, a few MB on loopback)
    assert body.sent < TOTAL / 4, body.sent
    assert client.get("/healthz").status_code == 200


def test_a_declared_length_over_the_limit_is_refused_before_the_body(
        server: tuple[str, httpx.Client]) -> None:
    _, client = server
    r = client.post("/events", content=b"x" * 5000, headers=AUTH | {
        "content-type": "application/json"})
    assert r.status_code == 413 and "request body of 5000 bytes" in r.json()["detail"]


@pytest.mark.parametrize("method, path, params", [
    ("GET", "/recommend", {"user_id": 3, "kk": 5}),
    ("GET", "/users/3/history", {"n": 2, "limit": 5}),
    ("GET", "/items/5/similar", {"k": 2, "user": 3}),
    ("GET", "/healthz", {"verbose": 1}),
    ("GET", "/readyz", {"x": ""}),
    ("GET", "/metrics", {"name": "bstrec"}),
    ("POST", "/events", {"dry_run": 1}),
    ("POST", "/admin/reload", {"force": 1}),
])
def test_unknown_query_parameters_are_refused_on_every_route(
        server: tuple[str, httpx.Client], method: str, path: str,
        params: dict[str, object]) -> None:
    _, client = server
    body = {"user_id": 3, "item_id": 5} if path == "/events" else {} if method == "POST" else None
    r = client.request(method, path, params=params, json=body, headers=AUTH)
    assert r.status_code == 422, r.text
    unknown = {k for k in params if k not in ("n", "k", "user_id")}
    problems = r.json()["detail"]
    assert {tuple(p["loc"]) for p in problems} == {("query", k) for k in unknown}
    assert all("unknown query parameter" in p["msg"] and path.split("/")[1] in p["msg"]
               for p in problems)


def test_reload_takes_bundles_only_from_under_the_bundle_root(artifacts: Artifacts,
                                                              tmp_path: Path) -> None:
    root = tmp_path / "bundles"
    root.mkdir()
    shutil.copytree(artifacts.bundle_b, root / "b")
    (root / "alias").symlink_to(root / "b")  # a link inside, to inside: fine
    outside = tmp_path / "outside"
    shutil.copytree(artifacts.bundle_b, outside)  # a valid bundle, but not under the root
    (root / "escape").symlink_to(outside)
    settings = settings_for(artifacts, tmp_path, bundle_root=root)
    with running(settings) as (_, c):
        def reload(path: object) -> httpx.Response:
            return c.post("/admin/reload", json={"bundle": str(path)}, headers=AUTH)

        refusals = [reload(p) for p in (
            outside, tmp_path / "does-not-exist", root / "escape", root / ".." / "outside",
            root / ".." / "nothing-here", "relative/outside", "/etc", "bad\x00path")]
        assert {r.status_code for r in refusals} == {403}
        # one message whatever exists out there: it says nothing of the disk outside the root
        assert {r.text for r in refusals} == {
            f'{{"detail":"bundles are loaded only from under the bundle root {root}"}}'}
        assert c.get("/readyz").json()["model_version"] == "A"
        r = reload(root / "alias")
        assert r.status_code == 200 and r.json()["model_version"] == "B"
        assert r.json()["bundle"] == str(root / "b")  # the link resolved
        r = reload(root / "missing")  # inside the root: the loader says what is wrong
        assert r.status_code == 409 and "still serving B" in r.text


def test_the_default_bundle_root_is_the_bundles_parent(artifacts: Artifacts,
                                                       tmp_path: Path) -> None:
    with running(settings_for(artifacts, tmp_path)) as (_, c):
        r = c.post("/admin/reload", json={"bundle": str(tmp_path)}, headers=AUTH)
        assert r.status_code == 403 and str(artifacts.bundle.parent.resolve()) in r.text


def test_late_duplicate_future_and_unknown_events_from_many_clients(
        artifacts: Artifacts, bundle: Bundle, tmp_path: Path) -> None:
    """Four clients post the same events at once, each in its own shuffled order, single and in
    batches: out of order, every event id four times, some stamped a day ahead, some of items
    nobody knows. A refused request names each bad event and why; the client resends its
    good ones, as a producer would. Afterwards each user's history holds every good event
    once, in timestamp order, and nothing else."""
    now = int(time.time())
    items = sorted(bundle.items, key=str)[:20]
    users = [70_001, 70_002, 70_003]
    good: dict[int, list[dict[str, Any]]] = {}
    bad: list[dict[str, Any]] = []
    for u in users:
        stamps = random.Random(u).sample(range(now - 30 * 86_400, now), 12)  # out of order
        good[u] = [{"user_id": u, "item_id": items[i], "timestamp": ts, "event_id": f"{u}-{i}"}
                   for i, ts in enumerate(stamps)]
        bad += [{"user_id": u, "item_id": items[0], "timestamp": now + 86_400,
                 "event_id": f"{u}-future"},
                {"user_id": u, "item_id": 987_654_321, "timestamp": now - 5,
                 "event_id": f"{u}-unknown"}]
    bad_ids = {e["event_id"] for e in bad}

    def requests(seed: int) -> list[dict[str, Any]]:
        """The events in batches of 1 to 4 (under the server's 5), bad ones among good ones."""
        events = [e for u in users for e in good[u]] + bad
        random.Random(seed).shuffle(events)
        rng, out = random.Random(seed + 100), []
        while events:
            n = rng.randint(1, 4)
            batch, events = events[:n], events[n:]
            out.append(batch[0] if len(batch) == 1 else {"events": batch})
        return out

    totals = {"received": 0, "stored": 0, "ignored": 0}
    refused: list[str] = []
    lock = threading.Lock()

    def client(url: str, seed: int) -> None:
        with http_client(url) as c:
            for body in requests(seed):
                r = c.post("/events", json=body, headers=AUTH)
                if r.status_code == 422:
                    batch = body.get("events", [body])
                    wrong = set()
                    for problem in r.json()["detail"]:
                        loc = problem["loc"]
                        n = loc[2] if "events" in body else 0
                        assert loc == (["body", "events", n, loc[-1]] if "events" in body
                                       else ["body", loc[-1]]), problem
                        event = batch[n]
                        reason = ("in the future" if event["event_id"].endswith("future")
                                  else "unknown item 987654321")
                        assert reason in problem["msg"], problem
                        wrong.add(n)
                        with lock:
                            refused.append(event["event_id"])
                    assert {batch[n]["event_id"] for n in wrong} <= bad_ids
                    rest = [e for n, e in enumerate(batch) if n not in wrong]
                    assert {e["event_id"] for e in rest}.isdisjoint(bad_ids)
                    if not rest:
                        continue
                    r = c.post("/events", json={"events": rest}, headers=AUTH)
                assert r.status_code == 200, r.text
                with lock:
                    for k in totals:
                        totals[k] += r.json()[k]

    with running(settings_for(artifacts, tmp_path)) as (url, c):
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda s: client(url, s), range(4)))
        histories = {u: c.get(f"/users/{u}/history", params={"n": 200}).json()["behaviours"]
                     for u in users}
    n_good = sum(len(v) for v in good.values())
    # every bad event refused by each of the four clients, every good one sent four times and
    # stored once
    assert sorted(refused) == sorted(list(bad_ids) * 4)
    assert totals == {"received": 4 * n_good, "stored": n_good, "ignored": 3 * n_good}
    for u in users:
        stored = [(b["item_id"], b["timestamp"]) for b in histories[u]]
        expected = sorted(((e["item_id"], e["timestamp"]) for e in good[u]),
                          key=lambda x: -x[1])
        assert stored == expected  # newest first, each once, nothing of the refused


def test_max_future_s_sets_how_far_ahead_an_event_may_be(artifacts: Artifacts,
                                                          tmp_path: Path) -> None:
    strict = Service(settings_for(artifacts, tmp_path / "strict"))  # 300 s
    # made after the service, whose start-up takes seconds on a loaded machine
    ahead = IncomingEvent(3, 5, int(time.time()) + 600, "ten-minutes-ahead")
    try:
        with pytest.raises(EventsRefused, match=r"(600|599|598) s in the future"):
            strict.pipeline.ingest([ahead])
    finally:
        strict.close()
    lenient = Service(settings_for(artifacts, tmp_path / "lenient", max_future_s=3600))
    try:
        assert lenient.pipeline.ingest([ahead]).stored == 1
    finally:
        lenient.close()


def test_an_empty_key_opens_nothing() -> None:
    check = key_check([SecretStr(""), None], "admin is", "BSTREC_ADMIN_KEY")
    with pytest.raises(HTTPException) as refused:
        check("")
    assert refused.value.status_code == 403 and "admin is disabled" in str(refused.value.detail)
