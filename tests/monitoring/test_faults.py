"""Fault injection: replays of the synthetic test period against a real server, each with one
fault production knows, and the live alert on /metrics that must see it; a healthy replay
breaches none. The same faults run on ML-1M in benchmarks/bench_feedback.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from bstrec.data.build import build
from bstrec.monitoring.faults import empty_source_bundle, stale_bundle
from bstrec.monitoring.replay import ReplayConfig, load_replay_log, replay
from bstrec.serving.bundle import build_bundle
from bstrec.serving.settings import Settings
from bstrec.training.task import train_ranker
from tests.features.conftest import RedisServer
from tests.serving.fixtures import running

KEY = "fault-key"
DAY_S = 86_400.0


def alerts_of(text: str) -> dict[str, bool]:
    """/metrics' bstrec_alert gauges: alert name -> breached."""
    out: dict[str, bool] = {}
    for line in text.splitlines():
        if line.startswith("bstrec_alert{"):
            name = line.split('name="', 1)[1].split('"', 1)[0]
            out[name] = out.get(name, False) or line.endswith(" 1.0")
    return out


@dataclass(frozen=True)
class Served:
    samples: Path
    bundle: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    """A synthetic log of 600 users and a toy BST bundle (no retriever) on it. The serving
    tests' log has 80 users: a test period of about a hundred requests from a few dozen users,
    whose PSI is noise well above any threshold (each user's requests share their categories);
    600 users give over a thousand test requests, enough for the default thresholds."""
    threads = torch.get_num_threads()  # training sets it process-wide; given back below
    root = tmp_path_factory.mktemp("faults")
    samples = root / "samples"
    build("synthetic-order", samples,
          dataset_options={"n_users": 600, "events_per_user": [10, 30]})
    train_ranker("bst", samples, root / "bst", model_overrides={
        "mlp": [16], "item_dim": 8, "cat_dim": 4, "pos_dim": 4, "heads": 2, "embed_dim": 4},
        train_overrides={"max_epochs": 1, "batch_size": 256, "num_threads": 1}, progress=False)
    torch.set_num_threads(threads)
    return Served(samples, build_bundle(samples, root / "bst", root / "bundle", version="A"))


def run(served: Served, tmp_path: Path, *, config: ReplayConfig | None = None,
        **settings: object) -> dict[str, bool]:
    """A replay of the whole test period (the store seeded with what came before) and the
    alerts at its end."""
    base: dict[str, object] = {"bundle": served.bundle, "api_key": KEY,
                               "store_path": str(tmp_path / "store.sqlite"),
                               "seed_events": served.samples, "seed_until": "test",
                               "alert_window": 100_000}
    with running(Settings(**(base | settings))) as (url, client):  # type: ignore[arg-type]
        result = replay(served.samples, url,
                        config or ReplayConfig(api_key=KEY, seed_history=False), progress=False)
        assert result.requests > 1_000 and result.errors == 0
        return alerts_of(client.get("/metrics").text)


def test_a_healthy_replay_breaches_no_alert(served: Served, tmp_path: Path) -> None:
    alerts = run(served, tmp_path)
    assert {"degraded_share", "bundle_age", "empty_source:item_cf",
            "feature_psi:last_category"} <= alerts.keys()
    assert [name for name, breached in alerts.items() if breached] == []


def test_a_frozen_feature_breaches_its_drift_alert(served: Served, tmp_path: Path,
                                                   ) -> None:
    dataset, _ = load_replay_log(served.samples)
    frozen = dataset.events["item_id"].mode().to_list()[0]
    alerts = run(served, tmp_path,
                 config=ReplayConfig(api_key=KEY, seed_history=False, freeze_item=frozen))
    assert alerts["feature_psi:last_category"]


def test_a_stale_bundle_breaches_bundle_age(served: Served, tmp_path: Path) -> None:
    _, test_start = load_replay_log(served.samples)
    stale = stale_bundle(served.bundle, tmp_path / "stale", data_end=test_start - 90 * DAY_S)
    alerts = run(served, tmp_path, bundle=stale)
    assert alerts["bundle_age"]
    assert not alerts["degraded_share"]


def test_an_empty_source_breaches_its_alert(served: Served, tmp_path: Path) -> None:
    empty = empty_source_bundle(served.bundle, tmp_path / "empty")
    alerts = run(served, tmp_path, bundle=empty)
    assert alerts["empty_source:item_cf"]
    assert not alerts.get("empty_source:two_tower", False)


def test_the_store_down_breaches_degraded_share(served: Served, tmp_path: Path,
                                                redis_server: RedisServer) -> None:
    base: dict[str, object] = {"bundle": served.bundle, "api_key": KEY, "store": "redis",
                               "redis_url": redis_server.url, "alert_window": 100_000}
    with running(Settings(**base)) as (url, client):  # type: ignore[arg-type]
        redis_server.stop()
        # the events cannot be stored either (503): counted, not fatal
        result = replay(served.samples, url,
                        ReplayConfig(api_key=KEY, seed_history=False, max_errors=100_000),
                        progress=False)
        assert result.requests > 1_000 and result.errors > 0
        alerts = alerts_of(client.get("/metrics").text)
    assert alerts["degraded_share"]
