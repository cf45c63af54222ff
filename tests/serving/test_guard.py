"""The store breaker: fail fast while open, one retry per interval, recover on success."""

from __future__ import annotations

import pytest

from bstrec.features.store import FeatureStore, StoreUnavailable
from bstrec.serving.guard import StoreGuard


class Flaky:
    def __init__(self) -> None:
        self.up = True
        self.calls = 0

    def __call__(self, store: FeatureStore) -> str:
        self.calls += 1
        if not self.up:
            raise StoreUnavailable("refused")
        return "ok"


def test_breaker_opens_fails_fast_and_recovers() -> None:
    now = [100.0]
    guard = StoreGuard(None, "redis", retry_s=1.0, clock=lambda: now[0])  # type: ignore[arg-type]
    fn = Flaky()
    assert guard.call(fn) == "ok" and guard.status().ok
    fn.up = False
    with pytest.raises(StoreUnavailable):
        guard.call(fn)
    status = guard.status()
    assert not status.ok and status.error == "refused" and status.down_since is not None
    for _ in range(5):  # open: the store is not called at all
        with pytest.raises(StoreUnavailable):
            guard.call(fn)
    assert fn.calls == 2
    now[0] += 1.5
    fn.up = True
    assert guard.call(fn) == "ok"  # one retry after retry_s, and it closes the breaker
    assert guard.status().ok and guard.status().error is None and fn.calls == 3


class Sharded:
    """A store whose users live on two shards, "a" (even ids) and "b" (odd ids)."""

    def __init__(self) -> None:
        self.down: set[str] = set()
        self.calls = 0

    def shard_of(self, user: object) -> str:
        return "items" if user is None else "ab"[int(str(user)) % 2]

    def read(self, user: int) -> str:
        self.calls += 1
        if self.shard_of(user) in self.down:
            raise StoreUnavailable(f"shard {self.shard_of(user)} refused")
        return f"user {user}"


def test_a_shard_that_fails_opens_its_own_breaker_only() -> None:
    now = [100.0]
    store = Sharded()
    guard = StoreGuard(store, "redis_cluster", retry_s=1.0,  # type: ignore[arg-type]
                       clock=lambda: now[0])
    store.down.add("a")
    with pytest.raises(StoreUnavailable, match="shard a"):
        guard.call(lambda s: s.read(2), user=2)  # type: ignore[attr-defined]
    calls = store.calls
    with pytest.raises(StoreUnavailable):  # user 4 is on the open shard: not tried
        guard.call(lambda s: s.read(4), user=4)  # type: ignore[attr-defined]
    assert store.calls == calls
    # the other shard's users, and the items, are served as before
    assert guard.call(lambda s: s.read(3), user=3) == "user 3"  # type: ignore[attr-defined]
    assert guard.call(lambda s: "items", items=True) == "items"
    status = guard.status()
    assert not status.ok and status.error == "shard a refused"
    store.down.clear()
    now[0] += 1.5
    assert guard.call(lambda s: s.read(4), user=4) == "user 4"  # type: ignore[attr-defined]
    assert guard.status().ok
