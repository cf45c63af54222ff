"""ANN benchmark: HNSW and IVF against exact inner-product search on synthetic item vectors.

1M unit vectors of dim 64 drawn from a seeded Gaussian whose covariance has a power-law spectrum
(eigenvalue i proportional to i ** -1.65) in a random orientation: the spectrum measured on the
ML-1M two-tower's item vectors (their variance fits i ** -1.65 over the first 40 directions; 90%
of it lies in 18 of the 64). Isotropic random vectors would be far harder than learned
embeddings, a few tight clusters far easier. Queries come from the same distribution and are
never in the index; ground truth is the exact top 100. For HNSW the search width ``efSearch``,
for IVF the number of probed lists ``nprobe``, is raised until recall@100 against exact reaches
the target (0.98); the query rate is then measured single-query (one query per call, one
thread: a request's latency) and batched (all queries in one call, every core). Build time, the
resident memory the build added and the serialised index size are recorded, and so is the time
to add 10,000 new items without a rebuild.

    python benchmarks/bench_ann.py [--items 1000000] [--queries 2000] [--dim 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bstrec.retrieval.index import FaissIndex, IndexConfig, VectorIndex
from common import machine, now, update_section, write_result

TARGET_RECALL = 0.98
K = 100


def rss_mb() -> float:
    """Resident memory of this process now (Linux /proc), MB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def spectrum_basis(dim: int, slope: float, rng: np.random.Generator) -> np.ndarray:
    """(dim, dim) map from standard normal draws to the power-law covariance, randomly rotated."""
    scale = np.arange(1, dim + 1, dtype=np.float64) ** (-slope / 2)  # std = sqrt(eigenvalue)
    rot, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    out: np.ndarray = scale[:, None] * rot.T
    return out


def draw(n: int, basis: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n, D) unit vectors: Gaussian with the basis' covariance, normalised."""
    out = np.empty((n, basis.shape[1]), dtype=np.float32)
    for lo in range(0, n, 100_000):  # chunks keep the float64 temporaries small
        m = min(100_000, n - lo)
        x = rng.standard_normal((m, basis.shape[0])) @ basis
        out[lo:lo + m] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found top-k ∩ exact top-k| / k."""
    hits = sum(np.intersect1d(f, t).size for f, t in zip(found, truth, strict=True))
    return hits / truth.size


def qps_single(index: VectorIndex, queries: np.ndarray, n: int) -> tuple[float, float]:
    """One query per call on one thread -> (queries per CPU second, per wall second).

    The CPU rate is the work a query costs, whatever else runs on the machine; the wall rate
    also counts the time other processes held the cores."""
    import faiss

    faiss.omp_set_num_threads(1)
    w0, c0 = time.perf_counter(), time.thread_time()
    for q in queries[:n]:
        index.search(q[None, :], K)
    cpu, wall = time.thread_time() - c0, time.perf_counter() - w0
    faiss.omp_set_num_threads(THREADS)
    return n / cpu, n / wall


def qps_batched(index: VectorIndex, queries: np.ndarray) -> tuple[float, float, np.ndarray]:
    """All queries in one call on every thread -> (queries per CPU second summed over threads,
    per wall second, the ids found)."""
    w0, c0 = time.perf_counter(), time.process_time()
    _, ids = index.search(queries, K)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    return len(queries) / cpu, len(queries) / wall, ids


def build(kind: str, ids: np.ndarray, base: np.ndarray, cfg: IndexConfig
          ) -> tuple[FaissIndex, dict[str, Any]]:
    import faiss

    before = rss_mb()
    t0 = time.perf_counter()
    index = FaissIndex(base.shape[1], cfg)
    index.add(ids, base)
    seconds = time.perf_counter() - t0
    size = faiss.serialize_index(index.index).nbytes / 2**20
    facts = {"build_seconds": round(seconds, 2), "rss_added_mb": round(rss_mb() - before, 1),
             "index_mb": round(float(size), 1)}
    print(f"{kind}: built in {seconds:.1f} s, +{facts['rss_added_mb']} MB RSS, "
          f"{facts['index_mb']} MB serialised", flush=True)
    return index, facts


def sweep(index: FaissIndex, name: str, values: list[int], queries: np.ndarray,
          truth: np.ndarray) -> tuple[int, float, list[dict[str, float]]]:
    """Raise the search knob until recall@K >= TARGET_RECALL; -> (value, recall, curve)."""
    curve = []
    for v in values:
        if name == "ef_search":
            index.set_search_params(ef_search=max(v, K))
        else:
            index.set_search_params(nprobe=v)
        rate, _, found = qps_batched(index, queries)
        r = recall(found, truth)
        curve.append({name: v, "recall@100": round(r, 4), "batched_qps": round(rate, 1)})
        print(f"  {name}={v}: recall@100 {r:.4f}, batched {rate:,.0f} q/cpu-s", flush=True)
        if r >= TARGET_RECALL:
            return v, r, curve
    return values[-1], r, curve


THREADS = 1


def main() -> None:
    global THREADS
    import faiss

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--slope", type=float, default=1.65,
                    help="power-law exponent of the covariance spectrum")
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--ef-construction", type=int, default=100)
    ap.add_argument("--nlist", type=int, default=2048)
    ap.add_argument("--exact-single", type=int, default=200,
                    help="queries timed one by one for exact search (it is slow)")
    ap.add_argument("--no-markdown", action="store_true")
    args = ap.parse_args()
    THREADS = faiss.omp_get_max_threads()
    rng = np.random.default_rng(0)
    basis = spectrum_basis(args.dim, args.slope, rng)
    base = draw(args.items, basis, rng)
    queries = draw(args.queries, basis, rng)
    ids = np.arange(args.items, dtype=np.int64)
    print(f"{args.items:,} vectors of dim {args.dim}, {args.queries:,} queries, "
          f"{THREADS} threads", flush=True)

    exact, exact_facts = build("exact", ids, base, IndexConfig(kind="flat"))
    exact_batched, exact_batched_wall, truth = qps_batched(exact, queries)
    exact_single, exact_single_wall = qps_single(exact, queries, args.exact_single)
    print(f"exact: single {exact_single:,.1f} q/cpu-s ({exact_single_wall:,.1f} wall), batched "
          f"{exact_batched:,.1f} q/cpu-s ({exact_batched_wall:,.1f} wall)", flush=True)
    result: dict[str, Any] = {
        "items": args.items, "dim": args.dim, "queries": args.queries, "k": K,
        "target_recall": TARGET_RECALL, "date": now(), "machine": machine(), "threads": THREADS,
        "load_average_at_start": os.getloadavg()[0],
        "rates": "queries per CPU second (single: one thread; batched: summed over threads); "
                 "*_wall: per wall-clock second on the shared machine",
        "data": {"distribution": "gaussian, power-law spectrum", "slope": args.slope, "seed": 0},
        "command": "python benchmarks/bench_ann.py " + " ".join(sys.argv[1:]),
        "exact": {"qps": round(exact_single, 1), "qps_wall": round(exact_single_wall, 1),
                  "batched_qps": round(exact_batched, 1),
                  "batched_qps_wall": round(exact_batched_wall, 1),
                  **exact_facts, "index": "IndexFlatIP"},
    }
    del exact

    extra = draw(10_000, basis, rng)
    extra_ids = np.arange(args.items, args.items + len(extra), dtype=np.int64)
    plans = [
        ("hnsw", IndexConfig(kind="hnsw", hnsw_m=args.hnsw_m, ef_construction=args.ef_construction),
         "ef_search", [200, 256, 320, 400, 512, 640, 800]),
        ("ivf", IndexConfig(kind="ivf", nlist=args.nlist, train_size=min(args.items, 200_000)),
         "nprobe", [16, 24, 32, 48, 64, 96, 128, 192, 256]),
    ]
    for kind, cfg, knob, values in plans:
        index, facts = build(kind, ids, base, cfg)
        value, r, curve = sweep(index, knob, values, queries, truth)
        batched, batched_wall, _ = qps_batched(index, queries)
        single, single_wall = qps_single(index, queries, len(queries))
        t0 = time.perf_counter()
        index.add(extra_ids, extra)
        add_s = time.perf_counter() - t0
        _, found = index.search(extra[:200], 1)
        self_hit = float(np.mean(found[:, 0] == extra_ids[:200]))
        print(f"{kind}: {knob}={value}, recall@100 {r:.4f}, single {single:,.0f} q/cpu-s "
              f"({single / exact_single:.0f}x exact), batched {batched:,.0f} q/s; "
              f"add 10k in {add_s:.2f} s", flush=True)
        result[kind] = {
            "recall@100": round(r, 4), "qps": round(single, 1), "qps_wall": round(single_wall, 1),
            "batched_qps": round(batched, 1), "batched_qps_wall": round(batched_wall, 1),
            "speedup_single": round(single / exact_single, 1),
            "speedup_batched": round(batched / exact_batched, 1),
            knob: value, "params": {k: v for k, v in vars(cfg).items() if k in (
                "hnsw_m", "ef_construction", "nlist", "train_size")} if kind else {},
            **facts, "add_10k_seconds": round(add_s, 3),
            "added_items_found_by_own_vector": self_hit, "sweep": curve,
        }
        del index
    result["load_average_at_end"] = os.getloadavg()[0]
    write_result("ann", result)
    if not args.no_markdown:
        update_section("ann", markdown(result))


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    ex = r["exact"]
    lines = [
        "## ANN: approximate against exact inner-product search",
        "",
        f"`{r['command'].strip()}` on {r['date']}, {m['cores']} cores ({m['cpu']}). "
        f"{r['items']:,} synthetic unit vectors of dim {r['dim']} (Gaussian, covariance spectrum "
        f"i^-{r['data']['slope']} as measured on the ML-1M two-tower's item vectors), "
        f"{r['queries']:,} held-out queries, top {r['k']}. "
        "Recall@100 = overlap with the exact top 100. Single-query rate: one query per call on one "
        f"thread; batched: all queries in one call on {r['threads']} threads. The search knob is "
        f"raised until recall@100 >= {r['target_recall']}. The machine was shared with other jobs "
        f"(load average {r['load_average_at_start']:.1f} at the start, "
        f"{r['load_average_at_end']:.1f} at the end, on {m['cores']} cores), so rates are queries "
        "per CPU second of this process (batched: summed over its threads), which other jobs do "
        "not change; the wall-clock rates of the same runs are in `benchmarks/results/ann.json`.",
        "",
        "| index | setting | recall@100 | single q/s | x exact | batched q/s | x exact | build (s) "
        "| RSS added (MB) | index (MB) | add 10k (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| exact (IndexFlatIP) | - | 1.0000 | {ex['qps']:,.1f} | 1 | {ex['batched_qps']:,.1f} | 1 | "
        f"{ex['build_seconds']} | {ex['rss_added_mb']:,.0f} | {ex['index_mb']:,.0f} | - |",
    ]
    for kind, knob, desc in (("hnsw", "ef_search", "HNSW M={hnsw_m}, efConstruction="
                              "{ef_construction}"), ("ivf", "nprobe", "IVF-Flat nlist={nlist}")):
        h = r[kind]
        name = desc.format(**h["params"])
        lines.append(
            f"| {name} | {knob}={h[knob]} | {h['recall@100']:.4f} | {h['qps']:,.0f} | "
            f"{h['speedup_single']:.0f} | {h['batched_qps']:,.0f} | {h['speedup_batched']:.0f} | "
            f"{h['build_seconds']} | {h['rss_added_mb']:,.0f} | {h['index_mb']:,.0f} | "
            f"{h['add_10k_seconds']} |")
    lines += ["", "Adding 10,000 new vectors to a built HNSW or IVF index takes the time in the last "
              "column (no rebuild); each added vector is then found as its own nearest neighbour in "
              f"{r['hnsw']['added_items_found_by_own_vector']:.0%} (HNSW) and "
              f"{r['ivf']['added_items_found_by_own_vector']:.0%} (IVF) of 200 checks."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
