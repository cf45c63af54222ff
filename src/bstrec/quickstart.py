"""The quickstart job: samples, a small BST, its offline evaluation, and the service answering
one request; on real data when the data directory holds it, synthetic data otherwise."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from rich.console import Console

from bstrec.data.build import build
from bstrec.data.loaders import available, resolve_data_dir
from bstrec.data.report import manifest_markdown, print_manifest

# Preference order: the BST setting first, then the complete smaller log, then synthetic data.
PREFERENCE = ("ml-1m", "ml-100k")


def choose_dataset(data_dir: Path | None) -> str:
    for name in PREFERENCE:
        if data_dir is not None and available(name, data_dir):
            return name
    return "synthetic-order"


def run_quickstart(
    data_dir: Path | None,
    out: Path,
    console: Console,
    stages: Callable[[str], AbstractContextManager[Callable[[str], None]]],
) -> Path:
    """Build samples, train, evaluate, serve one recommendation; write a short report and print
    where everything is. Returns the report path."""
    start = time.perf_counter()
    data_dir = resolve_data_dir(data_dir)
    name = choose_dataset(data_dir)
    where = f"from {data_dir}" if name != "synthetic-order" else "(no real dataset found: synthetic)"
    console.print(f"[bold]quickstart[/bold] on {name} {where}")
    samples_dir = out / "samples"
    with stages(f"building {name} samples") as progress:
        samples = build(name, samples_dir, data_dir=data_dir, progress=progress)
    report = out / "report.md"
    report.write_text(f"# bstrec quickstart: {name}\n\n## Samples\n\n"
                      + manifest_markdown(samples.manifest))
    print_manifest(console, samples.manifest, samples_dir)
    run_dir = out / "bst"
    train_small_bst(name, samples_dir, run_dir, console, stages)
    evaluate_small_bst(samples_dir, run_dir, out / "evaluation", report, console, stages)
    serve_and_query(samples_dir, run_dir, out, report, console, stages)
    console.print(f"artifacts: [bold]{out.resolve()}[/bold]")
    console.print(f"report:    [bold]{report.resolve()}[/bold]")
    console.print(f"quickstart finished in {time.perf_counter() - start:.1f} s")
    return report


def train_small_bst(
    name: str,
    samples_dir: Path,
    run_dir: Path,
    console: Console,
    stages: Callable[[str], AbstractContextManager[Callable[[str], None]]],
) -> None:
    """A small BST, capped at 150 steps of 1024 samples on real data (about a minute on 2 free
    cores for ML-1M); a toy one in seconds on the synthetic fallback (the CLI test's path)."""
    import shutil

    from bstrec.training.task import train_ranker

    real = name != "synthetic-order"
    with stages("training") as progress:
        progress("training a small BST (one epoch, capped in steps)")
        shutil.rmtree(run_dir, ignore_errors=True)  # a new run each time, not a resumed one
        model: dict[str, Any] = {"mlp": [128, 64]} if real else {
            "mlp": [16], "item_dim": 8, "cat_dim": 4, "pos_dim": 4, "heads": 2, "embed_dim": 4}
        train_ranker("bst", samples_dir, run_dir, model_overrides=model,
                     train_overrides={"max_epochs": 1, "max_steps": 150 if real else 10,
                                      "batch_size": 1024 if real else 256,
                                      "num_threads": 0 if real else 1},
                     progress=False, console=console)


def evaluate_small_bst(
    samples_dir: Path,
    run_dir: Path,
    eval_dir: Path,
    report: Path,
    console: Console,
    stages: Callable[[str], AbstractContextManager[Callable[[str], None]]],
) -> None:
    """``bstrec evaluate`` of the quickstart's BST on the test split, with the references."""
    import json

    from rich.table import Table

    from bstrec.evaluation.evaluate import evaluate_runs

    with stages("evaluating on the test split") as progress:
        progress("scoring the test split and writing the report")
        eval_report = evaluate_runs(samples_dir, {"bst": [run_dir]}, eval_dir, n_boot=200)
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    table = Table(title=f"test split: {metrics['n_test']:,} samples")
    for col in ("model", "AUC", "GAUC", "logloss"):
        table.add_column(col, justify="left" if col == "model" else "right")
    lines = ["", "## Evaluation (test split)", "", "| model | AUC | GAUC | logloss |",
             "|---|---:|---:|---:|"]
    for group in ("models", "references"):
        for model, row in metrics[group].items():
            cells = [f"{row[m]['mean']:.4f}" if row[m]["mean"] is not None else "n/a"
                     for m in ("auc", "gauc", "logloss")]
            label = model if group == "models" else f"reference: {model}"
            table.add_row(label, *cells)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    console.print(table)
    lines.append(f"\nFull report with plots: `{eval_report}`.\n")
    with report.open("a") as f:
        f.write("\n".join(lines))


def serve_and_query(
    samples_dir: Path,
    run_dir: Path,
    out: Path,
    report: Path,
    console: Console,
    stages: Callable[[str], AbstractContextManager[Callable[[str], None]]],
) -> dict[str, Any]:
    """Bundle the trained BST, serve the bundle on a free loopback port, ask it for one user's
    recommendations over HTTP, print them and add them to the report. The bundle's match stage
    is item-CF and popularity (a two-tower joins it with ``bstrec bundle build --retriever``)."""
    import json
    import secrets
    import urllib.request

    from rich.table import Table

    from bstrec.features.vocab import Vocabularies
    from bstrec.serving.app import create_app
    from bstrec.serving.bundle import build_bundle
    from bstrec.serving.server import BackgroundServer
    from bstrec.serving.settings import Settings

    bundle_dir, store = out / "bundle", out / "feature_store.sqlite"
    with stages("serving") as progress:
        progress("exporting the ranker to ONNX and building the bundle")
        build_bundle(samples_dir, run_dir, bundle_dir)
        progress("starting the service and seeding the feature store")
        settings = Settings(bundle=bundle_dir, store_path=str(store), seed_events=samples_dir,
                            api_key=secrets.token_urlsafe(16))
        user = Vocabularies.load(samples_dir / "vocab.json")["user_id"].values[0]
        with BackgroundServer(create_app(settings)) as server:
            progress(f"GET /recommend?user_id={user}")
            url = f"{server.url}/recommend?user_id={user}&k=10"
            with urllib.request.urlopen(url, timeout=60) as resp:
                rec: dict[str, Any] = json.loads(resp.read())
    table = Table(title=f"GET /recommend?user_id={user}&k=10  (bundle {rec['model_version']}, "
                  f"{rec['history_length']} behaviours, {rec['path']} path)")
    rows = [(str(r), str(item["item_id"]) if not item.get("title") else
             f"{item['item_id']} {item['title']}", f"{item['score']:.3f}", str(item["category"]),
             ", ".join(item["sources"])) for r, item in enumerate(rec["items"], 1)]
    for col in ("rank", "item", "score", "category", "sources"):
        table.add_column(col, justify="right" if col in ("rank", "score") else "left")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    timings = ", ".join(f"{k} {v:.1f}" for k, v in rec["timings_ms"].items())
    console.print(f"stage times (ms): {timings}")
    command = f"bstrec serve --bundle {bundle_dir} --store-path {store}"
    console.print(f"serve it again: [bold]{command}[/bold], then open http://127.0.0.1:8000/ or "
                  f"curl 'http://127.0.0.1:8000/recommend?user_id={user}&k=10'")
    with report.open("a") as f:
        f.write(f"\n## Serving\n\nBundle `{rec['model_version']}` in `{bundle_dir}`; "
                f"`{command}`.\n\n| rank | item | score | category | sources |\n"
                "|---|---|---|---|---|\n")
        f.writelines("| " + " | ".join(row) + " |\n" for row in rows)
    return rec
