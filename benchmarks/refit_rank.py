"""Refit on train + valid: the rankers of bench_rank.py retrained on the train and valid splits
together, for the number of epochs each (model, seed) chose on valid, then scored once on test.

A diagnostic of the gap between valid and test (see split_shift.py), not a protocol result: the
protocol trains on the train split only, and its tables stay those of bench_rank.py. Refitting on
train + valid with the epoch count chosen on valid is common practice; it uses no test data, and
it tells whether the ranking of the models on test changes when they have also seen the 10% of
time right before test. Nothing else changes: same samples (encoded with the train-only
vocabularies, so ids first seen in valid stay out-of-vocabulary), same model settings, batch
size, learning rate and seeds; the weights after the last epoch are scored (valid is now training
data, so it cannot pick an epoch).

Needs the results file and samples of bench_rank.py for the protocol (run it first). Writes
``benchmarks/results/refit_<protocol>.json`` and its BENCHMARKS.md section; finished runs in
``WORKDIR/<protocol>/refit_runs`` are reused, killed ones resumed.

    python benchmarks/refit_rank.py --protocol ml100k-ctr
    python benchmarks/refit_rank.py --protocol ml1m-ctr --seeds-for torch_rechub_bst=0
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rank import (
    ALSO_COMPARE,
    DATASETS,
    bootstrap_lines,
    fmt,
    parse_seeds_for,
    peer_lines,
    train_cell,
)
from bstrec.data.samples import SampleSet
from bstrec.evaluation.evaluate import evaluate_runs
from bstrec.training.loop import LAST
from common import RESULTS, machine, now, rewrite_sections, update_section, write_result
from peers import PEERS, build_peer, peers_available

MODELS = ("wdl", "din", "bst", "bst_target_bn", *PEERS)


def refit_samples(samples: Path, out: Path) -> Path:
    """``samples`` with train = train + valid (rows as encoded, vocabularies untouched); a copy
    from samples built with another config is rebuilt."""
    copy = out / "manifest.json"
    source = json.loads((samples / "manifest.json").read_text())
    if copy.exists() and json.loads(copy.read_text()).get("config_hash") == source["config_hash"]:
        return out
    data = SampleSet.load(samples)
    splits = {"train": pl.concat([data.splits["train"], data.splits["valid"]]),
              "valid": data.splits["valid"], "test": data.splits["test"]}
    manifest = {**data.manifest, "splits": {k: len(v) for k, v in splits.items()},
                "refit": "train = the protocol's train + valid splits (refit_rank.py)"}
    SampleSet(splits, data.vocabs, data.spec, manifest).save(out, with_dataset=False)
    return out


def run_protocol(protocol: str, args: argparse.Namespace, started: float) -> None:
    root = Path(args.workdir) / protocol
    first_path = RESULTS / f"rank_{protocol}.json"
    if not first_path.exists() or not (root / "samples" / "manifest.json").exists():
        raise SystemExit(f"{protocol}: no {first_path} or {root / 'samples'}: run "
                         f"benchmarks/bench_rank.py --protocol {protocol} first")
    first = json.loads(first_path.read_text())
    tc = first["train_config"]
    samples = refit_samples(root / "samples", root / "refit_samples")
    names = [n for n in args.models if n in first["models"]
             and (n not in PEERS or peers_available())]
    skipped = [n for n in args.models if n not in names]
    if skipped:
        print(f"  not in {first_path} or torch-rechub not installed: skipping {skipped}")
    runs: dict[str, list[Path]] = {}
    trained: dict[str, list[tuple[int, int]]] = {}  # name -> (seed, epochs) of each run
    out_of_time = []
    for name in names:
        row = first["models"][name]
        chosen = dict(zip(row["seeds"], row["best_epoch"], strict=True))
        for seed in args.seeds_for.get(name, args.seeds):
            if seed not in chosen:
                continue
            run_dir = root / "refit_runs" / f"{name}-s{seed}"
            if (time.time() - started) / 60 > args.budget_minutes and not run_dir.exists():
                out_of_time.append(f"{name} seed {seed}")
                continue
            cfg = {"batch_size": tc["batch_size"], "lr": tc["lr"], "max_epochs": chosen[seed],
                   "patience": 0}
            done = train_cell(name, seed, samples, run_dir, cfg)
            if done["train_config"]["max_epochs"] != chosen[seed]:
                raise SystemExit(f"{run_dir} holds {done['train_config']['max_epochs']} epochs, "
                                 f"but {first_path} now chooses {chosen[seed]}: remove it to "
                                 "refit again")
            runs.setdefault(name, []).append(run_dir / LAST)
            trained.setdefault(name, []).append((seed, chosen[seed]))
    # scored on the protocol's own samples, so that the references are the protocol's
    report = evaluate_runs(root / "samples", runs, root / "refit_report",
                           also_compare=ALSO_COMPARE, builder=build_peer)
    summary = json.loads((report.parent / "metrics.json").read_text())
    models: dict[str, Any] = {}
    for name, row in summary["models"].items():
        seeds = [s for s, _ in trained[name]]
        before = dict(zip(first["models"][name]["seeds"], first["models"][name]["test_auc"],
                          strict=True))
        models[name] = {
            "test_auc": row["auc"]["values"], "test_gauc": row["gauc"]["values"],
            "test_logloss": row["logloss"]["values"], "auc": row["auc"], "gauc": row["gauc"],
            "logloss": row["logloss"], "epochs": [e for _, e in trained[name]], "seeds": seeds,
            "train_only_test_auc": [before[s] for s in seeds],
        }
    res = {
        "protocol": protocol, "date": now(), "machine": machine(),
        "command": "python benchmarks/refit_rank.py " + " ".join(sys.argv[1:]),
        "splits": json.loads((samples / "manifest.json").read_text())["splits"],
        "train_config": {"batch_size": tc["batch_size"], "lr": tc["lr"], "patience": 0},
        "models": models, "bootstraps": summary["bootstraps"],
        "report": str(report), "not_run_out_of_time": out_of_time,
        "not_refit": [n for n in MODELS if n in first["models"] and n not in names],
    }
    path = write_result(f"refit_{protocol}", res)
    update_section(f"refit_{protocol}", markdown(res))
    print(f"{protocol}: wrote {path} and its BENCHMARKS.md section; report {report}")


def markdown(res: dict[str, Any]) -> str:
    m, s = res["machine"], res["splits"]
    lines = [
        f"## Refit on train + valid: {res['protocol']} (a diagnostic, not the protocol's table)",
        "",
        f"`{res['command']}` on {res['date']}, {m['cores']} cores. The models of bench_rank.py "
        f"retrained on train + valid ({s['train']:,} samples) for the epochs each (model, seed) "
        "chose on valid, same settings and seeds; the last epoch's weights are scored once on "
        "test. The protocol trains on train only: its results are the rank table above. "
        "'train only' is that table's test AUC on the same seeds.",
        "",
        "| model | seeds | epochs | test AUC, train only | test AUC, refit | change | "
        "test GAUC, refit |",
        "|---|---:|---|---:|---|---:|---|",
    ]
    for name in (n for n in MODELS if n in res["models"]):  # whatever order trained them
        row = res["models"][name]
        was = statistics.mean(row["train_only_test_auc"])
        lines.append(f"| {name} | {len(row['seeds'])} | {', '.join(map(str, row['epochs']))} | "
                     f"{was:.4f} | {fmt(row['auc'])} | {row['auc']['mean'] - was:+.4f} | "
                     f"{fmt(row['gauc'])} |")
    lines += bootstrap_lines(res["bootstraps"], " of the refit models")
    lines += peer_lines(res["models"])
    if res["not_run_out_of_time"]:
        lines += ["", "Not run (time budget): " + ", ".join(res["not_run_out_of_time"]) + "."]
    if res.get("not_refit"):
        lines += ["", "Trained by bench_rank.py but not refit (left out of `--models`, or "
                  "torch-rechub not installed): "
                  + ", ".join(res["not_refit"]) + "."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--protocol", action="append", choices=[p for p in DATASETS
                                                            if p != "synthetic-order"])
    ap.add_argument("--models", nargs="+", default=list(MODELS),
                    help="models to refit, trained in this order (put slow ones last when "
                    "--budget-minutes may cut the list)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                    help="seeds to refit, among those bench_rank.py trained")
    ap.add_argument("--seeds-for", nargs="+", default=[], metavar="NAME=S,S",
                    help="the seeds of one model, over --seeds (e.g. torch_rechub_bst=0)")
    ap.add_argument("--budget-minutes", type=float, default=float("inf"),
                    help="start no new training run after this many minutes")
    ap.add_argument("--workdir", default="artifacts/bench_rank")
    ap.add_argument("--markdown-only", action="store_true",
                    help="only rewrite each protocol's BENCHMARKS.md section from its results "
                    "file, training nothing")
    args = ap.parse_args()
    protocols = args.protocol or ["ml100k-ctr", "ml1m-ctr"]
    if args.markdown_only:
        rewrite_sections("refit", protocols, markdown)
        return
    args.seeds_for = parse_seeds_for(args.seeds_for)
    unknown = [n for n in [*args.models, *args.seeds_for] if n not in MODELS]
    if unknown:
        ap.error(f"unknown models {unknown}; known: {list(MODELS)}")
    started = time.time()
    for protocol in protocols:
        print(f"== {protocol}")
        run_protocol(protocol, args, started)


if __name__ == "__main__":
    main()
