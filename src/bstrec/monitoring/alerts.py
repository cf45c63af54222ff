"""Alerts on recent impressions: each a value, its threshold and whether it is breached.

Alert names are a contract (the service exports them as metric labels):

- ``degraded_share``: share of requests answered with any degraded reason (the feature store down
  makes every request degraded);
- ``bundle_age``: median request time minus the newest event of the bundle's data, seconds;
- ``prediction_psi``: PSI of the shown scores against a baseline of served traffic (below);
- ``feature_psi:<feature>``: PSI of each input feature of the reference (monitoring/reference.py
  names them; user features need ``min_requests`` distinct users, as each counts once), and
  ``feature_psi:category``, the shown items' category against the baseline;
- ``empty_source:<source>``: among requests on a path whose merge takes the source, the share
  where it proposed no candidate (a retriever or index silently returning nothing);
- ``ece``: expected calibration error of the scores against joined clicks, one alert per model
  version (``Alert.model_version``), only when clicks are given.

The outputs (shown scores and categories) are compared with a baseline of served traffic, not
with the training reference: the training data has no shown lists, only random targets with all
their scores, while what is shown is the top k the policy picked (high scores, the categories it
favours), a different population by construction. The baseline is the shown rows of the first
requests a model version served, until they number ``baseline_requests`` and span
``baseline_users`` users (``evaluate`` takes them from the rows given unless told them), and the
rows of the later requests are compared with it; so the alert says "the outputs moved since this
version started serving", absent until the baseline is complete and ``min_requests`` more
requests were served.

An alert that cannot be computed (fewer than ``min_requests`` requests behind it, no reference,
no clicks) is absent rather than reported healthy or breached. Everything is a few vectorised
passes over the rows given, cheap enough for every Prometheus scrape on the last few thousand
rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from bstrec.config import from_dict, load_yaml
from bstrec.evaluation.metrics import ece
from bstrec.monitoring.drift import MAJOR, CategoricalDistribution, NumericDistribution
from bstrec.monitoring.reference import USER_PREFIX, Reference, served_features

DAY_S = 86_400.0


@dataclass(frozen=True)
class AlertConfig:
    """Thresholds: an alert is breached when its value exceeds its threshold.
    (``bstrec.config.from_dict`` fills it; unknown keys are errors.)"""

    # below this many requests (or, for ece, requests of the model version) an alert is absent:
    # PSI and shares of a few requests are noise
    min_requests: int = 200
    prediction_psi: float = MAJOR
    feature_psi: float = MAJOR
    degraded_share: float = 0.05
    # a source may legitimately find nothing for some users (item-CF for a history without
    # co-occurrences); most requests without it is a failure
    empty_source_share: float = 0.5
    bundle_age_s: float = 30 * DAY_S
    ece: float = 0.1
    ece_bins: int = 10
    # the output alerts' baseline: the first requests of a model version until they number
    # this many, enough that the baseline's own sampling noise stays well below the PSI
    # thresholds...
    baseline_requests: int = 500
    # ...and span this many distinct users: traffic (a replay's first minutes, a morning) can
    # start with a few users making many requests each, whose own score levels would otherwise
    # be the baseline, and every later user's would read as drift
    baseline_users: int = 100

    def __post_init__(self) -> None:
        if self.min_requests < 1:
            raise ValueError(f"min_requests must be >= 1, got {self.min_requests}")
        if self.baseline_requests < 1:
            raise ValueError(f"baseline_requests must be >= 1, got {self.baseline_requests}")
        if self.baseline_users < 1:
            raise ValueError(f"baseline_users must be >= 1, got {self.baseline_users}")
        if self.ece_bins < 1:
            raise ValueError(f"ece_bins must be >= 1, got {self.ece_bins}")
        for name in ("prediction_psi", "feature_psi", "degraded_share", "empty_source_share",
                     "bundle_age_s", "ece"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_yaml(cls, path: str | Path) -> AlertConfig:
        return from_dict(cls, load_yaml(path), where=str(path))


@dataclass(frozen=True)
class Alert:
    name: str
    value: float
    threshold: float
    breached: bool
    message: str
    model_version: str | None = None  # set for per-version alerts (ece)


def _alert(name: str, value: float, threshold: float, what: str,
           model_version: str | None = None) -> Alert:
    breached = value > threshold
    verdict = "above" if breached else "within"
    version = f" (model {model_version})" if model_version is not None else ""
    return Alert(name, value, threshold, breached,
                 f"{what}{version}: {value:.4g}, {verdict} the threshold {threshold:.4g}",
                 model_version)


def evaluate(impressions: pl.DataFrame, reference: Reference | None, config: AlertConfig,
             joined: pl.DataFrame | None = None, baseline: pl.DataFrame | None = None
             ) -> list[Alert]:
    """The alerts computable on ``impressions`` (IMPRESSION_SCHEMA; shadow rows are ignored)
    against ``reference`` (the serving bundle's), and, with ``joined`` (``join_clicks``
    output), calibration per model version.

    ``baseline``: the rows of the output alerts' baseline (the live monitor's, frozen when a
    version started serving); its requests found in ``impressions`` are not compared with it.
    None: the first ``config.baseline_requests`` requests of ``impressions`` (``split_baseline``).
    """
    shown = impressions.filter(pl.col("shown"))
    requests = shown.unique("request_id", keep="first", maintain_order=True)
    alerts: list[Alert] = []
    if requests.height >= config.min_requests:
        degraded = float(np.mean((requests["degraded"].list.len() > 0).to_numpy()))
        alerts.append(_alert("degraded_share", degraded, config.degraded_share,
                             "share of degraded requests"))
        if reference is not None and math.isfinite(reference.data_end):
            age = float(np.median(requests["ts"].to_numpy())) - reference.data_end
            alerts.append(_alert("bundle_age", age, config.bundle_age_s,
                                 "seconds from the bundle's newest event to the median request"))
        alerts += _output_alerts(shown, baseline, config)
        if reference is not None:
            alerts += _feature_alerts(shown, reference, config)
            alerts += _source_alerts(requests, reference, config)
    if joined is not None:
        alerts += _calibration_alerts(joined, config)
    return alerts


def split_baseline(shown: pl.DataFrame, config: AlertConfig
                   ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The shown rows of the first requests of ``shown`` by request time until they number
    ``config.baseline_requests`` and span ``config.baseline_users`` users (the baseline), and
    those of the later ones. ``baseline_complete`` says whether the first part is one."""
    requests = (shown.group_by("request_id").agg(pl.col("ts").min(), pl.col("user_id").first())
                .sort("ts", "request_id"))
    users = requests["user_id"].is_first_distinct().cum_sum().to_numpy()
    # the request that brings the baseline_users-th user (all of them when none does)
    enough_users = int(np.searchsorted(users, config.baseline_users)) + 1
    first = requests["request_id"].head(max(config.baseline_requests, enough_users))
    mine = pl.col("request_id").is_in(first.implode())
    return shown.filter(mine), shown.filter(~mine)


def baseline_complete(baseline: pl.DataFrame, config: AlertConfig) -> bool:
    """Whether ``baseline``'s rows hold ``baseline_requests`` requests of ``baseline_users``
    users."""
    return (baseline["request_id"].n_unique() >= config.baseline_requests
            and baseline["user_id"].n_unique() >= config.baseline_users)


def output_drift(baseline: pl.DataFrame, current: pl.DataFrame) -> dict[str, float]:
    """PSI of the ``current`` shown rows' scores (``predictions``) and categories
    (``category``) against the ``baseline`` rows', each user weighing the same on each side
    (their rows share a weight of 1): a user making many requests has their own score level,
    and how many requests each user makes is traffic, not drift."""
    wb, wc = _per_user(baseline), _per_user(current)
    return {"predictions": NumericDistribution.fit(baseline["score"], weights=wb)
            .psi(current["score"], wc),
            "category": CategoricalDistribution.fit(baseline["category"], weights=wb)
            .psi(current["category"], wc)}


def _per_user(rows: pl.DataFrame) -> np.ndarray:
    return rows.select(1.0 / pl.len().over("user_id")).to_series().to_numpy()


def _output_alerts(shown: pl.DataFrame, baseline: pl.DataFrame | None, config: AlertConfig
                   ) -> list[Alert]:
    if baseline is None:
        base, current = split_baseline(shown, config)
    else:
        base = baseline.filter(pl.col("shown"))
        current = shown.filter(~pl.col("request_id").is_in(base["request_id"].unique()
                                                            .implode()))
    if not baseline_complete(base, config) or current["request_id"].n_unique() < config.min_requests:
        return []
    psi = output_drift(base, current)
    return [_alert("prediction_psi", psi["predictions"], config.prediction_psi,
                   "PSI of the shown scores against the version's first requests"),
            _alert("feature_psi:category", psi["category"], config.feature_psi,
                   "PSI of the shown categories against the version's first requests")]


def _feature_alerts(shown: pl.DataFrame, reference: Reference, config: AlertConfig
                    ) -> list[Alert]:
    # each user counts once: below min_requests users their profiles' PSI is noise
    enough_users = shown["user_id"].n_unique() >= config.min_requests
    return [_alert(f"feature_psi:{name}", reference.features[name].psi(values),
                   config.feature_psi, f"PSI of {name}")
            for name, values in served_features(shown, reference).items()
            if enough_users or not name.startswith(USER_PREFIX)]


def _source_alerts(requests: pl.DataFrame, reference: Reference, config: AlertConfig
                   ) -> list[Alert]:
    sources = sorted({s for ss in reference.expected_sources.values() for s in ss})
    if not sources:
        return []
    counts = requests.select(
        "path", pl.col("candidates").str.json_decode(pl.Struct({s: pl.Int64 for s in sources}))
        .alias("_c")).unnest("_c")
    alerts = []
    for s in sources:
        paths = [p for p, expected in reference.expected_sources.items() if s in expected]
        on_path = counts.filter(pl.col("path").is_in(paths))
        if on_path.height < config.min_requests:
            continue
        empty = float(np.mean((on_path[s].fill_null(0) <= 0).to_numpy()))
        alerts.append(_alert(f"empty_source:{s}", empty, config.empty_source_share,
                             f"share of requests on {'/'.join(sorted(paths))} without a {s} "
                             "candidate"))
    return alerts


def _calibration_alerts(joined: pl.DataFrame, config: AlertConfig) -> list[Alert]:
    alerts = []
    groups = joined.partition_by("model_version", as_dict=True)
    for (version,), rows in sorted(groups.items(), key=lambda kv: str(kv[0][0])):
        if rows["request_id"].n_unique() < config.min_requests:
            continue
        value = ece(rows["clicked"].to_numpy(), rows["score"].to_numpy(), config.ece_bins)
        alerts.append(_alert("ece", value, config.ece, "expected calibration error of the "
                             "scores against clicks", model_version=str(version)))
    return alerts
