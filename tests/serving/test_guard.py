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
