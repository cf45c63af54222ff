"""Issue 23's stall, sought without external data: BST configurations trained on the
large-catalogue implicit generator (P5 ``synthetic-implicit``) and its variants.

Two modes, both with bench_rank.py's optimiser (Adam 1e-3, batch 256):

* runs (default): ``train_ranker`` for at most 3 epochs (patience 1; ``--max-steps`` caps the
  steps), valid AUC by epoch per seed, and whether the training loop flagged the run as stalled.
* probes (``--probe-steps N``): the first N steps in a plain loop, every ``--every`` steps the
  valid AUC (on at most ``--probe-valid`` valid rows) and what the issue asks to look at: the
  scale of the MLP input's sequence part and of its other features (RMS, and the spread across
  the batch, i.e. what differs from sample to sample), their shares of the first layer's
  pre-activation spread, the pre-activations' mean, spread and fraction > 0, the logits' spread
  across the batch (a constant scorer has none), and the gradient norm of each parameter group
  at that step.

    python benchmarks/stall_repro.py --n-users 10000 --seeds 0 1 2 --out stall.json
    python benchmarks/stall_repro.py --variants default taobao_like --probe-steps 400 --out x.json

Samples are built once per variant, size and data seed into
``WORKDIR/samples_<variant>_<n_users>_<data seed>``; each run goes to its own folder, and a
finished one is reused.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bstrec.data.build import build
from bstrec.data.samples import SampleSet
from bstrec.evaluation.metrics import auc
from bstrec.ranking import build_ranker
from bstrec.training.loop import predict_logits, seed_model_init
from bstrec.training.task import RESULT, train_ranker
from bstrec.training.tensors import TensorSplit
from common import RESULTS, machine, now, update_section

LEFT_CHANCE = 0.55  # a probe's valid AUC from which it counts as off the plateau at chance
SECTION = "stall_synthetic-implicit"  # its BENCHMARKS.md section, rendered from results/ of it
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "bst": ("bst", {}),
    "bst_target_bn": ("bst", {"output": "target", "mlp_norm": "batch"}),
    # one change each from the paper's: normalisation alone, the target's output alone
    "bst_concat_bn": ("bst", {"mlp_norm": "batch"}),
    "bst_target": ("bst", {"output": "target"}),
    "bst_concat_scaled": ("bst", {"concat_scale": "sqrt"}),  # named before "length" existed
    "bst_concat_length": ("bst", {"concat_scale": "length"}),
}
TRAIN = {"optimizer": "adam", "lr": 1e-3, "batch_size": 256, "max_epochs": 3, "patience": 1}
# Generator variants (ImplicitConfig fields) meant to be closer to a real Taobao log than the
# defaults: flatter item popularity, more events whose category is drawn from the catalogue's
# popularity rather than from the history, longer histories.
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "flat_items": {"item_zipf": 0.4, "category_zipf": 0.6},
    "popular_heavy": {"category_source_weights": [0.2, 0.1, 0.1, 0.6]},
    "long_histories": {"events_per_user": [50, 200]},
    "taobao_like": {"item_zipf": 0.4, "category_zipf": 0.6,
                    "category_source_weights": [0.2, 0.1, 0.1, 0.6],
                    "events_per_user": [50, 200], "repeat_prob": 0.2},
}


def samples_dir(args: argparse.Namespace, variant: str) -> Path:
    out: Path = args.workdir / f"samples_{variant}_{args.n_users}_{args.data_seed}"
    if not (out / "manifest.json").exists():
        build("synthetic-implicit", out, dataset_options={
            **VARIANTS[variant], "n_users": args.n_users, "seed": args.data_seed})
    return out


def run(args: argparse.Namespace, variant: str, samples: Path, name: str, seed: int
        ) -> dict[str, Any]:
    model, overrides = CONFIGS[name]
    lr = "" if args.lr == TRAIN["lr"] else f"_lr{args.lr:g}"
    out = args.workdir / f"run_{variant}_{args.n_users}_{args.data_seed}_{name}_{seed}{lr}"
    started = time.perf_counter()
    if not (out / RESULT).exists():
        train_ranker(model, samples, out, model_overrides=overrides,
                     train_overrides={**TRAIN, "lr": args.lr, "max_epochs": args.max_epochs,
                                      "max_steps": args.max_steps, "seed": seed,
                                      "num_threads": args.threads, "device": args.device},
                     resume=(out / "last").exists(), progress=False)
    result = json.loads((out / RESULT).read_text())["result"]
    aucs = [round(h["valid_auc"], 4) for h in result["history"]]
    print(f"{variant:15s} {name:15s} seed {seed}: valid AUC by epoch "
          f"{', '.join(f'{a:.3f}' for a in aucs)}{'  STALLED' if result['stalled'] else ''}",
          flush=True)
    return {"variant": variant, "config": name, "model_overrides": overrides, "seed": seed,
            "lr": args.lr, "valid_auc_by_epoch": aucs, "steps": result["steps"], "stalled": result["stalled"],
            "chance_checks": len(result["chance_checks"]),
            "seconds": round(time.perf_counter() - started, 1)}


def _rms(x: torch.Tensor) -> float:
    return float(x.pow(2).mean().sqrt())


def _spread(x: torch.Tensor) -> float:
    """RMS over features of the across-batch standard deviation: what varies by sample."""
    return float(x.std(0).pow(2).mean().sqrt())


def snapshot(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Eval-mode statistics of the MLP's input and first layer on one fixed train batch."""
    captured: dict[str, torch.Tensor] = {}
    first = model.mlp[0]  # type: ignore[index]
    hook = first.register_forward_hook(
        lambda m, inp, out: captured.update(x=inp[0].detach(), z=out.detach()))
    was = model.training
    model.eval()
    with torch.no_grad():
        logits = model(batch)
    model.train(was)
    hook.remove()
    x, z = captured["x"], captured["z"]
    n_seq = int(model.w1_seq_cols.numel())  # type: ignore[attr-defined]
    seq, other = x[:, :n_seq], x[:, n_seq:]
    w = first.weight.detach()
    z_seq = seq @ w[:, :n_seq].T
    z_other = other @ w[:, n_seq:].T
    labels = batch["label"].numpy()
    return {
        "seq_rms": _rms(seq), "seq_spread": _spread(seq),
        "other_rms": _rms(other), "other_spread": _spread(other),
        # sum over inputs of |batch mean|: how far one Adam step (every weight moved by about
        # lr, signs agreeing) can move a first-layer unit's pre-activation on every sample at once
        "seq_mean_l1": float(seq.mean(0).abs().sum()),
        "other_mean_l1": float(other.mean(0).abs().sum()),
        "z_seq_spread": _spread(z_seq), "z_other_spread": _spread(z_other),
        "z_mean": float(z.mean()), "z_spread": _spread(z),
        "z_frac_pos": float((z > 0).float().mean()),
        "logit_mean": float(logits.mean()), "logit_std": float(logits.std()),
        "batch_auc": auc(labels, logits.numpy()),
    }


def grad_norms(model: torch.nn.Module) -> dict[str, float]:
    groups: dict[str, float] = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        key = "mlp0" if name.startswith("mlp.0.") else name.split(".")[0]
        groups[key] = groups.get(key, 0.0) + float(p.grad.detach().pow(2).sum())
    return {f"grad_{k}": round(v ** 0.5, 6) for k, v in sorted(groups.items())}


def probe(args: argparse.Namespace, variant: str, samples: Path, name: str, seed: int
          ) -> dict[str, Any]:
    model_name, overrides = CONFIGS[name]
    data = SampleSet.load(samples, splits=("train", "valid"))
    train = TensorSplit.from_frame(data.splits["train"], data.spec)
    valid = TensorSplit.from_frame(data.splits["valid"], data.spec)
    if len(valid) > args.probe_valid:
        pick = torch.randperm(len(valid), generator=torch.Generator().manual_seed(0))
        valid = TensorSplit({k: v[pick[:args.probe_valid]] for k, v in valid.tensors.items()})
    fixed = train.batch(torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[:1024])
    vlabels = valid.tensors["label"].numpy()
    seed_model_init(seed)
    model = build_ranker(model_name, data.spec, overrides)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    shuffle = torch.Generator().manual_seed(seed)
    trace: list[dict[str, Any]] = []
    started = time.perf_counter()

    def record(step: int, grads: dict[str, float]) -> None:
        vauc = auc(vlabels, predict_logits(model, valid, 4096))
        model.train()
        trace.append({"step": step, "valid_auc": round(vauc, 4),
                      **{k: round(v, 5) for k, v in snapshot(model, fixed).items()}, **grads})

    record(0, {})
    step = 0
    model.train()
    while step < args.probe_steps:
        for batch in train.batches(TRAIN["batch_size"], shuffle=True, generator=shuffle):
            loss = F.binary_cross_entropy_with_logits(model(batch), batch["label"])
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            grads = grad_norms(model) if (step + 1) % args.every == 0 else {}
            opt.step()
            step += 1
            if grads:
                record(step, {"train_loss": round(float(loss.detach()), 5), **grads})
            if step >= args.probe_steps:
                break
    aucs = [t["valid_auc"] for t in trace]
    print(f"{variant:15s} {name:15s} seed {seed}: valid AUC by {args.every} steps "
          f"{', '.join(f'{a:.3f}' for a in aucs)}", flush=True)
    return {"variant": variant, "config": name, "model_overrides": overrides, "seed": seed,
            "lr": args.lr, "steps": step, "trace": trace, "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-users", type=int, default=10_000)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--variants", nargs="+", default=["default"], choices=list(VARIANTS))
    ap.add_argument("--max-epochs", type=int, default=TRAIN["max_epochs"])
    ap.add_argument("--lr", type=float, default=TRAIN["lr"])
    ap.add_argument("--max-steps", type=int, default=0, help="runs: cap on steps (0 = none)")
    ap.add_argument("--probe-steps", type=int, default=0, help="> 0: probes of this many steps")
    ap.add_argument("--every", type=int, default=50, help="probes: steps between records")
    ap.add_argument("--probe-valid", type=int, default=20_000, help="probes: valid rows used")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", type=Path, default=Path("artifacts/stall_repro"))
    ap.add_argument("--out", type=Path,
                    help="JSON file: this sweep is added to the sweeps already in it")
    ap.add_argument("--markdown-only", action="store_true",
                    help="only rewrite the BENCHMARKS.md section from --out")
    args = ap.parse_args()
    if args.markdown_only:
        out = (args.out or RESULTS / f"{SECTION}.json").resolve()
        update_section(SECTION, markdown(json.loads(out.read_text()), out))
        return
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    results, datasets = [], {}
    for variant in args.variants:
        samples = samples_dir(args, variant)
        manifest = json.loads((samples / "manifest.json").read_text())
        datasets[variant] = {"options": VARIANTS[variant], "splits": manifest.get("splits"),
                             "vocab_sizes": manifest.get("vocab_sizes")}
        for name in args.configs:
            for seed in args.seeds:
                results.append(probe(args, variant, samples, name, seed) if args.probe_steps
                               else run(args, variant, samples, name, seed))
                if args.out:  # after every run, so that an interrupted sweep keeps its figures
                    write(args, datasets, results)


def write(args: argparse.Namespace, datasets: dict[str, Any], results: list[dict[str, Any]]
          ) -> None:
    """Write this invocation's sweep to ``--out`` after the sweeps already there."""
    if not args.out:
        return
    sweep = {"created": now(), "machine": machine(), "command": sys.argv,
             "dataset": {"name": "synthetic-implicit", "n_users": args.n_users,
                         "seed": args.data_seed, "variants": datasets},
             "train": {**TRAIN, "lr": args.lr, "max_epochs": args.max_epochs,
                       "max_steps": args.max_steps},
             "mode": "probes" if args.probe_steps else "runs",
             "probes" if args.probe_steps else "runs": results}
    if not hasattr(args, "earlier"):
        old = json.loads(args.out.read_text()) if args.out.exists() else {}
        args.earlier = old.get("sweeps", [])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"sweeps": [*args.earlier, sweep]}, indent=2) + "\n")
    if args.out.resolve().parent == RESULTS:
        update_section(SECTION, markdown(json.loads(args.out.read_text()), args.out.resolve()))


def markdown(res: dict[str, Any], path: Path) -> str:
    """The BENCHMARKS.md section of a results file: each probe's valid AUC by step, and each
    run's by epoch, grouped by variant, configuration and learning rate, seeds in order."""
    probes: dict[tuple[str, str, float], dict[int, list[float]]] = {}
    runs: dict[tuple[str, str, float], dict[int, list[float]]] = {}
    steps: list[int] = []
    for sweep in res["sweeps"]:
        lr = sweep["train"]["lr"]
        for p in sweep.get("probes", []):
            key = (p["variant"], p["config"], p.get("lr", lr))
            probes.setdefault(key, {})[p["seed"]] = [t["valid_auc"] for t in p["trace"]]
            steps = steps or [t["step"] for t in p["trace"]]
        for r in sweep.get("runs", []):
            key = (r["variant"], r["config"], r.get("lr", lr))
            runs.setdefault(key, {})[r["seed"]] = r["valid_auc_by_epoch"]
    first = res["sweeps"][0]
    lines = [
        "## The stall at chance on synthetic-implicit (issue 23)",
        "",
        f"`python benchmarks/stall_repro.py ...` sweeps ({len(res['sweeps'])}, from "
        f"{first['created']} to {res['sweeps'][-1]['created']}; each one's command, machine "
        f"and data in `{path.relative_to(path.parents[2])}`): {first['dataset']['n_users']:,} "
        "users of the large-catalogue implicit generator (P5 samples), Adam, batch "
        f"{first['train']['batch_size']}. Variants: " + "; ".join(
            f"{v} {o or '(the generator defaults)'}" for v, o in VARIANTS.items()) + ". Probes: "
        "valid AUC (5,000 valid rows) every 50 steps of the first steps; a seed per line. "
        "Configurations: " + "; ".join(f"{n} {o or '(the paper: concat, no normalisation)'}"
                                      for n, (_, o) in CONFIGS.items()) + ".",
        "",
        f"Plateau at chance, per configuration: the first probed step at which a seed's valid AUC "
        f"reached {LEFT_CHANCE}, the slowest seed's (and the seeds), and the range at the last "
        "step:",
        "",
        "| variant | configuration | lr | seeds | slowest seed left chance at step | by seed | "
        "last step's AUC |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for (variant, config, lr), by_seed in probes.items():
        left = [next((s for s, a in zip(steps, aucs, strict=False) if a >= LEFT_CHANCE), None)
                for aucs in by_seed.values()]
        slowest = "not by the last step" if None in left else str(max(s for s in left if s is not None))
        last = [aucs[-1] for aucs in by_seed.values()]
        lines.append(f"| {variant} | {config} | {lr:g} | {len(by_seed)} | {slowest} | "
                     + ", ".join("-" if s is None else str(s) for s in left)
                     + f" | {min(last):.3f}-{max(last):.3f} |")
    lines += [
        "",
        "Every probe:",
        "",
        "| variant | configuration | lr | seed | " + " | ".join(f"step {s}" for s in steps)
        + " |", "|---|---|---:|---:|" + "---:|" * len(steps)]
    for (variant, config, lr), by_seed in probes.items():
        for seed in sorted(by_seed):
            lines.append(f"| {variant} | {config} | {lr:g} | {seed} | "
                         + " | ".join(f"{a:.3f}" for a in by_seed[seed]) + " |")
    if runs:
        lines += ["", "Whole runs (valid AUC by epoch):", "",
                  "| variant | configuration | lr | seed | valid AUC by epoch |",
                  "|---|---|---:|---:|---|"]
        for (variant, config, lr), by_seed in runs.items():
            for seed in sorted(by_seed):
                lines.append(f"| {variant} | {config} | {lr:g} | {seed} | "
                             + ", ".join(f"{a:.4f}" for a in by_seed[seed]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
