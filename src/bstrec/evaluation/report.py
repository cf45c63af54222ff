"""Offline evaluation report: a table per model, the count-based references, AUC by history
length, the paired bootstrap of BST - DIN, and plots.

``evaluation_summary`` computes every number once, as JSON-ready data; ``write_report`` writes it
to ``metrics.json`` and renders ``report.md`` and the PNG plots from that same dict, so the text
and the JSON can never disagree. Plots use matplotlib's object API on the Agg canvas (no pyplot,
no global backend switch).

History-length buckets count the behaviours in a sample's history (at most ``max_len``, 20 in
P1): 0, 1-4, 5-9, 10-19, 20+. The bootstrap resamples users (samples of one user are not
independent) and, with several seeds, compares the seeds' mean AUCs on each resample.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl

from bstrec.evaluation.metrics import (
    auc,
    auc_by_bucket,
    calibration_curve,
    ece,
    gauc,
    logloss,
    mean_std,
    paired_bootstrap_auc_diff,
    rela_impr,
)

FloatArray = npt.NDArray[np.float64]
# model name -> (N,) probabilities, or S of them (one per seed)
Predictions = Mapping[str, npt.ArrayLike]

# (lowest, highest or None, name) of each history-length bucket
HISTORY_BUCKETS: tuple[tuple[int, int | None, str], ...] = (
    (0, 0, "0"), (1, 4, "1-4"), (5, 9, "5-9"), (10, 19, "10-19"), (20, None, "20+"))
REFERENCE_NAMES = {
    "item_rate": "item rate (ref. a)",
    "rate_lr": "rate LR (ref. b)",
}
N_BINS = 10

PLOT_HISTORY = "auc_by_history_length.png"
PLOT_CALIBRATION = "calibration.png"
PLOT_ATTENTION = "attention.png"


def history_buckets(lengths: npt.ArrayLike) -> tuple[npt.NDArray[np.int64], list[str]]:
    """Bucket id of each history length (see ``HISTORY_BUCKETS``) and the bucket names."""
    n = np.asarray(lengths, dtype=np.int64).ravel()
    edges = np.array([lo for lo, _, _ in HISTORY_BUCKETS[1:]])
    ids: npt.NDArray[np.int64] = np.searchsorted(edges, n, side="right").astype(np.int64)
    return ids, [name for _, _, name in HISTORY_BUCKETS]


def history_lengths(frame: pl.DataFrame) -> npt.NDArray[np.int64]:
    """``hist_len`` if the frame has it, else the length of the ``hist_item`` lists."""
    if "hist_len" in frame.columns:
        return frame["hist_len"].to_numpy().astype(np.int64)
    if "hist_item" in frame.columns:
        return frame["hist_item"].list.len().to_numpy().astype(np.int64)
    raise ValueError("test_frame needs a 'hist_len' or a 'hist_item' column")


def _as_seeds(name: str, p: npt.ArrayLike, n: int) -> FloatArray:
    """(S, n) probabilities from one array (n,) or a list of S arrays."""
    arr = np.asarray(p, dtype=np.float64)
    arr = arr[None, :] if arr.ndim == 1 else arr
    if arr.ndim != 2 or arr.shape[1] != n or arr.shape[0] == 0:
        raise ValueError(f"predictions of {name!r} must be (n,) or S arrays of (n,) with n = {n}, "
                         f"got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"predictions of {name!r} hold NaN or infinite values")
    return arr


def _find(names: Sequence[str], wanted: str | None) -> str | None:
    if wanted is None:
        return None
    hits = [n for n in names if n.lower() == wanted.lower()]
    return hits[0] if hits else None


def _stat(values: list[float]) -> dict[str, Any]:
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "values": values}


def _row(probs: FloatArray, y: FloatArray, users: np.ndarray, bucket_ids: np.ndarray,
         bucket_names: list[str], kind: str) -> dict[str, Any]:
    """Metrics of one model (or reference) over its seeds."""
    by_hist = [[b.auc for b in auc_by_bucket(y, p, bucket_ids, bucket_names)] for p in probs]
    # a bucket without both labels is NaN for every seed alike
    hist_mean = np.mean(np.array(by_hist), axis=0)
    curve = calibration_curve(np.tile(y, probs.shape[0]), probs.ravel(), N_BINS)
    return {
        "kind": kind,
        "seeds": int(probs.shape[0]),
        "auc": _stat([auc(y, p) for p in probs]),
        "gauc": _stat([gauc(users, y, p) for p in probs]),
        "logloss": _stat([logloss(y, p) for p in probs]),
        "ece": _stat([ece(y, p, N_BINS) for p in probs]),
        "rela_impr": None,
        "auc_by_history": [float(v) for v in hist_mean],
        # pooled over the seeds: the average reliability curve
        "calibration": {"mean_pred": curve.mean_pred.tolist(), "frac_pos": curve.frac_pos.tolist(),
                        "count": curve.counts.tolist()},
    }


def _json_ready(x: Any) -> Any:
    """NaN / inf -> None (JSON has no NaN), NumPy scalars -> Python, tuples -> lists."""
    if isinstance(x, dict):
        return {str(k): _json_ready(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_ready(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def evaluation_summary(*, protocol: str, test_frame: pl.DataFrame, predictions: Predictions,
                       references: Mapping[str, npt.ArrayLike] | None = None,
                       baseline: str | None = "wdl", compare: tuple[str, str] = ("bst", "din"),
                       also_compare: Sequence[tuple[str, str]] = (),
                       n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Every number of the report, JSON-ready (NaN as None).

    ``test_frame``: the test split with raw ``user_id``, ``label`` and ``hist_item`` (or
    ``hist_len``). ``predictions``: model name -> (N,) probabilities, or a list of them, one per
    seed. ``references``: e.g. ``references.reference_scores(splits)``. RelaImpr is over the
    model named ``baseline`` (case-insensitive) when present, from the seeds' mean AUCs. The
    paired bootstrap of ``compare[0] - compare[1]`` (and of each pair of ``also_compare``) runs
    when both are present.
    """
    n = test_frame.height
    y = test_frame["label"].to_numpy().astype(np.float64)
    users = test_frame["user_id"].to_numpy()
    bucket_ids, bucket_names = history_buckets(history_lengths(test_frame))
    models = {name: _as_seeds(name, p, n) for name, p in predictions.items()}
    refs = {name: _as_seeds(name, p, n) for name, p in (references or {}).items()}
    if not models:
        raise ValueError("no predictions to evaluate")

    rows_m = {k: _row(v, y, users, bucket_ids, bucket_names, "model") for k, v in models.items()}
    rows_r = {k: _row(v, y, users, bucket_ids, bucket_names, "reference") for k, v in refs.items()}
    base = _find(list(models), baseline)
    if base is not None:
        base_auc = rows_m[base]["auc"]["mean"]
        for row in (*rows_m.values(), *rows_r.values()):
            row["rela_impr"] = rela_impr(row["auc"]["mean"], base_auc)

    boots: list[dict[str, Any]] = []
    for pair in (compare, *also_compare):
        a, b = _find(list(models), pair[0]), _find(list(models), pair[1])
        if a is not None and b is not None and a != b:
            res = paired_bootstrap_auc_diff(y, models[a], models[b], n_boot=n_boot, seed=seed,
                                            groups=users)
            boots.append({"a": a, "b": b, "diff": res.diff, "lo": res.lo, "hi": res.hi,
                          "n_boot": n_boot, "seed": seed, "resample": "users", "level": 0.95})
    main = [x for x in boots if (x["a"].lower(), x["b"].lower()) == tuple(c.lower() for c in compare)]

    counts = np.bincount(bucket_ids, minlength=len(bucket_names))
    pos = np.bincount(bucket_ids, weights=y, minlength=len(bucket_names))
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = pos / counts
    summary = {
        "protocol": protocol,
        "n_test": n,
        "n_users": int(np.unique(users).size),
        "positive_rate": float(y.mean()) if n else float("nan"),
        "baseline": base,
        "models": rows_m,
        "references": rows_r,
        "history": {"buckets": bucket_names, "n": counts.tolist(), "positive_rate": rate.tolist()},
        "bootstrap": main[0] if main else None,  # the ``compare`` pair
        "bootstraps": boots,  # every pair asked for and present, ``compare`` first
        "calibration_bins": N_BINS,
    }
    out: dict[str, Any] = _json_ready(summary)
    return out


def _num(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _mean_std(stat: dict[str, Any], seeds: int) -> str:
    if seeds > 1:
        return f"{_num(stat['mean'])} ± {_num(stat['std'])}"
    return _num(stat["mean"])


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.2f}%"


def _display(name: str, row: dict[str, Any]) -> str:
    return REFERENCE_NAMES.get(name, name) if row["kind"] == "reference" else name


def render_markdown(summary: dict[str, Any], *, plots: Sequence[str] = ()) -> str:
    """``report.md`` from an ``evaluation_summary`` dict."""
    rows = {**summary["models"], **summary["references"]}
    base = summary["baseline"]
    lines = [
        f"# Offline evaluation: {summary['protocol']}",
        "",
        f"Test split: {summary['n_test']:,} samples, {summary['n_users']:,} users, positive rate "
        f"{_num(summary['positive_rate'])}. With several seeds a cell is mean ± sample std over "
        "the seeds. GAUC = per-user AUC weighted by the user's sample count over users with both "
        f"labels; ECE over {summary['calibration_bins']} equal-width bins. References (rule P1.8) "
        "learn no embeddings.",
        "",
        "## Results",
        "",
        f"| model | seeds | AUC | GAUC | logloss | ECE | RelaImpr vs {base or 'baseline'} |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        s = row["seeds"]
        lines.append(
            f"| {_display(name, row)} | {s} | {_mean_std(row['auc'], s)} | "
            f"{_mean_std(row['gauc'], s)} | {_mean_std(row['logloss'], s)} | "
            f"{_mean_std(row['ece'], s)} | {_pct(row['rela_impr'])} |")
    if base is None:
        lines += ["", "No baseline model among the predictions: RelaImpr is not reported."]

    hist = summary["history"]
    lines += [
        "",
        "## AUC by history length",
        "",
        "Buckets count the behaviours in a sample's history (capped at the sequence length). "
        "Mean AUC over seeds; n/a where a bucket lacks one of the labels.",
        "",
        "| | " + " | ".join(hist["buckets"]) + " |",
        "|---" * (len(hist["buckets"]) + 1) + "|",
        "| samples | " + " | ".join(f"{c:,}" for c in hist["n"]) + " |",
        "| positive rate | " + " | ".join(_num(r) for r in hist["positive_rate"]) + " |",
    ]
    for name, row in rows.items():
        lines.append(f"| {_display(name, row)} | "
                     + " | ".join(_num(v) for v in row["auc_by_history"]) + " |")

    for boot in summary["bootstraps"]:
        lines += [
            "",
            f"## AUC difference {boot['a']} - {boot['b']} (paired bootstrap)",
            "",
            f"AUC({boot['a']}) - AUC({boot['b']}) = {_num(boot['diff'])}, "
            f"{int(boot['level'] * 100)}% interval [{_num(boot['lo'])}, {_num(boot['hi'])}] "
            f"from {boot['n_boot']} resamples of the test {boot['resample']} "
            f"(seed {boot['seed']}); "
            "both models are scored on the same resample, and with several seeds each side is "
            "the mean AUC of its seeds.",
        ]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _plot_history(summary: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    hist = summary["history"]
    x = np.arange(len(hist["buckets"]))
    fig = Figure(figsize=(7, 5.5), layout="constrained")
    ax, ax_n = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    for name, row in {**summary["models"], **summary["references"]}.items():
        vals = [np.nan if v is None else v for v in row["auc_by_history"]]
        style = "--" if row["kind"] == "reference" else "-"
        ax.plot(x, vals, style, marker="o", label=_display(name, row))
    ax.set_ylabel("test AUC")
    ax.set_title(f"AUC by history length ({summary['protocol']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax_n.bar(x, hist["n"], color="0.6")
    ax_n.set_ylabel("samples")
    ax_n.set_xticks(x, hist["buckets"])
    ax_n.set_xlabel("behaviours in history")
    fig.savefig(path, dpi=120)


def _plot_calibration(summary: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 6), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ":", color="0.5", label="perfect")
    for name, row in {**summary["models"], **summary["references"]}.items():
        cal = row["calibration"]
        ok = [c > 0 for c in cal["count"]]
        mp = [m for m, k in zip(cal["mean_pred"], ok, strict=True) if k]
        fp = [f for f, k in zip(cal["frac_pos"], ok, strict=True) if k]
        style = "--" if row["kind"] == "reference" else "-"
        ax.plot(mp, fp, style, marker="o", label=f"{_display(name, row)} "
                f"(ECE {_num(row['ece']['mean'])})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean predicted probability (bin)")
    ax.set_ylabel("positive rate (bin)")
    ax.set_title(f"Calibration on test ({summary['calibration_bins']} bins, seeds pooled)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def attention_view(attention: npt.ArrayLike, tokens: Sequence[str] | None
                   ) -> tuple[FloatArray, FloatArray, list[str]]:
    """What the attention plot shows of (heads, L+1, L+1) maps (or one (L+1, L+1) map): the mean
    over heads (T, T) and each head's row of the last token, the target (heads, T), over the T
    tokens that are not padding (label ""), with their labels (positions when none are given)."""
    att = np.asarray(attention, dtype=np.float64)
    att = att[None] if att.ndim == 2 else att
    if att.ndim != 3 or att.shape[1] != att.shape[2]:
        raise ValueError(f"attention must be (heads, L+1, L+1), got shape {att.shape}")
    size = att.shape[1]
    labels = list(tokens) if tokens is not None else [str(i) for i in range(size)]
    if len(labels) != size:
        raise ValueError(f"{len(labels)} attention tokens for maps of size {size}")
    # padding keys get no weight and padding queries attend to nothing real: both are left out
    keep = np.array([i for i, t in enumerate(labels) if t != "" or i == size - 1])
    att = att[:, keep][:, :, keep]
    return att.mean(axis=0), att[:, -1, :], [labels[i] for i in keep]


def _short(label: str, width: int = 32) -> str:
    return label if len(label) <= width else label[:width - 1] + "…"


def _plot_attention(attention: npt.ArrayLike, tokens: Sequence[str] | None, path: Path) -> None:
    """Top: the mean over heads, query by key; bottom: what the target attends to, head by head.
    Attention rows sum to one, so their weights sit in a narrow band; each panel's colours span
    its own smallest to largest weight (a perceptual colormap, with a colourbar) so that the
    differences show."""
    from matplotlib.figure import Figure

    mean, target, labels = attention_view(attention, tokens)
    heads, size = target.shape
    short = [_short(t) for t in labels]
    cell = 0.32
    fig = Figure(figsize=(cell * size + 4.5, cell * (size + heads) + 3.5), layout="constrained")
    ax_map, ax_target = fig.subplots(2, 1, sharex=True, height_ratios=[size, max(heads, 2)])
    for ax, data, label in ((ax_map, mean, "attention weight, mean over heads"),
                            (ax_target, target, "attention weight of the target")):
        image = ax.imshow(data, vmin=float(data.min()), vmax=float(data.max()), cmap="viridis",
                          aspect="auto", interpolation="nearest")
        fig.colorbar(image, ax=ax, label=label, shrink=0.9)
    ax_map.set_yticks(np.arange(size), short, fontsize=7)
    ax_map.set_ylabel("query (behaviours oldest first, target last)", fontsize=8)
    ax_map.set_title("mean over heads", fontsize=9)
    ax_target.set_yticks(np.arange(heads), [f"head {h}" for h in range(heads)], fontsize=7)
    ax_target.set_title("the target's row, per head", fontsize=9)
    ax_target.set_xticks(np.arange(size), short, rotation=60, ha="right", fontsize=7,
                         rotation_mode="anchor")
    ax_target.set_xlabel("key (attended to)", fontsize=8)
    fig.suptitle(f"Self-attention of one test sample (first block); a uniform row would be "
                 f"1/{size} = {1 / size:.4f} everywhere", fontsize=10)
    fig.savefig(path, dpi=120)


def write_report(out_dir: str | Path, *, protocol: str, test_frame: pl.DataFrame,
                 predictions: Predictions,
                 references: Mapping[str, npt.ArrayLike] | None = None,
                 baseline: str | None = "wdl", compare: tuple[str, str] = ("bst", "din"),
                 also_compare: Sequence[tuple[str, str]] = (),
                 attention: npt.ArrayLike | None = None,
                 attention_tokens: Sequence[str] | None = None,
                 n_boot: int = 1000, seed: int = 0) -> Path:
    """Write ``metrics.json``, ``report.md``, ``auc_by_history_length.png``, ``calibration.png``
    and, when ``attention`` (heads, L+1, L+1) is given, ``attention.png`` into ``out_dir``.

    Arguments as in ``evaluation_summary``; ``attention_tokens`` label the attention axes.
    Returns the path of ``report.md``.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("write_report needs matplotlib: pip install matplotlib") from e
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = evaluation_summary(protocol=protocol, test_frame=test_frame,
                                 predictions=predictions, references=references,
                                 baseline=baseline, compare=compare,
                                 also_compare=also_compare, n_boot=n_boot, seed=seed)
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    plots = [PLOT_HISTORY, PLOT_CALIBRATION]
    _plot_history(summary, out / PLOT_HISTORY)
    _plot_calibration(summary, out / PLOT_CALIBRATION)
    if attention is not None:
        _plot_attention(attention, attention_tokens, out / PLOT_ATTENTION)
        plots.append(PLOT_ATTENTION)
    report = out / "report.md"
    report.write_text(render_markdown(summary, plots=plots))
    return report
