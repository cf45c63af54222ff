"""Prometheus metrics of one service instance, in a registry of its own (several apps in one
process, e.g. in tests, do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from bstrec.monitoring.alerts import Alert
from bstrec.serving.pipeline import Recommendation

# milliseconds-scale stages up to whole-request seconds
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
COUNT_BUCKETS = (0, 1, 5, 10, 25, 50, 100, 200, 300, 500, 1000)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("bstrec_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=r)
        self.latency = Histogram("bstrec_request_seconds", "HTTP request latency by route",
                                 ["method", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage = Histogram("bstrec_stage_seconds", "Recommendation pipeline latency by stage",
                               ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.candidates = Histogram("bstrec_candidates", "Merged candidates per request by source",
                                    ["source"], buckets=COUNT_BUCKETS, registry=r)
        self.recommendations = Counter("bstrec_recommendations",
                                       "Recommendations served by match path and degradation",
                                       ["path", "degraded"], registry=r)
        self.events = Counter("bstrec_events", "Events received, by outcome",
                              ["outcome"], registry=r)
        self.reloads = Counter("bstrec_reloads", "Bundle reloads, by outcome", ["outcome"],
                               registry=r)
        self.store_up = Gauge("bstrec_store_up", "1 while the feature store answers", registry=r)
        self.bundle = Gauge("bstrec_bundle_info", "The bundle being served (value 1)",
                            ["version"], registry=r)
        self.shadow = Counter("bstrec_shadow", "Shadow scorings, by outcome (scored, dropped: "
                              "over shadow_max_pending waiting, failed)", ["outcome"],
                              registry=r)
        self.alert = Gauge("bstrec_alert", "1 while an alert's threshold is breached over the "
                           "last alert_window shown items, else 0", ["name", "model_version"],
                           registry=r)
        self.alert_value = Gauge("bstrec_alert_value", "The value an alert compares with its "
                                 "threshold", ["name", "model_version"], registry=r)
        self.impression_rows = Gauge(
            "bstrec_impression_log_rows", "Rows of the impression log since the start, by "
            "outcome (written_impressions, written_events, lost: their write failed, dropped: "
            "over max_queued_rows waiting)", ["outcome"], registry=r)

    def observe(self, rec: Recommendation) -> None:
        for stage, ms in rec.timings_ms.items():
            self.stage.labels(stage).observe(ms / 1e3)
        for source, n in rec.candidates.items():
            self.candidates.labels(source).observe(n)
        self.recommendations.labels(rec.path, str(rec.degraded).lower()).inc()

    def serving(self, version: str) -> None:
        self.bundle.clear()
        self.bundle.labels(version).set(1)

    def alerts(self, alerts: dict[str, list[Alert]]) -> None:
        """The alerts of the last evaluation by model version (alerts that could not be
        computed are absent, so their gauges go too)."""
        self.alert.clear()
        self.alert_value.clear()
        for version, found in alerts.items():
            for a in found:
                self.alert.labels(a.name, version).set(1.0 if a.breached else 0.0)
                self.alert_value.labels(a.name, version).set(a.value)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
