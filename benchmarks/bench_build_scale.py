"""Scale benchmark of `bstrec data build` out of core (issue 26): time and peak memory of the
partitioned build on generated implicit logs of growing size, and the Dask 2-worker local
cluster against one process on the same log (with a row-for-row comparison of their output).

Logs are generated chunk by chunk into Parquet (``write_implicit_log``, 50 events per user on
average, 50,000 items) and built through the command line as a user would:
``bstrec data build --dataset parquet --input LOG --column ... --partitions P`` with one
partition per million events. Each measurement is its own child process, whose peak resident
memory (``getrusage(RUSAGE_CHILDREN)``, the largest process of its tree: Dask workers too) and
wall time are recorded.

    python benchmarks/bench_build_scale.py [--sizes 5000000 20000000 50000000]
        [--workdir /tmp/bstrec-scale] [--distributed-events 5000000] [--skip-distributed]
        [--small-events 1000000] [--markdown-only]

Writes benchmarks/results/scale.json keys ``build``, ``distributed_build`` and
``build_small`` (in-memory vs partitioned on a small log), and the ``scale-build`` section of
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, merge_result, now, update_section

EVENTS_PER_USER = 50  # the mean of ImplicitConfig's events_per_user (20, 80)
COLUMNS = [arg for col in ("user_id", "item_id", "timestamp", "action", "category")
           for arg in ("--column", f"{col}={col}")]


def measure(cmd: list[str]) -> dict[str, float]:
    """Run ``cmd`` in a fresh child (through ``--measure``) so that RUSAGE_CHILDREN is its own."""
    out = subprocess.run([sys.executable, __file__, "--measure", "--", *cmd], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def measure_child(cmd: list[str]) -> None:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    print(json.dumps({"seconds": round(seconds, 2), "peak_rss_mb": round(peak_kib / 1024, 1)}))


def make_log(workdir: Path, events: int) -> tuple[Path, int]:
    """The generated log of about ``events`` events (reused when already there)."""
    from bstrec.data.synthetic import ImplicitConfig, write_implicit_log

    path = workdir / f"log-{events}.parquet"
    meta = path.with_suffix(".json")
    if not (path.exists() and meta.exists()):
        t0 = time.perf_counter()
        n = write_implicit_log(ImplicitConfig(n_users=max(1, events // EVENTS_PER_USER)), path)
        meta.write_text(json.dumps({"events": n}))
        print(f"generated {path} ({n:,} events) in {time.perf_counter() - t0:.0f} s", flush=True)
    return path, int(json.loads(meta.read_text())["events"])


def build_cmd(log: Path, out: Path, *extra: str) -> list[str]:
    bstrec = str(Path(sys.executable).with_name("bstrec"))
    return [bstrec, "data", "build", "--dataset", "parquet", "--input", str(log), *COLUMNS,
            "--out", str(out), *extra]


def partitions_for(events: int) -> int:
    from bstrec.distributed.build import EVENTS_PER_PARTITION

    return max(1, math.ceil(events / EVENTS_PER_PARTITION))


def same_output(a: Path, b: Path, chunk: int = 500_000) -> bool:
    """Row for row, every split, vocabularies, feature spec and manifest; in bounded memory."""
    import polars as pl

    for split in ("train", "valid", "test"):
        fa, fb = (pl.scan_parquet(d / "samples" / f"{split}.parquet") for d in (a, b))
        n = fa.select(pl.len()).collect().item()
        if n != fb.select(pl.len()).collect().item():
            return False
        for off in range(0, n, chunk):
            if not fa.slice(off, chunk).collect().equals(fb.slice(off, chunk).collect()):
                return False
    for name in ("vocab.json", "feature_spec.json"):
        if json.loads((a / name).read_text()) != json.loads((b / name).read_text()):
            return False
    drop = {"created", "partitions"}
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    return {k: v for k, v in ma.items() if k not in drop} == {
        k: v for k, v in mb.items() if k not in drop}


def command() -> str:
    return "python benchmarks/bench_build_scale.py " + " ".join(sys.argv[1:])


def samples_of(out: Path) -> int:
    return sum(json.loads((out / "manifest.json").read_text())["splits"].values())


def current(key: str) -> dict[str, Any]:
    path = RESULTS / "scale.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    value: dict[str, Any] = data.get(key) or {}
    return value


def run_sizes(workdir: Path, sizes: list[int]) -> None:
    for size in sizes:
        log, events = make_log(workdir, size)
        parts = partitions_for(events)
        out = workdir / f"out-{size}"
        print(f"building {events:,} events in {parts} partitions ...", flush=True)
        m = measure(build_cmd(log, out, "--partitions", str(parts)))
        entry = {**m, "events": events, "partitions": parts, "samples": samples_of(out),
                 "date": now(), "machine": machine(), "command": command()}
        print(f"  {entry}", flush=True)
        merge_result("scale", "build", {**current("build"), str(events): entry})
        shutil.rmtree(out, ignore_errors=True)


def run_small(workdir: Path, size: int) -> None:
    """In memory (today's default) against partitioned, on a log small enough for both."""
    log, events = make_log(workdir, size)
    mem, part = workdir / "small-mem", workdir / "small-part"
    parts = partitions_for(events)
    m_mem = measure(build_cmd(log, mem))
    m_part = measure(build_cmd(log, part, "--partitions", str(parts)))
    result = {"events": events, "partitions": parts, "in_memory": m_mem, "partitioned": m_part,
              "identical": same_output(mem, part), "date": now(), "machine": machine(),
              "command": command()}
    print(f"small log: {result}", flush=True)
    merge_result("scale", "build_small", result)
    for d in (mem, part):
        shutil.rmtree(d, ignore_errors=True)


def run_distributed(workdir: Path, size: int) -> None:
    log, events = make_log(workdir, size)
    parts = partitions_for(events)
    single, dask = workdir / "dist-single", workdir / "dist-dask"
    m_single = measure(build_cmd(log, single, "--partitions", str(parts)))
    m_dask = measure(build_cmd(log, dask, "--partitions", str(parts), "--engine", "dask",
                               "--workers", "2"))
    result = {"engine": "dask", "identical": same_output(single, dask),
              "seconds": m_dask["seconds"], "single_process_seconds": m_single["seconds"],
              "peak_rss_mb": m_dask["peak_rss_mb"],
              "single_process_peak_rss_mb": m_single["peak_rss_mb"], "workers": 2,
              "partitions": parts, "events": events, "date": now(), "machine": machine(),
              "command": command()}
    print(f"distributed: {result}", flush=True)
    merge_result("scale", "distributed_build", result)
    for d in (single, dask):
        shutil.rmtree(d, ignore_errors=True)


def markdown() -> str:
    path = RESULTS / "scale.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    m = machine()
    lines = [
        "## Sample building out of core and on Dask (issue 26)",
        "",
        "`python benchmarks/bench_build_scale.py`: generated P5 logs (`write_implicit_log`, "
        "50,000 items, 1 uniform negative per positive, histories of 20) built by "
        "`bstrec data build --dataset parquet --partitions P` (one partition per million "
        "events), each run a fresh process; peak = largest resident set of its process tree. "
        f"Machine: {m['cores']} cores, {m['cpu']}, shared with other jobs (times are noisy). "
        "Results: `benchmarks/results/scale.json` keys `build`, `build_small`, "
        "`distributed_build`.",
        "",
        "| events | partitions | samples | seconds | µs / event | peak RSS (MB) | date |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key, e in sorted(data.get("build", {}).items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {int(key):,} | {e['partitions']} | {e['samples']:,} | {e['seconds']:.0f}"
                     f" | {e['seconds'] / int(key) * 1e6:.1f} | {e['peak_rss_mb']:,.0f} | "
                     f"{e['date']} |")
    small = data.get("build_small")
    if small:
        lines += ["", f"Small log ({small['events']:,} events): in memory "
                  f"{small['in_memory']['seconds']:.0f} s, peak {small['in_memory']['peak_rss_mb']:,.0f}"
                  f" MB; partitioned ({small['partitions']}) {small['partitioned']['seconds']:.0f} s,"
                  f" peak {small['partitioned']['peak_rss_mb']:,.0f} MB; identical output: "
                  f"{small['identical']} ({small['date']})."]
    dist = data.get("distributed_build")
    if dist:
        lines += ["", f"Dask local cluster, {dist['workers']} worker processes, "
                  f"{dist['events']:,} events in {dist['partitions']} partitions: "
                  f"{dist['seconds']:.0f} s (peak process {dist['peak_rss_mb']:,.0f} MB) against "
                  f"{dist['single_process_seconds']:.0f} s in one process (peak "
                  f"{dist['single_process_peak_rss_mb']:,.0f} MB); identical output: "
                  f"{dist['identical']} ({dist['date']}). Both workers share the machine's "
                  f"{m['cores']} cores with the client and other jobs, so this checks the "
                  "engine and its overhead, not a speed-up across machines."]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--measure":
        measure_child(sys.argv[3:] if sys.argv[2] == "--" else sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[5_000_000, 20_000_000, 50_000_000])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bstrec-scale"))
    ap.add_argument("--distributed-events", type=int, default=5_000_000)
    ap.add_argument("--skip-distributed", action="store_true")
    ap.add_argument("--small-events", type=int, default=1_000_000,
                    help="in memory vs partitioned on this log (0: skip)")
    ap.add_argument("--markdown-only", action="store_true")
    args = ap.parse_args()
    if not args.markdown_only:
        args.workdir.mkdir(parents=True, exist_ok=True)
        if args.small_events:
            run_small(args.workdir, args.small_events)
        if not args.skip_distributed:
            run_distributed(args.workdir, args.distributed_events)
        run_sizes(args.workdir, args.sizes)
    update_section("scale-build", markdown())


if __name__ == "__main__":
    main()
