"""Training throughput as a share of the fp32 matrix-multiply peak (issue 23).

The paper-size BST (default ``BSTConfig``: one block, 8 heads, MLP 1024-512-256) on the ML-1M
P1 samples (protocol ml1m-ctr; the synthetic-order dataset when the ML-1M files are absent):

1. FLOP per training sample at batch ``--batch``, counted as bench_serving counts inference
   FLOP (torch's FlopCounterMode on the eager model): forward + ``loss.backward()``, forward
   only, and by module (MLP, Transformer blocks, rest);
2. full training steps exactly as ``training/loop.py`` runs them (row gather of a shuffled
   batch, forward, BCE with logits, ``zero_grad(set_to_none=True)``, backward, the optimizer of
   ``make_optimizer``), timed per part, at 1 and 2 threads, interleaved round by round with the
   1024x1024 GEMM peak at the same thread count (bench_serving's ``matmul_peak`` timing);
3. achieved GFLOP/s = FLOP/sample x samples/s, its share of the GEMM peak, and each part's
   share of the step time;
4. with ``--compile``, the same steps of a ``torch.compile``'d copy of the model (same weights,
   its own optimizer) in the same rounds, right after the eager steps: the ratio of the two is
   measured side by side.

The share depends on the machine as much as on the code: the GEMM peak grows with the vector
width (AVX-512 against AVX2) while the attention kernel, dropout and the optimizer do not, so run
it on the machine whose figure you quote; ``--name`` keeps one results file (and BENCHMARKS.md
section) per machine.

    python benchmarks/bench_train.py --data-dir /work/shared/data
    python benchmarks/bench_train.py --samples /tmp/qs/samples --rounds 5 --steps 10
    python benchmarks/bench_train.py --compile --name train_throughput_epyc
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ensure_samples, machine, now, timed, update_section, write_result

GOAL_SHARE = 0.5
GEMM_N = 1024
PARTS = ("data", "forward", "backward", "optimizer")


def default_samples(work: Path, data_dir: str) -> tuple[Path, str]:
    """ML-1M P1 samples when the ML-1M files are present, else synthetic-order."""
    ml1m = (Path(data_dir) / "ml-1m").is_dir()
    protocol, dataset = ("ml1m-ctr", "ml-1m") if ml1m else ("synthetic-order", "synthetic-order")
    return ensure_samples(dataset, work / protocol / "samples", data_dir), protocol


def gemm_ms(reps: int) -> float:
    """Median milliseconds of a ``GEMM_N`` square fp32 matmul at the current thread count."""
    a, b = torch.randn(GEMM_N, GEMM_N), torch.randn(GEMM_N, GEMM_N)
    return timed(lambda: a @ b, reps)


class Stepper:
    """One training step of ``training/loop.py`` (no grad clipping: its default is off), with
    the time of each part."""

    def __init__(self, model: torch.nn.Module, split: Any, batch: int, optimizer: str,
                 seed: int = 0) -> None:
        from bstrec.training.loop import TrainConfig, make_optimizer

        self.model, self.split, self.batch = model, split, batch
        self.optimizer = make_optimizer(model, TrainConfig(optimizer=optimizer))  # type: ignore[arg-type]
        self.order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
        self.at = 0
        model.train()

    def step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        if self.at + self.batch > len(self.order):
            self.at = 0
        b = self.split.batch(self.order[self.at:self.at + self.batch])
        self.at += self.batch
        labels = b["label"]
        t1 = time.perf_counter()
        logits = self.model(b)
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        t2 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        t3 = time.perf_counter()
        self.optimizer.step()
        t4 = time.perf_counter()
        return {"data": t1 - t0, "forward": t2 - t1, "backward": t3 - t2, "optimizer": t4 - t3}


def count_flops(model: torch.nn.Module, split: Any, batch: int) -> dict[str, Any]:
    """FLOP per sample of forward + backward and of forward only (train mode, grads on), and
    the forward + backward FLOP per sample by module (leaf-most module names counted once)."""
    b = split.batch(torch.arange(batch))
    model.train()
    with FlopCounterMode(display=False) as fwd:
        logits = model(b)
        loss = F.binary_cross_entropy_with_logits(logits, b["label"])
    with FlopCounterMode(display=False) as both:
        logits = model(b)
        loss = F.binary_cross_entropy_with_logits(logits, b["label"])
        loss.backward()  # type: ignore[no-untyped-call]
    model.zero_grad(set_to_none=True)
    total = float(both.get_total_flops())
    counts = both.get_flop_counts()
    # FlopCounterMode attributes each op to every enclosing module: the MLP, each block, and the
    # rest (the loss and anything outside those modules) as the difference
    mlp = float(sum(counts.get("BST.mlp", {}).values()))
    blocks = float(sum(sum(c.values()) for n, c in counts.items()
                       if re.fullmatch(r"BST\.blocks\.\d+", n)))
    by_module = {"mlp": mlp, "transformer": blocks, "rest": total - mlp - blocks}
    by_op = {str(k): float(v) / batch for k, v in counts["Global"].items()}
    return {"train_flop_per_sample": total / batch,
            "forward_flop_per_sample": float(fwd.get_total_flops()) / batch,
            "train_flop_per_sample_by_module": {k: v / batch for k, v in by_module.items()},
            "train_flop_per_sample_by_op": by_op,
            "uncounted": "attention's softmax(QK^T)V (scaled_dot_product_attention has no CPU "
                         "FLOP formula), elementwise ops, embedding lookups"}


def measure(steppers: dict[str, Stepper], threads: list[int], rounds: int, steps: int,
            warmup: int, gemm_reps: int) -> dict[str, dict[str, Any]]:
    """Rounds of (per thread count: GEMM peak, then ``steps`` training steps of each stepper),
    interleaved; per stepper, per thread count, the medians and the rounds."""
    rows: dict[str, dict[int, dict[str, list[float]]]] = {
        mode: {t: {"gemm_ms": [], "step_s": [], **{p: [] for p in PARTS}} for t in threads}
        for mode in steppers}
    for t in threads:
        torch.set_num_threads(t)
        for step in steppers.values():
            for _ in range(warmup):
                step.step()
    for r in range(rounds):
        for t in threads:
            torch.set_num_threads(t)
            gemm = gemm_ms(gemm_reps)
            for mode, step in steppers.items():
                row = rows[mode][t]
                row["gemm_ms"].append(gemm)
                parts = [step.step() for _ in range(steps)]
                for p in PARTS:
                    row[p].append(statistics.median(x[p] for x in parts))
                row["step_s"].append(statistics.median(sum(x.values()) for x in parts))
        print(f"  round {r + 1}/{rounds}: " + ", ".join(
            f"{t}t {mode} step {rows[mode][t]['step_s'][-1] * 1e3:.0f} ms"
            for t in threads for mode in steppers) + ", gemm " + ", ".join(
            f"{t}t {rows[next(iter(steppers))][t]['gemm_ms'][-1]:.1f} ms" for t in threads),
            flush=True)
    return {mode: {str(t): {k: statistics.median(v) for k, v in d.items()} | {"rounds": d}
                   for t, d in by_t.items()} for mode, by_t in rows.items()}


# op groups of the profile (self CPU time of torch.profiler's key averages), by op name prefix
OP_GROUPS = {"matrix multiplies": ("aten::mm", "aten::addmm", "aten::bmm"),
             "attention kernel": ("aten::_scaled_dot_product",),
             "dropout's random numbers": ("aten::bernoulli",)}


def profile_ops(step: Stepper, steps: int, threads: int, flops: dict[str, Any], batch: int
                ) -> dict[str, Any]:
    """Where a step's time goes at ``threads`` threads: torch.profiler's self CPU time per op
    over ``steps`` steps, in ``OP_GROUPS`` and the rest, and the GFLOP/s of the matrix
    multiplies alone (their counted FLOP over their own time)."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step.step()
    ms = {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}
    total = sum(ms.values())
    groups = {g: sum(v for k, v in ms.items() if k.startswith(prefixes))
              for g, prefixes in OP_GROUPS.items()}
    groups["the rest"] = total - sum(groups.values())
    mm_flop = sum(v for k, v in flops["train_flop_per_sample_by_op"].items()
                  if k in ("aten.mm", "aten.addmm", "aten.bmm")) * batch
    top = sorted(ms.items(), key=lambda kv: -kv[1])[:10]
    return {"threads": threads, "steps": steps, "step_ms": total,
            "groups_ms": groups, "groups_share": {g: v / total for g, v in groups.items()},
            "matmul_gflops": mm_flop / (groups["matrix multiplies"] / 1e3) / 1e9,
            "top_ops_ms": dict(top)}


def summarize(timing: dict[str, Any], flops: dict[str, Any], batch: int) -> dict[str, Any]:
    out = {}
    train_f, fwd_f = flops["train_flop_per_sample"], flops["forward_flop_per_sample"]
    for t, m in timing.items():
        peak = 2.0 * GEMM_N ** 3 / m["gemm_ms"] / 1e6
        # per round, so that each share divides by the peak measured beside it
        shares = [train_f * batch / s / 1e9 / (2.0 * GEMM_N ** 3 / g / 1e6)
                  for s, g in zip(m["rounds"]["step_s"], m["rounds"]["gemm_ms"], strict=True)]
        sps = batch / m["step_s"]
        out[t] = {
            "samples_per_s": sps, "step_ms": m["step_s"] * 1e3, "gemm_peak_gflops": peak,
            "achieved_gflops": train_f * sps / 1e9,
            "share_of_peak": statistics.median(shares),
            "parts_ms": {p: m[p] * 1e3 for p in PARTS},
            "parts_share_of_step": {p: m[p] / m["step_s"] for p in PARTS},
            # forward and backward each as a share of the peak (backward FLOP = train - forward)
            "forward_share_of_peak": fwd_f * batch / m["forward"] / 1e9 / peak,
            "backward_share_of_peak": (train_f - fwd_f) * batch / m["backward"] / 1e9 / peak,
            "rounds": m["rounds"],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("BSTREC_DATA_DIR", "../shared/data"))
    ap.add_argument("--workdir", default="artifacts/bench_train")
    ap.add_argument("--samples", help="reuse built samples (a `bstrec data build` output)")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=8, help="training steps per round and thread")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--gemm-reps", type=int, default=10)
    ap.add_argument("--optimizer", default="adam", choices=("adam", "adagrad"))
    ap.add_argument("--compile", action="store_true",
                    help="also time a torch.compile'd copy of the model in the same rounds")
    ap.add_argument("--markdown-only", action="store_true",
                    help="rewrite the BENCHMARKS.md sections from the results files, run nothing")
    ap.add_argument("--name", default="train_throughput",
                    help="results file benchmarks/results/NAME.json and BENCHMARKS.md section")
    args = ap.parse_args()
    if args.markdown_only:
        for path in sorted(RESULTS.glob("train_throughput*.json")):
            update_section(path.stem, markdown(json.loads(path.read_text())))
        render_machines()
        return

    from bstrec.data.samples import SampleSet
    from bstrec.ranking.bst import BST, BSTConfig
    from bstrec.training.tensors import TensorSplit

    if args.samples:
        samples = Path(args.samples)
        protocol = json.loads((samples / "manifest.json").read_text()).get("protocol", "?")
    else:
        samples, protocol = default_samples(Path(args.workdir), args.data_dir)
    data = SampleSet.load(samples, splits=("train",))
    split = TensorSplit.from_frame(data.splits["train"], data.spec)
    torch.manual_seed(0)
    config = BSTConfig()
    model = BST(data.spec, config)
    params = sum(p.numel() for p in model.parameters())
    flops = count_flops(model, split, args.batch)
    print(f"{protocol}: {len(split):,} train rows, {params:,} parameters; FLOP/sample train "
          f"{flops['train_flop_per_sample'] / 1e6:.2f} M, forward "
          f"{flops['forward_flop_per_sample'] / 1e6:.2f} M; by module "
          + ", ".join(f"{k} {v / 1e6:.2f} M"
                      for k, v in flops["train_flop_per_sample_by_module"].items()), flush=True)
    saved = torch.get_num_threads()
    steppers = {"eager": Stepper(model, split, args.batch, args.optimizer)}
    if args.compile:
        twin = copy.deepcopy(model)
        steppers["compiled"] = Stepper(torch.compile(twin), split, args.batch,  # type: ignore[arg-type]
                                       args.optimizer)
        t0 = time.perf_counter()
        steppers["compiled"].step()
        compile_s = time.perf_counter() - t0
        print(f"torch.compile: first step {compile_s:.1f} s", flush=True)
    timing = measure(steppers, args.threads, args.rounds, args.steps, args.warmup,
                     args.gemm_reps)
    profile = profile_ops(steppers["eager"], args.steps, min(args.threads), flops, args.batch)
    torch.set_num_threads(saved)
    modes = {mode: summarize(t, flops, args.batch) for mode, t in timing.items()}
    res = modes["eager"]
    for mode, by_t in modes.items():
        for t, r in by_t.items():
            print(f"{mode}, {t} thread(s): {r['samples_per_s']:.0f} samples/s, "
                  f"{r['achieved_gflops']:.1f} GFLOP/s of a {r['gemm_peak_gflops']:.1f} GFLOP/s "
                  f"GEMM peak = {r['share_of_peak']:.1%}; step parts " + ", ".join(
                      f"{p} {v:.1f} ms" for p, v in r["parts_ms"].items()))
    best = max(r["share_of_peak"] for r in res.values())
    result = {
        "command": "python benchmarks/bench_train.py " + " ".join(sys.argv[1:]),
        "date": now(), "machine": machine(), "protocol": protocol, "samples": str(samples),
        "train_rows": len(split), "batch": args.batch, "optimizer": args.optimizer,
        "model": "bst", "config": {k: v for k, v in vars(config).items()}, "parameters": params,
        "step": "training/loop.py's per-step code: gather, forward, BCE, zero_grad(set_to_none), "
                "backward, make_optimizer's step", "torch": torch.__version__,
        "rounds": args.rounds, "steps_per_round": args.steps, "gemm_n": GEMM_N,
        "flops": flops, "threads": res, "profile": profile, "goal_share": GOAL_SHARE,
        **({"compiled": {"threads": modes["compiled"], "first_step_s": compile_s,
                         "mode": "torch.compile defaults (inductor)"}}
           if args.compile else {}),
        "goal_met": best >= GOAL_SHARE, "loadavg_end": list(os.getloadavg()),
    }
    path = write_result(args.name, json.loads(json.dumps(result, default=str)))
    update_section(args.name, markdown(json.loads(path.read_text())))
    render_machines()
    print(f"wrote {path} and its BENCHMARKS.md section")


def markdown(res: dict[str, Any]) -> str:
    """The BENCHMARKS.md section of a results file."""
    f, m = res["flops"], res["machine"]
    lines = [
        f"## Training throughput against the matrix-multiply peak (issue 23): {m['cpu']}",
        "",
        f"`{res['command']}` on {res['date']}, {m['cores']} cores ({m['cpu']}), load average "
        f"{', '.join(f'{x:.1f}' for x in res['loadavg_end'])} at the end; protocol "
        f"{res['protocol']}; paper-size BST, batch {res['batch']}, each step what "
        "training/loop.py does (gather, forward, BCE, backward, optimizer step), with the fp32 "
        f"{res['gemm_n']}x{res['gemm_n']} GEMM peak measured in the same rounds. FLOP per training "
        f"sample (FlopCounterMode, forward and backward): {f['train_flop_per_sample'] / 1e6:.2f} M, "
        f"forward {f['forward_flop_per_sample'] / 1e6:.2f} M; not counted: {f['uncounted']}. "
        f"Medians over {res['rounds']} rounds.",
        "",
        "| threads | samples/s | achieved GFLOP/s | GEMM peak GFLOP/s | share of peak | "
        "forward / backward / optimizer / data, % of a step |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for t, r in res["threads"].items():
        parts = " / ".join(f"{100 * r['parts_share_of_step'][k]:.1f}"
                           for k in ("forward", "backward", "optimizer", "data"))
        lines.append(f"| {t} | {r['samples_per_s']:.0f} | {r['achieved_gflops']:.1f} | "
                     f"{r['gemm_peak_gflops']:.1f} | {100 * r['share_of_peak']:.0f}% | {parts} |")
    compiled = res.get("compiled")
    if compiled:
        ratios = []
        for t, c in compiled["threads"].items():
            e = res["threads"][t]["rounds"]["step_s"]
            ratio = statistics.median(x / y for x, y in zip(e, c["rounds"]["step_s"], strict=True))
            ratios.append(f"{ratio:.2f} at {t} thread(s)")
            parts = " / ".join(f"{100 * c['parts_share_of_step'][k]:.1f}"
                               for k in ("forward", "backward", "optimizer", "data"))
            lines.append(f"| {t}, torch.compile | {c['samples_per_s']:.0f} | "
                         f"{c['achieved_gflops']:.1f} | {c['gemm_peak_gflops']:.1f} | "
                         f"{100 * c['share_of_peak']:.0f}% | {parts} |")
        lines += ["", f"A compiled copy of the same model ({compiled['mode']}; its first step, "
                  f"the compilation, took {compiled['first_step_s']:.0f} s), in the same rounds "
                  "right after the eager steps: throughput compiled / eager, median of "
                  "the per-round ratios, " + ", ".join(ratios) + "."]
    if "profile" in res:
        pr = res["profile"]
        peak = res["threads"][str(pr["threads"])]["gemm_peak_gflops"]
        lines += ["", f"Where a step goes at {pr['threads']} thread(s) (torch.profiler, self CPU "
                  f"time over {pr['steps']} steps, {pr['step_ms']:.0f} ms a step with the "
                  "profiler on): " + ", ".join(f"{g} {100 * s:.0f}%"
                                               for g, s in pr["groups_share"].items())
                  + f". The matrix multiplies alone run at {pr['matmul_gflops']:.0f} GFLOP/s, "
                  f"{100 * pr['matmul_gflops'] / peak:.0f}% of the GEMM peak; the attention "
                  "kernel and dropout's random numbers cost that share of the step for a "
                  "negligible share of the FLOP."]
    lines += ["", f"Goal: at least {100 * res['goal_share']:.0f}% of the peak: "
              f"{'met' if res['goal_met'] else 'not met'}."]
    return "\n".join(lines)


def machines_markdown(runs: list[dict[str, Any]]) -> str:
    """The comparison of the results files of several machines (``train_throughput*.json``)."""
    lines = [
        "### The same code on several machines",
        "",
        "| machine | samples/s, 1 thread | GEMM peak GFLOP/s, 1 thread | share of peak, by "
        "threads | profiled step (ms): matrix multiplies / attention kernel / dropout's random "
        "numbers | torch.compile / eager, by threads |",
        "|---|---:|---:|---|---|---|",
    ]
    for r in runs:
        one = r["threads"]["1"]
        shares = ", ".join(f"{t}: {100 * x['share_of_peak']:.0f}%"
                           for t, x in r["threads"].items())
        ms = r["profile"]["groups_ms"]
        profile = " / ".join(f"{ms[g]:.0f}" for g in OP_GROUPS)
        compiled = ", ".join(f"{t}: {r['threads'][t]['step_ms'] / c['step_ms']:.2f}"
                             for t, c in r["compiled"]["threads"].items()) \
            if "compiled" in r else ""
        lines.append(f"| {r['machine']['cpu']} ({r['date']}) | {one['samples_per_s']:,.0f} | "
                     f"{one['gemm_peak_gflops']:.0f} | {shares} | {profile} | {compiled} |")
    lines += ["", "Where the matrix multiplies are fast, what is not a matrix multiply (the "
              "attention kernel, dropout's random numbers, elementwise ops) weighs more: the share "
              "of peak is a property of the machine as much as of the code, so quote it with its "
              "machine. torch.compile's ratio is of the medians here (the machine's own section "
              "gives the median of per-round ratios)."]
    return "\n".join(lines)


def render_machines() -> None:
    runs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("train_throughput*.json"))]
    update_section("train_throughput_machines", machines_markdown(runs))


if __name__ == "__main__":
    main()
