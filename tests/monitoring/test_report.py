"""The monitoring report: figures against hand-computed values, input drift against a reference
and output drift against the first requests, the files of both formats, empty windows and logs
without clicks, the A/B section and the log-dir entry point."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from bstrec.monitoring.alerts import AlertConfig
from bstrec.monitoring.drift import MAJOR, MODERATE
from bstrec.monitoring.impressions import ImpressionLog, ImpressionLogConfig
from bstrec.monitoring.report import (
    PLOT_POSITION,
    PLOT_RELIABILITY,
    PLOT_SCORES,
    REPORT_JSON,
    gini,
    write_log_report,
    write_report,
)
from tests.monitoring.test_alerts import BASELINE, make_log, make_reference, with_baseline
from tests.monitoring.test_join import event, events_frame, impression, impressions_frame

SMALL_CONFIG = AlertConfig(min_requests=1)


def small_log() -> tuple[pl.DataFrame, pl.DataFrame]:
    """Two requests: r1 (regular) shows i0, i1, i2; r2 (cold) shows i0; u1 and u2 click i0."""
    rows = [
        impression("r1", "i0", user="u1", ts=100.0, position=0, score=0.85,
                   sources=["two_tower", "popular"]),
        impression("r1", "i1", user="u1", ts=100.0, position=1, score=0.15, sources=["item_cf"]),
        impression("r1", "i2", user="u1", ts=100.0, position=2, score=0.05, sources=["popular"]),
        impression("r2", "i0", user="u2", ts=200.0, position=0, score=0.15, sources=["popular"],
                   path="cold", timings_ms='{"rank": 3.0, "match": 2.0}'),
        # a shadow ranking of r1: never shown, counts nowhere
        impression("r1", "i9", user="u1", ts=100.0, position=0, score=0.99, shown=False,
                   model_version="B"),
    ]
    events = [event("i0", 110.0, user="u1"), event("i0", 210.0, user="u2")]
    return impressions_frame(rows), events_frame(events)


def test_figures_match_hand_computed_values(tmp_path: Path) -> None:
    imps, events = small_log()
    result = write_report(imps, events, tmp_path, window_s=60.0, references={},
                          alert_config=SMALL_CONFIG)
    s = result.summary
    assert s["window"] | {"start": 100.0, "end": 200.0} == s["window"]
    assert (s["window"]["impressions"], s["window"]["shadow_rows"], s["window"]["requests"],
            s["window"]["clicks"]) == (4, 1, 2, 2)
    ctr = s["ctr"]
    assert ctr["overall"] == 0.5
    assert [(r["position"], r["impressions"], r["clicks"], r["ctr"]) for r in ctr["by_position"]
            ] == [(0, 2, 2, 1.0), (1, 1, 0, 0.0), (2, 1, 0, 0.0)]
    assert {r["source"]: r["ctr"] for r in ctr["by_source"]} == pytest.approx(
        {"item_cf": 0.0, "popular": 2 / 3, "two_tower": 1.0})
    assert {r["path"]: r["ctr"] for r in ctr["by_path"]} == pytest.approx(
        {"cold": 1.0, "regular": 1 / 3})
    assert [(r["model_version"], r["arm"]) for r in ctr["by_version_arm"]] == [("A", "default")]
    # ECE by hand over 10 bins: {0.05: no click}, {0.15: one click of two}, {0.85: clicked}
    assert s["calibration"]["A"]["ece"] == pytest.approx((0.05 + 2 * 0.35 + 0.15) / 4)
    assert [b["n"] for b in s["calibration"]["A"]["bins"]] == [1, 2, 1]
    cov = s["coverage"]
    assert cov["items_shown"] == 3 and cov["catalog_size"] is None
    # exposures 2, 1, 1: mean absolute difference over all ordered pairs / (2 * mean)
    assert cov["gini"] == pytest.approx((4 / 9) / (2 * 4 / 3))
    # i0 has both events: shown items' mean popularity (2 + 0 + 0 + 2) / 4, events' 2
    assert cov["mean_shown_popularity"] == 1.0 and cov["mean_event_popularity"] == 2.0
    assert s["freshness"]["p50"] == 60.0 and s["freshness"]["missing_share"] == 0.0
    assert s["latency"]["rank"] == {"requests": 2, "p50": 2.0, "p95": pytest.approx(2.9),
                                    "p99": pytest.approx(2.98)}
    assert s["latency"]["match"]["requests"] == 1
    assert s["drift"] == {"A": {"reference": False, "outputs": None}}
    assert s["ab"]["comparison"] is None and [a["arm"] for a in s["ab"]["arms"]] == ["default"]
    # the JSON is the summary, NaN-free
    assert json.loads(result.data.read_text()) == json.loads(json.dumps(s))


def test_gini() -> None:
    assert gini([3, 3, 3]) == pytest.approx(0.0)
    assert gini([0, 0, 0, 8]) == pytest.approx(0.75)  # (n - 1) / n: all on one item
    assert gini([]) is None and gini([0, 0]) is None


@pytest.mark.parametrize("fmt", ["md", "html"])
def test_files_of_each_format(tmp_path: Path, fmt: str) -> None:
    imps, events = make_log(n_requests=300)
    result = write_report(imps, events, tmp_path, window_s=60.0,
                          references={"A": make_reference()}, fmt=fmt)  # type: ignore[arg-type]
    assert result.report == tmp_path / f"report.{fmt}" and result.data == tmp_path / REPORT_JSON
    names = {p.name for p in result.plots}
    assert {PLOT_POSITION, PLOT_RELIABILITY, "drift_psi.png", PLOT_SCORES, "freshness.png",
            "latency.png", "exposure_lorenz.png", "ctr_by_source.png", "ctr_by_path.png"} == names
    for p in result.plots:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = result.report.read_text()
    for name in names:
        assert name in text
    if fmt == "html":
        assert text.startswith("<!doctype html>") and "<table>" in text
    else:
        assert "## CTR by position" in text and "| position |" in text
    # healthy synthetic traffic: every alert computed, none breached, drift below moderate
    assert result.alerts and not any(a.breached for a in result.alerts)
    drift = result.summary["drift"]["A"]
    assert max(drift["features"].values()) < MODERATE
    assert drift["outputs"] is None  # fewer requests than the baseline and min_requests
    # the served scores beside the training predictions, on the latter's bins
    scores = drift["scores"]
    assert len(scores["training"]) == len(scores["served"]) == len(scores["edges"]) + 1
    assert sum(scores["served"]) == pytest.approx(1.0)
    cov = result.summary["coverage"]
    assert cov["catalog_size"] == 200 and 0 < cov["coverage"] <= 1


def test_drift_and_breached_alerts_come_first(tmp_path: Path) -> None:
    imps, events = with_baseline(score_beta=(8.0, 2.0), history=0)
    result = write_report(imps, events, tmp_path, window_s=60.0,
                          references={"A": make_reference()})
    drift = result.summary["drift"]["A"]
    assert drift["features"]["history_length"] > MAJOR
    outputs = drift["outputs"]
    assert outputs["baseline_requests"] == BASELINE and outputs["requests"] == 400
    assert outputs["predictions"] > MAJOR and outputs["category"] < MODERATE
    breached = [a.breached for a in result.alerts]
    assert breached == sorted(breached, reverse=True) and breached[0]
    # the clicks follow the shifted scores, so calibration still holds: ece is not breached
    names = {a.name for a in result.alerts if a.breached}
    assert names == {"prediction_psi", "feature_psi:history_length"}
    assert result.summary["alerts"][0]["model_version"] == "A"
    text = result.report.read_text()
    assert "predictions (vs baseline)" in text and "history_length" in text


def test_healthy_traffic_past_the_baseline(tmp_path: Path) -> None:
    imps, events = with_baseline()
    result = write_report(imps, events, tmp_path, window_s=60.0,
                          references={"A": make_reference()})
    names = {a.name for a in result.alerts}
    assert {"prediction_psi", "feature_psi:category", "feature_psi:user.segment"} <= names
    assert not any(a.breached for a in result.alerts)
    outputs = result.summary["drift"]["A"]["outputs"]
    assert max(outputs["predictions"], outputs["category"]) < MODERATE
    # without a reference the outputs still have their baseline
    bare = write_report(imps, events, tmp_path / "bare", window_s=60.0, references={})
    assert bare.summary["drift"]["A"]["outputs"] == outputs
    assert "No reference for A" in bare.report.read_text()


@pytest.mark.parametrize("fmt", ["md", "html"])
def test_empty_window_and_no_clicks(tmp_path: Path, fmt: str) -> None:
    empty = write_report(impressions_frame([]), events_frame([]), tmp_path / "empty",
                         window_s=60.0, references={"A": make_reference()},
                         fmt=fmt)  # type: ignore[arg-type]
    assert empty.report.exists() and empty.plots == () and empty.alerts == ()
    assert empty.summary["ctr"]["overall"] is None and empty.summary["window"]["start"] is None
    assert "empty window" in empty.report.read_text()
    imps, _ = make_log(n_requests=300)
    no_clicks = write_report(imps, pl.DataFrame(), tmp_path / "none", window_s=60.0,
                             references={"A": make_reference()}, fmt=fmt)  # type: ignore[arg-type]
    assert no_clicks.summary["ctr"]["overall"] == 0.0
    assert no_clicks.summary["coverage"]["mean_shown_popularity"] is None
    # without clicks the scores look miscalibrated: the one breached alert is ece
    assert [a.name for a in no_clicks.alerts if a.breached] == ["ece"]


def test_ab_section_with_two_arms(tmp_path: Path) -> None:
    imps, events = make_log(arms=("control", "treatment"))
    result = write_report(imps, events, tmp_path, window_s=60.0, references={}, n_boot=200)
    ab = result.summary["ab"]
    assert [a["arm"] for a in ab["arms"]] == ["control", "treatment"]
    c = ab["comparison"]
    assert (c["arm_a"], c["arm_b"]) == ("control", "treatment")
    ctr = {a["arm"]: a["ctr"] for a in ab["arms"]}
    assert c["ctr_a"] == pytest.approx(ctr["control"]) and c["ctr_b"] == pytest.approx(
        ctr["treatment"])
    assert c["lo"] <= c["diff"] <= c["hi"]
    assert "95% bootstrap interval" in result.report.read_text()


def test_report_of_a_log_directory(tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    with ImpressionLog(ImpressionLogConfig(log_dir)) as log:
        log.log_impressions([impression(f"r{n}", "i0", user=f"u{n}", ts=100.0 * n)
                             for n in range(1, 4)])
        # u2 clicks after the window's end (until = 250), within the click window
        log.log_events([event("i0", 205.0, user="u2"), event("i0", 320.0, user="u3")])
    result = write_log_report(log_dir, tmp_path / "out", since=150.0, until=250.0,
                              window_s=60.0, references={}, alert_config=SMALL_CONFIG)
    w = result.summary["window"]
    assert (w["requests"], w["clicks"], w["start"]) == (1, 1, 200.0)
    assert np.isclose(result.summary["ctr"]["overall"], 1.0)
