"""The Redis feature store: the same interface on a Redis server, for several serving processes.

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

Appends run one Lua script per user (atomic: no reader sees a half-applied append, no two
writers interleave). Connection failures and timeouts raise :class:`StoreUnavailable` at once (no
retries that would hold a request); the client's pool reconnects by itself on a later call.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import redis
from redis.backoff import NoBackoff
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


class RedisStore(FeatureStore):
    """Redis-backed store (redis-py). Raises StoreUnavailable while the server is unreachable."""

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, max_events: int = 50,
                 prefix: str = "bstrec", connect_timeout_s: float = 0.5,
                 timeout_s: float = 1.0) -> None:
        if max_events < 1:
            raise ValueError(f"max_events must be >= 1, got {max_events}")
        self.max_events = max_events
        self.url = url
        self.prefix = prefix
        # No retries: a request must fail over within its budget, not wait out a dead server.
        self._r = redis.Redis.from_url(url, socket_connect_timeout=connect_timeout_s,
                                       socket_timeout=timeout_s, retry=Retry(NoBackoff(), 0),
                                       decode_responses=True)
        self._append = self._r.register_script(_APPEND)
        self._put_items = self._r.register_script(_PUT_ITEMS)
        self._item_keys = [f"{prefix}:items:epoch", f"{prefix}:items:version", f"{prefix}:items",
                           f"{prefix}:items:changed"]

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as exc:
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
            kept = set(self._append(keys=self._user_keys(user_id), args=self._args(events)))
        # an id repeated within one call is new only the first time
        seen: set[str] = set()
        out = []
        for e in events:
            out.append(e.event_id in kept and e.event_id not in seen)
            seen.add(e.event_id)
        return out

    def _append_bulk(self, groups: Sequence[tuple[UserId, Sequence[Event]]]) -> int:
        with self._errors():
            pipe = self._r.pipeline(transaction=False)
            for user, evs in groups:
                self._append(keys=self._user_keys(user), args=self._args(evs), client=pipe)
            return sum(len(kept) for kept in pipe.execute())

    def snapshot(self, user_id: UserId) -> UserSnapshot:
        with self._errors():
            pipe = self._r.pipeline(transaction=True)  # MULTI: both reads see the same state
            pipe.zrange(self._user(user_id, "seq"), 0, -1, withscores=False)
            pipe.get(self._user(user_id, "profile"))
            pipe.mget(self._item_keys[:2])
            members, prof, version = pipe.execute()
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
            for part in chunks(list(profiles.items()), 5_000):
                self._r.mset({self._user(u, "profile"): dumps(p) for u, p in part})

    def put_items(self, items: Mapping[ItemId, Features]) -> None:
        with self._errors():
            for part in chunks(list(items.items()), 5_000):
                args: list[Any] = [new_epoch()]
                for i, f in part:
                    args += [id_key(i), dumps(f)]
                self._put_items(keys=self._item_keys, args=args)

    def items_changed(self, since: ItemsVersion | None) -> ItemChanges:
        epoch_key, version_key, items_key, changed_key = self._item_keys
        with self._errors():
            pipe = self._r.pipeline(transaction=True)
            pipe.mget([epoch_key, version_key])
            pipe.zrangebyscore(changed_key, f"({-1 if since is None else since[1]}", "+inf")
            raw_version, keys = pipe.execute()
            version = _version(raw_version)
            full = since is None or since[0] != version[0]
            found: dict[Any, Any]  # str -> str (decode_responses)
            if full:
                found = self._r.hgetall(items_key)
            else:
                # read after the version: an item put meanwhile comes with its newer features,
                # which the next version check reads again (no reader is left behind)
                values = self._r.hmget(items_key, keys) if keys else []
                found = {k: v for k, v in zip(keys, values, strict=True) if v is not None}
        return ItemChanges(version, {key_id(str(k)): loads_features(v) for k, v in found.items()},
                           full)

    def items(self, item_ids: Iterable[ItemId]) -> dict[ItemId, Features]:
        keys = [id_key(i) for i in dict.fromkeys(item_ids)]
        if not keys:
            return {}
        with self._errors():
            values = self._r.hmget(f"{self.prefix}:items", keys)
        return {key_id(k): loads_features(v) for k, v in zip(keys, values, strict=True)
                if v is not None}

    def ping(self) -> None:
        with self._errors():
            self._r.ping()

    def clear(self) -> None:
        with self._errors():
            keys = list(self._r.scan_iter(match=f"{self.prefix}:*", count=1_000))
            for part in chunks(keys, 1_000):
                self._r.delete(*part)

    def close(self) -> None:
        self._r.close()


def _version(raw: list[str | None]) -> ItemsVersion:
    """(epoch, counter) from their keys; no epoch yet: ("", 0), which no put gives."""
    epoch, counter = raw
    return (epoch or "", int(counter or 0)) if epoch else ("", 0)
