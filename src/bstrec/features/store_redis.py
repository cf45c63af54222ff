"""The Redis feature store: the same interface on a Redis server, or on a Redis Cluster, for
several serving processes.

Keys (``{user}`` is a hash tag, so one user's keys share a cluster slot):

- ``<prefix>:u:{<user>}:seq``  sorted set, score = timestamp, member =
  ``<item key> \\x1f <event id, hex> \\x1f <JSON behaviour>``: Redis orders equal scores by
  member bytes, i.e. by item id, then event id: exactly the behaviour order (store.py ``id_key``).
- ``<prefix>:u:{<user>}:ids``  hash event id -> member, for idempotence (only the kept behaviours).
- ``<prefix>:u:{<user>}:profile``  JSON profile.
- ``<prefix>:items``  hash item key -> JSON features.
- ``<prefix>:items:epoch``, ``<prefix>:items:version``, ``<prefix>:items:changed`` (sorted set,
  item key by the version that last wrote it): the item features' version (store.py
  ``ItemsVersion``); a Redis that lost its keys has no epoch, and the next put starts a new one.

On a Redis Cluster (``cluster=True``) the item keys are ``<prefix>:{items}``,
``<prefix>:{items}:epoch``, ...: the hash tag puts them in one slot, as the script that writes
them and the transaction that reads them need (a single Redis keeps the names above, so that
its existing stores still open). A request then touches two shards at most: its user's, and the
items' for the version (features/online.py caches the item features by that version). The items
are one shard's load and, without replicas, one shard's outage for every request: give the
masters replicas (``--cluster-replicas 1``) to fail over.

Appends run one Lua script per user (atomic: no reader sees a half-applied append, no two
writers interleave). Connection failures and timeouts raise :class:`StoreUnavailable` at once (no
retries that would hold a request); the client's pool reconnects by itself on a later call. On a
cluster, a master that is down fails the calls that touch its slots only; the client refreshes
its slot map (at most once a second, from any live node) and reaches the master again when it
comes back.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.commands.core import Script
from redis.connection import SSLConnection, parse_url
from redis.exceptions import ClusterDownError, RedisClusterUnreachableError, SlotNotCoveredError
from redis.retry import Retry

from bstrec.features.store import (
    Behaviour,
    Event,
    Features,
    FeatureStore,
    ItemChanges,
    ItemId,
    ItemsVersion,
    StoreUnavailable,
    UserId,
    UserSnapshot,
    chunks,
    dumps,
    id_key,
    key_id,
    loads_features,
    new_epoch,
)

# KEYS: seq zset, ids hash. ARGV: cap, then (event id, timestamp, item key, event id hex, JSON) per
# event.
# Returns the ids of the events that are new and still kept after the cap.
_APPEND = """
local cap = tonumber(ARGV[1])
local added = {}
for i = 2, #ARGV, 5 do
  local eid = ARGV[i]
  if redis.call('HEXISTS', KEYS[2], eid) == 0 then
    local member = ARGV[i + 2] .. '\\31' .. ARGV[i + 3] .. '\\31' .. ARGV[i + 4]
    redis.call('ZADD', KEYS[1], ARGV[i + 1], member)
    redis.call('HSET', KEYS[2], eid, member)
    added[#added + 1] = eid
  end
end
local n = redis.call('ZCARD', KEYS[1])
if n > cap then
  local old = redis.call('ZRANGE', KEYS[1], 0, n - cap - 1)
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, n - cap - 1)
  for _, m in ipairs(old) do
    -- JSON escapes control characters, so the last \\31 starts the behaviour's JSON
    redis.call('HDEL', KEYS[2], cjson.decode(string.match(m, '\\31([^\\31]*)$'))['event_id'])
  end
end
local kept = {}
for _, eid in ipairs(added) do
  if redis.call('HEXISTS', KEYS[2], eid) == 1 then kept[#kept + 1] = eid end
end
return kept
"""

# KEYS: epoch, version, items hash, changed zset. ARGV: an epoch (kept if one exists), then
# (item key, JSON features) pairs. One version per call; returns it.
_PUT_ITEMS = """
redis.call('SET', KEYS[1], ARGV[1], 'NX')
local v = redis.call('INCR', KEYS[2])
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  redis.call('ZADD', KEYS[4], v, ARGV[i])
end
return v
"""


# What a down server or master raises; on a cluster also a slot map that no live node could
# refresh, and a master back before it has heard from the others (CLUSTERDOWN).
_UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError, ClusterDownError, SlotNotCoveredError,
                RedisClusterUnreachableError)


class RedisStore(FeatureStore):
    """Redis-backed store (redis-py). Raises StoreUnavailable while the server is unreachable.

    ``cluster=True``: a Redis Cluster; ``url`` names one node or several, comma-separated
    (``redis://h1:7000,redis://h2:7000``), as seeds from which the client learns the others.
    Several seeds let a process start while one of them is down.
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, max_events: int = 50,
                 prefix: str = "bstrec", connect_timeout_s: float = 0.5,
                 timeout_s: float = 1.0, cluster: bool = False) -> None:
        if max_events < 1:
            raise ValueError(f"max_events must be >= 1, got {max_events}")
        self.max_events = max_events
        self.url = url
        self.prefix = prefix
        self.cluster = cluster
        # No retries: a request must fail over within its budget, not wait out a dead server.
        options: dict[str, Any] = {"socket_connect_timeout": connect_timeout_s,
                                   "socket_timeout": timeout_s, "retry": Retry(NoBackoff(), 0),
                                   "decode_responses": True}
        self._r: redis.Redis | RedisCluster | None = None
        self._lock = threading.Lock()
        if cluster:
            if "{" in prefix or "}" in prefix:
                raise ValueError(f"a cluster store's prefix cannot hold braces (they would be the "
                                 f"keys' hash tag): {prefix!r}")
            self._seeds, given = _cluster_seeds(url)
            self._options = {**given, **options}
            items = f"{prefix}:{{items}}"
        else:
            self._r = redis.Redis.from_url(url, **options)
            items = f"{prefix}:items"
        self._append, self._put_items = _script(_APPEND), _script(_PUT_ITEMS)
        self._item_keys = [f"{items}:epoch", f"{items}:version", items, f"{items}:changed"]

    def _client(self) -> redis.Redis | RedisCluster:
        """The client; a cluster's is made on first use, so that a store opens (and a service
        starts, degraded) while the cluster is unreachable, and is made again on a later call."""
        if self._r is not None:
            return self._r
        with self._lock:
            if self._r is None:
                with self._errors():
                    # Made with retries: it asks one node for the command table, and that
                    # node may be a down one, replaced by another on a retry. Then none, as
                    # with a single Redis.
                    made = RedisCluster(startup_nodes=self._seeds, require_full_coverage=False,
                                        **{**self._options, "retry": Retry(
                                            NoBackoff(), max(3, len(self._seeds)))})
                made.set_retry(self._options["retry"])
                self._r = made
            return self._r

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"redis at {self.url} is unreachable: {exc}") from exc

    def _user(self, user_id: UserId, what: str) -> str:
        return f"{self.prefix}:u:{{{id_key(user_id)}}}:{what}"

    def _user_keys(self, user_id: UserId) -> list[str]:
        return [self._user(user_id, "seq"), self._user(user_id, "ids")]

    def _args(self, events: Sequence[Event]) -> list[Any]:
        args: list[Any] = [self.max_events]
        for e in events:
            args += [e.event_id, e.timestamp, id_key(e.item_id), e.event_id.encode().hex(),
                     dumps({"item_id": e.item_id, "timestamp": e.timestamp,
                            "event_id": e.event_id})]
        return args

    def _append_user(self, user_id: UserId, events: Sequence[Event]) -> list[bool]:
        with self._errors():
            kept = set(self._append(keys=self._user_keys(user_id), args=self._args(events),
                                    client=self._client()))
        # an id repeated within one call is new only the first time
        seen: set[str] = set()
        out = []
        for e in events:
            out.append(e.event_id in kept and e.event_id not in seen)
            seen.add(e.event_id)
        return out

    def _append_bulk(self, groups: Sequence[tuple[UserId, Sequence[Event]]]) -> int:
        with self._errors():
            r = self._client()
            if isinstance(r, redis.Redis):
                pipe = r.pipeline(transaction=False)  # loads the script itself when it must
                for user, evs in groups:
                    self._append(keys=self._user_keys(user), args=self._args(evs), client=pipe)
                return sum(len(kept) for kept in pipe.execute())
            return self._append_bulk_cluster(r, groups)

    def _append_bulk_cluster(self, r: RedisCluster,
                             groups: Sequence[tuple[UserId, Sequence[Event]]]) -> int:
        # A cluster pipeline sends each master its users' scripts, but does not load a script
        # that a master lacks (NOSCRIPT): load it on every master first, and once more for the
        # groups of a master restarted meanwhile. Appends are idempotent, so running them
        # again is safe.
        added, todo = 0, list(groups)
        for attempt in range(2):
            r.script_load(_APPEND)
            pipe = r.pipeline(transaction=False)  # type: ignore[no-untyped-call]
            for user, evs in todo:
                self._append(keys=self._user_keys(user), args=self._args(evs), client=pipe)
            results = pipe.execute(raise_on_error=False)
            retry = []
            for group, result in zip(todo, results, strict=True):
                if isinstance(result, redis.exceptions.NoScriptError) and attempt == 0:
                    retry.append(group)
                elif isinstance(result, Exception):
                    raise result
                else:
                    added += len(result)
            if not retry:
                break
            todo = retry
        return added

    def snapshot(self, user_id: UserId) -> UserSnapshot:
        with self._errors():
            r = self._client()
            pipe = r.pipeline(transaction=True)  # MULTI: the reads see one state
            pipe.zrange(self._user(user_id, "seq"), 0, -1, withscores=False)
            pipe.get(self._user(user_id, "profile"))
            if isinstance(r, redis.Redis):
                pipe.mget(self._item_keys[:2])
                members, prof, version = pipe.execute()
            else:
                # the items' keys hash to another slot (likely another master), which a
                # transaction cannot span: the version is read after the user's state, and
                # a reader only ever compares it with the version it read the items at
                members, prof = pipe.execute()
                version = r.mget(self._item_keys[:2])
        out = []
        for m in members:
            b = json.loads(m.rsplit("\x1f", 1)[1])
            # (members written before categories were read at request time carry one: ignored)
            out.append(Behaviour(b["item_id"], b["timestamp"], b["event_id"]))
        return UserSnapshot(user_id=user_id, behaviours=tuple(out),
                            profile=None if prof is None else json.loads(prof),
                            items_version=_version(version))

    def put_profiles(self, profiles: Mapping[UserId, Features]) -> None:
        with self._errors():
            r = self._client()
            for part in chunks(list(profiles.items()), 5_000):
                mapping = {self._user(u, "profile"): dumps(p) for u, p in part}
                if isinstance(r, redis.Redis):
                    r.mset(mapping)
                else:
                    # one MSET per slot (a cluster refuses keys of several slots in one)
                    r.mset_nonatomic(mapping)

    def put_items(self, items: Mapping[ItemId, Features]) -> None:
        with self._errors():
            r = self._client()
            for part in chunks(list(items.items()), 5_000):
                args: list[Any] = [new_epoch()]
                for i, f in part:
                    args += [id_key(i), dumps(f)]
                self._put_items(keys=self._item_keys, args=args, client=r)

    def items_changed(self, since: ItemsVersion | None) -> ItemChanges:
        epoch_key, version_key, items_key, changed_key = self._item_keys
        with self._errors():
            r = self._client()
            pipe = r.pipeline(transaction=True)
            # (GETs, not MGET, which a cluster pipeline refuses)
            pipe.get(epoch_key)
            pipe.get(version_key)
            pipe.zrangebyscore(changed_key, f"({-1 if since is None else since[1]}", "+inf")
            epoch, counter, keys = pipe.execute()
            version = _version([epoch, counter])
            full = since is None or since[0] != version[0]
            found: dict[Any, Any]  # str -> str (decode_responses)
            if full:
                found = r.hgetall(items_key)
            else:
                # read after the version: an item put meanwhile comes with its newer features,
                # which the next version check reads again (no reader is left behind)
                values = r.hmget(items_key, keys) if keys else []
                found = {k: v for k, v in zip(keys, values, strict=True) if v is not None}
        return ItemChanges(version, {key_id(str(k)): loads_features(v) for k, v in found.items()},
                           full)

    def items(self, item_ids: Iterable[ItemId]) -> dict[ItemId, Features]:
        keys = [id_key(i) for i in dict.fromkeys(item_ids)]
        if not keys:
            return {}
        with self._errors():
            values = self._client().hmget(self._item_keys[2], keys)
        return {key_id(k): loads_features(v) for k, v in zip(keys, values, strict=True)
                if v is not None}

    def ping(self) -> None:
        with self._errors():
            r = self._client()
            if isinstance(r, redis.Redis):
                r.ping()
            else:
                # every master: a cluster with one master down is not wholly up
                r.ping(target_nodes=RedisCluster.PRIMARIES)

    def shard_of(self, user_id: UserId | None) -> str:
        """On a cluster, the master (``host:port``) that holds the user's slot (None: the
        items' slot), from the client's slot map; "" on a single Redis, or before the map is
        known."""
        r = self._r
        if not isinstance(r, RedisCluster):
            return ""
        key = self._item_keys[2] if user_id is None else self._user(user_id, "seq")
        try:
            return str(r.nodes_manager.get_node_from_slot(r.keyslot(key)).name)  # type: ignore[no-untyped-call]
        except SlotNotCoveredError:
            return ""

    def clear(self) -> None:
        with self._errors():
            r = self._client()
            # (on a cluster: the keys of every master, deleted one slot at a time)
            keys = list(r.scan_iter(match=f"{self.prefix}:*", count=1_000))
            for part in chunks(keys, 1_000):
                r.delete(*part)

    def close(self) -> None:
        with self._lock:
            if self._r is not None:
                self._r.close()
            if self.cluster:
                self._r = None  # (made again on the next call)


def _script(text: str) -> Script:
    # A Script takes from the client it is registered on only the text's encoding (UTF-8 for
    # every client here): each call names the client, or the pipeline, it runs on.
    return Script(redis.Redis(), text)


def _cluster_seeds(url: str) -> tuple[list[ClusterNode], dict[str, Any]]:
    """``redis://h1:p1,redis://h2:p2`` -> the seed nodes, and the client options the URLs set
    (credentials, TLS for ``rediss://``), which must be the same in every seed."""
    seeds, options = [], []
    for part in url.split(","):
        parsed = parse_url(part.strip())  # type: ignore[no-untyped-call]
        if "path" in parsed:
            raise ValueError(f"a cluster seed is a TCP node, not a socket: {part!r} in {url!r}")
        # (a cluster has database 0 only)
        if parsed.pop("db", 0) != 0:
            raise ValueError(f"a Redis Cluster has database 0 only, got {part!r} in {url!r}")
        host, port = parsed.pop("host", "localhost"), int(parsed.pop("port", 6379))
        seeds.append(ClusterNode(host, port))  # type: ignore[no-untyped-call]
        if parsed.pop("connection_class", None) is SSLConnection:
            parsed["ssl"] = True
        options.append(parsed)
    if any(o != options[0] for o in options):
        raise ValueError(f"the seeds of {url!r} differ in scheme, credentials or options")
    return seeds, options[0]


def _version(raw: list[str | None]) -> ItemsVersion:
    """(epoch, counter) from their keys; no epoch yet: ("", 0), which no put gives."""
    epoch, counter = raw
    return (epoch or "", int(counter or 0)) if epoch else ("", 0)
