"""The ``bstrec`` command line: data, train, evaluate, index, similar, bundle, serve, quickstart."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler

from bstrec.config import ConfigError, load_yaml, parse_overrides
from bstrec.data.report import print_manifest

app = typer.Typer(help="bstrec: sequence-aware two-stage recommender (BST).",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Load behaviour logs, build and inspect point-in-time samples.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console()

DataDirOpt = Annotated[Path | None, typer.Option(
    "--data-dir", help="Folder with one sub-folder per dataset (ml-1m/, ml-100k/, taobao/, "
    "amazon/). Default: $BSTREC_DATA_DIR.", envvar="BSTREC_DATA_DIR")]


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])


@contextmanager
def stages(title: str) -> Iterator[Callable[[str], None]]:
    """A spinner that names the stage under way, and logs each stage's duration."""
    with console.status(title) as status:
        started = [time.perf_counter()]
        current = [""]

        def update(name: str) -> None:
            now = time.perf_counter()
            if current[0]:
                console.log(f"{current[0]} [dim]({now - started[0]:.1f} s)[/dim]")
            started[0], current[0] = now, name
            status.update(f"{title}: {name}")

        yield update
        update("")


def fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/bold red] {message}")
    return typer.Exit(code=2)


@data_app.command("build")
def data_build(
    dataset: Annotated[str, typer.Option(help="ml-1m, ml-100k, taobao, amazon, synthetic-order, "
                                         "synthetic-implicit, synthetic-taobao, csv, parquet or "
                                         "impressions (the "
                                         "service's impression log: --input LOG_DIR --base "
                                         "SAMPLES_DIR)")],
    out: Annotated[Path | None, typer.Option(help="Output folder (default artifacts/DATASET)")] = None,
    data_dir: DataDirOpt = None,
    input_path: Annotated[Path | None, typer.Option(
        "--input", help="csv/parquet: the file to load")] = None,
    column: Annotated[list[str] | None, typer.Option(
        help="csv/parquet column mapping, repeatable: user_id=COL item_id=COL timestamp=COL "
        "[action=COL value=COL event_id=COL category=COL]")] = None,
    config: Annotated[Path | None, typer.Option(
        help="YAML file with a `samples:` and/or `dataset:` section")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Sample config override, repeatable: max_len=50, negatives=4, ...")] = None,
    option: Annotated[list[str] | None, typer.Option(
        help="Dataset loader option, repeatable: e.g. n_users=500 for synthetic-order")] = None,
    lenient: Annotated[bool, typer.Option(
        help="Skip and count bad input rows instead of stopping at the first")] = False,
    partitions: Annotated[int | None, typer.Option(
        help="Build N partitions of the users (ranges balanced by events) one at a time, in "
        "bounded memory; the same rows as in memory. "
        "Default: in memory, or one partition per million events for a csv/parquet log of "
        "two million events or more", min=1)] = None,
    engine: Annotated[str, typer.Option(
        help="Where the partitions run: local (this process) or dask (a cluster)")] = "local",
    scheduler: Annotated[str | None, typer.Option(
        help="dask: the scheduler's address (tcp://host:8786); the output folder must be on "
        "storage every worker sees. Default: a local cluster of --workers processes")] = None,
    workers: Annotated[int | None, typer.Option(
        help="dask without --scheduler: local worker processes (default 2)", min=1)] = None,
    base: Annotated[Path | None, typer.Option(
        help="impressions: the samples the served bundle was built from (their vocabularies, "
        "feature spec, config and dataset tables)")] = None,
    window_s: Annotated[float | None, typer.Option(
        help="impressions: a shown item is a click when the user's event on it falls within "
        "this many seconds of the request (default: one hour)")] = None,
) -> None:
    """Build point-in-time samples (Parquet + manifest.json) from a dataset.

    With --dataset impressions, the samples are the shown items of the service's impression
    log (BSTREC_IMPRESSION_LOG), labelled 1 when clicked within --window-s and 0 when not,
    over the vocabularies and feature spec of --base (see bstrec.data.impressions)."""
    from bstrec.data.build import build, build_partitioned, wants_partitions
    from bstrec.data.schema import DataFormatError
    from bstrec.data.tabular import ColumnMapping

    if dataset == "impressions":
        # --data-dir is not refused: $BSTREC_DATA_DIR fills it in every environment that sets it
        _build_impressions(input_path, base, out, window_s, [
            ("--column", column), ("--config", config), ("--set", set_),
            ("--option", option), ("--partitions", partitions), ("--scheduler", scheduler),
            ("--workers", workers), ("--lenient", lenient or None),
            ("--engine", None if engine == "local" else engine)])
        return
    if base is not None or window_s is not None:
        raise fail("--base and --window-s go with --dataset impressions")
    try:
        file_cfg = load_yaml(config) if config else {}
        unknown = sorted(set(file_cfg) - {"samples", "dataset"})
        if unknown:
            raise ConfigError(f"{config}: unknown sections {unknown}; known: dataset, samples")
        sample_overrides = {**file_cfg.get("samples", {}), **parse_overrides(set_ or [])}
        dataset_options = {**file_cfg.get("dataset", {}), **parse_overrides(option or [])}
        mapping = ColumnMapping.parse(column) if column else None
        target = out or Path("artifacts") / dataset
        partitioned = (partitions is not None or engine != "local" or scheduler is not None
                       or workers is not None or wants_partitions(dataset, input_path))
        with stages(f"building {dataset} samples") as progress:
            if partitioned:
                manifest = build_partitioned(
                    dataset, target, data_dir=data_dir, input_path=input_path, mapping=mapping,
                    strict=not lenient, sample_overrides=sample_overrides,
                    dataset_options=dataset_options, partitions=partitions, engine=engine,
                    scheduler=scheduler, workers=workers, progress=progress)
            else:
                manifest = build(dataset, target, data_dir=data_dir, input_path=input_path,
                                 mapping=mapping, strict=not lenient,
                                 sample_overrides=sample_overrides,
                                 dataset_options=dataset_options, progress=progress).manifest
    except (ConfigError, DataFormatError, FileNotFoundError, ValueError, ImportError) as exc:
        raise fail(str(exc)) from None
    print_manifest(console, manifest, target)


def _build_impressions(log_dir: Path | None, base: Path | None, out: Path | None,
                       window_s: float | None, unused: list[tuple[str, object]]) -> None:
    """``data build --dataset impressions``: samples from the service's impression log."""
    from bstrec.data.impressions import build_impression_samples

    given = [name for name, value in unused if value]
    if given:
        raise fail(f"{', '.join(given)} do not go with --dataset impressions (it takes --input, "
                   "--base, --out and --window-s)")
    if log_dir is None or base is None:
        raise fail("--dataset impressions needs --input LOG_DIR (the service's "
                   "BSTREC_IMPRESSION_LOG) and --base SAMPLES_DIR (the samples its bundle was "
                   "built from)")
    target = out or Path("artifacts") / "impressions"
    try:
        with console.status(f"building samples from the impression log {log_dir}"):
            path = build_impression_samples(
                log_dir, base, target,
                window_s=click_window(window_s))
    except (ConfigError, FileNotFoundError, ValueError, OSError) as exc:
        raise fail(str(exc)) from None
    print_manifest(console, json.loads((path / "manifest.json").read_text()), path)


@data_app.command("stats")
def data_stats(
    path: Annotated[Path, typer.Argument(help="Output folder of `bstrec data build`")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw manifest")] = False,
) -> None:
    """Print the statistics of built samples (their manifest.json)."""
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        raise fail(f"{manifest_path} not found: is {path} the output of `bstrec data build`?")
    manifest = json.loads(manifest_path.read_text())
    if as_json:
        console.print_json(data=manifest)
    else:
        print_manifest(console, manifest, path)


@data_app.command("download")
def data_download(
    name: Annotated[str, typer.Argument(help="ml-1m or ml-100k")],
    data_dir: DataDirOpt = None,
    force: Annotated[bool, typer.Option(help="Download again even if present")] = False,
) -> None:
    """Download a public MovieLens archive into DATA_DIR/NAME, verifying its checksum."""
    from bstrec.data.download import download_movielens

    if data_dir is None:
        raise fail("no data directory: pass --data-dir or set BSTREC_DATA_DIR")
    if name not in ("ml-1m", "ml-100k"):
        raise fail(f"unknown archive {name!r}; choose ml-1m or ml-100k")
    try:
        path = download_movielens(name, data_dir, force=force)  # type: ignore[arg-type]
    except (OSError, ValueError) as exc:
        raise fail(str(exc)) from None
    console.print(f"{name} is in [bold]{path}[/bold]")


@app.command()
def quickstart(
    data_dir: DataDirOpt = None,
    out: Annotated[Path, typer.Option(help="Where artifacts and the report go")] = Path(
        "artifacts/quickstart"),
    user: Annotated[str | None, typer.Option(
        help="Whose history and recommendations to show (default: the user with the median "
        "event count among the test split's users)")] = None,
) -> None:
    """End to end on ML-1M when DATA_DIR holds it, else on the synthetic generator: samples,
    two-tower and item-CF retrieval, a BST ranker checked against the count-based references,
    and the service answering one user's history and recommendations; times per stage."""
    from bstrec.quickstart import run_quickstart

    run_quickstart(data_dir, out, console, stages, user=user)


train_app = typer.Typer(help="Train models on built samples.", no_args_is_help=True)
app.add_typer(train_app, name="train")


@train_app.command("ranker")
def train_ranker_cmd(
    samples: Annotated[Path, typer.Option(help="Output folder of `bstrec data build`")],
    out: Annotated[Path, typer.Option(help="Run folder: best/, last/ and train_result.json; "
                                      "with --select, the selection folder")],
    model: Annotated[str | None, typer.Option(
        help="Ranker to train: bst, din, wdl, wdl_seq, or esmm (click and conversion heads, "
        "on a log with buys) (required without --select)")] = None,
    config: Annotated[Path | None, typer.Option(
        help="YAML file with a `model:` and/or `train:` section")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Model config override, repeatable: e.g. dropout=0.2")] = None,
    train_: Annotated[list[str] | None, typer.Option(
        "--train", help="Train config override, repeatable: lr=1e-3, batch_size=512, "
        "max_epochs=5, patience=2, seed=1, checkpoint_every=1000, num_threads=8, ...")] = None,
    resume: Annotated[bool, typer.Option(
        help="Continue the run in --out from its last checkpoint (its configs are the "
        "defaults)")] = False,
    select: Annotated[bool, typer.Option(
        "--select", help="Model selection on the valid split: train a grid of trials (default: "
        "16 BST cells and the wdl, wdl_seq, din baselines) over --seeds into OUT/runs, choose "
        "the best mean valid AUC, copy its checkpoint to OUT/selected (see "
        "bstrec.training.select); finished runs are reused")] = False,
    seeds: Annotated[list[int] | None, typer.Option(
        help="With --select: the seeds of every trial, repeatable (default: 0)")] = None,
    grid: Annotated[Path | None, typer.Option(
        help="With --select: YAML grid file (`trials:` of name, model, model_overrides, "
        "train_overrides) replacing the default grid")] = None,
    baselines: Annotated[bool, typer.Option(
        help="With --select: add the wdl, wdl_seq and din baselines to the grid")] = True,
    nproc: Annotated[int, typer.Option(
        help="Data-parallel processes on this machine (torchrun; gloo on CPU, NCCL for "
        "device=cuda, one GPU each), each on its slice of the same global batch_size")] = 1,
) -> None:
    """Train a ranker; early-stops on valid AUC and keeps the best epoch in OUT/best.

    With --select, train a grid of trials instead and keep the best (on valid AUC) in
    OUT/selected."""
    from rich.table import Table

    from bstrec.distributed.ddp import DistributedError, Job, launched_rank, run_job
    from bstrec.training.loop import TrainResult

    if select and nproc != 1:
        raise fail("--nproc does not go with --select")
    if select:
        from bstrec.training.select import default_grid, load_grid, selection_rows, with_baselines
        from bstrec.training.select import select as run_selection

        if set_:
            raise fail("--set does not go with --select: the grid decides the model configs "
                       "(give a --grid file)")
        if model not in (None, "bst"):
            raise fail(f"--model {model} does not go with --select: the default grid is BST's "
                       "(give a --grid file for other models)")
        try:
            file_cfg = load_yaml(config) if config else {}
            unknown = sorted(set(file_cfg) - {"train"})
            if unknown:
                raise ConfigError(f"{config}: with --select only a `train:` section is allowed "
                                  f"(the grid decides the models); got {unknown}")
            train_overrides = {**file_cfg.get("train", {}), **parse_overrides(train_ or [])}
            trials = load_grid(grid) if grid else default_grid(baselines=False)
            if baselines:
                trials = with_baselines(trials)
            selection = run_selection(samples, out, trials, seeds or [0], train_overrides,
                                      console=console)
        except (ValueError, OSError) as exc:  # ConfigError and CheckpointError are ValueErrors
            raise fail(str(exc)) from None
        header, rows = selection_rows(selection)
        table = Table(title=f"model selection on {samples} (valid AUC)")
        for col in header:
            table.add_column(col, justify="left" if col in ("trial", "model", "overrides")
                             else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
        chosen = selection.chosen
        assert chosen is not None  # select raises when no trial can be chosen
        console.print(f"chosen: [bold]{chosen.trial.name}[/bold] (mean valid AUC "
                      f"{chosen.mean_auc:.4f} over seeds {selection.seeds}); seed "
                      f"{chosen.best_seed()}'s checkpoint in [bold]{selection.selected}[/bold]; "
                      f"report in {out / 'selection.md'}")
        return
    if model is None:
        raise fail("--model is required (or give --select)")
    if seeds or grid or not baselines:
        raise fail("--seeds, --grid and --no-baselines go with --select")
    try:
        file_cfg = load_yaml(config) if config else {}
        unknown = sorted(set(file_cfg) - {"model", "train"})
        if unknown:
            raise ConfigError(f"{config}: unknown sections {unknown}; known: model, train")
        model_overrides = {**file_cfg.get("model", {}), **parse_overrides(set_ or [])}
        train_overrides = {**file_cfg.get("train", {}), **parse_overrides(train_ or [])}
        job = Job("ranker", str(samples), str(out), model=model,
                  model_overrides=model_overrides, train_overrides=train_overrides,
                  resume=resume)
        result = run_job(job, nproc, console=console)
    except KeyError as exc:  # an unknown model name in the registry
        raise fail(str(exc.args[0]) if exc.args else repr(exc)) from None
    except (ValueError, OSError, DistributedError) as exc:  # ConfigError, CheckpointError
        raise fail(str(exc)) from None
    assert isinstance(result, TrainResult)
    if launched_rank() > 0:
        return  # under torchrun, rank 0 reports
    table = Table(title=f"{model} on {samples}")
    for col in ("epoch", "steps", "train loss", "valid AUC", "valid logloss", "samples/s"):
        table.add_column(col, justify="right")
    for h in result.history:
        best = " *" if h.epoch == result.best_epoch else ""
        table.add_row(f"{h.epoch}{best}", str(h.steps), f"{h.train_loss:.4f}",
                      f"{h.valid_auc:.4f}", f"{h.valid_logloss:.4f}", f"{h.samples_per_s:,.0f}")
    console.print(table)
    console.print(f"best valid AUC [bold]{result.best_valid_auc:.4f}[/bold] at epoch "
                  f"{result.best_epoch} ({result.stop_reason.replace('_', ' ')}); "
                  f"checkpoint in [bold]{out / 'best'}[/bold]")


@train_app.command("prerank")
def train_prerank_cmd(
    samples: Annotated[Path, typer.Option(help="Output folder of `bstrec data build`")],
    teacher: Annotated[Path, typer.Option(help="The BST run (or checkpoint) whose logits the "
                                          "pre-ranker learns")],
    retriever: Annotated[Path, typer.Option(help="Folder of `bstrec train retriever`: its "
                                            "merged candidates are what the pre-ranker scores")],
    out: Annotated[Path, typer.Option(help="Checkpoint folder, for `bundle build --prerank`")],
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Pre-ranker config override, repeatable: hidden=32, mlp=[32], "
        "item_dim=16, ...")] = None,
    train_: Annotated[list[str] | None, typer.Option(
        "--train", help="Distillation override, repeatable: alpha=0.5, temperature=2, lr=2e-3, "
        "max_epochs=5, seed=0, ...")] = None,
    n_samples: Annotated[int, typer.Option(
        help="Train samples whose candidates are distilled (a quarter as many valid ones "
        "choose the epoch)")] = 8000,
    k: Annotated[int, typer.Option("-k", help="Merged candidates drawn per sample")] = 15,
) -> None:
    """Distil the funnel's pre-ranker from a BST run on the retriever's merged candidates
    (training/distill.py)."""
    from bstrec.serving.config import PipelineConfig
    from bstrec.training.distill import distill_prerank

    try:
        with console.status("distilling the pre-ranker"):
            result = distill_prerank(samples, teacher, retriever, out,
                                     prerank=parse_overrides(set_ or []),
                                     distill=parse_overrides(train_ or []),
                                     candidates=PipelineConfig().candidates,
                                     n_samples=n_samples, k=k)
    except (ValueError, OSError) as exc:  # ConfigError, CheckpointError
        raise fail(str(exc)) from None
    for h in result.history:
        best = " *" if h["epoch"] == result.best_epoch else ""
        console.print(f"epoch {h['epoch']:.0f}{best}: train loss {h['train_loss']:.4f}, valid "
                      f"loss {h['valid_loss']:.4f}, valid Spearman with the teacher "
                      f"{h['valid_spearman']:.4f}")
    console.print(f"pre-ranker in [bold]{out}[/bold] ({result.seconds:.0f} s); serve it with "
                  "`bundle build --prerank OUT --set 'funnel={prerank: distilled}'`")


@app.command("evaluate")
def evaluate_cmd(
    samples: Annotated[Path, typer.Option(help="Output folder of `bstrec data build`")],
    run: Annotated[list[str], typer.Option(
        help="NAME=PATH of a training run (or checkpoint), repeatable; several runs under one "
        "NAME are seeds of that model: --run bst=runs/bst_s0 --run bst=runs/bst_s1")],
    out: Annotated[Path, typer.Option(help="Report folder: report.md, metrics.json, plots")] = Path(
        "artifacts/report"),
    baseline: Annotated[str, typer.Option(help="Model that RelaImpr is measured over")] = "wdl",
    compare: Annotated[str, typer.Option(
        help="A,B: the pair whose AUC difference gets a paired bootstrap interval")] = "bst,din",
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples (of users)")] = 1000,
) -> None:
    """Test AUC, GAUC, logloss, RelaImpr, calibration and AUC by history length of trained
    rankers, with the count-based references, a BST-DIN bootstrap and plots."""
    from bstrec.evaluation.evaluate import evaluate_runs, parse_runs

    pair = tuple(x.strip() for x in compare.split(","))
    try:
        if len(pair) != 2:
            raise ValueError(f"--compare {compare!r}: expected two names, A,B")
        runs = parse_runs(run)
        with console.status("scoring the test split"):
            report = evaluate_runs(samples, runs, out, baseline=baseline,
                                   compare=(pair[0], pair[1]), n_boot=n_boot)
    except (ValueError, OSError) as exc:
        raise fail(str(exc)) from None
    console.print(report.read_text(), markup=False, highlight=False)
    console.print(f"report in [bold]{report}[/bold] (metrics.json and plots beside it)")


bundle_app = typer.Typer(help="Serving bundles: models, vocabularies and index in one folder.",
                         no_args_is_help=True)
app.add_typer(bundle_app, name="bundle")


@bundle_app.command("build")
def bundle_build(
    samples: Annotated[Path, typer.Option(help="Output folder of `bstrec data build`")],
    ranker: Annotated[Path, typer.Option(help="Ranker training run (its best/) or checkpoint")],
    out: Annotated[Path, typer.Option(help="Bundle folder to write (replaced atomically)")],
    retriever: Annotated[Path | None, typer.Option(
        help="Two-tower training output (best/ and catalog.parquet); without it the match "
        "stage uses item-CF and popularity only")] = None,
    index: Annotated[str, typer.Option(help="Vector index kind: exact, flat, hnsw or ivf")] = "exact",
    version: Annotated[str | None, typer.Option(help="Bundle version (default: model, time, "
                                                "content hash)")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Pipeline config override, repeatable: rank_n=50, max_per_category=3, "
        "candidates={quotas: [[two_tower, 100], [popular, 50]]}")] = None,
    item2vec: Annotated[Path | None, typer.Option(
        help="item2vec folder (RETRIEVER/item2vec of `train retriever --item2vec`): the "
        "item2vec source, merged where --set candidates quotas name item2vec")] = None,
    prerank: Annotated[Path | None, typer.Option(
        help="Distilled pre-ranker checkpoint (training/distill.py): scores every merged "
        "candidate where --set funnel={prerank: distilled}")] = None,
    light: Annotated[Path | None, typer.Option(
        help="Light ranker run or checkpoint (e.g. DIN): the funnel's middle layer where "
        "--set funnel={light_n: N}")] = None,
) -> None:
    """Export the ranker to ONNX and gather every serving artifact into one bundle."""
    from bstrec.config import from_dict
    from bstrec.retrieval.index import IndexConfig
    from bstrec.serving.bundle import build_bundle, load_bundle
    from bstrec.serving.config import PipelineConfig

    try:
        pipeline = from_dict(PipelineConfig, parse_overrides(set_ or []), where="--set")
        with console.status("building the bundle"):
            path = build_bundle(samples, ranker, out, retriever_dir=retriever,
                                index_config=from_dict(IndexConfig, {"kind": index}),
                                pipeline_config=pipeline, version=version,
                                item2vec_dir=item2vec, prerank_checkpoint=prerank,
                                light_checkpoint=light)
            bundle = load_bundle(path)
    except (ValueError, OSError) as exc:  # ConfigError, BundleError, CheckpointError
        raise fail(str(exc)) from None
    parts = ["ranker.onnx", "item_cf", "popular"] + (["two_tower", "index"] if retriever else [])
    parts += ["item2vec"] if item2vec else []
    parts += [n for n, given in (("prerank", prerank), ("light", light)) if given]
    console.print(f"bundle [bold]{bundle.version}[/bold] in [bold]{path}[/bold] "
                  f"({', '.join(parts)})")


@app.command()
def serve(
    bundle: Annotated[Path, typer.Option(help="Bundle folder (`bstrec bundle build`)",
                                         envvar="BSTREC_BUNDLE")],
    host: Annotated[str | None, typer.Option(help="Interface (default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000)")] = None,
    store: Annotated[str | None, typer.Option(
        help="Feature store: embedded, redis or redis_cluster")] = None,
    redis_url: Annotated[str | None, typer.Option(
        help="redis://host:port/db; redis_cluster: redis://host:port of one node or several, "
        "comma-separated")] = None,
    store_path: Annotated[Path | None, typer.Option(help="Embedded store's SQLite file")] = None,
    seed_events: Annotated[Path | None, typer.Option(
        help="Load this samples folder's event log into the store at start")] = None,
    seed_until: Annotated[str | None, typer.Option(
        help="With --seed-events: load only the events before this time (unix seconds), or "
        "before the samples' test period (\"test\"): what `bstrec replay --no-seed-history` "
        "needs")] = None,
    static_dir: Annotated[Path | None, typer.Option(
        help="Folder of the web page served at / (default: the built-in page)")] = None,
    bundle_root: Annotated[Path | None, typer.Option(
        help="POST /admin/reload loads bundles only from under this folder (default: the "
        "bundle's parent folder)")] = None,
    public_history: Annotated[bool | None, typer.Option(
        "--public-history/--protected-history",
        help="Whether GET /users/{id}/history is open to anyone (the web page reads it without "
        "a key) or needs the read or admin key (default: protected)")] = None,
    max_future_s: Annotated[int | None, typer.Option(
        help="Refuse events stamped more than this many seconds ahead of the server clock "
        "(default 300)")] = None,
) -> None:
    """Serve recommendations over HTTP (FastAPI + uvicorn; OpenAPI at /docs). Every setting
    can also come from the environment: BSTREC_K_MAX, BSTREC_STORE, ... Keys come from the
    environment only (a command line is visible to every user of the machine):
    BSTREC_EVENTS_KEY (POST /events), BSTREC_ADMIN_KEY (POST /admin/reload), BSTREC_READ_KEY
    (GET /users/{id}/history), BSTREC_API_KEY (events and admin where their own is unset)."""
    import os
    import secrets
    from typing import Any

    from pydantic import ValidationError

    from bstrec.serving.server import serve as run
    from bstrec.serving.settings import Settings

    given = {"bundle": bundle, "host": host, "port": port, "store": store,
             "redis_url": redis_url, "store_path": None if store_path is None else str(store_path),
             "seed_events": seed_events, "seed_until": seed_until, "static_dir": static_dir,
             "bundle_root": bundle_root, "public_history": public_history, "max_future_s": max_future_s}
    overrides: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if not any(os.environ.get(f"BSTREC_{k}_KEY") for k in ("API", "EVENTS", "ADMIN", "READ")):
        overrides["api_key"] = key = secrets.token_urlsafe(18)
        console.print("no BSTREC_*_KEY set: POST /events, /admin/reload and GET "
                      f"/users/{{id}}/history take X-API-Key: {key}")
    try:
        settings = Settings(**overrides)
        run(settings)
    except ValidationError as exc:
        raise fail(str(exc)) from None
    except ValueError as exc:  # BundleError: refused before serving
        raise fail(str(exc)) from None


@app.command("replay")
def replay_cmd(
    samples: Annotated[Path, typer.Option(help="Output folder of `bstrec data build`: its "
                                          "dataset/ tables and its test period (t90 on)")],
    service: Annotated[str, typer.Option(help="URL of the running service, e.g. "
                                         "http://127.0.0.1:8000")],
    k: Annotated[int, typer.Option(help="Items asked for per request", min=1)] = 10,
    window_s: Annotated[float | None, typer.Option(
        help="A shown item is a click when the user interacted with it within this many "
        "seconds of the request (default: one hour)")] = None,
    limit: Annotated[int | None, typer.Option(
        help="Replay only N behaviours of the test period", min=0)] = None,
    skip: Annotated[int, typer.Option(
        help="Start at the N-th behaviour of the test period (to go on after a replay of the "
        "first N, with --no-seed-history)", min=0)] = 0,
    api_key: Annotated[str | None, typer.Option(
        help="X-API-Key of POST /events (default: $BSTREC_EVENTS_KEY, else $BSTREC_API_KEY; "
        "prefer the environment, a command line is visible to every user)")] = None,
    seed_history: Annotated[bool, typer.Option(
        "--seed-history/--no-seed-history",
        help="First post every event before the test period, so that the store holds each "
        "user's history as of its start")] = True,
    freeze_item: Annotated[str | None, typer.Option(
        help="Fault injection: replace every posted event's item by ITEM (an upstream "
        "feature frozen to a constant)")] = None,
    max_errors: Annotated[int, typer.Option(
        help="Failed calls tolerated before the replay stops", min=0)] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON")] = False,
) -> None:
    """Drive a running service through the samples' test period in time order: each test
    behaviour's user asks for recommendations at its time (a shown item the user interacted
    with within --window-s is a click), then the behaviour is posted as an event, with the
    request id of the answer it is a click on.

    The store must hold each user's history as of the test start and nothing later: serve
    with `--seed-events SAMPLES --seed-until test` (profiles, items and the history before the
    test period) and replay with --no-seed-history. Plain --seed-events loads the whole log,
    test period included (the replayed behaviours would be history already). Without either,
    the replay posts the history itself, but events carry no profiles: the users are then
    served without their profile features (see bstrec.monitoring.replay)."""
    import os

    from bstrec.monitoring.replay import ReplayConfig, ReplayError, replay

    key = api_key or os.environ.get("BSTREC_EVENTS_KEY") or os.environ.get("BSTREC_API_KEY")
    try:
        cfg = ReplayConfig(k=k, limit=limit, skip=skip, api_key=key, seed_history=seed_history,
                           freeze_item=freeze_item, max_errors=max_errors,
                           window_s=click_window(window_s))
        result = replay(samples, service, cfg, progress=not as_json)
    except ReplayError as exc:
        done = exc.result.to_dict() if exc.result is not None else {}
        console.print(f"[bold red]error:[/bold red] {exc}")
        if done:
            console.print(f"done before it stopped: {json.dumps(done)}", markup=False)
        raise typer.Exit(code=1) from None
    except (ValueError, OSError) as exc:
        raise fail(str(exc)) from None
    if as_json:
        console.print_json(data=result.to_dict())
        return
    console.print(
        f"{result.requests:,} requests, {result.shown:,} items shown, {result.clicks:,} clicks "
        f"(CTR {result.ctr:.4f}, hit rate {result.hit_rate:.4f}); {result.seeded:,} history "
        f"events seeded, {result.events_posted:,} posted, {result.stored:,} stored; "
        f"{result.errors} errors; {result.seconds:.1f} s; versions {result.versions}")


# -- match stage: retriever, index, similar items ------------------------------------------------
@train_app.command("retriever")
def train_retriever_cmd(
    samples: Annotated[Path, typer.Option(help="Output folder of `bstrec data build`")],
    out: Annotated[Path, typer.Option(help="Retriever folder: two-tower, item-CF, popularity, "
                                      "index")],
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Two-tower config override, repeatable: encoder=mean, dim=64, ...")] = None,
    train_: Annotated[list[str] | None, typer.Option(
        "--train", help="Train config override, repeatable: temperature=0.05, logq=true, "
        "negatives=none|uniform|popularity|hard, max_epochs=6, ...")] = None,
    popular: Annotated[list[str] | None, typer.Option(
        help="Popularity override, repeatable: half_life_days=30, ...")] = None,
    item_cf: Annotated[list[str] | None, typer.Option(
        "--item-cf", help="Item-CF override, repeatable: window=10, max_gap_days=30, ...")] = None,
    nproc: Annotated[int, typer.Option(
        help="Data-parallel processes on this machine (torchrun, gloo), each on its slice of "
        "the same global batch_size")] = 1,
    item2vec: Annotated[bool, typer.Option(
        "--item2vec", help="Also train the item2vec session source into OUT/item2vec "
        "(`similar --by sessions`, a candidate source)")] = False,
    item2vec_set: Annotated[list[str] | None, typer.Option(
        "--item2vec-set", help="item2vec override, repeatable (implies --item2vec): "
        "backend=torch|gensim, session_gap_minutes=30, dim=64, window=5, lr=..., "
        "epochs=..., ...")] = None,
) -> None:
    """Train the two-tower (valid Recall@K picks the epoch), fit item-CF and popularity."""
    from bstrec.distributed.ddp import DistributedError, Job, launched_rank, run_job
    from bstrec.retrieval.train import RetrieverResult

    try:
        job = Job("retriever", str(samples), str(out),
                  model_overrides=parse_overrides(set_ or []),
                  train_overrides=parse_overrides(train_ or []),
                  popular_overrides=parse_overrides(popular or []),
                  item_cf_overrides=parse_overrides(item_cf or []))
        result = run_job(job, nproc, console=console)
    except (ValueError, OSError, DistributedError) as exc:
        raise fail(str(exc)) from None
    assert isinstance(result, RetrieverResult)
    if launched_rank() > 0:
        return  # under torchrun, rank 0 reports
    for h in result.history:
        console.print(f"epoch {h['epoch']}: loss {h['train_loss']:.4f}, " + ", ".join(
            f"{k} {v:.4f}" for k, v in h.items() if k.startswith("valid_")))
    if item2vec or item2vec_set:
        from bstrec.retrieval.artifacts import train_item2vec

        try:
            with console.status("training item2vec"):
                i2v = train_item2vec(samples, out, parse_overrides(item2vec_set or []))
        except (ValueError, OSError, ImportError) as exc:
            raise fail(str(exc)) from None
        console.print(f"item2vec ({i2v.config.backend}): {i2v.info['sessions']:,} sessions, "
                      f"{len(i2v.index):,} item vectors in {i2v.info['seconds']:.1f} s")
    console.print(f"best epoch {result.best_epoch}; retriever in [bold]{out}[/bold]")


index_app = typer.Typer(help="Build item-vector indexes.", no_args_is_help=True)
app.add_typer(index_app, name="index")


@index_app.command("build")
def index_build_cmd(
    retriever: Annotated[Path, typer.Option(help="Folder of `bstrec train retriever`")],
    kind: Annotated[str, typer.Option(help="exact, flat, hnsw or ivf")] = "hnsw",
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Index config override, repeatable: hnsw_m=32, ef_search=128, nlist=1024, "
        "nprobe=32, ivf_codes=pq4 (4-bit residual codes, exact re-scoring), pq_m=64, refine=4")
    ] = None,
) -> None:
    """(Re)build RETRIEVER/index from the two-tower's item vectors."""
    from bstrec.config import from_dict
    from bstrec.retrieval.artifacts import build_item_index, load_artifacts
    from bstrec.retrieval.index import IndexConfig

    try:
        cfg = from_dict(IndexConfig, {"kind": kind, **parse_overrides(set_ or [])}, where="index")
        r = load_artifacts(retriever)
        t0 = time.perf_counter()
        index = build_item_index(r.model, r.catalog, cfg)
        index.save(retriever / "index")
    except (ValueError, OSError) as exc:
        raise fail(str(exc)) from None
    console.print(f"{cfg.kind} index of {len(index):,} items built in "
                  f"{time.perf_counter() - t0:.1f} s: [bold]{retriever / 'index'}[/bold]")


@app.command("similar")
def similar_cmd(
    retriever: Annotated[Path, typer.Option(help="Folder of `bstrec train retriever`")],
    item: Annotated[str, typer.Option(help="Item id as in the dataset")],
    k: Annotated[int, typer.Option("-k", help="How many")] = 10,
    by: Annotated[str, typer.Option(help="co-occurrence (item-CF), vectors (two-tower) or "
                                    "sessions (item2vec)")] = "co-occurrence",
) -> None:
    """Items similar to ITEM: "people also watched" (item-CF), nearest item vectors
    (two-tower) or nearest session embeddings (item2vec)."""
    from rich.table import Table

    from bstrec.retrieval.artifacts import load_artifacts

    try:
        r = load_artifacts(retriever)
        code = r.encode_id(item)
        if by == "co-occurrence":
            scores, ids = r.item_cf.similar([code], k)
        elif by == "vectors" and r.index is not None:
            import numpy as np

            from bstrec.retrieval.train import item_vectors

            vec = item_vectors(r.model, r.catalog).numpy()[code]
            scores, ids = r.index.search(vec[None, :], k + 1)
            keep = ids[0] != code
            scores, ids = scores[:, keep][:, :k], ids[:, keep][:, :k]
            scores, ids = np.asarray(scores), np.asarray(ids)
        elif by == "sessions":
            if r.item2vec is None:
                raise ValueError(f"{retriever} has no item2vec/: train it with `bstrec train "
                                 "retriever --item2vec`")
            # item2vec's own vectors through its index (retrieval/index.py), the item excluded
            scores, ids = r.item2vec.similar([code], k)
        else:
            raise ValueError("--by must be co-occurrence, vectors (with an index) or sessions, "
                             f"got {by!r}")
    except (KeyError, ValueError, OSError) as exc:
        raise fail(str(exc.args[0]) if isinstance(exc, KeyError) else str(exc)) from None
    table = Table(title=f"similar to {item} ({by})")
    table.add_column("item")
    table.add_column("score", justify="right")
    for s, i in zip(scores[0], ids[0], strict=True):
        if i >= 2:
            table.add_row(str(r.raw_id(int(i))), f"{float(s):.4f}")
    console.print(table)


# -- the feedback loop: monitoring report, off-policy estimates -------------------------------
monitor_app = typer.Typer(help="Read the impression log: reports, alerts, off-policy estimates.",
                          no_args_is_help=True)
app.add_typer(monitor_app, name="monitor")
WindowOpt = Annotated[float | None, typer.Option(
    help="A click is an event on a shown item within this many seconds of the answer "
    "(default: the replay's and impression samples', one hour)")]


def click_window(window_s: float | None) -> float:
    """``--window-s``, or the one default the replay and impression samples share."""
    from bstrec.data.impressions import DEFAULT_WINDOW_S

    return DEFAULT_WINDOW_S if window_s is None else window_s
TimeOpt = Annotated[str | None, typer.Option(
    help="Unix seconds or an ISO date/time (UTC unless it says otherwise)")]


def parse_time(value: str | None, option: str) -> float | None:
    """``value`` as unix seconds: a number, or an ISO date or date-time (UTC when naive)."""
    from datetime import UTC, datetime

    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise fail(f"{option} {value!r}: expected unix seconds or an ISO date such as "
                   "2026-12-01 or 2026-12-01T12:00") from None
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


@monitor_app.command("report")
def monitor_report(
    log: Annotated[Path, typer.Option(help="Impression log folder (BSTREC_IMPRESSION_LOG)")],
    out: Annotated[Path, typer.Option(help="Report folder: report.md or .html, report.json, "
                                           "plots")] = Path("artifacts/monitor"),
    since: TimeOpt = None,
    until: TimeOpt = None,
    window_s: WindowOpt = None,
    bundle: Annotated[list[Path] | None, typer.Option(
        help="A bundle whose training reference the drift is measured against (repeatable: "
        "one per model version in the log)")] = None,
    alerts: Annotated[Path | None, typer.Option(
        help="YAML of alert thresholds (AlertConfig); default: the built-in ones")] = None,
    fmt: Annotated[str, typer.Option("--format", help="md or html")] = "md",
) -> None:
    """CTR by position, source, model version, arm and path; calibration; drift against the
    training reference; coverage and popularity bias; freshness; latency per stage; alerts;
    A/B difference with its interval. Exit code 1 when an alert is breached."""
    from bstrec.monitoring.alerts import AlertConfig
    from bstrec.monitoring.reference import Reference
    from bstrec.monitoring.report import write_log_report
    from bstrec.serving.bundle import read_reference

    if fmt not in ("md", "html"):
        raise fail(f"--format {fmt!r}: expected md or html")
    if not log.is_dir():
        raise fail(f"--log {log}: no such folder")
    try:
        references: dict[str, Reference] = {}
        for path in bundle or []:
            version, reference = read_reference(path)
            if reference is None:
                raise ValueError(f"{path} has no training reference (built before them): "
                                 "rebuild it with `bstrec bundle build` to measure drift")
            references[version] = reference
        config = AlertConfig() if alerts is None else AlertConfig.from_yaml(alerts)
        with console.status("joining clicks and writing the report"):
            result = write_log_report(log, out, since=parse_time(since, "--since"),
                                      until=parse_time(until, "--until"),
                                      window_s=click_window(window_s),
                                      references=references, alert_config=config,
                                      fmt=fmt)  # type: ignore[arg-type]
    except (ValueError, OSError) as exc:
        raise fail(str(exc)) from None
    breached = [a for a in result.alerts if a.breached]
    for a in breached:
        console.print(f"[bold red]alert[/bold red] {a.name}: {a.message}")
    console.print(f"report in [bold]{result.report}[/bold] ({len(result.plots)} plots, "
                  f"{len(breached)} alerts breached)")
    if breached:
        raise typer.Exit(code=1)


@monitor_app.command("ope")
def monitor_ope(
    log: Annotated[Path, typer.Option(help="Impression log of a service run with the "
                                           "plackett_luce policy and a shadow bundle")],
    target: Annotated[str, typer.Option(help="Model version of the shadow bundle to estimate")],
    since: TimeOpt = None,
    until: TimeOpt = None,
    window_s: WindowOpt = None,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples (of users)")] = 1000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed")] = 0,
    out: Annotated[Path | None, typer.Option(help="Write the estimate as JSON here")] = None,
) -> None:
    """Off-policy CTR of a candidate bundle from the log alone: IPS and self-normalised IPS
    with bootstrap intervals, from the shadow rankings and the logged propensities."""
    import dataclasses

    from bstrec.monitoring.impressions import read_log
    from bstrec.monitoring.join import join_clicks
    from bstrec.monitoring.ope import estimate

    t0, t1 = parse_time(since, "--since"), parse_time(until, "--until")
    window_s = click_window(window_s)
    try:
        impressions = read_log(log, "impressions", t0, t1)
        events = read_log(log, "events", t0, None if t1 is None else t1 + window_s)
        joined = join_clicks(impressions, events, window_s)
        result = estimate(joined, impressions.filter(~impressions["shown"]), target,
                          n_boot=n_boot, seed=seed)
    except (ValueError, OSError) as exc:
        raise fail(str(exc)) from None
    data = dataclasses.asdict(result)
    console.print_json(data=data)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=2) + "\n")
