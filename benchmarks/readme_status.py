"""Render README.md's status table from the rank results files, so that no figure in the README
is typed by hand: `python benchmarks/readme_status.py` (runs nothing else; bench_rank.py calls it
after it writes a results file). `--check` exits 1 when the README's table is not what the
results files give (the test suite runs it)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from common import RESULTS, ROOT, rendered_block, write_or_check

README = ROOT / "README.md"
PROTOCOLS = ("synthetic-order", "ml1m-ctr", "ml100k-ctr")
OURS = ("bst", "bst_target_bn")
PEERS = ("torch_rechub_bst", "torch_rechub_din", "torch_rechub_widedeep")


def _auc(models: dict[str, Any], name: str) -> str:
    row = models.get(name)
    if row is None:
        return "n/a"
    seeds = len(row["auc"]["values"])
    return f"{row['auc']['mean']:.4f}" + (f" ({seeds} seed)" if seeds == 1 else "")


def _interval(res: dict[str, Any], a: str, b: str) -> str | None:
    for boot in res.get("bootstraps", []):
        if boot["a"] == a and boot["b"] == b:
            return f"{boot['diff']:+.4f} [{boot['lo']:+.4f}, {boot['hi']:+.4f}]"
    return None


def render() -> str:
    lines = ["| protocol | " + " | ".join(OURS) + " | " + " | ".join(
        p.replace("torch_rechub_", "their ") for p in PEERS) + " | reference (LR on rates) |",
             "|---|" + "---:|" * (len(OURS) + len(PEERS) + 1)]
    intervals: list[str] = []
    for protocol in PROTOCOLS:
        path = RESULTS / f"rank_{protocol}.json"
        if not path.exists():
            continue
        res = json.loads(path.read_text())
        cells = [_auc(res["models"], m) for m in (*OURS, *PEERS)]
        ref = res["references"]["rate_lr"]["auc"]["mean"]
        lines.append(f"| {protocol} | " + " | ".join(cells) + f" | {ref:.4f} |")
        diffs = [f"{peer.replace('torch_rechub_', 'their ')} {iv}" for peer in PEERS
                 if (iv := _interval(res, "bst_target_bn", peer)) is not None]
        if diffs:
            intervals.append(f"- {protocol}: " + "; ".join(diffs))
    return "\n".join([
        "Test AUC, mean over seeds (`benchmarks/results/rank_<protocol>.json`, written by",
        "`benchmarks/bench_rank.py`; its command, date and machine are in BENCHMARKS.md):", "",
        *lines, "",
        "bst_target_bn minus each peer, paired bootstrap over users (95% interval):", "",
        *intervals])


def write(check: bool = False) -> int:
    return write_or_check(README, rendered_block(README, "status", render()), check,
                          "benchmarks/readme_status.py")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when stale")
    return write(ap.parse_args().check)


if __name__ == "__main__":
    sys.exit(main())
