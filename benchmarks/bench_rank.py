"""Rank-stage benchmark: BST, DIN, WDL, WDL(+Seq), BST ablations and torch-rechub's peers on the
very same samples, several seeds, test AUC / GAUC / logloss and training throughput.

For each protocol (synthetic-order, ml100k-ctr, ml1m-ctr):

1. builds the samples (P1/P3/P4) into ``WORKDIR/<protocol>/samples``;
2. trains every (model, seed) with the same loop, optimizer, batch size and early stopping on
   valid AUC (selection on valid only); a finished run folder is reused, a killed one resumed,
   so the script can be stopped and started again;
3. scores the test split once per run and writes the report of ``bstrec evaluate`` (tables, AUC
   by history length, calibration, attention map, paired bootstrap BST - DIN) into
   ``WORKDIR/<protocol>/report``;
4. measures training throughput side by side: every model does the same training steps on the
   same batches, interleaved in rounds so that load on a shared machine hits all alike; the
   median over rounds is reported;
5. writes ``benchmarks/results/rank_<protocol>.json`` and its BENCHMARKS.md section.

    python benchmarks/bench_rank.py --protocol ml100k-ctr --seeds 0 1 2
    python benchmarks/bench_rank.py --protocol ml1m-ctr --budget-minutes 90   # stops starting runs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import readme_status
from bstrec.data.samples import SampleSet
from bstrec.evaluation.evaluate import evaluate_runs
from bstrec.training.loop import seed_model_init
from bstrec.training.task import RESULT, train_ranker
from bstrec.training.tensors import TensorSplit
from common import (
    ensure_samples,
    machine,
    median,
    now,
    rewrite_sections,
    update_section,
    write_result,
)
from peers import PEERS, build_peer, peers_available

DATASETS = {"synthetic-order": "synthetic-order", "ml100k-ctr": "ml-100k", "ml1m-ctr": "ml-1m"}
MAIN = ("wdl", "wdl_seq", "din", "bst")
# name -> (ranker, model config overrides): the paper's Table 4 ablations
ABLATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "bst_pos_slot": ("bst", {"position": "slot"}),
    "bst_pos_none": ("bst", {"position": "none"}),
    "bst_b2": ("bst", {"blocks": 2}),
    "bst_b3": ("bst", {"blocks": 3}),
}
# BST settings chosen on the valid split (tune_bst.py), trained on every seed like the main four:
# the target position's output alone instead of all positions concatenated, BatchNorm in the MLP
TUNED: dict[str, tuple[str, dict[str, Any]]] = {
    "bst_target_bn": ("bst", {"output": "target", "mlp_norm": "batch"}),
}
# paired bootstraps beyond BST - DIN: the tuned BST against DIN and each peer, the paper's BST
# against the peers' BST and against each of its Table 4 ablations
ALSO_COMPARE = (("bst_target_bn", "din"), ("bst_target_bn", "torch_rechub_bst"),
                ("bst_target_bn", "torch_rechub_din"), ("bst_target_bn", "torch_rechub_widedeep"),
                ("bst", "torch_rechub_bst"), *(("bst", name) for name in ABLATIONS))


def ranker_of(name: str) -> tuple[str, dict[str, Any]]:
    return ABLATIONS.get(name) or TUNED.get(name) or (name, {})


def train_cell(name: str, seed: int, samples: Path, run_dir: Path, train_cfg: dict[str, Any]
               ) -> dict[str, Any]:
    """Train one (model, seed) unless its run folder already holds a finished result."""
    if (run_dir / RESULT).exists():
        print(f"  {name} seed {seed}: reusing {run_dir}")
    else:
        ranker, overrides = ranker_of(name)
        print(f"  {name} seed {seed}: training into {run_dir}")
        train_ranker(ranker, samples, run_dir, model_overrides=overrides,
                     train_overrides={**train_cfg, "seed": seed}, resume=run_dir.exists(),
                     builder=build_peer)
    result: dict[str, Any] = json.loads((run_dir / RESULT).read_text())
    return result


def throughput(samples: Path, names: list[str], batch_size: int, steps: int, rounds: int
               ) -> dict[str, dict[str, float]]:
    """Training samples/s of each model on the same batches, interleaved over ``rounds``."""
    data = SampleSet.load(samples, splits=("train",))
    train = TensorSplit.from_frame(data.splits["train"], data.spec)
    gen = torch.Generator().manual_seed(0)
    batches = [train.batch(torch.randint(len(train), (batch_size,), generator=gen))
               for _ in range(steps + 3)]
    models = {}
    for name in names:
        ranker, overrides = ranker_of(name)
        seed_model_init(0)
        model = build_peer(ranker, data.spec, overrides)
        models[name] = (model, torch.optim.Adam(model.parameters(), lr=1e-3))
    rates: dict[str, list[float]] = {n: [] for n in names}
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for r in range(rounds):
        for name, (model, opt) in models.items():
            model.train()
            for i, batch in enumerate(batches):
                if i == 3:  # the first steps warm up allocators and caches
                    t0 = time.perf_counter()
                loss = loss_fn(model(batch), batch["label"])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            rates[name].append(steps * batch_size / (time.perf_counter() - t0))
        print(f"  throughput round {r + 1}/{rounds}: "
              + ", ".join(f"{n} {v[-1]:,.0f}" for n, v in rates.items()))
    return {n: {"median": median(v), "rounds": v} for n, v in rates.items()}


def fmt(stat: dict[str, Any] | None, digits: int = 4) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    std = stat.get("std")
    pm = f" ± {std:.{digits}f}" if std is not None and len(stat.get("values", [])) > 1 else ""
    return f"{stat['mean']:.{digits}f}{pm}"


def markdown(res: dict[str, Any]) -> str:
    m, tput = res["machine"], res["train_samples_per_s"]
    tc = res["train_config"]
    lines = [
        f"## Rank: {res['protocol']}",
        "",
        f"`{res['command']}` on {res['date']}, {m['cores']} cores ({m['cpu']}). Samples "
        f"{res['splits']['train']:,} / {res['splits']['valid']:,} / {res['splits']['test']:,} "
        f"(train / valid / test). Every model trains in the same loop on the same batches: Adam "
        f"lr {tc['lr']}, batch {tc['batch_size']}, at most {tc['max_epochs']} epochs, early "
        f"stopping on valid AUC (patience {tc['patience']}); the best valid epoch is scored once "
        "on test. Cells are mean ± std over the seeds. Throughput: training samples/s on identical "
        f"batches, models interleaved, median of {res['throughput_rounds']} rounds "
        "(single process, all cores; 1-minute load average "
        f"{' -> '.join(str(x) for x in res['throughput_load_average'])} on {m['cores']} cores "
        "during the measurement). Full report with plots: "
        f"`{res['report']}` (not committed; rerun the command).",
        "",
        "| model | seeds | test AUC | test GAUC | test logloss | RelaImpr vs WDL | train samples/s |",
        "|---|---:|---|---|---|---:|---:|",
    ]
    for name, row in res["models"].items():
        ri = row.get("rela_impr")
        rate = tput.get(name)
        lines.append(f"| {name} | {len(row['test_auc'])} | {fmt(row['auc'])} | {fmt(row['gauc'])} "
                     f"| {fmt(row['logloss'])} | {'n/a' if ri is None else f'{ri:+.2f}%'} | "
                     f"{'n/a' if rate is None else f'{rate:,.0f}'} |")
    for name, row in res["references"].items():
        lines.append(f"| reference: {name} | - | {fmt(row['auc'])} | {fmt(row['gauc'])} | "
                     f"{fmt(row['logloss'])} | | |")
    boots = res.get("bootstraps") or ([res["bootstrap"]] if res.get("bootstrap") else [])
    lines += bootstrap_lines(boots)
    ratios = {k.removeprefix("throughput_ratio_").removesuffix("_vs_torch_rechub_bst"): v
              for k, v in res.items() if k.startswith("throughput_ratio_")}
    if ratios:
        lines += ["", "Training throughput over torch-rechub's BST, same batches and widths: "
                  + ", ".join(f"{k} **{v:.1f}x**" for k, v in ratios.items()) + "."]
    lines += peer_lines(res["models"])
    if res.get("notes"):
        lines += ["", *res["notes"]]
    return "\n".join(lines)


def bootstrap_lines(boots: list[dict[str, Any]], of: str = "") -> list[str]:
    """The paired bootstrap intervals of ``evaluate_runs``, a heading and a line each."""
    if not boots:
        return []
    return ["", f"Paired bootstrap{of} (1,000 resamples of test users; with several seeds each "
            "side is the mean of its seeds) of the AUC difference, 95% interval:", "",
            *(f"- AUC({b['a']}) - AUC({b['b']}): {b['diff']:+.4f} "
              f"[{b['lo']:+.4f}, {b['hi']:+.4f}]" for b in boots)]


def peer_lines(models: dict[str, Any]) -> list[str]:
    """The issue's goal (our BST's test AUC above every peer's), checked on the peers' own seeds:
    each of our BSTs' AUC averaged over the seeds the peer was trained on."""
    peers = [p for p in PEERS if p in models]
    ours = [n for n in ("bst", *TUNED) if n in models]
    if not peers or not ours:
        return []
    out = ["", "Our BSTs against the peers, test AUC on the peers' seeds:", ""]
    for name in ours:
        by_seed = dict(zip(models[name]["seeds"], models[name]["test_auc"], strict=True))
        cells, above = [], True
        for p in peers:
            seeds = [s for s in models[p]["seeds"] if s in by_seed]
            if not seeds:
                continue
            mine = sum(by_seed[s] for s in seeds) / len(seeds)
            theirs = sum(a for s, a in zip(models[p]["seeds"], models[p]["test_auc"], strict=True)
                         if s in by_seed) / len(seeds)
            above &= mine > theirs
            cells.append(f"{mine:.4f} vs {p} {theirs:.4f} ({mine - theirs:+.4f})")
        out.append(f"- {name}: " + "; ".join(cells) + " -> "
                   + ("above every peer." if above else "not above every peer."))
    return out


def run_notes(names: list[str], train_results: dict[str, list[dict[str, Any]]],
              args: argparse.Namespace, out_of_time: bool) -> list[str]:
    """What a reader of the table must know that the table does not show, from the runs."""
    notes = []
    missing = [n for n in names if n not in train_results]
    if out_of_time:
        notes.append(f"- Stopped starting runs after the {args.budget_minutes:.0f}-minute budget"
                     + (f": not run are {', '.join(missing)}" if missing else "") + ".")
    short = {n: sorted({r["train_config"]["max_epochs"] for r in rs}) for n, rs in
             train_results.items() if any(r["train_config"]["max_epochs"] != args.max_epochs
                                          for r in rs)}
    for name, epochs in short.items():
        stopped = all(r["result"]["best_epoch"] < len(r["result"]["history"])
                      for r in train_results[name])
        notes.append(f"- {name} was trained with at most {'/'.join(map(str, epochs))} epochs "
                     f"(reused runs), not {args.max_epochs}"
                     + ("; each run's best epoch came before its last, so the limit did not "
                        "bind." if stopped else "; its valid AUC was still rising at its last "
                        "epoch."))
    for name in TUNED:
        if name in train_results:
            notes.append(f"- {name}: BST with {TUNED[name][1]}, the setting chosen on the ML-1M "
                         "valid split by benchmarks/tune_bst.py; bst is the paper's "
                         "concatenation of all positions.")
    return notes


def model_seeds(name: str, args: argparse.Namespace) -> list[int]:
    """The seeds ``name`` trains on: ``--seeds-for`` if it names the model, else the ablation
    or peer seeds for those, else ``--seeds``."""
    if name in args.seeds_for:
        return args.seeds_for[name]
    if name in ABLATIONS:
        return args.ablation_seeds
    return args.peer_seeds if name in PEERS else args.seeds


def parse_seeds_for(values: list[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for v in values:
        name, _, seeds = v.partition("=")
        if not seeds or not all(x.strip().isdigit() for x in seeds.split(",")):
            raise argparse.ArgumentTypeError(f"--seeds-for wants NAME=0,1,2, got {v!r}")
        out[name] = [int(x) for x in seeds.split(",")]
    return out


def run_protocol(protocol: str, args: argparse.Namespace, started: float) -> None:
    root = Path(args.workdir) / protocol
    samples = ensure_samples(DATASETS[protocol], root / "samples", args.data_dir)
    manifest = json.loads((samples / "manifest.json").read_text())
    train_cfg = {"max_epochs": args.max_epochs, "patience": args.patience,
                 "batch_size": args.batch_size, "lr": args.lr}
    names = [n for n in args.models if n not in PEERS or peers_available()]
    skipped = [n for n in args.models if n not in names]
    if skipped:
        print(f"  torch-rechub not installed (pip install -e '.[peers]'): skipping {skipped}")
    runs: dict[str, list[Path]] = {}
    train_results: dict[str, list[dict[str, Any]]] = {}
    out_of_time = False
    for seed in args.seeds:  # seed-major: an interrupted run still has every model's first seed
        for name in names:
            if seed not in model_seeds(name, args):
                continue
            run_dir = root / "runs" / f"{name}-s{seed}"
            over = (time.time() - started) / 60 > args.budget_minutes
            if over and not (run_dir / RESULT).exists():
                out_of_time = True
                continue
            train_results.setdefault(name, []).append(
                train_cell(name, seed, samples, run_dir, train_cfg))
            runs.setdefault(name, []).append(run_dir)
    report = evaluate_runs(samples, runs, root / "report", also_compare=ALSO_COMPARE,
                           builder=build_peer)
    summary = json.loads((report.parent / "metrics.json").read_text())
    load_before = os.getloadavg()[0]
    tput = throughput(samples, list(runs), args.batch_size, args.throughput_steps,
                      args.throughput_rounds)
    load = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    models: dict[str, Any] = {}
    for name, row in summary["models"].items():
        models[name] = {
            "test_auc": row["auc"]["values"], "test_gauc": row["gauc"]["values"],
            "test_logloss": row["logloss"]["values"], "test_ece": row["ece"]["values"],
            "auc": row["auc"], "gauc": row["gauc"], "logloss": row["logloss"],
            "rela_impr": row["rela_impr"],
            "valid_auc": [r["result"]["best_valid_auc"] for r in train_results[name]],
            "best_epoch": [r["result"]["best_epoch"] for r in train_results[name]],
            "seeds": [r["train_config"]["seed"] for r in train_results[name]],
            "auc_by_history": row["auc_by_history"],
        }
    rates = {n: v["median"] for n, v in tput.items()}
    res: dict[str, Any] = {
        "protocol": protocol, "date": now(), "machine": machine(),
        "command": "python benchmarks/bench_rank.py " + " ".join(sys.argv[1:]),
        "splits": manifest["splits"], "train_config": train_cfg,
        "models": models,
        "references": {k: {"test_auc": [v["auc"]["mean"]], "auc": v["auc"], "gauc": v["gauc"],
                           "logloss": v["logloss"]} for k, v in summary["references"].items()},
        "bootstrap": summary["bootstrap"], "bootstraps": summary["bootstraps"],
        "history_buckets": summary["history"],
        "train_samples_per_s": rates,
        "throughput": tput, "throughput_steps": args.throughput_steps,
        "throughput_rounds": args.throughput_rounds,
        # 1-minute load average before and after the throughput phase: above the core count,
        # other work shared the machine and absolute rates are low (ratios less affected)
        "throughput_load_average": load,
        "report": str(report),
        "notes": [],
    }
    for ours in ("bst", *TUNED):
        if ours in rates and "torch_rechub_bst" in rates:
            res[f"throughput_ratio_{ours}_vs_torch_rechub_bst"] = (
                rates[ours] / rates["torch_rechub_bst"])
    res["notes"] = run_notes(names, train_results, args, out_of_time)
    path = write_result(f"rank_{protocol}", res)
    update_section(f"rank_{protocol}", markdown(res))
    readme_status.write()
    print(f"{protocol}: wrote {path}, its BENCHMARKS.md section and README.md's status table; "
          f"report {report}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--protocol", action="append", choices=list(DATASETS))
    ap.add_argument("--models", nargs="+", default=[*MAIN, *TUNED, *ABLATIONS, *PEERS])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--ablation-seeds", nargs="+", type=int, default=[0, 1, 2],
                    help="seeds of the BST ablations (a subset of --seeds)")
    ap.add_argument("--peer-seeds", nargs="+", type=int, default=[0, 1, 2],
                    help="seeds of the torch-rechub peers (a subset of --seeds)")
    ap.add_argument("--seeds-for", nargs="+", default=[], metavar="NAME=S,S",
                    help="the seeds of one model, over the ones above (e.g. a slow peer on "
                    "fewer seeds: torch_rechub_bst=0)")
    ap.add_argument("--max-epochs", type=int, default=3)
    ap.add_argument("--patience", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--throughput-steps", type=int, default=10)
    ap.add_argument("--throughput-rounds", type=int, default=3)
    ap.add_argument("--budget-minutes", type=float, default=float("inf"),
                    help="start no new training run after this many minutes")
    ap.add_argument("--workdir", default="artifacts/bench_rank")
    ap.add_argument("--data-dir", default=os.environ.get("BSTREC_DATA_DIR", "../shared/data"))
    ap.add_argument("--markdown-only", action="store_true",
                    help="only rewrite each protocol's BENCHMARKS.md section from its results "
                    "file (after a change to the section's layout), training nothing")
    args = ap.parse_args()
    args.seeds_for = parse_seeds_for(args.seeds_for)
    if args.markdown_only:
        rewrite_sections("rank", args.protocol or list(DATASETS), markdown)
        return
    unknown = [n for n in [*args.models, *args.seeds_for]
               if n not in (*MAIN, *TUNED, *ABLATIONS, *PEERS)]
    if unknown:
        ap.error(f"unknown models {unknown}")
    started = time.time()
    for protocol in args.protocol or list(DATASETS):
        if DATASETS[protocol] != "synthetic-order" and not (
                Path(args.data_dir) / DATASETS[protocol]).is_dir():
            print(f"skip {protocol}: {DATASETS[protocol]} not in {args.data_dir}")
            continue
        print(f"== {protocol}")
        run_protocol(protocol, args, started)


if __name__ == "__main__":
    main()
