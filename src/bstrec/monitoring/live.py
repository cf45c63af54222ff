"""Live alerts: the service's last shown items, kept in memory and checked against each
bundle's training reference at every /metrics scrape, with the thresholds the offline report
uses (monitoring/alerts.py). Clicks arrive later and are not waited for here: calibration is
the report's.

The output alerts (prediction_psi, feature_psi:category) compare with a baseline of served
traffic (the training data has no shown lists: alerts.py says why). The window rolls, so the
baseline cannot be its oldest rows: each model version's first requests (``baseline_requests``
of them, from ``baseline_users`` users at least) are kept aside, frozen, when it starts
serving, and the window's later requests are compared with them.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from bstrec.monitoring.alerts import Alert, AlertConfig, evaluate
from bstrec.monitoring.impressions import IMPRESSION_SCHEMA, ImpressionRow
from bstrec.monitoring.reference import Reference

SCHEMA = pl.DataFrame(IMPRESSION_SCHEMA.empty_table()).schema


@dataclass
class _Baseline:
    """The rows of a model version's first requests, growing until it holds enough of them."""

    requests: set[str] = field(default_factory=set)
    users: set[str] = field(default_factory=set)
    rows: list[ImpressionRow] = field(default_factory=list)
    frame: pl.DataFrame | None = None  # built once, when complete

    def complete(self, config: AlertConfig) -> bool:
        return (len(self.requests) >= config.baseline_requests
                and len(self.users) >= config.baseline_users)


class LiveMonitor:
    """The last ``window`` shown impression rows, and each model version's baseline;
    ``alerts(references)`` evaluates them per model version. Thread-safe: requests add,
    scrapes read."""

    def __init__(self, window: int, config: AlertConfig) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.config = config
        self._rows: deque[ImpressionRow] = deque(maxlen=window)
        self._baselines: dict[str, _Baseline] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, window: int, path: Path | None) -> LiveMonitor:
        """``path``: a YAML of AlertConfig's fields (unknown keys are errors); None: defaults."""
        return cls(window, AlertConfig() if path is None else AlertConfig.from_yaml(path))

    def add(self, rows: Sequence[ImpressionRow]) -> None:
        with self._lock:
            self._rows.extend(rows)
            for row in rows:
                base = self._baselines.setdefault(row["model_version"], _Baseline())
                request = row["request_id"]
                if request in base.requests:
                    base.rows.append(row)
                elif not base.complete(self.config):
                    base.requests.add(request)
                    base.users.add(row["user_id"])
                    base.rows.append(row)

    def frame(self) -> pl.DataFrame:
        with self._lock:
            rows = list(self._rows)
        return pl.DataFrame(rows, schema=SCHEMA)

    def baseline(self, version: str) -> pl.DataFrame | None:
        """The frozen baseline rows of ``version``; None until it is complete
        (``baseline_requests`` requests of ``baseline_users`` users)."""
        with self._lock:
            base = self._baselines.get(version)
            if base is None or not base.complete(self.config):
                return None
            if base.frame is None:
                base.frame = pl.DataFrame(base.rows, schema=SCHEMA)
                base.rows = []  # the frame holds them now
            return base.frame

    def alerts(self, references: Mapping[str, Reference | None]) -> dict[str, list[Alert]]:
        """The alerts of each model version in ``references`` over its rows in the window
        (its outputs against its baseline)."""
        frame = self.frame()
        with self._lock:
            # a version no longer served will not come back with the same first requests
            for version in set(self._baselines) - set(references):
                del self._baselines[version]
        out: dict[str, list[Alert]] = {}
        for version, reference in references.items():
            baseline = self.baseline(version)
            # until the baseline is complete the window holds too few requests or users of the
            # version, and evaluate's own split finds no complete baseline either
            out[version] = evaluate(frame.filter(pl.col("model_version") == version), reference,
                                    self.config, baseline=baseline)
        return out
