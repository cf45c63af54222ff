"""BST tuning on the valid split (issue 3): which settings the rank benchmark should use.

Every trial trains BST on the train split of one protocol with each of the given seeds and keeps
the best valid AUC over its epochs (early stopping as in bench_rank.py); trials run on the same
seeds are ranked by the mean over them. The test split is never read here, so that
bench_rank.py can test the chosen setting once. Trials are named model/train config
overrides; a finished (trial, seed) run folder is reused, so the script can be stopped and
started again, and new trials or seeds added. On ML-1M the seeds of one setting spread over
about 0.003 of valid AUC (target_bn: 0.7463, 0.7441, 0.7429), as much as most trials differ
by, so one seed does not rank them. Kept for its recorded results; for new selections use
`bstrec train ranker --select` (bstrec.training.select).

    python benchmarks/tune_bst.py --protocol ml1m-ctr --trials paper target target_small
    python benchmarks/tune_bst.py --protocol ml1m-ctr --trials target_bn target_bn_wide --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rank import DATASETS
from bstrec.training.task import RESULT, train_ranker
from common import ensure_samples, machine, now, update_section, write_result

# name -> (BST config overrides, train config overrides), against bench_rank.py's defaults
TRIALS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "paper": ({}, {}),
    "target": ({"output": "target"}, {}),
    "target_small": ({"output": "target", "mlp": [256, 128, 64]}, {}),
    "small": ({"mlp": [256, 128, 64]}, {}),
    "mlp_dropout": ({"mlp_dropout": 0.3}, {}),
    "lr_half": ({}, {"lr": 5e-4}),
    "target_bn": ({"output": "target", "mlp_norm": "batch"}, {}),
    "target_bn_long": ({"output": "target", "mlp_norm": "batch"}, {"max_epochs": 6}),
    "target_small_bn": ({"output": "target", "mlp": [256, 128, 64], "mlp_norm": "batch"}, {}),
    "paper_bn": ({"mlp_norm": "batch"}, {}),
    "target_bn_drop": ({"output": "target", "mlp_norm": "batch", "mlp_dropout": 0.2}, {}),
    # torch-rechub's initialisation (every table std 1e-4) with target_bn
    "target_bn_init": ({"output": "target", "mlp_norm": "batch", "token_init_std": 1e-4,
                        "embed_init_std": 1e-4}, {}),
    # regularisers against leaning on the sequence or on rarely seen ids
    "target_bn_hdrop": ({"output": "target", "mlp_norm": "batch", "history_dropout": 0.2}, {}),
    "target_bn_wd": ({"output": "target", "mlp_norm": "batch"}, {"weight_decay": 1e-5}),
    # every table 16 wide, the item's too (token 48), as torch-rechub's WideDeep has in peers.py
    "target_bn_d16": ({"output": "target", "mlp_norm": "batch", "item_dim": 16}, {}),
    "target_bn_lr2": ({"output": "target", "mlp_norm": "batch"}, {"lr": 2e-3}),
    # per-parameter step sizes that stay large for rarely seen ids
    "target_bn_adagrad": ({"output": "target", "mlp_norm": "batch"},
                          {"optimizer": "adagrad", "lr": 1e-2}),
    # two blocks: the paper's BST ablation bst_b2 is above b = 1 on valid for each of 3 seeds on
    # both MovieLens protocols (bench_rank.py); on test the two do not separate
    "target_bn_b2": ({"output": "target", "mlp_norm": "batch", "blocks": 2}, {}),
    # smaller layers for serving (benchmarks/bench_serving.py): a request's cost is mostly the
    # candidates' feed-forward and MLP
    "serve_bn": ({"output": "target", "mlp": [128, 64, 32], "ffn_mult": 2, "mlp_norm": "batch"}, {}),
    # torch-rechub's WideDeep leads every ranker on ML-1M test; what it has and BST lacks is a
    # linear term over the embeddings beside its MLP (BSTConfig.wide)
    "target_bn_wide": ({"output": "target", "mlp_norm": "batch", "wide": True}, {}),
}


def run_trial(name: str, samples: Path, run_dir: Path, base: dict[str, Any]) -> dict[str, Any]:
    model, train = TRIALS[name]
    if not (run_dir / RESULT).exists():
        print(f"{name}: training into {run_dir}", flush=True)
        train_ranker("bst", samples, run_dir, model_overrides=model,
                     train_overrides={**base, **train}, resume=run_dir.exists())
    result: dict[str, Any] = json.loads((run_dir / RESULT).read_text())
    history = result["result"]["history"]
    return {"best_valid_auc": result["result"]["best_valid_auc"],
            "best_epoch": result["result"]["best_epoch"], "n_parameters": result["n_parameters"],
            "valid_auc_by_epoch": [round(h["valid_auc"], 5) for h in history]}


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"## BST tuning on {r['protocol']} (valid split only)",
        "",
        f"`{r['command']}` on {r['date']}, {r['machine']['cores']} cores. Adam, batch "
        f"{r['base']['batch_size']}, lr {r['base']['lr']} unless the trial says otherwise, at "
        f"most {r['base']['max_epochs']} epochs, early stopping on valid AUC. Selection only: "
        "test AUC is measured once, by bench_rank.py, for the chosen setting. Trials with more "
        "seeds come first, then by the mean of their seeds' best valid AUC; means compare only "
        "over the same seeds, and the seeds of one setting spread over about as much as most "
        "trials differ by. Trials and seeds run by earlier invocations of the script are kept "
        "(the last column says when each was trained).",
        "",
        "| trial | overrides | parameters | valid AUC by epoch (first seed) | best valid AUC by "
        "seed | mean | trained |",
        "|---|---|---:|---|---|---:|---|",
    ]
    for name, t in sorted(r["trials"].items(), key=lambda kv: (-len(kv[1]["seeds"]),
                                                           -mean_valid(kv[1]))):
        over = json.dumps({**t["model"], **t["train"]}) if t["model"] or t["train"] else "-"
        seeds = sorted(t["seeds"].items(), key=lambda kv: int(kv[0]))
        dates = sorted({run["date"][:10] for _, run in seeds})
        lines.append(f"| {name} | `{over}` | {t['n_parameters']:,} | "
                     f"{', '.join(f'{a:.4f}' for a in seeds[0][1]['valid_auc_by_epoch'])} | "
                     + ", ".join(f"s{s} {run['best_valid_auc']:.4f}" for s, run in seeds)
                     + f" | {mean_valid(t):.4f} | {', '.join(dates)} |")
    return "\n".join(lines)


def mean_valid(trial: dict[str, Any]) -> float:
    runs = trial["seeds"].values()
    return sum(run["best_valid_auc"] for run in runs) / len(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--protocol", default="ml1m-ctr", choices=list(DATASETS))
    ap.add_argument("--trials", nargs="+", default=list(TRIALS), choices=list(TRIALS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--max-epochs", type=int, default=2)
    ap.add_argument("--workdir", default="artifacts/bench_rank")
    ap.add_argument("--data-dir", default=os.environ.get("BSTREC_DATA_DIR", "../shared/data"))
    args = ap.parse_args()
    root = Path(args.workdir) / args.protocol
    samples = ensure_samples(DATASETS[args.protocol], root / "samples", args.data_dir)
    base = {"max_epochs": args.max_epochs, "patience": 1, "batch_size": 256, "lr": 1e-3}
    path = Path(__file__).resolve().parent / "results" / f"tune_bst_{args.protocol}.json"
    # trials of earlier invocations: {name: {"model", "train", "n_parameters", "seeds": {seed:
    # run summary and the date it was trained}}}
    done: dict[str, Any] = json.loads(path.read_text())["trials"] if path.exists() else {}
    started = time.perf_counter()
    for name in args.trials:
        model, train = TRIALS[name]
        trial = done.setdefault(name, {"seeds": {}})
        trial.update(model=model, train=train)
        for seed in args.seeds:
            run_dir = root / "tune" / f"{name}-s{seed}"
            # a run trained before keeps the date it was first recorded with
            dated = trial["seeds"].get(str(seed), {}).get("date") \
                if (run_dir / RESULT).exists() else None
            run = run_trial(name, samples, run_dir, {**base, "seed": seed})
            trial["n_parameters"] = run.pop("n_parameters")
            trial["seeds"][str(seed)] = {**run, "date": dated or now()}
            print(f"{name} seed {seed}: best valid AUC {run['best_valid_auc']:.4f} "
                  f"(epochs {run['valid_auc_by_epoch']})", flush=True)
    result = {"protocol": args.protocol, "date": now(), "machine": machine(), "base": base,
              "command": "python benchmarks/tune_bst.py " + " ".join(sys.argv[1:]),
              "minutes": round((time.perf_counter() - started) / 60, 1), "trials": done}
    write_result(f"tune_bst_{args.protocol}", result)
    update_section(f"tune_bst_{args.protocol}", markdown(result))


if __name__ == "__main__":
    main()
