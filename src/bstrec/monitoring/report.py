"""The monitoring report of a window of the impression log: CTR, calibration, drift, coverage,
freshness, latency, alerts and the A/B comparison.

``monitoring_summary`` computes every figure once, as JSON-ready data (``report.json``);
``write_report`` renders ``report.md`` or ``report.html`` and the PNG plots from that same dict,
so the text, the plots and the JSON can never disagree. Plots use matplotlib's object API on the
Agg canvas (no pyplot, no global backend switch).

Only shown rows count (shadow rankings were never seen); clicks are joined by
``join_clicks``. Per-source CTR counts an impression once for each source that proposed it.
Popularity is the number of events of an item in the events given (the window's), so that
"mean popularity of what is shown" compares with the same of what users chose.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import polars as pl

from bstrec.evaluation.metrics import calibration_curve, ece
from bstrec.monitoring.alerts import (
    Alert,
    AlertConfig,
    baseline_complete,
    evaluate,
    output_drift,
    split_baseline,
)
from bstrec.monitoring.drift import MAJOR, MODERATE
from bstrec.monitoring.impressions import EVENT_SCHEMA, IMPRESSION_SCHEMA, read_log
from bstrec.monitoring.join import join_clicks
from bstrec.monitoring.reference import Reference, drift

Format = Literal["md", "html"]
REPORT_JSON = "report.json"
PLOT_POSITION = "ctr_by_position.png"
PLOT_SOURCE = "ctr_by_source.png"
PLOT_PATH = "ctr_by_path.png"
PLOT_RELIABILITY = "reliability.png"
PLOT_DRIFT = "drift_psi.png"
PLOT_SCORES = "scores.png"
PLOT_FRESHNESS = "freshness.png"
PLOT_LATENCY = "latency.png"
PLOT_EXPOSURE = "exposure_lorenz.png"
QUANTILES = (0.5, 0.95, 0.99)
FRESHNESS_QUANTILES = (0.1, 0.5, 0.9, 0.99)
FRESHNESS_BINS = 20
LORENZ_POINTS = 101  # the curve is kept at this many points, whatever the catalogue's size


@dataclass(frozen=True)
class ReportResult:
    out_dir: Path
    report: Path  # report.md or report.html
    data: Path  # report.json
    plots: tuple[Path, ...]
    summary: dict[str, Any]
    alerts: tuple[Alert, ...]  # breached first


# --- figures --------------------------------------------------------------------------------

def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _ctr_by(joined: pl.DataFrame, keys: Sequence[str]) -> list[dict[str, Any]]:
    """Impressions, clicks and CTR per value of ``keys`` (sorted by them)."""
    table = (joined.group_by(*keys)
             .agg(impressions=pl.len(), clicks=pl.col("clicked").sum())
             .with_columns(ctr=pl.col("clicks") / pl.col("impressions"))
             .sort(*keys))
    return table.to_dicts()


def _ctr_section(joined: pl.DataFrame) -> dict[str, Any]:
    by_source = joined.select("sources", "clicked").explode("sources").drop_nulls("sources")
    return {
        "overall": _ratio(int(joined["clicked"].sum()), joined.height),
        "by_position": _ctr_by(joined, ["position"]),
        "by_source": _ctr_by(by_source.rename({"sources": "source"}), ["source"]),
        "by_version_arm": _ctr_by(joined, ["model_version", "arm"]),
        "by_path": _ctr_by(joined, ["path"]),
    }


def _calibration_section(joined: pl.DataFrame, n_bins: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for version in sorted(joined["model_version"].unique().to_list()):
        rows = joined.filter(pl.col("model_version") == version)
        y, p = rows["clicked"].to_numpy(), rows["score"].to_numpy()
        curve = calibration_curve(y, p, n_bins)
        bins = [{"lo": b / n_bins, "hi": (b + 1) / n_bins, "n": int(curve.counts[b]),
                 "mean_pred": float(curve.mean_pred[b]), "ctr": float(curve.frac_pos[b])}
                for b in range(n_bins) if curve.counts[b] > 0]
        out[version] = {"ece": ece(y, p, n_bins), "impressions": rows.height, "bins": bins}
    return out


def _drift_section(shown: pl.DataFrame, references: Mapping[str, Reference],
                   config: AlertConfig) -> dict[str, Any]:
    """Per model version: the inputs' PSI against its training reference (``features``), the
    outputs' against its first ``baseline_requests`` requests in the window (``outputs``,
    None until there are ``min_requests`` more), and the shown scores' shares beside the
    training predictions' on the reference's bins (``scores``: a picture, not an alert, as
    the top k of a ranking sits above random rows' scores by construction)."""
    out: dict[str, Any] = {}
    for version in sorted(shown["model_version"].unique().to_list()):
        rows = shown.filter(pl.col("model_version") == version)
        reference = references.get(version)
        baseline, current = split_baseline(rows, config)
        n_base, n_current = baseline["request_id"].n_unique(), current["request_id"].n_unique()
        outputs = None
        if baseline_complete(baseline, config) and n_current >= config.min_requests:
            outputs = {"baseline_requests": n_base,
                       "baseline_users": baseline["user_id"].n_unique(), "requests": n_current,
                       **output_drift(baseline, current)}
        section: dict[str, Any] = {"reference": reference is not None, "outputs": outputs}
        if reference is not None:
            section["features"] = drift(rows, reference)
            if reference.scored_rows:
                p = reference.predictions
                section["scores"] = {"edges": list(p.edges), "training": list(p.shares),
                                     "served": p.observed(rows["score"])[:-1].tolist()}
        out[version] = section
    return out


def gini(values: npt.ArrayLike) -> float | None:
    """Gini coefficient of non-negative ``values`` (0: equal exposure, towards 1: all on one);
    None when there is nothing to share."""
    x = np.sort(np.asarray(values, dtype=np.float64).ravel())
    n, total = x.size, x.sum()
    if n == 0 or total <= 0:
        return None
    ranks = np.arange(1, n + 1)
    return float(2 * np.sum(ranks * x) / (n * total) - (n + 1) / n)


def _lorenz(exposure: npt.NDArray[np.float64]) -> dict[str, list[float]]:
    """The exposure Lorenz curve (share of items, least shown first -> share of impressions)."""
    x = np.sort(exposure)
    cum = np.concatenate([[0.0], np.cumsum(x)]) / max(float(x.sum()), 1.0)
    items = np.linspace(0.0, 1.0, cum.size)
    grid = np.linspace(0.0, 1.0, LORENZ_POINTS)
    return {"items": grid.tolist(), "impressions": np.interp(grid, items, cum).tolist()}


def _coverage_section(shown: pl.DataFrame, events: pl.DataFrame,
                      references: Mapping[str, Reference]) -> dict[str, Any]:
    exposure = shown.group_by("item_id").agg(n=pl.len())
    counts = exposure["n"].to_numpy().astype(np.float64)
    sizes = [r.catalog_size for r in references.values() if r.catalog_size]
    catalog = max(sizes) if sizes else None
    popularity = events.group_by("item_id").agg(pop=pl.len())
    shown_pop = shown.select("item_id").join(popularity, on="item_id", how="left")["pop"]
    out: dict[str, Any] = {
        "items_shown": exposure.height,
        "catalog_size": catalog,
        "coverage": _ratio(exposure.height, catalog) if catalog else None,
        "gini": gini(counts),
        # never-shown catalogue items as zero exposure: the bias of the whole catalogue
        "gini_catalog": (gini(np.concatenate([counts, np.zeros(max(catalog - counts.size, 0))]))
                         if catalog else None),
        "mean_shown_popularity": (float(np.mean(shown_pop.fill_null(0).to_numpy()))
                                  if events.height and shown.height else None),
        "mean_event_popularity": (float(popularity["pop"].pow(2).sum() / events.height)
                                  if events.height else None),
        "lorenz": _lorenz(counts) if counts.size else None,
    }
    return out


def _quantiles(values: npt.NDArray[np.float64], qs: Sequence[float]) -> dict[str, float | None]:
    if values.size == 0:
        return {f"p{round(q * 100)}": None for q in qs}
    return {f"p{round(q * 100)}": float(v) for q, v in zip(qs, np.quantile(values, qs),
                                                           strict=True)}


def _freshness_section(requests: pl.DataFrame) -> dict[str, Any]:
    values = requests["freshness_s"].drop_nulls().to_numpy().astype(np.float64)
    out: dict[str, Any] = {"requests": requests.height,
                           "missing_share": _ratio(requests["freshness_s"].null_count(),
                                                   requests.height),
                           **_quantiles(values, FRESHNESS_QUANTILES), "histogram": None}
    if values.size:
        # ages span seconds to months: log-spaced bins
        logs = np.log10(np.maximum(values, 0.0) + 1.0)
        counts, edges = np.histogram(logs, bins=FRESHNESS_BINS)
        out["histogram"] = {"log10_edges": edges.tolist(), "counts": counts.tolist()}
    return out


def _latency_section(requests: pl.DataFrame) -> dict[str, Any]:
    if requests.is_empty():
        return {}
    timings = requests["timings_ms"].str.json_decode(infer_schema_length=None)
    if not isinstance(timings.dtype, pl.Struct):
        return {}
    stages = timings.struct.unnest()
    out: dict[str, Any] = {}
    for stage in stages.columns:
        values = stages[stage].cast(pl.Float64).drop_nulls().to_numpy()
        out[stage] = {"requests": int(values.size), **_quantiles(values, QUANTILES)}
    return out


def _ab_section(joined: pl.DataFrame, n_boot: int, seed: int) -> dict[str, Any]:
    arms = {a["arm"]: a for a in (joined.group_by("arm")
                                  .agg(impressions=pl.len(), clicks=pl.col("clicked").sum(),
                                       users=pl.col("user_id").n_unique())
                                  .with_columns(ctr=pl.col("clicks") / pl.col("impressions"))
                                  .sort("arm").to_dicts())}
    out: dict[str, Any] = {"arms": list(arms.values()), "comparison": None}
    if len(arms) == 2:
        from bstrec.monitoring.experiments import compare_arms

        a, b = sorted(arms)
        comparison = compare_arms(joined, a, b, n_boot=n_boot, seed=seed)
        out["comparison"] = {**dataclasses.asdict(comparison), "n_boot": n_boot}
    return out


def _alerts(impressions: pl.DataFrame, joined: pl.DataFrame,
            references: Mapping[str, Reference], config: AlertConfig) -> list[Alert]:
    """Every model version's alerts against its own reference, breached first."""
    out: list[Alert] = []
    for version in sorted(joined["model_version"].unique().to_list()):
        mine = pl.col("model_version") == version
        for alert in evaluate(impressions.filter(mine), references.get(version), config,
                              joined.filter(mine)):
            out.append(dataclasses.replace(alert, model_version=version))
    return sorted(out, key=lambda a: not a.breached)


def monitoring_summary(impressions: pl.DataFrame, events: pl.DataFrame, *, window_s: float,
                       references: Mapping[str, Reference], alert_config: AlertConfig,
                       n_boot: int = 1000, seed: int = 0) -> tuple[dict[str, Any], list[Alert]]:
    """Every figure of the report as JSON-ready data, and the alerts (breached first)."""
    # a window without rows may come as a frame without columns: give it the log's schema
    if impressions.is_empty():
        impressions = empty_impressions()
    if events.is_empty():
        events = empty_events()
    joined = join_clicks(impressions, events, window_s)
    requests = joined.unique("request_id", keep="first", maintain_order=True)
    alerts = _alerts(impressions, joined, references, alert_config)
    ts = joined["ts"]
    summary: dict[str, Any] = {
        "window": {"start": ts.min() if ts.len() else None,
                   "end": ts.max() if ts.len() else None,
                   "click_window_s": window_s, "impressions": joined.height,
                   "shadow_rows": impressions.height - joined.height,
                   "requests": requests.height, "users": joined["user_id"].n_unique(),
                   "events": events.height, "clicks": int(joined["clicked"].sum())},
        "ctr": _ctr_section(joined),
        "calibration": _calibration_section(joined, alert_config.ece_bins),
        "drift": _drift_section(joined, references, alert_config),
        "coverage": _coverage_section(joined, events, references),
        "freshness": _freshness_section(requests),
        "latency": _latency_section(requests),
        "alerts": [dataclasses.asdict(a) for a in alerts],
        "ab": _ab_section(joined, n_boot, seed),
        "thresholds": {"psi_moderate": MODERATE, "psi_major": MAJOR,
                       **dataclasses.asdict(alert_config)},
    }
    return _finite(summary), alerts


def _finite(value: Any) -> Any:
    """NaN and infinities as None (JSON has neither), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


# --- plots ----------------------------------------------------------------------------------

def _plot_bars(path: Path, labels: Sequence[str], series: Mapping[str, Sequence[float | None]],
               *, title: str, ylabel: str, hlines: Mapping[str, float] | None = None) -> None:
    """Grouped bars: one group per label, one bar per series (None: no bar)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.5 * len(labels) * max(len(series), 1) + 2), 4.5),
                 layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(labels))
    width = 0.8 / max(len(series), 1)
    for k, (name, values) in enumerate(series.items()):
        heights = [np.nan if v is None else v for v in values]
        ax.bar(x + (k - (len(series) - 1) / 2) * width, heights, width, label=name)
    for name, y in (hlines or {}).items():
        ax.axhline(y, linestyle="--", color="0.4", linewidth=1)
        ax.annotate(name, (0, y), xytext=(2, 2), textcoords="offset points", fontsize=8,
                    xycoords=("axes fraction", "data"))
    ax.set_xticks(x, list(labels), rotation=30 if len(labels) > 8 else 0, ha="right"
                  if len(labels) > 8 else "center", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def _plot_reliability(path: Path, calibration: Mapping[str, Any]) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 5.5), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ":", color="0.5", label="perfect")
    for version, row in calibration.items():
        bins = row["bins"]
        ax.plot([b["mean_pred"] for b in bins], [b["ctr"] for b in bins], marker="o",
                label=f"{version} (ECE {_fmt(row['ece'])})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean predicted click probability (bin)")
    ax.set_ylabel("observed CTR (bin)")
    ax.set_title("Calibration per model version")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def _plot_histogram(path: Path, edges: Sequence[float], counts: Sequence[int], *, title: str,
                    xlabel: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.subplots()
    ax.stairs(counts, edges, fill=True, alpha=0.7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("requests")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)


def _plot_lorenz(path: Path, lorenz: Mapping[str, Sequence[float]], gini_value: float | None
                 ) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 5.5), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ":", color="0.5", label="equal exposure")
    ax.plot(lorenz["items"], lorenz["impressions"], label=f"shown items (Gini {_fmt(gini_value)})")
    ax.set_xlabel("share of shown items, least shown first")
    ax.set_ylabel("share of impressions")
    ax.set_title("Exposure concentration")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def _write_plots(summary: Mapping[str, Any], out: Path) -> dict[str, Path]:
    """The plots the summary has data for, by section."""
    plots: dict[str, Path] = {}
    ctr = summary["ctr"]
    for key, name, column, title in (
            ("by_position", PLOT_POSITION, "position", "CTR by position (0 = top)"),
            ("by_source", PLOT_SOURCE, "source", "CTR by candidate source"),
            ("by_path", PLOT_PATH, "path", "CTR by match path")):
        rows = ctr[key]
        if rows:
            _plot_bars(out / name, [str(r[column]) for r in rows], {"CTR": [r["ctr"] for r in rows]},
                       title=title, ylabel="CTR")
            plots[key] = out / name
    if summary["calibration"]:
        _plot_reliability(out / PLOT_RELIABILITY, summary["calibration"])
        plots["calibration"] = out / PLOT_RELIABILITY
    psis = {v: _psi_rows(d) for v, d in summary["drift"].items()}
    names = sorted({n for rows in psis.values() for n in rows})
    if names:
        series = {v: [rows.get(n) for n in names] for v, rows in psis.items()}
        _plot_bars(out / PLOT_DRIFT, names, series,
                   title="PSI: inputs against the training reference, outputs against the "
                   "first requests", ylabel="PSI", hlines={"moderate": MODERATE, "major": MAJOR})
        plots["drift"] = out / PLOT_DRIFT
    scores = {v: d["scores"] for v, d in summary["drift"].items() if d.get("scores")}
    if scores:
        _plot_scores(out / PLOT_SCORES, scores)
        plots["scores"] = out / PLOT_SCORES
    hist = summary["freshness"]["histogram"]
    if hist:
        _plot_histogram(out / PLOT_FRESHNESS, hist["log10_edges"], hist["counts"],
                        title="Freshness: age of the newest behaviour at request time",
                        xlabel="log10(1 + seconds)")
        plots["freshness"] = out / PLOT_FRESHNESS
    latency = summary["latency"]
    if latency:
        stages = list(latency)
        series = {q: [latency[s][q] for s in stages] for q in _quantile_keys(QUANTILES)}
        _plot_bars(out / PLOT_LATENCY, stages, series, title="Latency per stage",
                   ylabel="milliseconds")
        plots["latency"] = out / PLOT_LATENCY
    coverage = summary["coverage"]
    if coverage["lorenz"]:
        _plot_lorenz(out / PLOT_EXPOSURE, coverage["lorenz"], coverage["gini"])
        plots["coverage"] = out / PLOT_EXPOSURE
    return plots


def _psi_rows(section: Mapping[str, Any]) -> dict[str, float]:
    """Name -> PSI of one version's drift section: inputs by feature name, outputs suffixed
    with what they are compared with."""
    rows = dict(section.get("features") or {})
    outputs = section.get("outputs")
    if outputs:
        rows |= {f"{n} (vs baseline)": outputs[n] for n in ("predictions", "category")}
    return rows


def _plot_scores(path: Path, scores: Mapping[str, Mapping[str, Sequence[float]]]) -> None:
    """Per version, the shares of served and training scores on the training deciles."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 3.5 * len(scores)), layout="constrained")
    axes = fig.subplots(len(scores), 1, squeeze=False)[:, 0]
    for ax, (version, s) in zip(axes, scores.items(), strict=True):
        edges = s["edges"]
        labels = [f"<={e:.3g}" for e in edges] + [f">{edges[-1]:.3g}" if edges else "all"]
        x = np.arange(len(labels))
        ax.bar(x - 0.2, s["training"], 0.4, label="training predictions (validation rows)")
        ax.bar(x + 0.2, s["served"], 0.4, label="shown scores")
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("share")
        ax.set_title(f"Scores of {version}: shown (top k) beside training rows")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def _quantile_keys(qs: Sequence[float]) -> list[str]:
    return [f"p{round(q * 100)}" for q in qs]


# --- rendering ------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Heading:
    text: str


@dataclass(frozen=True)
class _Text:
    text: str


@dataclass(frozen=True)
class _Table:
    headers: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]


@dataclass(frozen=True)
class _Image:
    path: str
    alt: str


_Block = _Heading | _Text | _Table | _Image


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> _Table:
    return _Table(tuple(columns), tuple(tuple(r.get(c) for c in columns) for r in rows))


def _blocks(summary: Mapping[str, Any], plots: Mapping[str, Path]) -> list[_Block]:
    """The report's content in order, independent of the output format."""
    w, ctr = summary["window"], summary["ctr"]

    def image(key: str, alt: str) -> list[_Block]:
        return [_Image(plots[key].name, alt)] if key in plots else []

    blocks: list[_Block] = [
        _Heading("Window"),
        _Text(f"{w['impressions']} shown impressions of {w['requests']} requests by "
              f"{w['users']} users ({w['shadow_rows']} shadow rows left out); {w['events']} "
              f"events, {w['clicks']} clicked impressions (click window {_fmt(w['click_window_s'])}"
              f" s). Overall CTR {_fmt(ctr['overall'])}."),
        _Heading("Alerts"),
    ]
    alerts = summary["alerts"]
    blocks.append(_table(alerts, ["name", "model_version", "value", "threshold", "breached"])
                  if alerts else _Text("No alert could be computed on this window."))
    blocks += [_Heading("CTR by position"),
               _table(ctr["by_position"], ["position", "impressions", "clicks", "ctr"]),
               *image("by_position", "CTR by position"),
               _Heading("CTR by candidate source"),
               _Text("An impression counts for every source that proposed it."),
               _table(ctr["by_source"], ["source", "impressions", "clicks", "ctr"]),
               *image("by_source", "CTR by source"),
               _Heading("CTR by model version and arm"),
               _table(ctr["by_version_arm"], ["model_version", "arm", "impressions", "clicks",
                                              "ctr"]),
               _Heading("CTR by match path"),
               _table(ctr["by_path"], ["path", "impressions", "clicks", "ctr"]),
               *image("by_path", "CTR by path")]
    ab = summary["ab"]
    blocks += [_Heading("A/B"), _table(ab["arms"], ["arm", "users", "impressions", "clicks",
                                                    "ctr"])]
    c = ab["comparison"]
    if c:
        blocks.append(_Text(f"CTR({c['arm_b']}) - CTR({c['arm_a']}) = {_fmt(c['diff'])}, "
                            f"{round(100 * c['level'])}% bootstrap interval over users "
                            f"[{_fmt(c['lo'])}, {_fmt(c['hi'])}] "
                            f"({c['users_a']} and {c['users_b']} users, {c['n_boot']} "
                            "resamples)."))
    calibration = summary["calibration"]
    blocks += [_Heading("Calibration"),
               _table([{"model_version": v, **r} for v, r in calibration.items()],
                      ["model_version", "impressions", "ece"]),
               *image("calibration", "reliability diagram")]
    blocks.append(_Heading("Drift"))
    blocks.append(_Text(
        f"PSI: below {_fmt(MODERATE)} stable, up to {_fmt(MAJOR)} moderate, above it major. "
        "Inputs against the bundle's training reference; outputs (shown scores and "
        "categories) against the version's first requests in the window (at least "
        f"{summary['thresholds']['baseline_requests']}, of at least "
        f"{summary['thresholds']['baseline_users']} users), as the training data has no shown "
        "lists to compare with."))
    rows = [{"model_version": v, "feature": f, "psi": p}
            for v, d in summary["drift"].items() for f, p in _psi_rows(d).items()]
    missing = [v for v, d in summary["drift"].items() if not d["reference"]]
    blocks.append(_table(rows, ["model_version", "feature", "psi"]))
    if missing:
        blocks.append(_Text(f"No reference for {', '.join(missing)}: no input drift "
                            "computed."))
    blocks += image("drift", "PSI per feature")
    blocks += image("scores", "shown scores beside training predictions")
    cov = summary["coverage"]
    blocks += [_Heading("Coverage and popularity bias"),
               _table([cov], ["items_shown", "catalog_size", "coverage", "gini", "gini_catalog",
                              "mean_shown_popularity", "mean_event_popularity"]),
               _Text("Popularity: events of the item in this window; the event mean weighs "
                     "each event by its item's popularity (what users chose)."),
               *image("coverage", "exposure Lorenz curve")]
    fr = summary["freshness"]
    blocks += [_Heading("Freshness"),
               _table([fr], ["requests", "missing_share", *_quantile_keys(FRESHNESS_QUANTILES)]),
               _Text("Seconds from the user's newest behaviour to the request; missing: "
                     "no behaviour."),
               *image("freshness", "freshness histogram")]
    blocks += [_Heading("Latency per stage (ms)"),
               _table([{"stage": s, **v} for s, v in summary["latency"].items()],
                      ["stage", "requests", *_quantile_keys(QUANTILES)]),
               *image("latency", "latency per stage")]
    return blocks


def _render_md(blocks: Sequence[_Block], title: str) -> str:
    lines = [f"# {title}", ""]
    for b in blocks:
        if isinstance(b, _Heading):
            lines += [f"## {b.text}", ""]
        elif isinstance(b, _Text):
            lines += [b.text, ""]
        elif isinstance(b, _Image):
            lines += [f"![{b.alt}]({b.path})", ""]
        elif not b.rows:
            lines += ["(no data)", ""]
        else:
            lines.append("| " + " | ".join(b.headers) + " |")
            lines.append("|" + "---|" * len(b.headers))
            lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in b.rows]
            lines.append("")
    return "\n".join(lines)


def _render_html(blocks: Sequence[_Block], title: str) -> str:
    e = html.escape
    parts = ["<!doctype html>", "<html><head><meta charset='utf-8'>", f"<title>{e(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:60em;margin:auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}"
             "</style></head><body>", f"<h1>{e(title)}</h1>"]
    for b in blocks:
        if isinstance(b, _Heading):
            parts.append(f"<h2>{e(b.text)}</h2>")
        elif isinstance(b, _Text):
            parts.append(f"<p>{e(b.text)}</p>")
        elif isinstance(b, _Image):
            parts.append(f"<p><img src='{e(b.path)}' alt='{e(b.alt)}'></p>")
        elif not b.rows:
            parts.append("<p>(no data)</p>")
        else:
            head = "".join(f"<th>{e(h)}</th>" for h in b.headers)
            body = "".join("<tr>" + "".join(f"<td>{e(_fmt(v))}</td>" for v in row) + "</tr>"
                           for row in b.rows)
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# --- entry points ---------------------------------------------------------------------------

def write_report(impressions: pl.DataFrame, events: pl.DataFrame, out_dir: str | Path, *,
                 window_s: float, references: Mapping[str, Reference],
                 alert_config: AlertConfig | None = None, fmt: Format = "md",
                 n_boot: int = 1000, seed: int = 0) -> ReportResult:
    """Write ``report.md`` (or ``report.html``), ``report.json`` and the plots into ``out_dir``.

    ``impressions``/``events``: IMPRESSION_SCHEMA/EVENT_SCHEMA rows of the window;
    ``references``: model version -> its bundle's reference (versions without one get no drift
    or reference alerts); ``window_s``: the click window of ``join_clicks``.
    """
    if fmt not in ("md", "html"):
        raise ValueError(f"fmt must be 'md' or 'html', got {fmt!r}")
    config = alert_config or AlertConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary, alerts = monitoring_summary(impressions, events, window_s=window_s,
                                         references=references, alert_config=config,
                                         n_boot=n_boot, seed=seed)
    data = out / REPORT_JSON
    data.write_text(json.dumps(summary, indent=1) + "\n")
    plots = _write_plots(summary, out)
    blocks = _blocks(summary, plots)
    w = summary["window"]
    title = "Monitoring report" + (f" ({_when(w['start'])} to {_when(w['end'])})"
                                   if w["start"] is not None else " (empty window)")
    report = out / f"report.{fmt}"
    report.write_text(_render_md(blocks, title) if fmt == "md" else _render_html(blocks, title))
    return ReportResult(out, report, data, tuple(plots.values()), summary, tuple(alerts))


def _when(ts: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def write_log_report(log_dir: str | Path, out_dir: str | Path, *, since: float | None = None,
                     until: float | None = None, window_s: float,
                     references: Mapping[str, Reference],
                     alert_config: AlertConfig | None = None, fmt: Format = "md",
                     n_boot: int = 1000, seed: int = 0) -> ReportResult:
    """``write_report`` on the impressions of ``log_dir`` with ``since <= ts < until``, and the
    events up to ``window_s`` past ``until`` (the clicks of the window's last answers)."""
    impressions = read_log(log_dir, "impressions", since, until)
    events = read_log(log_dir, "events", since,
                      None if until is None else until + window_s)
    return write_report(impressions, events, out_dir, window_s=window_s, references=references,
                        alert_config=alert_config, fmt=fmt, n_boot=n_boot, seed=seed)


def empty_impressions() -> pl.DataFrame:
    """A frame of IMPRESSION_SCHEMA without rows."""
    frame = pl.from_arrow(IMPRESSION_SCHEMA.empty_table())
    assert isinstance(frame, pl.DataFrame)
    return frame


def empty_events() -> pl.DataFrame:
    """A frame of EVENT_SCHEMA without rows."""
    frame = pl.from_arrow(EVENT_SCHEMA.empty_table())
    assert isinstance(frame, pl.DataFrame)
    return frame


