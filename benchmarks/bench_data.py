"""Data benchmark: build P1 (ml1m-ctr) and P3 (ml100k-ctr) samples from the raw files.

Each run is a fresh process (load the raw files, build the samples, write Parquet + manifest),
so that its peak resident memory is its own. Prints and records the median over the runs.

    python benchmarks/bench_data.py [--runs 5] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, now, update_section, write_result

PROTOCOLS = {"ml-1m": "ml1m-ctr", "ml-100k": "ml100k-ctr"}
TARGET_S, TARGET_MB = 20.0, 2048.0


def child(dataset: str, data_dir: str, out: str) -> None:
    """One timed build, in this (fresh) process; prints a JSON line."""
    t0 = time.perf_counter()
    from bstrec.data.build import build  # imports count: a user pays them too

    samples = build(dataset, Path(out), data_dir=Path(data_dir))
    print(json.dumps({"seconds": time.perf_counter() - t0, "splits": samples.manifest["splits"]}))


def run_once(dataset: str, data_dir: str) -> dict[str, float | dict[str, int]]:
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child", dataset, "--data-dir", data_dir, "--out",
             str(Path(tmp) / "out")], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        output = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            raise SystemExit(f"{dataset} build failed with exit code {proc.returncode}")
        result = json.loads(output.strip().splitlines()[-1])
        result["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux reports KiB
        return result  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--data-dir", default=os.environ.get("BSTREC_DATA_DIR", "../shared/data"))
    ap.add_argument("--child")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.data_dir, args.out)
        return
    rows = []
    for dataset, protocol in PROTOCOLS.items():
        if not (Path(args.data_dir) / dataset).is_dir():
            print(f"skip {dataset}: not in {args.data_dir}")
            continue
        runs = [run_once(dataset, args.data_dir) for _ in range(args.runs)]
        secs = [float(r["seconds"]) for r in runs]  # type: ignore[arg-type]
        mem = [float(r["peak_rss_mb"]) for r in runs]  # type: ignore[arg-type]
        result = {
            "protocol": protocol, "date": now(), "machine": machine(), "runs": args.runs,
            "command": f"python benchmarks/bench_data.py --runs {args.runs}",
            "splits": runs[0]["splits"], "seconds": secs, "peak_rss_mb": mem,
            "median_seconds": median(secs), "median_peak_rss_mb": median(mem),
        }
        write_result(f"data_{protocol}", result)
        rows.append(result)
        print(f"{protocol}: median {median(secs):.2f} s, peak RSS {median(mem):.0f} MB "
              f"over {args.runs} runs")
    if not rows:
        raise SystemExit("no dataset found: nothing measured")
    m = rows[0]["machine"]
    lines = [
        "## Data: building point-in-time samples from the raw files",
        "",
        f"`{rows[0]['command']}` on {rows[0]['date']}, {m['cores']} cores ({m['cpu']}), "
        f"Python {m['python']}. Each run is a fresh process: import, load the raw files, build "
        "the samples, write Parquet and the manifest. Median of the runs; target for P1: under "
        f"{TARGET_S:.0f} s and {TARGET_MB / 1024:.0f} GB.",
        "",
        "| protocol | train / valid / test samples | median time (s) | median peak RSS (MB) |",
        "|---|---|---:|---:|",
    ]
    for r in rows:
        sp = r["splits"]
        lines.append(f"| {r['protocol']} | {sp['train']:,} / {sp['valid']:,} / {sp['test']:,} | "
                     f"{r['median_seconds']:.2f} | {r['median_peak_rss_mb']:.0f} |")
    update_section("data", "\n".join(lines))


if __name__ == "__main__":
    main()
