"""The Redis Cluster backend on a real 3-master cluster: one shard per user, concurrent clients,
and a master that dies and comes back. (The store's whole contract runs on the cluster too:
test_store.py through the ``make_store`` parametrisation.)"""

from __future__ import annotations

import dataclasses
import multiprocessing
import random
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from bstrec.features.store import (
    Event,
    StoreConfig,
    StoreUnavailable,
    UserId,
    open_store,
    order_key,
)
from bstrec.features.store_redis import RedisStore
from bstrec.serving.guard import StoreGuard
from bstrec.serving.settings import Settings
from tests.features.conftest import RedisClusterServers, _free_port
from tests.features.workers import append_shuffled

Row = tuple[Any, Any, int, str]


def cluster_store(cluster: RedisClusterServers, **kwargs: Any) -> RedisStore:
    return RedisStore(cluster.url, prefix=f"t{uuid.uuid4().hex[:12]}", cluster=True, **kwargs)


def commandstats(cluster: RedisClusterServers) -> list[dict[str, Any]]:
    """Per master, the calls of each command it has run (left out: those of this connection
    asking it, INFO and the handshake)."""
    out = []
    for node in cluster.nodes:
        with redis.Redis(port=node.port) as r:
            stats = r.info("commandstats")
        out.append({k: v["calls"] for k, v in stats.items()
                    if k not in ("cmdstat_info", "cmdstat_hello")
                    and not k.startswith("cmdstat_client")})
    return out


def user_on(cluster: RedisClusterServers, store: RedisStore, master: int) -> int:
    """The first int user whose keys live on ``master``."""
    return next(u for u in range(10_000) if cluster.node_of(store._user(u, "seq")) == master)


def test_a_users_keys_share_one_slot_and_a_read_touches_its_master_and_the_items(
        redis_cluster: RedisClusterServers) -> None:
    store = cluster_store(redis_cluster)
    try:
        users: list[UserId] = [*range(40), *(f"user-{i}" for i in range(10))]
        store.append_many([Event(u, 1, 10, f"e-{u}") for u in users])
        store.put_profiles({u: {"age": "30"} for u in users})
        store.put_items({1: {"category": "a"}, 2: {"category": "b"}})
        keys = list(store._client().scan_iter(match=f"{store.prefix}:*", count=1_000))
        assert len(keys) == 3 * len(users) + 4  # seq, ids, profile a user; 4 item keys
        for u in users:
            assert {key_slot(store._user(u, w).encode()) for w in ("seq", "ids", "profile")} == {
                key_slot(store._user(u, "seq").encode())}
        assert len({key_slot(k.encode()) for k in store._item_keys}) == 1
        # the users spread over every master: each holds a share of them
        assert {redis_cluster.node_of(store._user(u, "seq")) for u in users} == {0, 1, 2}

        items = redis_cluster.node_of(store._item_keys[0])
        user_master = next(m for m in range(3) if m != items)
        other = ({0, 1, 2} - {items, user_master}).pop()
        user = user_on(redis_cluster, store, user_master)
        store.append(Event(user, 2, 20, "read-me"))
        before = commandstats(redis_cluster)
        snap = store.snapshot(user)
        after = commandstats(redis_cluster)
        assert [b.event_id for b in snap.behaviours][-1] == "read-me"
        assert snap.profile == {"age": "30"}
        assert snap.items_version == store.items_changed(None).version
        assert after[other] == before[other], "a read touched a master that holds nothing of it"
        assert after[user_master] != before[user_master] and after[items] != before[items]
    finally:
        store.clear()
        store.close()


def test_concurrent_clients_on_many_shards_lose_and_duplicate_nothing(
        redis_cluster: RedisClusterServers) -> None:
    """Three processes append the same events (shuffled, in batches mixing users of every
    master) while threads read: each event is added once, and every read is a whole append."""
    store = cluster_store(redis_cluster, max_events=1_000)
    cfg = StoreConfig(backend="redis_cluster", url=store.url, prefix=store.prefix,
                      max_events=1_000)
    rng = random.Random(1)
    users = 12
    rows: list[Row] = [(u, rng.randrange(15), rng.randrange(40), f"ev{u}-{k}")
                       for u in range(users) for k in range(25)]
    stop = threading.Event()
    seen: dict[int, int] = {}
    errors: list[str] = []

    def reader(k: int) -> None:
        with open_store(cfg) as mine:
            while not stop.is_set():
                u = (k * 7 + len(seen)) % users
                got = mine.behaviours(u)
                if list(got) != sorted(got, key=order_key) or len({b.event_id for b in got}) != len(got):
                    errors.append(f"user {u}: {got}")
                # appends only add here (no cap reached): a read never sees fewer than before
                if len(got) < seen.get(u, 0):
                    errors.append(f"user {u} went from {seen[u]} to {len(got)} behaviours")
                seen[u] = max(seen.get(u, 0), len(got))

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(2)]
    try:
        for t in threads:
            t.start()
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(3, mp_context=ctx) as pool:
            futures = [pool.submit(append_shuffled, dataclasses.asdict(cfg), rows, seed, 9)
                       for seed in range(3)]
            added = [e for f in futures for e in f.result(timeout=120)]
        stop.set()
        for t in threads:
            t.join()
        assert not errors, errors[:3]
        assert sorted(added) == sorted(r[3] for r in rows), "each event added by one writer"
        for u in range(users):
            want = sorted((r for r in rows if r[0] == u), key=lambda r: (r[2], r[1], r[3]))
            assert [(b.item_id, b.timestamp, b.event_id) for b in store.behaviours(u)] == [
                (r[1], r[2], r[3]) for r in want]
    finally:
        stop.set()
        store.clear()
        store.close()


def test_a_master_down_fails_its_users_at_once_and_they_recover_when_it_returns(
        own_redis_cluster: RedisClusterServers) -> None:
    cluster = own_redis_cluster
    # what bounds a call on a dead master is the socket timeouts and the lack of retries
    # (asserted), not a wall-clock duration that a loaded machine could exceed
    store = cluster_store(cluster, max_events=10, connect_timeout_s=0.2, timeout_s=0.3)
    client = store._client()
    assert client.retry.get_retries() == 0
    node = client.get_default_node().redis_connection
    assert node is not None
    kwargs = node.connection_pool.connection_kwargs
    assert (kwargs["socket_connect_timeout"], kwargs["socket_timeout"]) == (0.2, 0.3)
    guard = StoreGuard(store, "redis_cluster", retry_s=0.05)
    try:
        items = cluster.node_of(store._item_keys[0])
        victim = (items + 1) % 3  # not the items' master: the others' users keep their reads
        down = user_on(cluster, store, victim)
        up = user_on(cluster, store, (items + 2) % 3)
        store.put_items({7: {"category": "x"}})
        for u in (down, up):
            store.put_profiles({u: {"age": "20"}})
            assert store.append(Event(u, 7, 100, f"a{u}")) is True

        cluster.nodes[victim].stop()
        for call in (lambda: store.append(Event(down, 7, 101, "b")), lambda: store.snapshot(down),
                     store.ping, lambda: store.put_profiles({down: {"age": "21"}})):
            with pytest.raises(StoreUnavailable, match="unreachable"):
                call()
        # the service's guard degrades the dead master's users as with a single Redis, and
        # only them: its breaker is that master's (serving/guard.py)
        with pytest.raises(StoreUnavailable):
            guard.call(lambda s: s.snapshot(down), user=down)
        assert not guard.status().ok
        assert guard.call(lambda s: s.snapshot(up), user=up).profile == {"age": "20"}
        assert guard.call(lambda s: s.items([7]), items=True) == {7: {"category": "x"}}
        assert store.shard_of(down) != store.shard_of(up) != ""
        # users of the live masters, and the items, are served as before
        snap = store.snapshot(up)
        assert [b.event_id for b in snap.behaviours] == [f"a{up}"] and snap.profile == {"age": "20"}
        assert store.append(Event(up, 7, 102, "c")) is True
        assert store.items([7]) == {7: {"category": "x"}}
        # a process starting now learns the cluster from the seeds that answer
        with open_store(StoreConfig(backend="redis_cluster", url=cluster.url,
                                    prefix=store.prefix)) as fresh:
            assert len(fresh.behaviours(up)) == 2
            with pytest.raises(StoreUnavailable):
                fresh.behaviours(down)

        cluster.nodes[victim].start()  # same port and nodes.conf; empty (no persistence)
        deadline = time.monotonic() + 30
        while True:
            try:
                time.sleep(0.06)  # past the guard's retry_s
                assert guard.call(lambda s: s.snapshot(down), user=down).behaviours == ()
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "did not recover after the master came back"
        assert guard.status().ok
        store.ping()
        assert store.append(Event(down, 7, 103, "d")) is True  # the script is loaded again
        assert [b.event_id for b in store.behaviours(down)] == ["d"]
        assert [b.event_id for b in store.behaviours(up)] == [f"a{up}", "c"]
        cluster.wait_ok()
    finally:
        store.close()


def test_a_cluster_store_opens_while_the_cluster_is_down() -> None:
    """As a service must start (degraded) without its store: the client is made on first use."""
    store = open_store(StoreConfig(backend="redis_cluster",
                                   url=f"redis://127.0.0.1:{_free_port()}",
                                   connect_timeout_s=0.2, timeout_s=0.2))
    try:
        for call in (lambda: store.snapshot(1), store.ping):
            with pytest.raises(StoreUnavailable):
                call()
    finally:
        store.close()


def test_cluster_urls_and_prefixes_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="database 0 only"):
        RedisStore("redis://127.0.0.1:7000/1", cluster=True)
    with pytest.raises(ValueError, match="differ"):
        RedisStore("redis://127.0.0.1:7000,rediss://127.0.0.1:7001", cluster=True)
    with pytest.raises(ValueError, match="not a socket"):
        RedisStore("unix:///tmp/redis.sock", cluster=True)
    with pytest.raises(ValueError, match="braces"):
        RedisStore("redis://127.0.0.1:7000", prefix="a{b}", cluster=True)
    seeds = RedisStore("redis://u:pw@10.0.0.1:7000, redis://u:pw@10.0.0.2:7001", cluster=True)
    assert [(n.host, n.port) for n in seeds._seeds] == [("10.0.0.1", 7000), ("10.0.0.2", 7001)]
    assert (seeds._options["username"], seeds._options["password"]) == ("u", "pw")
    settings = Settings(bundle=tmp_path, store="redis_cluster", redis_url="redis://h:7000")
    assert settings.store_config().backend == "redis_cluster"
