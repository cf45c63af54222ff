"""The feature store behind breakers: after a failure the store is skipped for ``retry_s``
(each request answers from fallbacks at once instead of waiting out a connect timeout), then
one call tries it again; the first success closes the breaker. So the service degrades when
Redis goes down and recovers by itself when it returns.

One breaker per shard (``FeatureStore.shard_of``): on a Redis Cluster a master that is down
degrades its own users, and the users of the other masters are served as before. A single
server is one shard, ""."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from bstrec.features.store import FeatureStore, StoreUnavailable, UserId

T = TypeVar("T")


@dataclass(frozen=True)
class StoreStatus:
    ok: bool
    backend: str
    error: str | None  # the last failure while not ok
    down_since: float | None  # wall-clock time of the first failure of this outage


@dataclass
class _Breaker:
    error: str
    down_since: float  # wall clock
    retry_at: float  # the guard's clock


class StoreGuard:
    """Calls into a FeatureStore; raises StoreUnavailable at once while the breaker of the
    call's shard is open."""

    def __init__(self, store: FeatureStore, backend: str, *, retry_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.backend = backend
        self.retry_s = retry_s
        self._clock = clock
        self._lock = threading.Lock()
        self._open: dict[str, _Breaker] = {}  # shard -> its open breaker

    def call(self, fn: Callable[[FeatureStore], T], *, user: UserId | None = None,
             items: bool = False) -> T:
        """``fn(store)``; a StoreUnavailable opens the breaker and is re-raised. A call that
        reads one ``user`` (or the ``items``) goes through that shard's breaker, any other
        through the whole store's ("")."""
        shard = self.store.shard_of(user) if user is not None or items else ""
        with self._lock:
            open_ = self._open.get(shard)
            if open_ is not None and self._clock() < open_.retry_at:
                raise StoreUnavailable(open_.error)
            if open_ is not None:
                # half-open: let this call try; others keep failing fast until it is done
                open_.retry_at = self._clock() + self.retry_s
        try:
            out = fn(self.store)
        except StoreUnavailable as exc:
            with self._lock:
                open_ = self._open.get(shard)
                down_since = time.time() if open_ is None else open_.down_since
                self._open[shard] = _Breaker(str(exc), down_since,
                                             self._clock() + self.retry_s)
            raise
        if shard in self._open:
            with self._lock:
                self._open.pop(shard, None)
        return out

    def probe(self) -> StoreStatus:
        """Ping the store (through the breaker) and report its status (/readyz)."""
        with contextlib.suppress(StoreUnavailable):  # the status says it
            self.call(lambda s: s.ping())
        return self.status()

    def status(self) -> StoreStatus:
        """Not ok while any shard's breaker is open: the last failure, since the first."""
        with self._lock:
            if not self._open:
                return StoreStatus(ok=True, backend=self.backend, error=None, down_since=None)
            last = max(self._open.values(), key=lambda b: b.retry_at)
            return StoreStatus(ok=False, backend=self.backend, error=last.error,
                               down_since=min(b.down_since for b in self._open.values()))
