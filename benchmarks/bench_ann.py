"""ANN benchmark: HNSW, IVF-Flat and IVF-PQ (4-bit fast-scan codes, exact re-scoring) against
exact inner-product search on synthetic item vectors.

1M unit vectors of dim 64 drawn from a seeded Gaussian whose covariance has a power-law spectrum
(eigenvalue i proportional to i ** -1.65) in a random orientation: the spectrum measured on the
ML-1M two-tower's item vectors (their variance fits i ** -1.65 over the first 40 directions; 90%
of it lies in 18 of the 64). Isotropic random vectors would be far harder than learned
embeddings, a few tight clusters far easier. Queries come from the same distribution and are
never in the index; ground truth is the exact top 100. For HNSW the search width ``efSearch``,
for IVF the number of probed lists ``nprobe``, is raised until recall@100 against exact reaches
the target (0.98); the query rate is then measured single-query (one query per call, one
thread: a request's latency) and batched (all queries in one call, on one thread too: see
``qps_batched``), alternating with exact search so that load hits both alike. Build time, the
resident memory the build added and the serialised index size are recorded, and so is the time
to add 10,000 new items without a rebuild.

    python benchmarks/bench_ann.py --ef-construction 160 [--indexes hnsw ivf ivf_pq4]

``--capacity`` runs the capacity-planning measurements instead (kept in ``results/ann.json``
under ``capacity`` and in ``results/scale.json`` under ``index``, beside the sweep's keys):
serialised bytes per million items of each kind, sharded (``--shards``) against unsharded
search at ``--items`` (alternating, like the sweep), and IVF-PQ at ``--large`` items, drawn
and added a million at a time (the items are never all in memory beside the index), its
recall@100 against exact search (IndexFlatIP over the same chunks, top 100s merged).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_ann.py --capacity --nlist-pq 4096 \
        --nprobe-pq 80 --large 10000000 --shards 4 --rounds 3 --threads 1

(one FAISS thread and passive OpenMP waits: on a machine whose cores other jobs hold, a team of
threads spinning at a barrier for a descheduled member costs many times the work.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bstrec.retrieval.index import FaissIndex, IndexConfig, VectorIndex
from common import RESULTS, machine, merge_result, now, update_section, write_result

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
    """All queries in one call, on one thread -> (queries per CPU second, per wall second, the
    ids found). One thread: a multi-threaded BLAS or OpenMP team spins while it waits for a
    core the machine's other jobs hold, which bills CPU time that is no search work; with one
    thread the CPU rate is the work a query costs, on a quiet or a busy machine alike."""
    import faiss

    faiss.omp_set_num_threads(1)
    w0, c0 = time.perf_counter(), time.thread_time()
    _, ids = index.search(queries, K)
    cpu, wall = time.thread_time() - c0, time.perf_counter() - w0
    faiss.omp_set_num_threads(THREADS)
    return len(queries) / cpu, len(queries) / wall, ids


def faiss_bytes(index: FaissIndex) -> int:
    """Bytes of FAISS' serialised form (``len(faiss.serialize_index(...))``, summed over the
    shards: FAISS cannot serialise an IndexShards), through a temporary file so that a large
    index is not copied in memory."""
    import faiss

    members = [index.index] if index.config.shards == 1 else [
        index.index.at(i) for i in range(index.index.count())]
    total = 0
    with tempfile.TemporaryDirectory() as tmp:
        for member in members:
            faiss.write_index(member, f"{tmp}/index.faiss")
            total += os.path.getsize(f"{tmp}/index.faiss")
    return total


def build(kind: str, ids: np.ndarray, base: np.ndarray, cfg: IndexConfig
          ) -> tuple[FaissIndex, dict[str, Any]]:
    before = rss_mb()
    t0 = time.perf_counter()
    index = FaissIndex(base.shape[1], cfg)
    index.add(ids, base)
    seconds = time.perf_counter() - t0
    size = faiss_bytes(index) / 2**20
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


def side_by_side(exact: VectorIndex, index: VectorIndex, queries: np.ndarray, n_exact: int,
                 rounds: int) -> dict[str, Any]:
    """Query rates of ``index`` and of exact search, timed alternately ``rounds`` times so that
    a shared machine's load hits both alike; medians of the rates and of the per-round ratios."""
    single, single_x, batched, batched_x = [], [], [], []
    for _ in range(rounds):
        e_single, _ = qps_single(exact, queries, n_exact)
        i_single, _ = qps_single(index, queries, len(queries))
        e_batched, _, _ = qps_batched(exact, queries)
        i_batched, _, _ = qps_batched(index, queries)
        single.append(i_single)
        single_x.append(i_single / e_single)
        batched.append(i_batched)
        batched_x.append(i_batched / e_batched)
    med = statistics.median
    return {"qps": round(med(single), 1), "speedup_single": round(med(single_x), 1),
            "batched_qps": round(med(batched), 1), "speedup_batched": round(med(batched_x), 1),
            "speedup_single_rounds": [round(x, 1) for x in single_x],
            "speedup_batched_rounds": [round(x, 1) for x in batched_x]}


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
    ap.add_argument("--nlist-pq", type=int, default=2048)
    ap.add_argument("--pq-m", type=int, default=64, help="ivf_pq4: 4-bit sub-quantizers")
    ap.add_argument("--refine", type=int, default=4,
                    help="ivf_pq4: refine*k shortlisted vectors re-scored exactly")
    ap.add_argument("--indexes", nargs="+", default=["hnsw", "ivf", "ivf_pq4"],
                    choices=["hnsw", "ivf", "ivf_pq4"])
    ap.add_argument("--exact-single", type=int, default=200,
                    help="queries timed one by one for exact search (it is slow)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="alternate exact and approximate timings this many times; medians")
    ap.add_argument("--no-markdown", action="store_true")
    ap.add_argument("--capacity", action="store_true",
                    help="bytes per million items, shards and --large IVF-PQ instead of the sweep")
    ap.add_argument("--large", type=int, default=10_000_000,
                    help="--capacity: items of the large IVF-PQ index (0: skip it)")
    ap.add_argument("--shards", type=int, default=4, help="--capacity: shards against one")
    ap.add_argument("--nprobe-pq", type=int, default=80,
                    help="--capacity: nprobe of ivf_pq4 at --items (the sweep's choice)")
    ap.add_argument("--hnsw-items", type=int, default=50_000,
                    help="--capacity: items of the HNSW index whose bytes are measured")
    ap.add_argument("--capacity-queries", type=int, default=500)
    ap.add_argument("--no-write", action="store_true",
                    help="--capacity: print the results, write no file (a trial run)")
    ap.add_argument("--markdown-only", action="store_true",
                    help="rewrite the BENCHMARKS.md section from results/ann.json, run nothing")
    ap.add_argument("--threads", type=int, default=2,
                    help="--capacity: FAISS threads to build and to compute the ground truth")
    args = ap.parse_args()
    if args.markdown_only:
        update_section("ann", markdown(read_ann()))
        return
    if args.capacity:
        capacity(args)
        return
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
        "rates": "queries per CPU second on one thread (single: one query per call; batched: all "
                 "in one call), "
                 "medians over rounds that alternate each index with exact search; exact's "
                 "*_wall: per wall-clock second", "rounds": args.rounds,
        "data": {"distribution": "gaussian, power-law spectrum", "slope": args.slope, "seed": 0},
        "command": "python benchmarks/bench_ann.py " + " ".join(sys.argv[1:]),
        "exact": {"qps": round(exact_single, 1), "qps_wall": round(exact_single_wall, 1),
                  "batched_qps": round(exact_batched, 1),
                  "batched_qps_wall": round(exact_batched_wall, 1),
                  **exact_facts, "index": "IndexFlatIP"},
    }

    extra = draw(10_000, basis, rng)
    extra_ids = np.arange(args.items, args.items + len(extra), dtype=np.int64)
    plans = [
        ("hnsw", IndexConfig(kind="hnsw", hnsw_m=args.hnsw_m, ef_construction=args.ef_construction),
         "ef_search", [192, 208, 224, 240, 256, 288, 320, 400, 512, 640, 800]),
        ("ivf", IndexConfig(kind="ivf", nlist=args.nlist, train_size=min(args.items, 200_000)),
         "nprobe", [16, 24, 32, 48, 64, 96, 128, 192, 256]),
        ("ivf_pq4", IndexConfig(kind="ivf", nlist=args.nlist_pq, train_size=min(args.items, 200_000),
                                ivf_codes="pq4", pq_m=args.pq_m, refine=args.refine),
         "nprobe", [16, 24, 32, 40, 48, 56, 64, 80, 96, 128, 192, 256]),
    ]
    for kind, cfg, knob, values in plans:
        if kind not in args.indexes:
            continue
        index, facts = build(kind, ids, base, cfg)
        value, r, curve = sweep(index, knob, values, queries, truth)
        rates = side_by_side(exact, index, queries, args.exact_single, args.rounds)
        t0 = time.perf_counter()
        index.add(extra_ids, extra)
        add_s = time.perf_counter() - t0
        _, found = index.search(extra[:200], 1)
        self_hit = float(np.mean(found[:, 0] == extra_ids[:200]))
        print(f"{kind}: {knob}={value}, recall@100 {r:.4f}, single {rates['qps']:,.0f} q/cpu-s "
              f"({rates['speedup_single']:.1f}x exact), batched {rates['batched_qps']:,.0f} q/cpu-s "
              f"({rates['speedup_batched']:.1f}x exact); add 10k in {add_s:.2f} s", flush=True)
        result[kind] = {
            "recall@100": round(r, 4), **rates, knob: value,
            "params": {k: getattr(cfg, k) for k in PARAMS[kind]},
            **facts, "add_10k_seconds": round(add_s, 3),
            "added_items_found_by_own_vector": self_hit, "sweep": curve,
        }
        del index
    result["load_average_at_end"] = os.getloadavg()[0]
    result = {**{k: v for k, v in read_ann().items() if k == "capacity"}, **result}
    write_result("ann", result)
    if not args.no_markdown:
        update_section("ann", markdown(result))


def read_ann() -> dict[str, Any]:
    path = RESULTS / "ann.json"
    out: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    return out


def process_rates(index: VectorIndex, queries: np.ndarray, n_single: int) -> dict[str, float]:
    """Single-query and batched rates on one FAISS thread per search (a sharded index still
    searches its shards in parallel threads), per wall second and per CPU second of the whole
    process (all its threads: per-thread CPU time would miss the shards' threads)."""
    import faiss

    faiss.omp_set_num_threads(1)
    w0, c0 = time.perf_counter(), time.process_time()
    for q in queries[:n_single]:
        index.search(q[None, :], K)
    w1, c1 = time.perf_counter(), time.process_time()
    index.search(queries, K)
    w2, c2 = time.perf_counter(), time.process_time()
    faiss.omp_set_num_threads(THREADS)
    return {"single_qps_wall": n_single / (w1 - w0), "single_qps_cpu": n_single / (c1 - c0),
            "batched_qps_wall": len(queries) / (w2 - w1),
            "batched_qps_cpu": len(queries) / (c2 - c1)}


def per_million(nbytes: float, items: int) -> int:
    return round(nbytes * 1_000_000 / items)


def same_up_to_ties(s1: np.ndarray, i1: np.ndarray, s2: np.ndarray, i2: np.ndarray) -> bool:
    """Equal scores, and equal ids but for the order of items of equal score (and, at the
    k-th score, which of the tied items made the cut)."""
    if not np.array_equal(s1, s2):
        return False
    for scores, a, b in zip(s1, i1, i2, strict=True):
        inner = scores > scores[-1]
        if set(zip(scores[inner], a[inner], strict=True)) != set(
                zip(scores[inner], b[inner], strict=True)):
            return False
    return True


def shard_pair(kind: str, cfg: IndexConfig, shards: int, ids: np.ndarray, base: np.ndarray,
               queries: np.ndarray, truth: np.ndarray, args: argparse.Namespace
               ) -> dict[str, Any]:
    """``cfg`` unsharded and with ``shards`` shards: same results?, bytes, alternating rates."""
    one, one_facts = build(kind, ids, base, cfg)
    many, many_facts = build(f"{kind} x{shards}", ids, base,
                             dataclasses.replace(cfg, shards=shards))
    s1, i1 = one.search(queries, K)
    sn, i_n = many.search(queries, K)
    runs: dict[str, list[dict[str, float]]] = {"1": [], str(shards): []}
    for _ in range(args.rounds):
        runs["1"].append(process_rates(one, queries, 200))
        runs[str(shards)].append(process_rates(many, queries, 200))
    out: dict[str, Any] = {
        "params": {k: getattr(cfg, k) for k in PARAMS.get(kind, ())},
        "identical_ids": bool((i1 == i_n).all()), "identical_scores": bool((s1 == sn).all()),
        "positions_with_other_ids": int((i1 != i_n).sum()),
        "same_up_to_ties": same_up_to_ties(s1, i1, sn, i_n),
        "recall@100": {"1": round(recall(i1, truth), 4), str(shards): round(recall(i_n, truth), 4)},
        "index_mb": {"1": one_facts["index_mb"], str(shards): many_facts["index_mb"]},
        "build_seconds": {"1": one_facts["build_seconds"],
                          str(shards): many_facts["build_seconds"]},
    }
    for key in ("single_qps_wall", "single_qps_cpu", "batched_qps_wall", "batched_qps_cpu"):
        out[key] = {n: round(statistics.median(r[key] for r in rs), 1) for n, rs in runs.items()}
    print(f"{kind}: shards 1 vs {shards}: {out}", flush=True)
    return out


def large_ivfpq(n: int, basis: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    """IVF-PQ (4-bit fast-scan, exact re-score) over ``n`` items drawn and added a million at a
    time; the exact top 100 of each query is merged over the same chunks."""
    import faiss

    rng = np.random.default_rng(1)  # its own stream: queries first, then the items
    queries = draw(args.capacity_queries, basis, rng)
    cfg = IndexConfig(kind="ivf", nlist=args.nlist_pq, train_size=200_000, ivf_codes="pq4",
                      pq_m=args.pq_m, refine=args.refine)
    index = FaissIndex(basis.shape[1], cfg)
    best_s = np.full((len(queries), K), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), K), -1, dtype=np.int64)
    before = rss_mb()
    build_s = truth_s = 0.0
    for lo in range(0, n, 1_000_000):
        x = draw(min(1_000_000, n - lo), basis, rng)
        t0 = time.perf_counter()
        flat = faiss.IndexFlatIP(x.shape[1])
        flat.add(x)
        s, i = flat.search(queries, K)
        del flat
        cat_s, cat_i = np.concatenate([best_s, s], 1), np.concatenate([best_i, i + lo], 1)
        top = np.argsort(-cat_s, axis=1, kind="stable")[:, :K]
        best_s, best_i = np.take_along_axis(cat_s, top, 1), np.take_along_axis(cat_i, top, 1)
        t1 = time.perf_counter()
        index.add(np.arange(lo, lo + len(x), dtype=np.int64), x)
        t2 = time.perf_counter()
        truth_s, build_s = truth_s + t1 - t0, build_s + t2 - t1
        print(f"  {lo + len(x):,} items: build {build_s:.0f} s, truth {truth_s:.0f} s, "
              f"RSS {rss_mb():,.0f} MB", flush=True)
        del x
    rss_added = rss_mb() - before
    nprobe, r, curve = sweep(index, "nprobe", [32, 48, 64, 80, 96, 128, 160, 192, 256], queries,
                             best_i)
    index.index.k_factor = 1.0  # the codes' own top 100: re-scoring 1x k only reorders it
    _, codes_found = index.search(queries, K)
    index.set_search_params(nprobe=nprobe)
    rates = process_rates(index, queries, 200)
    nbytes = faiss_bytes(index)
    with tempfile.TemporaryDirectory() as tmp:  # the IVF-PQ part alone: codes, lists, ids
        faiss.write_index(index.index.base_index, f"{tmp}/codes.faiss")
        codes_bytes = os.path.getsize(f"{tmp}/codes.faiss")
    out = {
        "items": n, "queries": len(queries), "k": K, "nprobe": nprobe,
        "params": {k: getattr(cfg, k) for k in PARAMS["ivf_pq4"]},
        "recall@100": round(r, 4), "recall@100_codes_only": round(recall(codes_found, best_i), 4),
        "bytes": nbytes, "bytes_per_million_items": per_million(nbytes, n),
        "codes_only_bytes": codes_bytes,
        "codes_only_bytes_per_million_items": per_million(codes_bytes, n),
        "build_s": round(build_s, 1), "ground_truth_s": round(truth_s, 1),
        "rss_added_mb": round(rss_added, 1), "ids_bytes": int(index.ids.nbytes),
        **{key: round(v, 1) for key, v in rates.items()}, "sweep": curve,
    }
    print(f"ivf_pq4 at {n:,}: {({k: v for k, v in out.items() if k != 'sweep'})}", flush=True)
    return out


def capacity(args: argparse.Namespace) -> None:
    """Each part is written as soon as it is measured (a long run on a shared machine)."""
    global THREADS
    import faiss

    THREADS = args.threads
    faiss.omp_set_num_threads(THREADS)
    rng = np.random.default_rng(0)
    basis = spectrum_basis(args.dim, args.slope, rng)
    base = draw(args.items, basis, rng)  # the sweep's items and queries
    queries = draw(args.queries, basis, rng)[:args.capacity_queries]
    ids = np.arange(args.items, dtype=np.int64)
    exact, _ = build("exact", ids, base, IndexConfig(kind="flat"))
    _, truth = exact.search(queries, K)
    del exact
    out: dict[str, Any] = {
        "command": "python benchmarks/bench_ann.py " + " ".join(sys.argv[1:]),
        "date": now(), "machine": machine(), "faiss_threads": THREADS,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
        "load_average_at_start": os.getloadavg()[0],
        "items": args.items, "dim": args.dim, "queries": len(queries), "k": K,
        "rounds": args.rounds,
        "notes": "bytes: FAISS' serialised index (what it holds in memory, near enough), "
                 "without bstrec's ids mapping (8 bytes an item, ids_mapping). Shard rates: one "
                 "FAISS thread per search, the shards searched in parallel threads; *_cpu per "
                 "second of the whole process' CPU time; medians over rounds alternating 1 and "
                 "n shards. flat/ivf_pq4 bytes at --items, hnsw at hnsw.items, ivf_pq4_large at "
                 "ivfpq_large.items.",
        "bytes_per_million_items": {"ids_mapping": 8_000_000}, "shards": {"count": args.shards},
        "ivfpq_large": None, "hnsw": None, "complete": False,
    }
    per_m = out["bytes_per_million_items"]
    pq4 = IndexConfig(kind="ivf", nlist=args.nlist_pq, nprobe=args.nprobe_pq,
                      train_size=min(args.items, 200_000), ivf_codes="pq4", pq_m=args.pq_m,
                      refine=args.refine)
    for kind, cfg in (("flat", IndexConfig(kind="flat")), ("ivf_pq4", pq4)):
        pair = shard_pair(kind, cfg, args.shards, ids, base, queries, truth, args)
        out["shards"][kind] = pair
        for n in ("1", str(args.shards)):
            name = kind if n == "1" else f"{kind}_{n}_shards"
            per_m[name] = per_million(pair["index_mb"][n] * 2**20, args.items)
        save_capacity(out, args)
    if args.large:
        large = large_ivfpq(args.large, basis, args)
        out["ivfpq_large"] = large
        per_m["ivf_pq4_large"] = large["bytes_per_million_items"]
        per_m["ivf_pq4_large_codes_only"] = large["codes_only_bytes_per_million_items"]
        save_capacity(out, args)
    n_hnsw = min(args.hnsw_items, args.items)
    hnsw_cfg = IndexConfig(kind="hnsw", hnsw_m=args.hnsw_m, ef_construction=args.ef_construction)
    hnsw, hnsw_facts = build("hnsw", ids[:n_hnsw], base[:n_hnsw], hnsw_cfg)
    per_m[f"hnsw_m{args.hnsw_m}"] = per_million(faiss_bytes(hnsw), n_hnsw)
    out["hnsw"] = {"items": n_hnsw, "hnsw_m": args.hnsw_m,
                   "ef_construction": args.ef_construction,
                   "build_seconds": hnsw_facts["build_seconds"]}
    out["complete"] = True
    save_capacity(out, args)


def save_capacity(out: dict[str, Any], args: argparse.Namespace) -> None:
    """``out`` (so far) into results/ann.json's ``capacity``, results/scale.json's ``index`` and,
    once complete, BENCHMARKS.md."""
    out["load_average_at_end"] = os.getloadavg()[0]
    if args.no_write:
        print(json.dumps(out, indent=1), "\n".join(capacity_markdown(out)), sep="\n")
        return
    result = read_ann()
    result["capacity"] = out
    write_result("ann", result)
    large = out["ivfpq_large"]
    large_key = "ivfpq_10m" if args.large == 10_000_000 else f"ivfpq_{args.large}"
    merge_result("scale", "index", {
        "source": "benchmarks/results/ann.json, key capacity", "command": out["command"],
        "date": out["date"], "machine": out["machine"], "faiss_threads": THREADS,
        "complete": out["complete"], "bytes_per_million_items": out["bytes_per_million_items"],
        large_key: large and {k: v for k, v in large.items() if k != "sweep"},
        "shards": out["shards"]})
    if out["complete"] and not args.no_markdown and "exact" in result:
        update_section("ann", markdown(result))


PARAMS = {"hnsw": ("hnsw_m", "ef_construction"), "ivf": ("nlist", "train_size"),
          "ivf_pq4": ("nlist", "train_size", "pq_m", "refine")}
KINDS = (("hnsw", "ef_search", "HNSW M={hnsw_m}, efConstruction={ef_construction}"),
         ("ivf", "nprobe", "IVF-Flat nlist={nlist}"),
         ("ivf_pq4", "nprobe", "IVF nlist={nlist}, PQ{pq_m}x4 fast-scan, exact re-score of "
          "{refine}x100"))


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
        f"thread; batched: all queries in one call, also on one thread (exact search then is one "
        "matrix product, far more efficient per query). The search knob is raised until "
        f"recall@100 >= {r['target_recall']}. Rates are queries per CPU second of this process "
        "(one thread, see qps_batched); each index and exact search were timed alternately "
        f"{r['rounds']} times and the table gives the medians of the rates and of the per-round "
        f"ratios (load average {r['load_average_at_start']:.1f} at the start, "
        f"{r['load_average_at_end']:.1f} at the end, on {m['cores']} cores; the ratios of every "
        "round are in `benchmarks/results/ann.json`).",
        "",
        "| index | setting | recall@100 | single q/s | x exact | batched q/s | x exact | build (s) "
        "| RSS added (MB) | index (MB) | add 10k (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| exact (IndexFlatIP) | - | 1.0000 | {ex['qps']:,.1f} | 1 | {ex['batched_qps']:,.1f} | 1 | "
        f"{ex['build_seconds']} | {ex['rss_added_mb']:,.0f} | {ex['index_mb']:,.0f} | - |",
    ]
    found = []
    for kind, knob, desc in KINDS:
        if kind not in r:
            continue
        h = r[kind]
        lines.append(
            f"| {desc.format(**h['params'])} | {knob}={h[knob]} | {h['recall@100']:.4f} | "
            f"{h['qps']:,.0f} | {h['speedup_single']:.1f} | {h['batched_qps']:,.0f} | "
            f"{h['speedup_batched']:.1f} | {h['build_seconds']} | {h['rss_added_mb']:,.0f} | "
            f"{h['index_mb']:,.0f} | {h['add_10k_seconds']} |")
        found.append(f"{h['added_items_found_by_own_vector']:.0%} ({kind})")
    met = [kind for kind, _, _ in KINDS if kind in r and r[kind]["recall@100"] >= r["target_recall"]
           and min(r[kind]["speedup_single"], r[kind]["speedup_batched"]) >= 10]
    lines += ["", f"Recall@100 >= {r['target_recall']} at >= 10x exact, single-query and batched: "
              f"{', '.join(met) or 'none'}. Batched, exact search is one matrix product; against "
              "it, the batched speed-ups are "
              + ", ".join(f"{k} {r[k]['speedup_batched']:.1f}x" for k, _, _ in KINDS if k in r)
              + " (a graph walk, a scan of float vectors, a scan of 4-bit codes of the residuals "
              "to the list centroids with an exact re-scoring of a short list)."]
    lines += ["", "Adding 10,000 new vectors to a built index takes the time in the last column (no "
              "rebuild); each added vector is then found as its own nearest neighbour in "
              f"{', '.join(found)} of 200 checks."]
    if "capacity" in r:
        lines += ["", *capacity_markdown(r["capacity"])]
    return "\n".join(lines)


def capacity_markdown(c: dict[str, Any]) -> list[str]:
    m, per_m, sh, big = c["machine"], c["bytes_per_million_items"], c["shards"], c["ivfpq_large"]
    n = sh["count"]
    pq = sh["ivf_pq4"]["params"] if "ivf_pq4" in sh else big and big["params"]
    pq_desc = pq and f"IVF{pq['nlist']},PQ{pq['pq_m']}x4fs + exact re-score store (ivf_pq4)"
    rows = [("flat (IndexFlatIP)", "flat", c["items"]),
            (f"flat, {n} shards", f"flat_{n}_shards", c["items"]),
            (pq_desc, "ivf_pq4", c["items"]),
            (f"{pq_desc}, {n} shards", f"ivf_pq4_{n}_shards", c["items"])]
    if big:
        rows += [(pq_desc, "ivf_pq4_large", big["items"]),
                 (f"IVF{pq['nlist']},PQ{pq['pq_m']}x4fs codes only (`refine=0`)",
                  "ivf_pq4_large_codes_only", big["items"])]
    if c["hnsw"]:
        h = c["hnsw"]
        rows.append((f"HNSW M={h['hnsw_m']}", f"hnsw_m{h['hnsw_m']}", h["items"]))
    lines = [
        "### Capacity: bytes per million items, shards, IVF-PQ at scale",
        "",
        f"`{c['command'].strip()}` on {c['date']}, {m['cores']} cores ({m['cpu']}), "
        f"{c['faiss_threads']} FAISS thread(s) to build and for the ground truth, one per search "
        f"call (OMP_WAIT_POLICY {c['omp_wait_policy']}; load average "
        f"{c['load_average_at_start']:.1f} at the start, {c['load_average_at_end']:.1f} at the "
        f"end, the machine shared with other jobs). Same vectors as above (dim {c['dim']}); "
        f"{c['queries']} queries, top {c['k']}. Bytes: FAISS' serialised index; bstrec's id "
        "mapping adds 8 bytes an item." + ("" if c["complete"] else " (Run incomplete.)"),
        "",
        "| index | items measured | MB per million items (bytes per item) |",
        "|---|---:|---:|",
        *(f"| {desc} | {items:,} | {per_m[key] / 1e6:,.1f} |" for desc, key, items in rows
          if key in per_m),
    ]
    if any(kind in sh for kind in ("flat", "ivf_pq4")):
        lines += [
            "",
            f"Sharded ({n} shards, `IndexConfig(shards={n})`: faiss.IndexShards, round-robin "
            f"split, one search thread per shard) against one index at {c['items']:,} items; "
            f"medians over {c['rounds']} alternating rounds; single = one query per call (200), "
            f"batched = {c['queries']} queries in one call; CPU = the whole process' CPU "
            "seconds. Same results: identical scores, and ids identical but for the order of "
            "items of equal score (float32 scores do tie among a million items); ivf_pq4's "
            "shards each probe their own lists and re-score their own shortlist, so its results "
            "differ (and each query scans and re-scores about shards times as many entries).",
            "",
            "| index | shards | same results as 1 shard | recall@100 | single q/s (wall) "
            "| single q/s (CPU) | batched q/s (wall) | batched q/s (CPU) | build (s) |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
    for kind in ("flat", "ivf_pq4"):
        if kind not in sh:
            continue
        h = sh[kind]
        for k in ("1", str(n)):
            same = "-" if k == "1" else "yes" if h["same_up_to_ties"] else "no"
            lines.append(
                f"| {kind} | {k} | {same} | {h['recall@100'][k]:.4f} | "
                f"{h['single_qps_wall'][k]:,.0f} | {h['single_qps_cpu'][k]:,.0f} | "
                f"{h['batched_qps_wall'][k]:,.0f} | {h['batched_qps_cpu'][k]:,.0f} | "
                f"{h['build_seconds'][k]} |")
    if big:
        lines += ["", f"IVF-PQ at {big['items']:,} items ({pq_desc}, refine {pq['refine']}): "
                  f"recall@100 {big['recall@100']:.4f} at nprobe={big['nprobe']} against exact "
                  f"search over {big['queries']} queries ({big['recall@100_codes_only']:.4f} from "
                  f"the codes alone); {big['bytes'] / 1e9:.2f} GB serialised "
                  f"({big['codes_only_bytes'] / 1e9:.2f} GB of it the IVF-PQ codes and lists); "
                  f"built in {big['build_s']:,.0f} s (train on {pq['train_size']:,}, add a million at a "
                  "time); "
                  f"{big['single_qps_cpu']:,.0f} single / {big['batched_qps_cpu']:,.0f} batched "
                  "queries per CPU second on one thread."]
    return lines


if __name__ == "__main__":
    main()
