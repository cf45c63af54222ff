"""Functions run in child processes by the concurrency and restart tests (importable by spawn)."""

from __future__ import annotations

import os
import random
from typing import Any

from bstrec.config import from_dict
from bstrec.features.store import Event, StoreConfig, open_store


def append_shuffled(cfg: dict[str, Any], events: list[tuple[Any, Any, int, str]], seed: int,
                    batch: int) -> list[str]:
    """Append ``events`` in a seeded shuffle, ``batch`` at a time; the ids this writer added."""
    order = list(events)
    random.Random(seed).shuffle(order)
    added: list[str] = []
    with open_store(from_dict(StoreConfig, cfg)) as store:
        for i in range(0, len(order), batch):
            part = [Event(*e) for e in order[i:i + batch]]
            added += [e.event_id for e, ok in zip(part, store.append_many(part), strict=True) if ok]
    return added


def append_then_die(cfg: dict[str, Any], events: list[tuple[Any, Any, int, str]]) -> None:
    """Append and exit at once, without closing anything (a crash, as far as the store knows)."""
    store = open_store(from_dict(StoreConfig, cfg))
    for e in events:
        store.append(Event(*e))
    os._exit(0)
