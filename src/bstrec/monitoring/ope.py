"""Off-policy estimates of what a shadow bundle's lists would have earned, from a log served by
the stochastic (Plackett-Luce) policy.

For each logged request the service also logs a shadow bundle's ranking (``shown`` False): the
list that bundle would have shown. Where the shown list was drawn at random with known
inclusion probabilities (``propensity``, bstrec.monitoring.policy), the clicks on the shown
items that the target list also holds, reweighted by 1 / propensity, estimate the clicks the
target list would have received, without showing it to anyone.

Estimator (item-level inverse propensity scoring, as in Open Bandit Pipeline's IPS and SNIPS,
https://github.com/st-tech/zr-obp, applied per item of a slate), over the N requests that have
both a logged list and a target list:

    V_IPS   = (1/N) sum_r (1/k_r) sum_{i in target(r)} 1[i shown in r] clicked_i / p_i
    V_SNIPS = sum_r (1/k_r) sum_i 1[i shown] clicked_i / p_i
              / sum_r (1/k_r) sum_i 1[i shown] / p_i

It estimates the target's CTR per shown slot, (1/N) sum_r (1/k_r) sum_{i in target(r)}
P(click i | r). Assumptions: (1) a position-free click model: whether the user clicks an item
depends on the user and the item, not on where in the list it stood or what else was shown
(it holds in the replay's simulated users; with real position bias the estimate is of the
target items' appeal, not of its list as laid out); (2) every target item had a positive
probability of being shown: Plackett-Luce gives every candidate one, but a target item that
was not among the logged policy's candidates can never match and biases V_IPS down. SNIPS trades
a small bias for a smaller variance when the weights are uneven.

Intervals are percentile bootstraps over users (their requests kept together).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from bstrec.monitoring.experiments import bootstrap_sums, percentile_interval

_LOGGED_COLUMNS = ("request_id", "user_id", "item_id", "propensity", "k", "clicked")
_SHADOW_COLUMNS = ("request_id", "item_id", "model_version")


@dataclass(frozen=True)
class OPEResult:
    """Off-policy CTR estimates of ``target_version`` with percentile bootstrap intervals."""

    target_version: str
    ips: float
    ips_lo: float
    ips_hi: float
    snips: float
    snips_lo: float
    snips_hi: float
    logged_ctr: float  # clicks / shown impressions of the same requests, as logged
    n_requests: int  # requests with both a logged and a target list
    n_users: int
    n_matched: int  # target items that were shown (the clicks the estimate sees)
    n_unmatched: int  # target requests absent from the logged rows (left out)
    # Kish's effective sample size of the per-request weights (1/k_r) sum_i 1[i shown] / p_i:
    # the number of requests of a fully overlapping log that would be as informative
    ess: float
    level: float
    n_boot: int


def _require(frame: pl.DataFrame, columns: tuple[str, ...], name: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{name} lacks the columns {missing}")


def estimate(joined: pl.DataFrame, shadow: pl.DataFrame, target_version: str, *,
             n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> OPEResult:
    """IPS and SNIPS estimates of ``target_version``'s CTR from a Plackett-Luce log.

    joined: the shown rows with ``clicked`` (bstrec.monitoring.join.join_clicks) and their
    ``propensity`` and ``k``; shadow: the shadow rows (``shown`` False, or no ``shown`` column),
    of which those of ``model_version == target_version`` are the target lists (positions
    below the request's ``k`` when a ``position`` column is present). See the module for the
    estimator and its assumptions. Raises ValueError when the log has no propensities (a
    greedy policy), the target has no shadow rows, no request has both, or no target item was
    ever shown (nothing to reweight)."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    _require(joined, _LOGGED_COLUMNS, "joined")
    _require(shadow, _SHADOW_COLUMNS, "shadow")

    target = shadow.filter(pl.col("model_version") == target_version)
    if "shown" in target.columns:
        target = target.filter(~pl.col("shown"))
    if target.is_empty():
        versions = sorted(shadow.get_column("model_version").unique().to_list())
        raise ValueError(f"target version {target_version!r} has no shadow rows (shadow "
                         f"versions present: {versions})")
    logged = joined.filter(pl.col("shown")) if "shown" in joined.columns else joined
    target_requests = target.select("request_id").unique()
    logged = logged.join(target_requests, on="request_id", how="semi")
    if logged.is_empty():
        raise ValueError(f"none of the {target_requests.height} requests with a "
                         f"{target_version!r} list is among the logged rows: are both read "
                         "from the same log and time window?")
    missing_p = logged.get_column("propensity").null_count()
    if missing_p:
        raise ValueError(f"{missing_p} of the {logged.height} logged rows have no propensity: "
                         "the log was served greedily, and off-policy estimates need the "
                         "stochastic policy's (PolicyConfig(kind='plackett_luce'))")
    p = logged.get_column("propensity")
    if bool(((p <= 0) | (p > 1)).any()):
        raise ValueError("propensities must lie in (0, 1]")

    requests = logged.group_by("request_id").agg(
        pl.col("user_id").first(), pl.col("k").first().cast(pl.Float64),
        pl.col("clicked").cast(pl.Float64).sum().alias("logged_clicks"),
        pl.len().alias("logged_shown"))
    n_unmatched = target_requests.height - requests.height
    target = target.join(requests.select("request_id", "k"), on="request_id", how="inner")
    if "position" in target.columns:
        # the target shows its top k of the request, as the logged policy did
        target = target.filter(pl.col("position") < pl.col("k"))
    target = target.unique(["request_id", "item_id"])
    hits = target.select("request_id", "item_id").join(
        logged.select("request_id", "item_id", "propensity", "clicked"),
        on=["request_id", "item_id"], how="inner")
    if hits.is_empty():
        raise ValueError(f"no item of the {target_version!r} lists was shown in any of the "
                         f"{requests.height} matched requests: no overlap to reweight")
    per_request = requests.join(
        hits.group_by("request_id").agg(
            (pl.col("clicked").cast(pl.Float64) / pl.col("propensity")).sum().alias("value"),
            (1.0 / pl.col("propensity")).sum().alias("weight")),
        on="request_id", how="left").with_columns(
        (pl.col("value").fill_null(0.0) / pl.col("k")).alias("value"),
        (pl.col("weight").fill_null(0.0) / pl.col("k")).alias("weight"))
    per_user = per_request.group_by("user_id").agg(
        pl.col("value").sum(), pl.col("weight").sum(), pl.len().cast(pl.Float64).alias("n"))
    sums = per_user.select("value", "weight", "n").to_numpy().astype(np.float64)  # (U, 3)

    value, weight, n = sums.sum(axis=0)
    boot = bootstrap_sums(sums, n_boot, np.random.default_rng(seed))
    with np.errstate(divide="ignore", invalid="ignore"):  # a resample may hold no shown target
        snips_boot = boot[:, 0] / boot[:, 1]
    ips_lo, ips_hi = percentile_interval(boot[:, 0] / boot[:, 2], level)
    snips_lo, snips_hi = percentile_interval(snips_boot, level)
    w = per_request.get_column("weight").to_numpy()
    logged_counts = requests.select(pl.col("logged_clicks").sum(), pl.col("logged_shown").sum())
    clicks, shown = (float(v) for v in logged_counts.row(0))
    return OPEResult(
        target_version=target_version, ips=float(value / n), ips_lo=ips_lo, ips_hi=ips_hi,
        snips=float(value / weight), snips_lo=snips_lo, snips_hi=snips_hi,
        logged_ctr=clicks / shown,
        n_requests=requests.height, n_users=per_user.height, n_matched=hits.height,
        n_unmatched=n_unmatched, ess=float(w.sum() ** 2 / np.square(w).sum()), level=level,
        n_boot=n_boot)
