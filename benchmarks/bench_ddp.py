"""Data-parallel training throughput: samples/s of 1 and 2 processes on one machine (issue 26).

The paper-size BST (default ``BSTConfig``: one block, 8 heads, MLP 1024-512-256) on the
synthetic-order samples, trained by the path ``bstrec train ranker --nproc N`` takes
(``bstrec.distributed.ddp.run_job``: in this process for N = 1, torchrun workers with DDP over
gloo for N > 1) for ``--steps`` optimizer steps of the same global batch ``--batch``, every
process with one intra-op thread. samples/s is the run's training throughput as ``train``
reports it: global samples over rank 0's training time (forward, backward with DDP's gradient
all-reduce, optimizer step; no start-up, evaluation or checkpoint). Rounds alternate the
process counts, so that a change in the machine's load hits both; the medians are reported,
and efficiency = samples/s(2) / (2 x samples/s(1)).

    python benchmarks/bench_ddp.py --samples artifacts/select_rank/synthetic-order/samples
    python benchmarks/bench_ddp.py --data-dir /work/shared/data --rounds 5 --steps 30
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bstrec.distributed.ddp import Job, run_job
from bstrec.training.loop import TrainResult
from common import ensure_samples, machine, median, merge_result, now, update_section


def run_once(samples: Path, out: Path, nproc: int, batch: int, steps: int) -> dict[str, float]:
    """One training run of ``steps`` steps on ``nproc`` processes; its throughput and wall time."""
    shutil.rmtree(out, ignore_errors=True)
    job = Job("ranker", str(samples), str(out), model="bst",
              train_overrides={"batch_size": batch, "max_steps": steps, "max_epochs": 1,
                               "num_threads": 1, "patience": 0, "seed": 0})
    t0 = time.perf_counter()
    result = run_job(job, nproc, progress=False)
    wall = time.perf_counter() - t0
    assert isinstance(result, TrainResult) and result.steps == steps
    shutil.rmtree(out, ignore_errors=True)
    h = result.history[0]
    return {"samples_per_s": h.samples_per_s, "train_seconds": h.train_seconds, "wall_s": wall}


def command_args() -> list[str]:
    """This run's arguments without the (long) --notes, which the section prints apart."""
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip or a.startswith("--notes"):
            skip = a == "--notes"
            continue
        args.append(a)
    return args


def markdown(r: dict[str, Any]) -> str:
    s = r["settings"]
    rows = "\n".join(
        f"| {n} | {r['samples_per_s'][n]:,.0f} | "
        f"{', '.join(f'{x:,.0f}' for x in r['rounds'][n]['samples_per_s'])} | "
        f"{median(r['rounds'][n]['wall_s']):.1f} |" for n in r["samples_per_s"])
    return f"""## Data-parallel training (DDP, gloo on CPU)

`{r['command']}` ({r['date']}; {r['machine']['cores']} cores, {r['machine']['cpu']},
torch {r['torch']}). Paper-size BST on the {s['protocol']} samples ({s['train_rows']:,} train
rows), global batch {s['batch']} (each of N processes trains on batch/N rows of it),
{s['steps']} optimizer steps per run, 1 intra-op thread per process, {s['rounds']} rounds
alternating the process counts; samples/s = global samples over rank 0's training time
(start-up, evaluation and checkpoints excluded), median over the rounds.

| processes | samples/s (median) | per round | wall s per run (median) |
|---:|---:|---|---:|
{rows}

Scaling efficiency samples/s(2) / (2 x samples/s(1)): **{r['efficiency']:.2f}**.
Load average (1 min) before / after: {r['loadavg'][0]:.1f} / {r['loadavg'][1]:.1f}.
{r['notes']}
Figures: `benchmarks/results/scale.json` key `ddp`."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("BSTREC_DATA_DIR", "../shared/data"))
    ap.add_argument("--workdir", default="artifacts/bench_ddp")
    ap.add_argument("--samples", help="reuse built synthetic-order samples (`bstrec data build`)")
    ap.add_argument("--batch", type=int, default=1024, help="global batch size")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--notes", default="", help="what the machine was doing besides")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = Path(args.workdir)
    samples = Path(args.samples) if args.samples else ensure_samples(
        "synthetic-order", work / "synthetic-order" / "samples", args.data_dir)
    import json

    import torch

    manifest = json.loads((samples / "manifest.json").read_text())
    per: dict[str, dict[str, list[float]]] = {
        str(n): {"samples_per_s": [], "train_seconds": [], "wall_s": []} for n in args.nproc}
    load_before = os.getloadavg()[0]
    for r in range(args.rounds):
        # alternate which count goes first, so that neither always meets the same load
        order = args.nproc if r % 2 == 0 else list(reversed(args.nproc))
        for n in order:
            m = run_once(samples, work / "run", n, args.batch, args.steps)
            for k, v in m.items():
                per[str(n)][k].append(v)
            print(f"round {r + 1}, {n} process(es): {m['samples_per_s']:,.0f} samples/s "
                  f"({m['train_seconds']:.1f} s training, {m['wall_s']:.1f} s wall)", flush=True)
    sps = {n: median(v["samples_per_s"]) for n, v in per.items()}
    eff = sps["2"] / (2 * sps["1"]) if "1" in sps and "2" in sps else float("nan")
    result = {
        "command": shlex.join(["python", "benchmarks/bench_ddp.py", *command_args()]),
        "date": now(), "machine": machine(), "torch": torch.__version__,
        "samples_per_s": sps, "efficiency": eff,
        "rounds": per, "loadavg": [load_before, os.getloadavg()[0]],
        "settings": {"model": "bst (default BSTConfig)", "protocol": manifest.get("protocol"),
                     "samples": str(samples), "train_rows": manifest["splits"]["train"],
                     "batch": args.batch, "steps": args.steps, "rounds": args.rounds,
                     "threads_per_process": 1, "backend": "gloo", "optimizer": "adam"},
        "notes": args.notes,
    }
    path = merge_result("scale", "ddp", result)
    update_section("scale-ddp", markdown(result))
    print(f"samples/s {sps}; efficiency {eff:.2f}; wrote {path} (key ddp) and BENCHMARKS.md")


if __name__ == "__main__":
    main()
