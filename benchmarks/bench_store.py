"""The online feature store on Redis: memory per user and per item, and a failover check on a
Redis Cluster, for docs/scaling.md's sizing.

Bytes are measured from our store, not estimated: users of MovieLens 1M (profile and their last
behaviours, written as POST /events writes them: event id ``user:item:timestamp``) and its item
table go into a real redis-server, and ``MEMORY USAGE`` (exact: ``SAMPLES 0``) is summed over
each user's keys and over the item keys; the growth of ``used_memory`` per user cross-checks it
(it also counts the keyspace's own entries). Then a 3-master Redis Cluster (no replicas) holds
users, one master is killed: the users of its slots must fail at once with StoreUnavailable (the
service answers them from its fallbacks, degraded), the others be served as before, and all be
served again once the master is back on its port.

    python benchmarks/bench_store.py --data-dir /work/shared/data
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import polars as pl
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
# the launchers the store tests use (a redis-server, a cluster formed slot by slot)
from tests.features.conftest import RedisClusterServers, RedisServer  # noqa: E402

from bstrec.data.movielens import load_ml1m  # noqa: E402
from bstrec.features.store import Event, StoreUnavailable, id_key  # noqa: E402
from bstrec.features.store_redis import RedisStore  # noqa: E402
from common import machine, merge_result, now, update_section  # noqa: E402

COMMAND = "python benchmarks/bench_store.py"


def user_events(data_dir: Path, users: int, length: int) -> tuple[dict[int, list[Event]],
                                                                    dict[int, dict[str, Any]],
                                                                    dict[int, dict[str, Any]]]:
    """The last ``length`` events of the first ``users`` users holding that many, their profiles,
    and every item's features, from MovieLens 1M."""
    ds = load_ml1m(data_dir / "ml-1m")
    events = (ds.events.sort(["user_id", "timestamp", "item_id"])
              .filter(pl.len().over("user_id") >= length)
              .group_by("user_id", maintain_order=True).tail(length))
    chosen = events["user_id"].unique(maintain_order=True).head(users)
    by_user: dict[int, list[Event]] = {}
    for u, i, ts in events.filter(pl.col("user_id").is_in(chosen.implode())).select(
            "user_id", "item_id", "timestamp").iter_rows():
        by_user.setdefault(u, []).append(Event(u, i, ts, f"{u}:{i}:{ts}"))
    profiles = {r.pop("user_id"): r for r in ds.users.filter(
        pl.col("user_id").is_in(chosen.implode())).iter_rows(named=True)}
    items = {r.pop("item_id"): r for r in ds.items.iter_rows(named=True)}
    return by_user, profiles, items


def memory(r: redis.Redis | redis.RedisCluster, keys: list[str]) -> int:
    return sum(int(r.memory_usage(k, samples=0) or 0) for k in keys)


def used_memory(r: redis.Redis) -> int:
    return int(r.info("memory")["used_memory"])


def measure_single(url: str, by_user: dict[int, list[Event]], profiles: dict[int, dict[str, Any]],
                   items: dict[int, dict[str, Any]], max_events: int) -> dict[str, Any]:
    r = redis.Redis.from_url(url, decode_responses=True)
    out: dict[str, Any] = {}
    for name, length in (("full", max_events), ("half", max_events // 2)):
        store = RedisStore(url, max_events=max_events, prefix=f"b{uuid.uuid4().hex[:8]}")
        before = used_memory(r)
        for evs in by_user.values():
            store.append_many(evs[-length:])
        store.put_profiles(profiles)
        per_user = [memory(r, [store._user(u, w) for w in ("seq", "ids", "profile")])
                    for u in by_user]
        profile = [memory(r, [store._user(u, "profile")]) for u in by_user]
        some = next(iter(by_user))
        out[name] = {
            "behaviours": length, "users": len(by_user),
            "bytes_per_user": round(statistics.mean(per_user)),
            "bytes_per_user_max": max(per_user),
            "profile_bytes": round(statistics.mean(profile)),
            "used_memory_per_user": round((used_memory(r) - before) / len(by_user)),
            "encodings": {w: r.object("encoding", store._user(some, w))
                          for w in ("seq", "ids")},
        }
        store.clear()
        store.close()
    store = RedisStore(url, max_events=max_events, prefix=f"b{uuid.uuid4().hex[:8]}")
    before = used_memory(r)
    store.put_items(items)
    out["items"] = {"items": len(items),
                    "bytes_per_item": round(memory(r, store._item_keys) / len(items)),
                    "used_memory_per_item": round((used_memory(r) - before) / len(items)),
                    "example": store.items([next(iter(items))])}
    store.clear()
    store.close()
    r.close()
    return out


def failover(binary: str, by_user: dict[int, list[Event]], profiles: dict[int, dict[str, Any]],
             items: dict[int, dict[str, Any]], max_events: int) -> dict[str, Any]:
    """Kill one master of a 3-master cluster under our store; what fails, what is served, when
    it comes back."""
    with tempfile.TemporaryDirectory() as tmp:
        cluster = RedisClusterServers(binary, Path(tmp) / "cluster")
        cluster.start()
        store = RedisStore(cluster.url, max_events=max_events, prefix="bench", cluster=True,
                           connect_timeout_s=0.5, timeout_s=1.0)
        try:
            store.put_items(items)
            store.put_profiles(profiles)
            for evs in by_user.values():
                store.append_many(evs)
            want = {u: [e.event_id for e in evs] for u, evs in by_user.items()}
            stored = {u: [b.event_id for b in store.behaviours(u)] for u in by_user}
            r = store._client()
            assert isinstance(r, redis.RedisCluster)
            full_bytes = statistics.mean(
                memory(r, [store._user(u, w) for w in ("seq", "ids", "profile")])
                for u in by_user)
            items_master = cluster.node_of(store._item_keys[0])
            victim = (items_master + 1) % len(cluster.nodes)
            on_victim = {u for u in by_user if cluster.node_of(store._user(u, "seq")) == victim}
            cluster.nodes[victim].stop()
            failed, served, wrong, fail_ms = 0, 0, 0, []
            for u in by_user:
                t0 = time.perf_counter()
                try:
                    got = [b.event_id for b in store.behaviours(u)]
                except StoreUnavailable:
                    fail_ms.append((time.perf_counter() - t0) * 1e3)
                    failed += u in on_victim
                    wrong += u not in on_victim
                    continue
                served += u not in on_victim and got == want[u]
                wrong += u in on_victim or got != want[u]
            items_served = store.items(list(items)[:100]) == {
                i: items[i] for i in list(items)[:100]}
            t_restart = time.perf_counter()
            cluster.nodes[victim].start()
            recovered_s = None
            while time.perf_counter() - t_restart < 60:
                try:
                    store.behaviours(next(iter(on_victim)))
                    recovered_s = time.perf_counter() - t_restart
                    break
                except StoreUnavailable:
                    time.sleep(0.05)
            # the master came back empty (no persistence): its users' events are written again
            if recovered_s is not None:
                for u in on_victim:
                    store.append_many(by_user[u])
            after = {u: [b.event_id for b in store.behaviours(u)] for u in by_user}
            ok = (stored == want and failed == len(on_victim) and wrong == 0
                  and served == len(by_user) - len(on_victim) and items_served
                  and recovered_s is not None and after == want)
            return {
                "masters": len(cluster.nodes), "failover_degraded_ok": ok,
                "users": len(by_user), "users_on_killed_master": len(on_victim),
                "failed_fast": failed, "served_from_live_masters": served, "wrong": wrong,
                "items_served": items_served,
                "failure_ms_median": round(statistics.median(fail_ms), 2) if fail_ms else None,
                "failure_ms_max": round(max(fail_ms), 2) if fail_ms else None,
                "recovered_after_restart_s": None if recovered_s is None else round(recovered_s, 2),
                "bytes_per_user_full": round(full_bytes),
                "setup": "no replicas, cluster-require-full-coverage no, node timeout 1 s, "
                         "client timeouts 0.5 s connect / 1 s read, no retries",
            }
        finally:
            store.close()
            cluster.stop()


def markdown(store: dict[str, Any], cl: dict[str, Any]) -> str:
    full, half, it = store["single"]["full"], store["single"]["half"], store["single"]["items"]
    lines = [
        "## Online store: memory per user and item, Redis Cluster failover",
        "",
        f"`{COMMAND}` ({store['date']}; {store['machine']['cpu']}, redis-server "
        f"{store['redis_version']}; results: `benchmarks/results/scale.json` keys `store`, "
        "`redis_cluster`). MovieLens 1M users and items, behaviours written as POST /events "
        "writes them; bytes from `MEMORY USAGE ... SAMPLES 0` summed over our keys.",
        "",
        "| what | stored | bytes (MEMORY USAGE) | used_memory growth |",
        "|---|---|---|---|",
        f"| user, full sequence | {full['behaviours']} behaviours + profile | "
        f"{full['bytes_per_user']:,} | {full['used_memory_per_user']:,} |",
        f"| user, half sequence | {half['behaviours']} behaviours + profile | "
        f"{half['bytes_per_user']:,} | {half['used_memory_per_user']:,} |",
        f"| user's profile alone | {len(store['profile_fields'])} fields | "
        f"{full['profile_bytes']:,} | |",
        f"| item | {', '.join(store['item_fields'])} | {it['bytes_per_item']:,} | "
        f"{it['used_memory_per_item']:,} |",
        "",
        f"Encodings of a full user: sequence `{full['encodings']['seq']}`, ids "
        f"`{full['encodings']['ids']}` (a member is over the 64 bytes that keep a small zset "
        f"or hash in a listpack). On the cluster a full user took {cl['bytes_per_user_full']:,} "
        "bytes.",
        "",
        f"Failover, {cl['masters']} masters ({cl['setup']}): {cl['users']} users, "
        f"{cl['users_on_killed_master']} on the killed master. Those failed at once with "
        f"StoreUnavailable ({cl['failed_fast']}, median {cl['failure_ms_median']} ms, max "
        f"{cl['failure_ms_max']} ms), the {cl['served_from_live_masters']} others were served "
        f"unchanged (wrong answers: {cl['wrong']}; items served: {cl['items_served']}); after "
        f"the master restarted on its port its users were served again within "
        f"{cl['recovered_after_restart_s']} s. Degraded and recovered as expected: "
        f"**{cl['failover_degraded_ok']}**.",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--users", type=int, default=500)
    ap.add_argument("--max-events", type=int, default=50, help="the store's cap (StoreConfig)")
    args = ap.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found on PATH (Debian: apt-get install redis-server)")
    by_user, profiles, items = user_events(args.data_dir, args.users, args.max_events)
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(binary, Path(tmp) / "redis")
        server.start()
        try:
            single = measure_single(server.url, by_user, profiles, items, args.max_events)
            with redis.Redis(port=server.port) as r:
                version = r.info("server")["redis_version"]
        finally:
            server.stop()
    cl = failover(binary, by_user, profiles, items, args.max_events)
    some_item = next(iter(items))
    result = {"date": now(), "machine": machine(), "command": COMMAND,
              "redis_version": version, "max_events": args.max_events,
              "profile_fields": sorted(next(iter(profiles.values()))),
              "item_fields": sorted(items[some_item]), "item_key_example": id_key(some_item),
              "single": single}
    merge_result("scale", "store", result)
    merge_result("scale", "redis_cluster", {**cl, "date": result["date"], "command": COMMAND})
    update_section("scale-store", markdown(result, cl))
    print(markdown(result, cl))


if __name__ == "__main__":
    main()
