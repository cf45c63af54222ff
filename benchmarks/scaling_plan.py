"""Render docs/scaling.md's capacity plan from the results files, so that every figure in it is a
measurement of ours (or an assumption named in ASSUMPTIONS) with its formula beside it:
`python benchmarks/scaling_plan.py`. `--check` exits 1 when the document's plan is not what the
results files give (the test suite runs it).

Inputs: benchmarks/results/serving.json (server CPU per request), scale.json (store bytes per
user, index bytes per million items, DDP samples/s, sample-build seconds and memory),
train_throughput.json (training FLOP per sample)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from typing import Any

from common import RESULTS, ROOT, rendered_block, write_or_check

DOC = ROOT / "docs" / "scaling.md"

USERS, ITEMS, RPS = 100_000_000, 10_000_000, 10_000
GB = 1e9


@dataclass(frozen=True)
class Assumption:
    value: float
    why: str


# What is not measured here: each is a choice an operator makes, stated so it can be changed.
ASSUMPTIONS: dict[str, Assumption] = {
    "cpu_utilisation": Assumption(0.5, "API replicas provisioned at 50% CPU, so that p99 holds "
                                       "at peak (serving.json: p99 grows fast once the cores are "
                                       "busy)"),
    "replica_cores": Assumption(16, "cores per API replica"),
    "redis_replicas": Assumption(1, "one replica per Redis master, for failover"),
    "redis_node_gb": Assumption(25, "data per Redis node: a 32 GB node, leaving room for the "
                                    "fork of a snapshot and fragmentation"),
    "full_users": Assumption(1.0, "share of users holding a full sequence (the worst case: "
                                  "every user at the store's cap)"),
    "events_per_user": Assumption(50, "events per user in one retraining window"),
    "samples_per_event": Assumption(2, "a positive and one sampled negative (P5, negatives=1)"),
    "build_workers": Assumption(32, "sample-building workers (one core each)"),
    "train_processes": Assumption(64, "training processes (one CPU core each) for the CPU figure"),
}


# The index kinds an operator chooses between (bench_ann.py's names; the "large" ones were
# measured at 10M items, the others at 1M or fewer)
INDEX_KINDS = {
    "flat": "exact (flat) index",
    "hnsw_m32": "HNSW (M=32)",
    "ivf_pq4_large": "IVF-PQ, vectors kept for re-scoring",
    "ivf_pq4_large_codes_only": "IVF-PQ, codes only",
}


def _load(name: str) -> dict[str, Any]:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _a(name: str) -> float:
    return ASSUMPTIONS[name].value


def _row(what: str, formula: str, value: str) -> str:
    return f"| {what} | {formula} | {value} |"


def _missing(what: str, command: str) -> str:
    return f"| {what} | not measured: run `{command}` | |"


def api_rows(serving: dict[str, Any], scale: dict[str, Any]) -> list[str]:
    headline = serving.get("servers", {}).get(serving.get("headline", ""), {})
    conc = headline.get("concurrency", {}).get("4")
    if conc is None:
        return [_missing("API replicas", "python benchmarks/bench_serving.py")]
    cpu_ms = conc["server_cpu_ms_per_request"]
    rows = [_row("server CPU per request (ML-1M bundle)",
                 "serving.json, headline server, concurrency 4", f"{cpu_ms:.2f} ms")]
    ann = scale.get("index", {}).get("ivfpq_10m", {})
    # the measured request cost searched a small catalogue's index; at 10M items add the
    # IVF-PQ search's CPU per query
    ann_ms = 1000.0 / ann["single_qps_cpu"] if "single_qps_cpu" in ann else None
    if ann_ms is not None:
        rows.append(_row("ANN search CPU at 10M items (IVF-PQ, nprobe "
                         f"{ann.get('nprobe')}, 1 thread)",
                         "1000 / scale.json index.ivfpq_10m.single_qps_cpu", f"{ann_ms:.2f} ms"))
    per_request = cpu_ms + (ann_ms or 0.0)
    cores = RPS * per_request / 1000 / _a("cpu_utilisation")
    replicas = math.ceil(cores / _a("replica_cores"))
    rows += [
        _row("API cores for 10k requests/s",
             f"{RPS} * {per_request:.2f} ms / 1000 / {_a('cpu_utilisation'):g}", f"{cores:,.0f}"),
        _row("API replicas", f"ceil({cores:,.0f} / {_a('replica_cores'):g})", f"{replicas}"),
    ]
    return rows


def store_rows(scale: dict[str, Any]) -> list[str]:
    full = scale.get("store", {}).get("single", {}).get("full")
    if not full:
        return [_missing("Redis Cluster", "python benchmarks/bench_store.py")]
    # used_memory's growth per user, not MEMORY USAGE of the keys: it counts the key table too
    per_user = full["used_memory_per_user"]
    data_gb = USERS * _a("full_users") * per_user / GB
    masters = math.ceil(data_gb / _a("redis_node_gb"))
    nodes = masters * (1 + int(_a("redis_replicas")))
    per_master_rps = RPS / masters
    return [
        _row(f"Redis memory per user ({full['behaviours']} behaviours)",
             "scale.json store.single.full.used_memory_per_user",
             f"{per_user:,.0f} B"),
        _row("user data", f"{USERS:,} * {_a('full_users'):g} * {per_user:,.0f} B",
             f"{data_gb:,.0f} GB"),
        _row("Redis masters", f"ceil({data_gb:,.0f} GB / {_a('redis_node_gb'):g} GB)", f"{masters}"),
        _row("Redis nodes", f"{masters} * (1 + {_a('redis_replicas'):g})", f"{nodes}"),
        _row("reads per master", f"{RPS} / {masters} (a request touches one shard)",
             f"{per_master_rps:,.0f} /s"),
    ]


def index_rows(scale: dict[str, Any]) -> list[str]:
    index = scale.get("index", {})
    per_million = index.get("bytes_per_million_items", {})
    if not per_million:
        return [_missing("index memory", "python benchmarks/bench_ann.py")]
    rows = []
    for kind, label in INDEX_KINDS.items():
        if kind in per_million:
            total = per_million[kind] * ITEMS / 1e6 / GB
            rows.append(_row(f"{label} at 10M items (a copy in every API replica)",
                             f"10 * scale.json index.bytes_per_million_items.{kind}",
                             f"{total:.2f} GB"))
    ivfpq = index.get("ivfpq_10m", {})
    for key in (k for k in ivfpq if k.startswith("recall@")):
        rows.append(_row(f"IVF-PQ {key.replace('_', ', ').replace('codes, only', 'codes only')} "
                         f"at 10M items, nprobe {ivfpq.get('nprobe')}",
                         f"scale.json index.ivfpq_10m.{key}", f"{ivfpq[key]:.3f}"))
    return rows


def training_rows(scale: dict[str, Any], train: dict[str, Any]) -> list[str]:
    ddp = scale.get("ddp", {}).get("samples_per_s", {})
    if "1" not in ddp or "2" not in ddp:
        return [_missing("training", "python benchmarks/bench_ddp.py")]
    one, two = ddp["1"], ddp["2"]
    efficiency = two / (2 * one)
    samples = USERS * _a("events_per_user") * _a("samples_per_event")
    procs = _a("train_processes")
    hours = samples / (one * procs * efficiency) / 3600
    rows = [
        _row("samples per epoch", f"{USERS:,} * {_a('events_per_user'):g} * "
                                  f"{_a('samples_per_event'):g}", f"{samples:,.0f}"),
        _row("DDP scaling efficiency (1 → 2 processes)", f"{two:,.0f} / (2 * {one:,.0f})",
             f"{efficiency:.2f}"),
        _row(f"epoch on {procs:g} CPU processes",
             f"{samples:,.0f} / ({one:,.0f} * {procs:g} * {efficiency:.2f}) / 3600",
             f"{hours:,.1f} h"),
    ]
    flop = train.get("flops", {}).get("train_flop_per_sample")
    if flop:
        rows.append(_row("training FLOP per epoch (paper-size BST)",
                         f"{samples:,.0f} * {flop:,.0f} (train_throughput.json)",
                         f"{samples * flop:.2e}"))
    return rows


def build_rows(scale: dict[str, Any]) -> list[str]:
    build = scale.get("build", {})
    sizes = sorted((int(k), v) for k, v in build.items() if k.isdigit())
    if not sizes:
        return [_missing("sample building", "python benchmarks/bench_build_scale.py")]
    events, largest = sizes[-1]
    per_million = largest["seconds"] / (events / 1e6)
    total_events = USERS * _a("events_per_user")
    dist = scale.get("distributed_build", {})
    speedup = (dist["single_process_seconds"] / dist["seconds"]
               if dist.get("seconds") and dist.get("single_process_seconds") else None)
    workers = _a("build_workers")
    rows = [
        _row(f"build seconds per million events (at {events:,})",
             f"scale.json build.{events}.seconds / {events / 1e6:g}", f"{per_million:.1f} s"),
        _row(f"peak memory at {events:,} events", f"scale.json build.{events}.peak_rss_mb",
             f"{largest['peak_rss_mb']:,.0f} MB"),
    ]
    if speedup is not None:
        eff = speedup / dist.get("workers", 2)
        hours = total_events / 1e6 * per_million / (workers * eff) / 3600
        rows += [
            _row("distributed build efficiency", f"{speedup:.2f} speed-up / "
                                                 f"{dist.get('workers', 2)} workers", f"{eff:.2f}"),
            _row(f"build of {total_events:,.0f} events on {workers:g} workers",
                 f"{total_events / 1e6:,.0f} * {per_million:.1f} s / ({workers:g} * {eff:.2f}) "
                 "/ 3600", f"{hours:,.1f} h"),
        ]
    return rows


def render() -> str:
    serving, scale, train = _load("serving"), _load("scale"), _load("train_throughput")
    head = ["| quantity | formula (inputs from benchmarks/results) | value |", "|---|---|---:|"]
    sections = [
        ("API replicas", api_rows(serving, scale)),
        ("Online store (Redis Cluster)", store_rows(scale)),
        ("Catalogue index", index_rows(scale)),
        ("Training", training_rows(scale, train)),
        ("Sample building", build_rows(scale)),
    ]
    out = [f"Targets: {USERS:,} users, {ITEMS:,} items, {RPS:,} requests/s. "
           "Rendered by `python benchmarks/scaling_plan.py` from the results files."]
    for title, rows in sections:
        out += ["", f"### {title}", "", *head, *rows]
    out += ["", "Assumptions (not measured; change them in benchmarks/scaling_plan.py):", ""]
    out += [f"- `{name}` = {a.value:g}: {a.why}" for name, a in ASSUMPTIONS.items()]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when stale")
    args = ap.parse_args()
    return write_or_check(DOC, rendered_block(DOC, "plan", render()), args.check,
                          "benchmarks/scaling_plan.py")


if __name__ == "__main__":
    sys.exit(main())
