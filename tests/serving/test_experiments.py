"""Experiments in the service: two bundles split by user (A/B), a shadow bundle logged and never
served, the stochastic policy with its propensities, a popularity-only ranking, live alerts on
/metrics. Against a real server, with the impression log read back."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from bstrec.features.store import FeatureStore
from bstrec.monitoring.experiments import arm_of
from bstrec.monitoring.impressions import read_log
from bstrec.serving.bundle import load_bundle
from bstrec.serving.guard import StoreGuard
from bstrec.serving.pipeline import Pipeline
from bstrec.serving.settings import Settings
from tests.serving.fixtures import Artifacts, copy_bundle, running

NOW = 1_700_000_000
SLOW = 3_600.0  # a flush interval no test waits for: the server's shutdown writes the log


def settings_for(artifacts: Artifacts, tmp_path: Path, **overrides: object) -> Settings:
    base: dict[str, object] = {"bundle": artifacts.bundle, "api_key": "k",
                               "store_path": str(tmp_path / "store.sqlite"),
                               "seed_events": artifacts.samples,
                               "impression_log": tmp_path / "log", "impression_flush_s": SLOW}
    return Settings(**(base | overrides))  # type: ignore[arg-type]


def users(artifacts: Artifacts) -> list[int]:
    return sorted(artifacts.dataset().users["user_id"].to_list())[:40]


def test_ab_split_serves_each_user_one_arm_and_labels_it(artifacts: Artifacts,
                                                         tmp_path: Path) -> None:
    settings = settings_for(artifacts, tmp_path, bundle_b=artifacts.bundle_b, share_b=0.5,
                            experiment_salt="exp1")
    seen: dict[str, set[str]] = {}
    with running(settings) as (_, client):
        for user in users(artifacts) * 2:
            body = client.get("/recommend", params={"user_id": user, "k": 5, "now": NOW}).json()
            assert body["arm"] == arm_of(str(user), 0.5, "exp1")
            # arm A answers with the main bundle, arm B with the other one
            assert body["model_version"] == {"A": "A", "B": "B"}[body["arm"]]
            seen.setdefault(str(user), set()).add(body["arm"])
    assert all(len(arms) == 1 for arms in seen.values())
    assert {a for arms in seen.values() for a in arms} == {"A", "B"}
    log = read_log(settings.impression_log or tmp_path)
    assert set(zip(log["arm"], log["model_version"], strict=True)) == {("A", "A"), ("B", "B")}
    assert log["shown"].all()


def test_no_second_bundle_means_one_default_arm(artifacts: Artifacts, tmp_path: Path) -> None:
    with running(settings_for(artifacts, tmp_path)) as (_, client):
        body = client.get("/recommend", params={"user_id": 3, "k": 3, "now": NOW}).json()
    assert (body["arm"], body["policy"], body["objective"]) == ("default", "greedy", "engagement")
    assert all(i["propensity"] is None for i in body["items"])


def test_shadow_bundle_is_logged_for_the_same_requests_and_never_served(
        artifacts: Artifacts, tmp_path: Path) -> None:
    shadow = copy_bundle(artifacts.bundle, tmp_path / "shadow", "S", max_per_category=1)
    settings = settings_for(artifacts, tmp_path, shadow_bundle=shadow)
    ids = []
    with running(settings) as (_, client):
        for user in users(artifacts)[:10]:
            body = client.get("/recommend", params={"user_id": user, "k": 5, "now": NOW}).json()
            assert body["model_version"] == "A"
            ids.append(body["request_id"])
    log = read_log(settings.impression_log or tmp_path)
    served, shadowed = log.filter(log["shown"]), log.filter(~log["shown"])
    assert set(served["model_version"]) == {"A"} and set(shadowed["model_version"]) == {"S"}
    assert set(shadowed["arm"]) == {"shadow"}
    assert set(served["request_id"]) == set(shadowed["request_id"]) == set(ids)
    # the same request time and user state: the shadow's cap of one item per category is the
    # only difference, so its lists are as long and its categories distinct
    for rid in ids:
        s = shadowed.filter(request_id=rid)
        assert s["ts"].unique().to_list() == [float(NOW)]
        cats = [c for c in s["category"].to_list() if c is not None]
        assert len(cats) == len(set(cats)) or len(s) == 5


def test_shadow_needs_the_impression_log(artifacts: Artifacts, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shadow_bundle needs impression_log"):
        settings_for(artifacts, tmp_path, shadow_bundle=artifacts.bundle_b, impression_log=None)


def test_stochastic_policy_draws_with_logged_propensities(artifacts: Artifacts, tmp_path: Path,
                                                          store: FeatureStore) -> None:
    pl_bundle = copy_bundle(artifacts.bundle, tmp_path / "pl", "PL", max_per_category=0,
                            policy={"kind": "plackett_luce", "temperature": 1.0})
    settings = settings_for(artifacts, tmp_path, bundle=pl_bundle)
    with running(settings) as (_, client):
        body = client.get("/recommend", params={"user_id": 3, "k": 5, "now": NOW}).json()
    assert body["policy"] == "plackett_luce" and len(body["items"]) == 5
    assert all(0 < i["propensity"] <= 1 for i in body["items"])
    log = read_log(settings.impression_log or tmp_path)
    assert log["propensity"].to_list() == pytest.approx([i["propensity"] for i in body["items"]])
    assert set(log["policy"]) == {"plackett_luce"}

    # the draw follows the seed: the same seed, the same list; other seeds, other lists
    pipeline = Pipeline(load_bundle(pl_bundle), StoreGuard(store, "embedded"))
    lists = [[i.item_id for i in pipeline.recommend(3, 5, NOW, seed=s).items] for s in range(8)]
    again = [i.item_id for i in pipeline.recommend(3, 5, NOW, seed=0).items]
    assert again == lists[0]
    assert len({tuple(x) for x in lists}) > 1


def test_popular_ranking_orders_by_training_popularity(artifacts: Artifacts, tmp_path: Path,
                                                       store: FeatureStore) -> None:
    bundle = load_bundle(copy_bundle(artifacts.bundle, tmp_path / "pop", "POP",
                                     ranking="popular", max_per_category=0))
    rec = Pipeline(bundle, StoreGuard(store, "embedded")).recommend(3, 8, NOW)
    scores = [i.score for i in rec.items]
    assert scores == sorted(scores, reverse=True)
    counts = bundle.popular.global_
    index = bundle.vocabs["item_id"].encode_values([i.item_id for i in rec.items])
    assert np.allclose(scores, counts[index] / counts.sum(), rtol=1e-5)
    assert rec.timings_ms["rank"] < 5  # the ranker is not called


def test_live_alerts_are_gauges_on_metrics(artifacts: Artifacts, tmp_path: Path) -> None:
    thresholds = tmp_path / "alerts.yaml"
    thresholds.write_text("min_requests: 20\n")  # the default waits for more requests
    settings = settings_for(artifacts, tmp_path, alert_window=500, alert_config=thresholds,
                            impression_log=None)
    with running(settings) as (_, client):
        for user in users(artifacts):
            assert client.get("/recommend", params={"user_id": user, "k": 5,
                                                    "now": NOW}).status_code == 200
        text = client.get("/metrics").text
    lines = [line for line in text.splitlines() if line.startswith("bstrec_alert{")]
    assert all(line.endswith((" 0.0", " 1.0")) for line in lines), lines
    # the store answers: not degraded (whether 40 requests drift from the training reference is
    # the replay tests' question, tests/monitoring/test_faults.py)
    assert 'bstrec_alert{model_version="A",name="degraded_share"} 0.0' in lines, lines
    assert 'bstrec_alert_value{model_version="A",name="degraded_share"} 0.0' in text


def test_a_slow_shadow_is_dropped_not_queued(artifacts: Artifacts, tmp_path: Path) -> None:
    from bstrec.serving.app import create_app
    from bstrec.serving.server import BackgroundServer
    from tests.serving.fixtures import http_client

    settings = settings_for(artifacts, tmp_path, shadow_bundle=artifacts.bundle_b,
                            shadow_max_pending=1)
    app = create_app(settings)
    shadow = app.state.service.shadow
    slow = shadow.recommend

    def recommend(*args: object, **kwargs: object) -> object:
        time.sleep(0.3)  # slower than the served requests
        return slow(*args, **kwargs)  # type: ignore[arg-type]

    shadow.recommend = recommend
    with BackgroundServer(app) as server, http_client(server.url) as client:
        ids = [client.get("/recommend", params={"user_id": u, "k": 3, "now": NOW}).json()
               ["request_id"] for u in users(artifacts)[:10]]
        metrics = client.get("/metrics").text
    dropped = float(metrics.split('bstrec_shadow_total{outcome="dropped"} ', 1)[1].split()[0])
    log = read_log(settings.impression_log or tmp_path)
    shadowed = set(log.filter(~log["shown"])["request_id"])
    assert dropped >= 1 and shadowed < set(ids)
    assert len(shadowed) + dropped == len(ids)  # each request either scored or dropped
    # the impression log's own counts (what is written depends on when the writer ran)
    assert 'bstrec_impression_log_rows{outcome="dropped"} 0.0' in metrics
    assert 'bstrec_impression_log_rows{outcome="written_impressions"}' in metrics


def test_reload_swaps_the_arm_it_names(artifacts: Artifacts, tmp_path: Path) -> None:
    main = copy_bundle(artifacts.bundle, tmp_path / "a", "A")
    candidate = copy_bundle(artifacts.bundle, tmp_path / "b2", "B2")
    settings = settings_for(artifacts, tmp_path, bundle=main, bundle_b=artifacts.bundle_b,
                            share_b=0.5)
    admin = {"X-API-Key": "k"}
    with running(settings) as (_, client):
        r = client.post("/admin/reload", json={"bundle": str(candidate), "target": "B"},
                        headers=admin)
        assert r.status_code == 200, r.text
        assert (r.json()["model_version"], r.json()["previous_version"]) == ("B2", "B")
        versions = {client.get("/recommend", params={"user_id": u, "k": 3, "now": NOW}).json()[
            "model_version"] for u in users(artifacts)}
        assert versions == {"A", "B2"}  # arm A untouched
        # no shadow bundle is served: nothing to swap, and nothing changed
        r = client.post("/admin/reload", json={"target": "shadow"}, headers=admin)
        assert r.status_code == 422 and "BSTREC_SHADOW_BUNDLE" in r.text
