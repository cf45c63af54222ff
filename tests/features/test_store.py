"""Feature store: one suite for both backends (embedded SQLite, real redis-server)."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import random
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from bstrec.data.schema import Dataset
from bstrec.features.store import (
    Event,
    ItemChanges,
    StoreConfig,
    StoreUnavailable,
    id_key,
    key_id,
    loads_features,
    open_store,
    order_key,
)
from bstrec.features.store_embedded import EmbeddedStore
from bstrec.features.store_redis import RedisStore
from tests.features.conftest import RedisServer, StoreFactory
from tests.features.workers import append_shuffled, append_then_die

Row = tuple[Any, Any, int, str]


def store_order(rows: list[Row]) -> list[Row]:
    """P1's behaviour order (timestamp, item id), full ties by event id."""
    return sorted(rows, key=lambda r: (r[2], r[1], r[3]))


def kept(store: Any, user: Any) -> list[tuple[Any, int, str]]:
    return [(b.item_id, b.timestamp, b.event_id) for b in store.behaviours(user)]


def test_append_is_idempotent_by_event_id(make_store: StoreFactory) -> None:
    store, _ = make_store()
    e = Event(1, 10, 100, "e1")
    assert store.append(e) is True
    assert store.append(e) is False
    # the id decides, not the content: a replay with other fields changes nothing
    assert store.append(dataclasses.replace(e, item_id=11, timestamp=200)) is False
    assert kept(store, 1) == [(10, 100, "e1")]
    assert store.append_many([Event(1, 12, 50, "e2"), Event(1, 12, 50, "e2")]) == [True, False]
    assert kept(store, 1) == [(12, 50, "e2"), (10, 100, "e1")]


def test_sequence_is_capped_at_n_keeping_the_latest_in_behaviour_order(make_store: StoreFactory) -> None:
    store, _ = make_store(max_events=5)
    rows: list[Row] = [(1, item, ts, f"e{k}") for k, (item, ts) in enumerate(
        [(5, 10), (3, 10), (9, 20), (1, 30), (7, 30), (2, 5), (4, 40), (4, 40), (8, 30), (6, 1)])]
    for r in rows:
        store.append(Event(*r))
    want = store_order(rows)[-5:]
    assert kept(store, 1) == [(r[1], r[2], r[3]) for r in want]
    before = kept(store, 1)
    # late events older than everything kept: dropped at once, nothing newer evicted
    assert store.append(Event(1, 99, 2, "late")) is False
    assert store.append(Event(1, 1, 30, "e3")) is False  # e3 was evicted: stays out
    assert kept(store, 1) == before
    # a late event that belongs inside the window goes in, evicting the oldest
    assert store.append(Event(1, 0, 35, "mid")) is True
    assert kept(store, 1) == [*before[1:3], (0, 35, "mid"), *before[3:]]
    snap = store.snapshot(1)
    assert list(snap.behaviours) == sorted(snap.behaviours, key=order_key)


def test_ties_order_by_item_id_then_event_id(make_store: StoreFactory) -> None:
    store, _ = make_store()
    rows: list[Row] = [(1, 10, 7, "a"), (1, 9, 7, "d"), (1, 100, 7, "c"), (1, 9, 7, "b"),
                       (1, -3, 7, "e"), (1, 9, 7, "b0"), (1, 9, 7, "b\x1f")]
    store.append_many([Event(*r) for r in rows])
    assert [b.event_id for b in store.behaviours(1)] == ["e", "b", "b\x1f", "b0", "d", "a", "c"]
    # string ids sort bytewise (code points), as polars sorts them offline
    names = ["b", "B", "é", "a", "ab", "a\x01", "a\x1f", "€"]
    store.append_many([Event("u", i, 7, f"s{k}") for k, i in enumerate(names)])
    assert [b.item_id for b in store.behaviours("u")] == sorted(names)
    assert pl.Series(names).sort().to_list() == sorted(names)


def test_a_replayed_evicted_full_tie_stays_out(make_store: StoreFactory) -> None:
    """Same second, same item, other event ids: the replay of the evicted one must not come back
    (an arrival-order tie-break would let it in, evicting its twin)."""
    store, _ = make_store(max_events=2)
    assert store.append_many([Event(1, 3, 5, "a"), Event(1, 3, 5, "b"), Event(1, 1, 6, "c")]) == [
        False, True, True]
    assert store.append(Event(1, 3, 5, "a")) is False
    assert kept(store, 1) == [(3, 5, "b"), (1, 6, "c")]


def test_int_and_str_ids_are_distinct_and_roundtrip(make_store: StoreFactory) -> None:
    store, _ = make_store()
    store.append(Event(7, 1, 1, "x"))
    store.append(Event("7", "1", 2, "y"))
    assert kept(store, 7) == [(1, 1, "x")] and kept(store, "7") == [("1", 2, "y")]
    store.put_items({1: {"category": "int"}, "1": {"category": "str"}, -(2**62): {"category": "neg"}})
    assert store.items([1, "1", -(2**62), 2]) == {1: {"category": "int"}, "1": {"category": "str"},
                                                   -(2**62): {"category": "neg"}}
    for v in (0, -1, 2**63 - 1, -(2**63), "", "a\x1fb", "é€"):
        assert key_id(id_key(v)) == v
    keys = [id_key(v) for v in (-(2**63), -5, 0, 3, 20, 2**63 - 1)]
    assert keys == sorted(keys)
    with pytest.raises(TypeError):
        store.append(Event(1.5, 1, 1, "z"))  # type: ignore[arg-type]


def test_profiles_items_and_behaviours_without_categories(make_store: StoreFactory) -> None:
    store, _ = make_store()
    assert store.snapshot(42).profile is None and store.behaviours(42) == ()
    store.put_profiles({42: {"gender": "F", "age": "25"}})
    store.put_items({10: {"category": "Drama", "genres": ["Drama", "War"], "year": "1995"}})
    assert store.profile(42) == {"gender": "F", "age": "25"}
    assert store.items([10, 11]) == {10: {"category": "Drama", "genres": ["Drama", "War"], "year": "1995"}}
    store.append_many([Event(42, 10, 5, "a"), Event(42, 11, 6, "b"), Event(42, 10, 7, "c")])
    # a behaviour's category is its item's at request time (features/online.py), never a copy
    # frozen at ingest that a later put_items would leave behind
    assert [dataclasses.astuple(b) for b in store.behaviours(42)] == [
        (10, 5, "a"), (11, 6, "b"), (10, 7, "c")]


def _events(n: int, users: int = 1) -> list[Row]:
    rng = random.Random(0)
    # few distinct timestamps and items: many ties for the order to break
    return [(u, rng.randrange(20), rng.randrange(30), f"ev{u}-{k}") for u in range(users) for k in range(n)]


@pytest.mark.parametrize("cap", [1000, 25])
def test_concurrent_threads_append_atomically_and_once(make_store: StoreFactory, cap: int) -> None:
    store, _ = make_store(max_events=cap)
    rows = _events(150, users=2)
    added: list[list[str]] = [[] for _ in range(6)]
    start = threading.Barrier(6)

    def writer(k: int) -> None:
        order = list(rows)
        random.Random(k).shuffle(order)
        start.wait()
        for i in range(0, len(order), 7):
            part = [Event(*r) for r in order[i:i + 7]]
            added[k] += [e.event_id for e, ok in zip(part, store.append_many(part), strict=True) if ok]

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [e for a in added for e in a]
    assert len(flat) == len(set(flat)), "an event was added by two writers"
    if cap >= len(rows):
        assert sorted(flat) == sorted(r[3] for r in rows)
    for u in range(2):
        want = store_order([r for r in rows if r[0] == u])[-cap:]
        assert kept(store, u) == [(r[1], r[2], r[3]) for r in want]


def test_concurrent_processes_append_atomically_and_once(make_store: StoreFactory) -> None:
    store, cfg = make_store(max_events=1000)
    rows = _events(120, users=2)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(3, mp_context=ctx) as pool:
        futures = [pool.submit(append_shuffled, dataclasses.asdict(cfg), rows, seed, 5)
                   for seed in range(3)]
        added = [e for f in futures for e in f.result(timeout=120)]
    assert sorted(added) == sorted(r[3] for r in rows), "each event added by exactly one process"
    for u in range(2):
        assert kept(store, u) == [(r[1], r[2], r[3]) for r in store_order([r for r in rows if r[0] == u])]


def test_embedded_restart_loses_nothing(tmp_path: Path) -> None:
    cfg = StoreConfig(path=str(tmp_path / "s.sqlite"), max_events=3)
    rows: list[Row] = [(1, i, 100 + i, f"e{i}") for i in range(5)]
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=append_then_die, args=(dataclasses.asdict(cfg), rows))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    with open_store(cfg) as store:  # a new process's view after the writer "crashed"
        assert kept(store, 1) == [(2, 102, "e2"), (3, 103, "e3"), (4, 104, "e4")]
        store.put_profiles({1: {"age": "18"}})
        store.put_items({2: {"category": "x"}})
        assert store.append(Event(1, 9, 200, "e9")) is True
    with open_store(cfg) as store:
        assert kept(store, 1) == [(3, 103, "e3"), (4, 104, "e4"), (9, 200, "e9")]
        assert store.profile(1) == {"age": "18"} and store.items([2]) == {2: {"category": "x"}}
        assert store.append(Event(1, 9, 200, "e9")) is False  # idempotence survives the restart


def toy_dataset() -> Dataset:
    events = pl.DataFrame({
        "user_id": [1, 1, 1, 2, 2, 1, 3], "item_id": [10, 11, 10, 10, 12, 12, 11],
        "timestamp": [5, 5, 5, 1, 9, 20, 3], "action": ["click"] * 7, "value": [None] * 7,
        "event_id": [None, None, None, "x", None, None, None]},
        schema_overrides={"value": pl.Float64, "event_id": pl.String})
    items = pl.DataFrame({"item_id": [10, 11, 12], "category": ["a", None, "c"],
                          "tags": [["t1"], [], ["t2", "t3"]]})
    users = pl.DataFrame({"user_id": [1, 2], "age": ["18", "25"]})
    return Dataset("toy", events, items, users, "implicit", user_features=("age",),
                   item_multi_features=("tags",))


def test_load_dataset_seeds_the_last_n_and_is_idempotent(make_store: StoreFactory) -> None:
    store, _ = make_store(max_events=2)
    report = store.load_dataset(toy_dataset(), until=10)
    assert (report.users, report.items, report.behaviours) == (2, 3, 5)
    # user 1 before t=10: (5,10),(5,10),(5,11); the exact duplicate row is dropped, as the
    # samples of an implicit log drop it (PROTOCOL.md P5), so the store holds what was trained on
    assert kept(store, 1) == [(10, 5, "1:10:5:0"), (11, 5, "1:11:5:0")]
    assert kept(store, 2) == [(10, 1, "x"), (12, 9, "2:12:9:0")]
    assert kept(store, 3) == [(11, 3, "3:11:3:0")]
    assert store.profile(1) == {"age": "18"} and store.profile(3) is None
    assert store.items([12]) == {12: {"category": "c", "tags": ["t2", "t3"]}}
    assert store.load_dataset(toy_dataset(), until=10).behaviours == 0
    assert store.load_dataset(toy_dataset()).behaviours == 1  # user 1's event at t=20
    assert kept(store, 1) == [(11, 5, "1:11:5:0"), (12, 20, "1:12:20:0")]


def test_redis_down_raises_store_unavailable_and_recovers(own_redis_server: RedisServer) -> None:
    # What bounds a call on a dead server is the client's socket timeouts and its lack of
    # retries: those are asserted, not a wall-clock duration that a loaded machine could exceed.
    store = RedisStore(own_redis_server.url, max_events=10, prefix="down",
                       connect_timeout_s=0.2, timeout_s=0.3)
    pool = store._r.connection_pool.connection_kwargs
    assert (pool["socket_connect_timeout"], pool["socket_timeout"]) == (0.2, 0.3)
    assert store._r.get_retry().get_retries() == 0
    try:
        assert store.append(Event(1, 1, 1, "a")) is True
        own_redis_server.stop()
        for call in (lambda: store.append(Event(1, 2, 2, "b")), lambda: store.snapshot(1),
                     lambda: store.items([1]), store.ping,
                     lambda: store.load_dataset(toy_dataset())):
            with pytest.raises(StoreUnavailable, match="unreachable"):
                call()
        own_redis_server.start()  # same port; no persistence, so it comes back empty
        store.ping()
        assert store.behaviours(1) == ()
        assert store.append(Event(1, 2, 2, "b")) is True  # the script is loaded again
        assert kept(store, 1) == [(2, 2, "b")]
    finally:
        store.close()


def test_redis_never_up_raises_store_unavailable() -> None:
    from tests.features.conftest import _free_port

    store = open_store(StoreConfig(backend="redis", url=f"redis://127.0.0.1:{_free_port()}/0"))
    with pytest.raises(StoreUnavailable):
        store.snapshot(1)
    store.close()


def test_store_config_rejects_bad_values() -> None:
    from bstrec.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="unknown keys"):
        from_dict(StoreConfig, {"backend": "redis", "max_event": 3})
    with pytest.raises(ConfigError):
        from_dict(StoreConfig, {"max_events": 0})
    with pytest.raises(ConfigError):
        from_dict(StoreConfig, {"backend": "memcached"})


def test_item_reads_follow_updates_and_hand_out_copies(make_store: StoreFactory) -> None:
    """Item features are parsed once per stored text (loads_features): an update is read back,
    and a caller changing a returned dict changes nothing for the next reader."""
    store, _ = make_store()
    store.put_items({1: {"category": "a", "tags": ["x"]}, 2: {"category": "a", "tags": ["x"]}})
    first = store.items([1, 2])
    assert first == {1: {"category": "a", "tags": ["x"]}, 2: {"category": "a", "tags": ["x"]}}
    first[1]["category"] = "changed by a caller"
    assert store.items([1])[1]["category"] == "a"
    store.put_items({1: {"category": "b", "tags": []}})
    assert store.items([1, 2]) == {1: {"category": "b", "tags": []},
                                   2: {"category": "a", "tags": ["x"]}}
    assert loads_features('{"a":1}') == json.loads('{"a":1}')


def test_item_versions_tell_what_changed_without_reading_items(make_store: StoreFactory) -> None:
    """A snapshot carries the item features' version; items_changed(since) gives the items put
    after it, everything for another epoch (None, or after a clear)."""
    store, _ = make_store()
    v0 = store.snapshot(1).items_version
    assert v0 is not None
    store.put_items({1: {"category": "a"}, 2: {"category": "b"}})
    full = store.items_changed(None)
    assert full.full and full.items == {1: {"category": "a"}, 2: {"category": "b"}}
    v1 = store.snapshot(1).items_version
    assert v1 == full.version != v0
    assert store.items_changed(v1) == ItemChanges(v1, {}, False)
    store.append(Event(1, 1, 100, "e1"))  # behaviours and profiles leave the version alone
    store.put_profiles({1: {"age": "3"}})
    assert store.snapshot(1).items_version == v1
    store.put_items({2: {"category": "c"}, 3: {"category": "d"}})
    changed = store.items_changed(v1)
    assert not changed.full and changed.items == {2: {"category": "c"}, 3: {"category": "d"}}
    assert changed.version == store.snapshot(1).items_version != v1
    store.clear()
    after = store.snapshot(1).items_version
    assert after is not None and after[0] != v1[0]  # a new epoch: caches start over
    again = store.items_changed(changed.version)
    assert again.full and again.items == {}
    store.put_items({1: {"category": "a"}})
    assert store.items_changed(changed.version).full
    assert store.snapshot(1).items_version != changed.version


def test_embedded_store_from_before_item_versions_opens(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE items (item_id PRIMARY KEY, features TEXT NOT NULL)")
    db.execute("INSERT INTO items VALUES (7, '{\"category\": \"a\"}')")
    db.commit()
    db.close()
    store = EmbeddedStore(path)
    try:
        assert store.items_changed(None).items == {7: {"category": "a"}}
        v = store.snapshot(1).items_version
        store.put_items({8: {"category": "b"}})
        assert store.items_changed(v).items == {8: {"category": "b"}}
    finally:
        store.close()
