"""The quickstart job: samples, the match stage (two-tower, item-to-item co-occurrence,
popularity), the ranker chosen on valid AUC among a BST and the WDL, WDL(+Seq) and DIN baselines
(``bstrec train ranker --select``), its offline evaluation against the count-based references,
and the service answering one user's history and recommendations; on real data when the data
directory holds it, synthetic data otherwise. Every stage is timed, and the times close the
output."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from bstrec.data.build import build
from bstrec.data.loaders import available, resolve_data_dir
from bstrec.data.report import manifest_markdown, print_manifest

if TYPE_CHECKING:
    from bstrec.training.select import Selection

# Preference order: the BST setting first, then the complete smaller log, then synthetic data.
PREFERENCE = ("ml-1m", "ml-100k")

Progress = Callable[[str], None]
Stages = Callable[[str], AbstractContextManager[Progress]]


@dataclass(frozen=True)
class Recipe:
    """What the quickstart trains: config overrides of the BST (``BSTConfig``), of the rankers'
    training (``TrainConfig``, every trial of the selection alike), of the two-tower
    (``TwoTowerConfig``) and of its training (``RetrieverTrainConfig``); and the dataset
    loader's options."""

    bst: dict[str, Any]
    ranker_train: dict[str, Any]
    two_tower: dict[str, Any]
    two_tower_train: dict[str, Any]
    dataset_options: dict[str, Any] = field(default_factory=dict)


# Real data: bench_rank.py's valid-selected BST (TUNED bst_target_bn: the target's output,
# BatchNorm in the MLP) with the smaller layers tune_bst.py's serve_bn chose on ML-1M valid AUC
# for serving (benchmarks/results/tune_bst_ml1m-ctr.json), so that one epoch fits the quickstart's
# time. The learning rate was chosen on one epoch's valid AUC among 2e-3 and 4e-3 (batch 1024),
# never on test; the two differ by less than seeds do (tune_bst.py's docstring), and the larger
# one did not diverge. The full-width MLP and batch 512 were no better on valid. The two-tower
# is bench_retrieval.py's default for one epoch: its first epoch already carries most of the
# recall its later ones reach (benchmarks/results/retrieval_ml1m-retrieval.json,
# two_tower_training.history). The baselines of the selection train with the BST's settings, so
# that the selection compares models, not budgets.
REAL = Recipe(
    bst={"output": "target", "mlp_norm": "batch", "mlp": [128, 64, 32], "ffn_mult": 2},
    ranker_train={"max_epochs": 1, "batch_size": 1024, "lr": 4e-3, "num_threads": 0},
    two_tower={},
    two_tower_train={"max_epochs": 1, "num_threads": 0},
)
# Synthetic fallback (the CLI test's path): the same kinds of model, toy-sized, on fewer users
# than the generator's default, so that every stage takes seconds.
TOY = Recipe(
    bst={"output": "target", "mlp_norm": "batch", "mlp": [16], "item_dim": 8, "cat_dim": 4,
         "pos_dim": 4, "heads": 2, "embed_dim": 4},
    ranker_train={"max_epochs": 1, "max_steps": 10, "batch_size": 256, "num_threads": 1},
    two_tower={"dim": 16, "token_dim": 16, "feat_dim": 4, "user_hidden": [32],
               "item_hidden": [32]},
    two_tower_train={"max_epochs": 1, "batch_size": 256, "eval_queries": 500, "num_threads": 1},
    dataset_options={"n_users": 400},
)


def choose_dataset(data_dir: Path | None) -> str:
    for name in PREFERENCE:
        if data_dir is not None and available(name, data_dir):
            return name
    return "synthetic-order"


@dataclass
class StageClock:
    """Wraps the caller's ``stages`` (a spinner) and keeps each stage's wall time."""

    stages: Stages
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str) -> Iterator[Progress]:
        started = time.perf_counter()
        with self.stages(name) as progress:
            yield progress
        self.seconds[name] = time.perf_counter() - started


def run_quickstart(data_dir: Path | None, out: Path, console: Console, stages: Stages,
                   user: str | None = None) -> Path:
    """Build samples, train the retriever and the ranker, evaluate, serve one user's history
    and recommendations (``user``, else a typical user of the test split); write a short report
    and print where everything is. Returns the report path."""
    start = time.perf_counter()
    clock = StageClock(stages)
    data_dir = resolve_data_dir(data_dir)
    name = choose_dataset(data_dir)
    recipe = TOY if name == "synthetic-order" else REAL
    where = f"from {data_dir}" if name != "synthetic-order" else "(no real dataset found: synthetic)"
    console.print(f"[bold]quickstart[/bold] on {name} {where}")
    samples_dir = out / "samples"
    with clock(f"building {name} samples") as progress:
        samples = build(name, samples_dir, data_dir=data_dir,
                        dataset_options=recipe.dataset_options, progress=progress)
    report = out / "report.md"
    report.write_text(f"# bstrec quickstart: {name}\n\n## Samples\n\n"
                      + manifest_markdown(samples.manifest))
    print_manifest(console, samples.manifest, samples_dir)
    tt_dir = out / "two_tower"
    train_two_tower_stage(recipe, samples_dir, tt_dir, console, clock)
    selection = select_ranker(recipe, samples_dir, out / "selection", console, clock)
    evaluate_selection(samples_dir, selection, out / "evaluation", report, console, clock)
    assert selection.selected is not None  # select() raises when nothing can be chosen
    serve_and_query(samples_dir, selection.selected, tt_dir, out, report, console, clock,
                    user=user)
    total = time.perf_counter() - start
    print_times(clock.seconds, total, report, console)
    console.print(f"artifacts: [bold]{out.resolve()}[/bold]")
    console.print(f"report:    [bold]{report.resolve()}[/bold]")
    console.print(f"quickstart finished in {total:.1f} s")
    return report


def train_two_tower_stage(recipe: Recipe, samples_dir: Path, tt_dir: Path, console: Console,
                          clock: StageClock) -> None:
    """The two-tower retriever, its epoch chosen on valid Recall@K of protocol P2."""
    import shutil

    from bstrec.config import from_dict
    from bstrec.data.samples import SampleSet
    from bstrec.retrieval.train import RetrieverTrainConfig, train_two_tower
    from bstrec.retrieval.two_tower import TwoTowerConfig

    with clock("training the two-tower retriever") as progress:
        progress("loading the samples")
        shutil.rmtree(tt_dir, ignore_errors=True)
        samples = SampleSet.load(samples_dir)  # seen items of valid queries need every split
        progress("training (in-batch sampled softmax, logQ correction)")
        _, result = train_two_tower(
            samples, from_dict(RetrieverTrainConfig, recipe.two_tower_train, where="quickstart"),
            from_dict(TwoTowerConfig, recipe.two_tower, where="quickstart"), out_dir=tt_dir,
            progress=False, console=console)
    best = result.history[result.best_epoch - 1]
    k = [key for key in best if key.startswith("valid_recall@")]
    console.print("two-tower: " + ", ".join(f"{key.removeprefix('valid_')} {best[key]:.3f}"
                                              for key in k) + " on valid queries (protocol P2)")


def select_ranker(recipe: Recipe, samples_dir: Path, sel_dir: Path, console: Console,
                  clock: StageClock) -> Selection:
    """The recipe's BST and the baselines, one seed each, the best on valid AUC kept in
    ``sel_dir/selected`` (``bstrec train ranker --select``; the test split is not read)."""
    import shutil

    from bstrec.training.select import Trial, select, with_baselines

    trials = with_baselines([Trial("bst", "bst", dict(recipe.bst))])
    with clock("selecting the ranker") as progress:
        progress(f"training {', '.join(t.name for t in trials)} ("
                 f"{recipe.ranker_train['max_epochs']} epoch, batch "
                 f"{recipe.ranker_train['batch_size']}) and keeping the best on valid AUC")
        shutil.rmtree(sel_dir, ignore_errors=True)  # new runs each time, not reused ones
        selection = select(samples_dir, sel_dir, trials, seeds=(0,),
                           train_overrides=recipe.ranker_train)
    chosen = selection.chosen
    assert chosen is not None  # select() raises when nothing can be chosen
    console.print(f"selected on valid AUC: [bold]{chosen.trial.name}[/bold] "
                  f"({chosen.mean_auc:.4f}; " + ", ".join(
                      f"{r.trial.name} {r.mean_auc:.4f}" for r in selection.trials
                      if r is not chosen) + ")")
    return selection


def evaluate_selection(samples_dir: Path, selection: Selection, eval_dir: Path, report: Path,
                       console: Console, clock: StageClock) -> dict[str, Any]:
    """``bstrec evaluate`` of every trial of the selection on the test split, with the
    references, and whether the chosen one beats each reference. Returns the metrics."""
    from bstrec.evaluation.evaluate import evaluate_runs
    from bstrec.training.select import selection_markdown

    chosen = selection.chosen
    assert chosen is not None
    runs = {r.trial.name: [r.runs[0]] for r in selection.trials}
    with clock("evaluating on the test split") as progress:
        progress("scoring the test split and writing the report")
        other = next(n for n in runs if n != chosen.trial.name)  # the baselines are trials
        eval_report = evaluate_runs(samples_dir, runs, eval_dir, n_boot=200,
                                    compare=(chosen.trial.name, other))
    metrics: dict[str, Any] = json.loads((eval_dir / "metrics.json").read_text())
    table = Table(title=f"test split: {metrics['n_test']:,} samples")
    for col in ("model", "AUC", "GAUC", "logloss"):
        table.add_column(col, justify="left" if col == "model" else "right")
    lines = ["", selection_markdown(selection, level=2),
             "## Evaluation (test split)", "", "| model | AUC | GAUC | logloss |",
             "|---|---:|---:|---:|"]
    for group in ("models", "references"):
        for model, row in metrics[group].items():
            cells = [f"{row[m]['mean']:.4f}" if row[m]["mean"] is not None else "n/a"
                     for m in ("auc", "gauc", "logloss")]
            label = (f"reference: {model}" if group == "references" else
                     f"{model} (selected)" if model == chosen.trial.name else model)
            table.add_row(label, *cells)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    console.print(table)
    verdict = reference_verdict(metrics, chosen.trial.name)
    console.print(verdict, soft_wrap=True)
    lines += ["", verdict, "", f"Full report with plots: `{eval_report}`.", ""]
    with report.open("a") as f:
        f.write("\n".join(lines))
    return metrics


def reference_verdict(metrics: dict[str, Any], model: str) -> str:
    """One line: ``model``'s test AUC against each count-based reference (PROTOCOL.md P1.8)."""
    from bstrec.evaluation.report import REFERENCE_NAMES

    auc = metrics["models"][model]["auc"]["mean"]
    parts, behind = [], []
    for name, row in metrics["references"].items():
        ref = row["auc"]["mean"]
        label = REFERENCE_NAMES.get(name, name)
        if auc is None or ref is None:
            parts.append(f"no AUC to compare with {label}")
            continue
        beats = auc > ref
        parts.append(f"{'beats' if beats else 'does NOT beat'} {label} {ref:.4f} "
                     f"({auc - ref:+.4f})")
        if not beats:
            behind.append(label)
    head = f"Selected ranker {model}: test AUC {auc:.4f}: " if auc is not None else f"{model}: "
    tail = "." if not behind else (
        f"; below {' and '.join(behind)}, this short run has learned nothing that counting does "
        "not give (bench_rank.py trains longer)")
    return head + "; ".join(parts) + tail


def typical_user(samples_dir: Path) -> object:
    """The user with the median event count among the users of the test split: a substantial
    history (test-period users are the active ones), not an outlier's."""
    import polars as pl

    test_users = pl.read_parquet(samples_dir / "samples" / "test.parquet",
                                 columns=["user_id"])["user_id"].unique()
    counts = (pl.read_parquet(samples_dir / "dataset" / "events.parquet", columns=["user_id"])
              .filter(pl.col("user_id").is_in(test_users.implode()))
              .group_by("user_id").len().sort(["len", "user_id"]))
    if counts.height == 0:  # a test split without users: the first known user
        from bstrec.features.vocab import Vocabularies

        return Vocabularies.load(samples_dir / "vocab.json")["user_id"].values[0]
    return counts["user_id"][counts.height // 2]


def _get(url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    import urllib.request

    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=60) as resp:
        body: dict[str, Any] = json.loads(resp.read())
    return body


def _item_label(item: dict[str, Any]) -> str:
    return f"{item['item_id']} {item['title']}" if item.get("title") else str(item["item_id"])


def serve_and_query(samples_dir: Path, ranker: Path, tt_dir: Path, out: Path, report: Path,
                    console: Console, clock: StageClock, *, user: str | None = None,
                    k: int = 10) -> dict[str, Any]:
    """Bundle the ranker checkpoint ``ranker`` with the match stage (two-tower and its index,
    item-CF, popularity), serve the bundle on a free loopback port, ask it over HTTP for one
    user's recent history and recommendations, print them side by side and add them to the
    report. Returns the recommendation response."""
    import secrets

    from bstrec.serving.app import create_app
    from bstrec.serving.bundle import build_bundle
    from bstrec.serving.server import BackgroundServer
    from bstrec.serving.settings import Settings

    bundle_dir, store = out / "bundle", out / "feature_store.sqlite"
    with clock("building the bundle") as progress:
        progress("exporting the ranker and the user tower to ONNX, fitting item-CF and "
                 "popularity, indexing the item vectors")
        build_bundle(samples_dir, ranker, bundle_dir, retriever_dir=tt_dir)
    who = user if user is not None else typical_user(samples_dir)
    key = secrets.token_urlsafe(16)
    with clock("serving") as progress:
        progress("starting the service and seeding the feature store")
        # a store left by an earlier run (perhaps on other data) would be served instead of
        # being seeded from these samples
        for path in (store, *(store.with_name(store.name + s) for s in ("-wal", "-shm"))):
            path.unlink(missing_ok=True)
        settings = Settings(bundle=bundle_dir, store_path=str(store), seed_events=samples_dir,
                            api_key=key)
        with BackgroundServer(create_app(settings)) as server:
            progress(f"GET /users/{who}/history and /recommend?user_id={who}")
            hist = _get(f"{server.url}/users/{who}/history?n={k}", {"X-API-Key": key})
            rec = _get(f"{server.url}/recommend?user_id={who}&k={k}")
    recent, items = hist["behaviours"], rec["items"]
    title = (f"user {who}: {rec['history_length']} behaviours in the store ({rec['path']} path), "
             f"bundle {rec['model_version']}")
    table = Table(title=title)
    for col in ("#", "recent history (newest first)", "recommended", "score", "sources"):
        table.add_column(col, justify="right" if col in ("#", "score") else "left")
    rows = []
    for r in range(max(len(recent), len(items))):
        h = _item_label(recent[r]) if r < len(recent) else ""
        if r < len(items):
            it = items[r]
            row = (str(r + 1), h, _item_label(it), f"{it['score']:.3f}", ", ".join(it["sources"]))
        else:
            row = (str(r + 1), h, "", "", "")
        rows.append(row)
        table.add_row(*row)
    console.print(table)
    sources = sorted({s for it in items for s in it["sources"]})
    proposed = ", ".join(f"{s} {n}" for s, n in rec["candidates"].items())
    console.print(f"sources among the {len(items)} recommendations: {', '.join(sources)}; "
                  f"merged candidates per source: {proposed}", soft_wrap=True)
    timings = ", ".join(f"{name} {v:.1f}" for name, v in rec["timings_ms"].items())
    console.print(f"request stage times (ms): {timings}", soft_wrap=True)
    command = f"bstrec serve --bundle {bundle_dir} --store-path {store}"
    console.print(f"serve it again: [bold]{command}[/bold], then open http://127.0.0.1:8000/ or "
                  f"curl 'http://127.0.0.1:8000/recommend?user_id={who}&k={k}'")
    with report.open("a") as f:
        f.write(f"\n## Serving\n\nBundle `{rec['model_version']}` in `{bundle_dir}`; "
                f"`{command}`. {title}; sources among the recommendations: "
                f"{', '.join(sources)}.\n\n"
                "| # | recent history (newest first) | recommended | score | sources |\n"
                "|---|---|---|---|---|\n")
        f.writelines("| " + " | ".join(row) + " |\n" for row in rows)
    return rec


def print_times(seconds: dict[str, float], total: float, report: Path, console: Console) -> None:
    """Wall time per stage and in all, printed and added to the report."""
    table = Table(title="time per stage")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for name, s in seconds.items():
        table.add_row(name, f"{s:.1f}")
    table.add_row("total", f"{total:.1f}")
    console.print(table)
    with report.open("a") as f:
        f.write("\n## Time per stage\n\n| stage | seconds |\n|---|---:|\n")
        f.writelines(f"| {name} | {s:.1f} |\n" for name, s in seconds.items())
        f.write(f"| total | {total:.1f} |\n")
