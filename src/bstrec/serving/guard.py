"""The feature store behind a breaker: after a failure the store is skipped for ``retry_s``
(each request answers from fallbacks at once instead of waiting out a connect timeout), then
one call tries it again; the first success closes the breaker. So the service degrades when
Redis goes down and recovers by itself when it returns."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from bstrec.features.store import FeatureStore, StoreUnavailable

T = TypeVar("T")


@dataclass(frozen=True)
class StoreStatus:
    ok: bool
    backend: str
    error: str | None  # the last failure while not ok
    down_since: float | None  # wall-clock time of the first failure of this outage


class StoreGuard:
    """Calls into a FeatureStore; raises StoreUnavailable at once while the breaker is open."""

    def __init__(self, store: FeatureStore, backend: str, *, retry_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.backend = backend
        self.retry_s = retry_s
        self._clock = clock
        self._lock = threading.Lock()
        self._error: str | None = None
        self._down_since: float | None = None
        self._retry_at = 0.0

    def call(self, fn: Callable[[FeatureStore], T]) -> T:
        """``fn(store)``; a StoreUnavailable opens the breaker and is re-raised."""
        with self._lock:
            if self._error is not None and self._clock() < self._retry_at:
                raise StoreUnavailable(self._error)
            if self._error is not None:
                # half-open: let this call try; others keep failing fast until it is done
                self._retry_at = self._clock() + self.retry_s
        try:
            out = fn(self.store)
        except StoreUnavailable as exc:
            with self._lock:
                if self._error is None:
                    self._down_since = time.time()
                self._error = str(exc)
                self._retry_at = self._clock() + self.retry_s
            raise
        if self._error is not None:
            with self._lock:
                self._error, self._down_since = None, None
        return out

    def probe(self) -> StoreStatus:
        """Ping the store (through the breaker) and report its status (/readyz)."""
        with contextlib.suppress(StoreUnavailable):  # the status says it
            self.call(lambda s: s.ping())
        return self.status()

    def status(self) -> StoreStatus:
        with self._lock:
            return StoreStatus(ok=self._error is None, backend=self.backend, error=self._error,
                               down_since=self._down_since)
