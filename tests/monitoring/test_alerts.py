"""Alerts: healthy traffic breaches none with the defaults, each alert breaches on its own fault,
outputs drift against a baseline of served traffic (offline and in the live monitor), user
features count once per user, alerts that cannot be computed are absent, and the config refuses
unknown keys. Also the synthetic reference and log the report tests share."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from bstrec.config import ConfigError
from bstrec.monitoring.alerts import DAY_S, Alert, AlertConfig, evaluate, split_baseline
from bstrec.monitoring.drift import MODERATE, CategoricalDistribution, NumericDistribution
from bstrec.monitoring.join import join_clicks
from bstrec.monitoring.live import LiveMonitor
from bstrec.monitoring.reference import Reference, served_features
from tests.monitoring.test_join import EVENT_POLARS, IMPRESSION_POLARS

DATA_END = 1_700_000_000.0
CATEGORIES = np.array(["books", "games", "music", "phones"])
CATEGORY_P = np.array([0.4, 0.3, 0.2, 0.1])
SEGMENTS = np.array(["casual", "fan", "pro"])
SEGMENT_P = np.array([0.6, 0.3, 0.1])
PATHS = np.array(["regular", "few", "cold"])
PATH_P = np.array([0.8, 0.1, 0.1])
EXPECTED = {"regular": ("two_tower", "item_cf", "popular"), "few": ("item_cf", "category",
                                                                    "popular"),
            "cold": ("popular",)}
N_ITEMS = 200


def _scores(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.beta(2.0, 8.0, n)


def _history(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.minimum(rng.poisson(8.0, n), 20)


def _freshness(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.exponential(3_600.0, n)


def make_reference(n: int = 20_000, seed: int = 0) -> Reference:
    rng = np.random.default_rng(seed)
    return Reference(
        predictions=NumericDistribution.fit(_scores(rng, n)),
        features={
            "history_length": NumericDistribution.fit(_history(rng, n)),
            "freshness_s": NumericDistribution.fit(_freshness(rng, n)),
            "last_category": CategoricalDistribution.fit(rng.choice(CATEGORIES, n, p=CATEGORY_P)),
            "user.segment": CategoricalDistribution.fit(rng.choice(SEGMENTS, n, p=SEGMENT_P)),
        },
        data_end=DATA_END, expected_sources=EXPECTED, history_cap=20, catalog_size=N_ITEMS,
        feature_rows=n, scored_rows=n, feature_users=n)


def make_log(n_requests: int = 400, k: int = 5, *, seed: int = 1, version: str = "A",
             arms: tuple[str, ...] = ("default",), start: float = DATA_END + DAY_S,
             score_beta: tuple[float, float] = (2.0, 8.0), degraded: bool = False,
             history: int | None = None, segment: str | None = None,
             silent_source: str | None = None, click_rate: float | None = None,
             category_p: np.ndarray = CATEGORY_P, heavy_user: float = 0.0,
             request_prefix: str = "r") -> tuple[pl.DataFrame, pl.DataFrame]:
    """Impressions (IMPRESSION_SCHEMA) of ``n_requests`` requests of ``k`` items drawn from the
    reference's distributions by users drawn from a pool of ``2 * n_requests``, and events
    clicking each item with probability = its score (calibrated) or ``click_rate``; the keyword
    arguments inject one fault each (``score_beta`` and ``category_p``: the shown items';
    ``heavy_user``: the share of requests made by one 'pro' user, not a fault)."""
    rng = np.random.default_rng(seed)
    n = n_requests * k
    req = np.repeat(np.arange(n_requests), k)
    pool = 2 * n_requests
    users = rng.integers(1, pool + 1, n_requests)
    users[rng.random(n_requests) < heavy_user] = 0
    ts = start + np.arange(n_requests) * 10.0
    paths = rng.choice(PATHS, n_requests, p=PATH_P)
    hist = _history(rng, n_requests) if history is None else np.full(n_requests, history)
    fresh = _freshness(rng, n_requests)
    # a profile per user, as the store keeps one
    profiles = rng.choice(SEGMENTS, pool + 1, p=SEGMENT_P) if segment is None else \
        np.full(pool + 1, segment)
    profiles[0] = "pro"
    segs = profiles[users]
    candidates = [json.dumps({s: 0 if s == silent_source else 50 for s in EXPECTED[p]})
                  for p in paths]
    scores = rng.beta(*score_beta, n)
    items = rng.integers(0, N_ITEMS, n)
    frame = pl.DataFrame({
        "request_id": [f"{request_prefix}{r}" for r in req],
        "user_id": [f"u{users[r]}" for r in req],
        "ts": ts[req], "received_at": ts[req] + 0.01, "model_version": version,
        "arm": [arms[r % len(arms)] for r in req], "path": paths[req],
        "degraded": [["store_unavailable"] if degraded else [] for _ in req],
        "position": np.tile(np.arange(k), n_requests), "item_id": [f"i{i}" for i in items],
        "score": scores, "prerank_score": None, "sources": [["two_tower", "popular"]] * n,
        "shown": True, "policy": "greedy", "propensity": None, "k": k,
        "category": rng.choice(CATEGORIES, n, p=category_p),
        "history_length": hist[req], "freshness_s": fresh[req],
        "last_category": rng.choice(CATEGORIES, n_requests, p=CATEGORY_P)[req],
        "user_features": [json.dumps({"segment": str(segs[r])}) for r in req],
        "candidates": [candidates[r] for r in req],
        "timings_ms": [json.dumps({"match": 2.0 + r % 3, "rank": 5.0}) for r in req],
    }, schema_overrides=IMPRESSION_POLARS).select(list(IMPRESSION_POLARS))
    p = scores if click_rate is None else np.full(n, click_rate)
    hit = np.flatnonzero(rng.random(n) < p)
    events = pl.DataFrame({
        "request_id": None, "user_id": frame["user_id"].gather(hit),
        "item_id": frame["item_id"].gather(hit), "ts": ts[req][hit] + 5.0,
        "event_id": [f"e{h}" for h in hit], "received_at": ts[req][hit] + 5.0,
    }, schema=EVENT_POLARS)
    return frame, events


def by_name(alerts: list[Alert]) -> dict[str, Alert]:
    return {a.name: a for a in alerts}


BASELINE = AlertConfig().baseline_requests


def with_baseline(n_after: int = 400, **fault: object) -> tuple[pl.DataFrame, pl.DataFrame]:
    """A healthy first ``BASELINE`` requests, then ``n_after`` requests with ``fault``."""
    first, events_first = make_log(BASELINE)
    after, events_after = make_log(n_after, seed=2, request_prefix="s",
                                   start=DATA_END + DAY_S + BASELINE * 10.0,
                                   **fault)  # type: ignore[arg-type]
    return pl.concat([first, after]), pl.concat([events_first, events_after])


INPUT_ALERTS = {"degraded_share", "bundle_age", "feature_psi:history_length",
                "feature_psi:freshness_s", "feature_psi:last_category",
                "feature_psi:user.segment", "empty_source:two_tower", "empty_source:item_cf",
                "empty_source:popular", "ece"}
OUTPUT_ALERTS = {"prediction_psi", "feature_psi:category"}


def test_healthy_traffic_breaches_nothing() -> None:
    imps, events = make_log()
    alerts = by_name(evaluate(imps, make_reference(), AlertConfig(),
                              join_clicks(imps, events, 60.0)))
    # the few path's 'category' source: too few requests on it to tell; the outputs: fewer
    # requests than their baseline
    assert set(alerts) == INPUT_ALERTS
    assert [a for a in alerts.values() if a.breached] == []
    assert alerts["degraded_share"].value == 0.0
    assert alerts["bundle_age"].value == pytest.approx(DAY_S + 200 * 10.0 - 5.0, abs=10.0)
    assert alerts["ece"].model_version == "A"
    # past the baseline the outputs are compared with it, and healthy ones stay quiet
    imps, events = with_baseline()
    alerts = by_name(evaluate(imps, make_reference(), AlertConfig(),
                              join_clicks(imps, events, 60.0)))
    assert set(alerts) == INPUT_ALERTS | OUTPUT_ALERTS
    assert [a for a in alerts.values() if a.breached] == []


@pytest.mark.parametrize("fault, breached", [
    ({"degraded": True}, "degraded_share"),
    ({"history": 0}, "feature_psi:history_length"),
    ({"segment": "pro"}, "feature_psi:user.segment"),
    ({"silent_source": "two_tower"}, "empty_source:two_tower"),
    ({"silent_source": "popular"}, "empty_source:popular"),
    ({"start": DATA_END + 90 * DAY_S}, "bundle_age"),
    ({"click_rate": 0.0}, "ece"),
])
def test_each_alert_breaches_on_its_fault(fault: dict[str, object], breached: str) -> None:
    imps, events = make_log(**fault)  # type: ignore[arg-type]
    alerts = evaluate(imps, make_reference(), AlertConfig(), join_clicks(imps, events, 60.0))
    assert [a.name for a in alerts if a.breached] == [breached]
    alert = by_name(alerts)[breached]
    assert alert.value > alert.threshold and "above" in alert.message


@pytest.mark.parametrize("fault, breached", [
    ({"score_beta": (8.0, 2.0)}, "prediction_psi"),
    ({"category_p": CATEGORY_P[::-1]}, "feature_psi:category"),
])
def test_shifted_outputs_after_the_baseline_breach(fault: dict[str, object], breached: str
                                                   ) -> None:
    imps, _ = with_baseline(**fault)  # type: ignore[arg-type]
    alerts = evaluate(imps, make_reference(), AlertConfig())
    assert [a.name for a in alerts if a.breached] == [breached]
    # the outputs need no training reference: the baseline is served traffic
    assert [a.name for a in evaluate(imps, None, AlertConfig()) if a.breached] == [breached]
    # shifted from the start, the shift is the baseline: nothing to tell
    shifted, _ = make_log(BASELINE + 400, **fault)  # type: ignore[arg-type]
    assert not any(a.breached for a in evaluate(shifted, make_reference(), AlertConfig()))


def test_a_burst_of_few_users_is_not_a_baseline() -> None:
    # each user scores at their own level; the first 600 requests come from 10 users (a
    # replay's or a morning's start), the next 1,400 from 300 others of the same kind
    imps, _ = make_log(2_000)
    rng = np.random.default_rng(5)
    req = imps["request_id"].str.slice(1).cast(pl.Int64).to_numpy()
    users = np.where(np.arange(2_000) < 600, rng.integers(0, 10, 2_000),
                     rng.integers(10, 310, 2_000))
    level = rng.uniform(0.05, 0.95, 310)
    imps = imps.with_columns(
        user_id=pl.Series([f"u{users[r]}" for r in req]),
        score=pl.Series(np.clip(level[users[req]] + rng.normal(0.0, 0.02, req.size), 0, 1)))
    few = AlertConfig(baseline_users=1)
    assert by_name(evaluate(imps, None, few))["prediction_psi"].breached
    # a baseline of 100 users or more, each weighing the same, is the same traffic as later
    base, _ = split_baseline(imps, AlertConfig())
    assert base["user_id"].n_unique() == 100 and base["request_id"].n_unique() > 600
    alert = by_name(evaluate(imps, None, AlertConfig()))["prediction_psi"]
    assert not alert.breached and alert.value < MODERATE
    # the live monitor freezes the same baseline
    monitor = LiveMonitor(window=100_000, config=AlertConfig())
    rows = imps.to_dicts()
    for r in range(0, len(rows), 5):
        monitor.add(rows[r:r + 5])  # type: ignore[arg-type]
    frozen = monitor.baseline("A")
    assert frozen is not None and frozen["user_id"].n_unique() == 100


def test_a_given_baseline_is_compared_with_the_later_requests() -> None:
    imps, _ = with_baseline(score_beta=(8.0, 2.0))
    baseline = imps.filter(pl.col("request_id").str.starts_with("r"))
    # the window rolled past the baseline: only shifted rows left, compared with the baseline
    window = imps.filter(pl.col("request_id").str.starts_with("s"))
    assert by_name(evaluate(window, None, AlertConfig(), baseline=baseline))[
        "prediction_psi"].breached
    # the baseline's own requests in the window are not compared with themselves
    quiet = by_name(evaluate(baseline, None, AlertConfig(), baseline=baseline))
    assert "prediction_psi" not in quiet


def test_a_heavy_user_counts_once() -> None:
    """One 'pro' user makes half the requests: weighted by requests the segment's PSI would
    breach; counted once per user it barely moves."""
    healthy, _ = make_log(800)
    heavy, _ = make_log(800, heavy_user=0.5)
    reference, config = make_reference(), AlertConfig()
    base = by_name(evaluate(healthy, reference, config))["feature_psi:user.segment"].value
    alert = by_name(evaluate(heavy, reference, config))["feature_psi:user.segment"]
    assert not alert.breached and alert.value < 0.1
    assert alert.value == pytest.approx(base, abs=0.05)
    by_request = reference.features["user.segment"].psi(
        heavy["user_features"].str.json_decode(pl.Struct({"segment": pl.String}))
        .struct.field("segment"))
    assert by_request > config.feature_psi
    # user features wait for min_requests distinct users, whatever the requests
    few = make_log(heavy_user=0.9)[0]
    assert few["user_id"].n_unique() < config.min_requests
    assert "feature_psi:user.segment" not in by_name(evaluate(few, reference, config))


def test_live_monitor_freezes_each_versions_baseline() -> None:
    imps, _ = with_baseline(score_beta=(8.0, 2.0))
    # a window smaller than the log: the baseline's rows roll out of it
    monitor = LiveMonitor(window=2_000, config=AlertConfig())
    rows = imps.to_dicts()
    for r in range(0, len(rows), 5):  # one request's rows a call, as the service adds them
        monitor.add(rows[r:r + 5])  # type: ignore[arg-type]
    baseline = monitor.baseline("A")
    assert baseline is not None and baseline["request_id"].n_unique() == BASELINE
    assert baseline["request_id"].str.starts_with("r").all()
    assert monitor.frame()["request_id"].str.starts_with("s").all()
    alerts = by_name(monitor.alerts({"A": make_reference()})["A"])
    assert alerts["prediction_psi"].breached and not alerts["feature_psi:category"].breached
    # before its baseline is complete a version has no output alert
    young = LiveMonitor(window=100_000, config=AlertConfig())
    young.add(imps.head(5 * 300).to_dicts())  # type: ignore[arg-type]
    assert young.baseline("A") is None
    assert not OUTPUT_ALERTS & set(by_name(young.alerts({"A": make_reference()})["A"]))
    # a version no longer served drops its baseline
    young.alerts({"B": None})
    assert young.baseline("A") is None and young._baselines == {}


def test_alerts_that_cannot_be_computed_are_absent() -> None:
    imps, events = make_log(n_requests=100)
    config = AlertConfig()  # 200 requests at least
    assert evaluate(imps, make_reference(), config) == []
    assert evaluate(imps, make_reference(), config, join_clicks(imps, events, 60.0)) == []
    imps, _ = make_log()
    # without a reference only the degraded share needs nothing to compare with (the outputs
    # need their baseline and more requests)
    assert [a.name for a in evaluate(imps, None, config)] == ["degraded_share"]
    # shadow rows are not traffic
    shadow = imps.with_columns(shown=pl.lit(False))
    assert evaluate(shadow, make_reference(), config) == []


def test_ece_per_model_version() -> None:
    a, events_a = make_log(version="A")
    b, events_b = make_log(version="B", seed=2, click_rate=0.0)
    imps, events = pl.concat([a, b.with_columns(request_id="b" + pl.col("request_id"))]), \
        pl.concat([events_a, events_b])
    eces = [x for x in evaluate(imps, None, AlertConfig(), join_clicks(imps, events, 60.0))
            if x.name == "ece"]
    assert [(x.model_version, x.breached) for x in eces] == [("A", False), ("B", True)]


def test_history_lengths_beyond_the_cap_compare_as_the_cap() -> None:
    imps, _ = make_log(n_requests=3, k=1)
    imps = imps.with_columns(history_length=pl.Series([50, 20, 3], dtype=pl.Int32))
    assert served_features(imps, make_reference())["history_length"].to_list() == [20, 20, 3]


def test_config_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "alerts.yaml"
    path.write_text("min_requests: 50\nprediction_psi: 0.3\n")
    config = AlertConfig.from_yaml(path)
    assert config.min_requests == 50 and config.prediction_psi == 0.3
    path.write_text("min_request: 50\n")
    with pytest.raises(ConfigError, match="unknown keys"):
        AlertConfig.from_yaml(path)
    path.write_text("min_requests: 0\n")
    with pytest.raises(ConfigError, match="min_requests"):
        AlertConfig.from_yaml(path)
    path.write_text("baseline_requests: 0\n")
    with pytest.raises(ConfigError, match="baseline_requests"):
        AlertConfig.from_yaml(path)


def test_cheap_enough_for_every_scrape() -> None:
    imps, _ = make_log(n_requests=1_000, k=5)  # past the baseline: every alert computed
    reference, config = make_reference(), AlertConfig()
    evaluate(imps, reference, config)  # warm-up: Polars' first call of each expression
    start = time.perf_counter()
    evaluate(imps, reference, config)
    elapsed = time.perf_counter() - start
    # generous: the machine is shared; a scrape interval is seconds
    assert elapsed < 1.0, elapsed
