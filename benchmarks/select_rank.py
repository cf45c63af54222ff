"""Model selection per protocol, then the chosen model tested once beside the peers (issue 23).

For each protocol (P1 ml1m-ctr, P3 ml100k-ctr, P4 synthetic-order, P5 synthetic-implicit):

1. builds the samples into ``WORKDIR/<protocol>/samples``;
2. runs ``bstrec.training.select.select`` (what ``bstrec train ranker --select`` runs) over a grid
   and the seeds into ``WORKDIR/<protocol>/select``: valid AUC only, the test split unread;
3. trains torch-rechub's peers on the same seeds and train settings (bench_rank.py's
   ``train_cell``) into ``WORKDIR/<protocol>/peers``;
4. scores on test, once: the chosen trial (every seed), the best BST trial when the choice is not
   a BST, our baselines and the peers; paired bootstraps of the chosen trial against each;
5. checks the issue's goal for the protocol's kind of data: order-carrying and implicit logs
   (P4, P5): the chosen model above every peer with the interval's lower bound > 0; rating logs
   (P1, P3): not below the best peer beyond the interval (upper bound >= 0);
6. writes ``benchmarks/results/select_<protocol>.json`` and its BENCHMARKS.md section.

The grid (``--grid``): ``bench`` (default) is three BST cells, the paper's configuration, the
same with ``concat_scale="length"`` and target output with BatchNorm, at lr 1e-3, plus the wdl,
wdl_seq and din baselines: small enough for 3 seeds on a 2-core machine. ``full`` is the
CLI's 16-cell default grid (``bstrec.training.select.default_grid``); a YAML path is a grid file.
Finished runs are reused, so a larger grid can be added to a finished one.

    python benchmarks/select_rank.py --protocol ml100k-ctr --protocol synthetic-order
    python benchmarks/select_rank.py --protocol ml1m-ctr --grid full --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rank import DATASETS, bootstrap_lines, fmt, train_cell
from bstrec.evaluation.evaluate import evaluate_runs
from bstrec.training.select import (
    BASELINES,
    Selection,
    Trial,
    default_grid,
    load_grid,
    select,
    selection_rows,
    with_baselines,
)
from common import ensure_samples, machine, now, rewrite_sections, update_section, write_result
from peers import build_peer, peers_available

PROTOCOLS = {**DATASETS, "synthetic-implicit": "synthetic-implicit"}
# the two goals, by the kind of data a protocol stands for
ORDER_OR_IMPLICIT = ("synthetic-order", "synthetic-implicit")
BENCH_GRID = with_baselines([
    Trial("bst_paper", "bst"),
    Trial("bst_concat_length", "bst", {"concat_scale": "length"}),
    Trial("bst_target_bn", "bst", {"output": "target", "mlp_norm": "batch"}),
])
# torch-rechub's BST trains several times slower than ours (train_samples_per_s in
# benchmarks/results/rank_*.json): left out by default
DEFAULT_PEERS = ("torch_rechub_widedeep", "torch_rechub_din")


def grid_of(arg: str) -> list[Trial]:
    if arg == "bench":
        return list(BENCH_GRID)
    if arg == "full":
        return default_grid()
    return load_grid(arg)


def goal(protocol: str, bootstraps: list[dict[str, Any]], chosen: str,
         test_auc: dict[str, float], peers: list[str]) -> dict[str, Any]:
    """The issue's goal for ``protocol``'s kind of data, from the chosen model's bootstraps."""
    against = {b["b"]: b for b in bootstraps if b["a"] == chosen and b["b"] in peers}
    if not against:
        return {"kind": "no peer was tested", "met": None}
    if protocol in ORDER_OR_IMPLICIT:
        met = all(b["lo"] > 0 for b in against.values())
        return {"kind": "above every peer (lower bound > 0)", "met": met,
                "against": sorted(against)}
    best = max(against, key=lambda p: test_auc[p])
    return {"kind": "not below the best peer (upper bound >= 0)", "met": against[best]["hi"] >= 0,
            "against": [best]}


def run_protocol(protocol: str, args: argparse.Namespace, console: Console) -> None:
    root = Path(args.workdir) / protocol
    samples = ensure_samples(PROTOCOLS[protocol], root / "samples", args.data_dir)
    manifest = json.loads((samples / "manifest.json").read_text())
    train_cfg = {"max_epochs": args.max_epochs, "patience": args.patience,
                 "batch_size": args.batch_size, "lr": args.lr, "num_threads": args.threads}
    selection: Selection = select(samples, root / "select", grid_of(args.grid), args.seeds,
                                  train_overrides=train_cfg, console=console)
    assert selection.chosen is not None  # select raises when nothing can be chosen
    chosen = selection.chosen.trial.name
    eligible = [r for r in selection.trials if r.eligible]
    tested = {chosen: selection.chosen}
    best_bst = max((r for r in eligible if r.trial.model == "bst"), key=lambda r: r.mean_auc,
                   default=None)
    if best_bst is not None:
        tested.setdefault(best_bst.trial.name, best_bst)
    tested.update({r.trial.name: r for r in selection.trials
                   if r.trial.name in BASELINES and r.eligible})
    runs: dict[str, list[Path]] = {name: [r.runs[s] for s in args.seeds]
                                   for name, r in tested.items()}
    peers = [p for p in args.peers if peers_available()]
    if args.peers and not peers:
        console.print("torch-rechub not installed (pip install -e '.[peers]'): no peers",
                      markup=False)
    peer_valid: dict[str, list[float]] = {}
    for peer in peers:
        for seed in args.seeds:
            run = root / "peers" / f"{peer}-s{seed}"
            result = train_cell(peer, seed, samples, run, train_cfg)
            runs.setdefault(peer, []).append(run)
            peer_valid.setdefault(peer, []).append(result["result"]["best_valid_auc"])
    others = [n for n in runs if n != chosen]
    report = evaluate_runs(samples, runs, root / "report",
                           baseline="wdl",
                           compare=(chosen, others[0]),
                           also_compare=[(chosen, o) for o in others[1:]], builder=build_peer)
    summary = json.loads((report.parent / "metrics.json").read_text())
    test = {name: {"test_auc": row["auc"]["values"], "auc": row["auc"], "gauc": row["gauc"],
                   "logloss": row["logloss"], "seeds": args.seeds,
                   "valid_auc": (peer_valid[name] if name in peer_valid
                                 else [tested[name].valid_auc[s] for s in args.seeds])}
            for name, row in summary["models"].items()}
    header, rows = selection_rows(selection)
    res: dict[str, Any] = {
        "protocol": protocol, "date": now(), "machine": machine(),
        "command": "python benchmarks/select_rank.py " + " ".join(sys.argv[1:]),
        "splits": manifest["splits"], "train_config": train_cfg, "grid": args.grid,
        "seeds": args.seeds,
        "selection": {"header": header, "rows": rows, **selection.to_dict()},
        "chosen": chosen, "best_bst": None if best_bst is None else best_bst.trial.name,
        "test": test, "peers": peers, "bootstraps": summary["bootstraps"],
        "goal": goal(protocol, summary["bootstraps"], chosen,
                     {n: t["auc"]["mean"] for n, t in test.items()}, peers),
        "report": str(report),
    }
    path = write_result(f"select_{protocol}", res)
    update_section(f"select_{protocol}", markdown(res))
    console.print(f"{protocol}: chosen {chosen}; wrote {path} and its BENCHMARKS.md section")


def markdown(res: dict[str, Any]) -> str:
    m, tc, sel = res["machine"], res["train_config"], res["selection"]
    g = res["goal"]
    lines = [
        f"## Selection: {res['protocol']}",
        "",
        f"`{res['command']}` on {res['date']}, {m['cores']} cores ({m['cpu']}). Samples "
        f"{res['splits']['train']:,} / {res['splits']['valid']:,} / {res['splits']['test']:,} "
        f"(train / valid / test); Adam lr {tc['lr']} unless a trial sets it, batch "
        f"{tc['batch_size']}, at most {tc['max_epochs']} epochs, early stopping on valid AUC "
        f"(patience {tc['patience']}). Grid `{res['grid']}`. Selection reads valid only: "
        f"best valid AUC of each run, mean over seeds {res['seeds']}; a trial with a stalled "
        "run is never chosen.",
        "",
        "| " + " | ".join(sel["header"]) + " |", "|" + "---|" * len(sel["header"]),
        *("| " + " | ".join(row) + " |" for row in sel["rows"]),
        "",
        f"Chosen: **{res['chosen']}**"
        + (f"; best BST trial: {res['best_bst']}" if res["best_bst"] not in (None, res["chosen"])
           else "") + ". Then test, once, beside the peers (torch-rechub, same samples, seeds "
        "and train settings); cells are mean ± std over the seeds:",
        "",
        "| model | valid AUC (mean) | test AUC | test GAUC | test logloss |",
        "|---|---|---|---|---|",
    ]
    for name, row in res["test"].items():
        valid = sum(row["valid_auc"]) / len(row["valid_auc"])
        star = " (chosen)" if name == res["chosen"] else ""
        lines.append(f"| {name}{star} | {valid:.4f} | {fmt(row['auc'])} | {fmt(row['gauc'])} | "
                     f"{fmt(row['logloss'])} |")
    lines += bootstrap_lines(res["bootstraps"])
    if g["met"] is not None:
        lines += ["", f"Goal for this kind of data, the chosen model {g['kind']} against "
                  f"{', '.join(g['against'])}: **{'met' if g['met'] else 'not met'}**."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--protocol", action="append", choices=list(PROTOCOLS))
    ap.add_argument("--grid", default="bench", help="bench, full, or a YAML grid file")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--peers", nargs="*", default=list(DEFAULT_PEERS))
    ap.add_argument("--max-epochs", type=int, default=3)
    ap.add_argument("--patience", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch threads per training run")
    ap.add_argument("--workdir", default="artifacts/select_rank")
    ap.add_argument("--data-dir", default=os.environ.get("BSTREC_DATA_DIR", "../shared/data"))
    ap.add_argument("--markdown-only", action="store_true",
                    help="only rewrite each protocol's BENCHMARKS.md section from its results file")
    args = ap.parse_args()
    protocols = args.protocol or list(PROTOCOLS)
    if args.markdown_only:
        rewrite_sections("select", protocols, markdown)
        return
    console = Console()
    for protocol in protocols:
        if not PROTOCOLS[protocol].startswith("synthetic") and not (
                Path(args.data_dir) / PROTOCOLS[protocol]).is_dir():
            console.print(f"skip {protocol}: {PROTOCOLS[protocol]} not in {args.data_dir}")
            continue
        console.rule(protocol)
        run_protocol(protocol, args, console)


if __name__ == "__main__":
    main()
