"""Serving benchmark (issue 5): the real HTTP server with the ML-1M bundle under loopback load.

1. builds the ML-1M samples (P1) into ``WORKDIR/samples`` (reused when present);
2. trains one epoch of BST (by default the configuration select_rank.py chose on the P1 valid
   split, read from ``benchmarks/results/select_ml1m-ctr.json``; other overrides with
   ``--ranker-config JSON``; or reuses ``--ranker RUN_DIR``, e.g. that selection's
   ``select/selected``) and one epoch of the two-tower, at ``nice`` 5 so that a shared machine's
   other jobs keep their share;
3. builds a bundle whose match quotas total ``--retrieved`` (500) and whose BST ranks
   ``--ranked`` (200) candidates per request; ``--variant int8`` serves the ranker with its
   MLP and attention matrices dynamically quantised to int8 (ONNX Runtime), after an AUC check
   of both on the P1 valid split;
4. measures the ranker's cost offline, in this process, before the server starts: FLOPs of one
   forward pass over 200 candidates (torch's FlopCounterMode on the eager model), its latency in
   eager torch and in ONNX Runtime (fp32, int8), the same for the request-shaped path the server
   runs (one user, 200 candidates' item columns), and the machine's fp32 matrix-multiply peak;
5. starts ``bstrec serve`` as a subprocess (fresh embedded store seeded with the ML-1M log) and
   drives it with asyncio aiohttp clients at each concurrency level for ``--duration`` seconds:
   90% ``GET /recommend`` for ML-1M users, 10% ``POST /events``; latency of every request and
   the server's per-stage ``timings_ms``;
6. freshness: with 4 load clients running, a probe takes a user's top item, posts it as an
   event and polls ``/recommend`` until the item is gone (the seen filter reads the store);
7. writes ``benchmarks/results/serving.json`` and the ``serving`` section of BENCHMARKS.md.

    python benchmarks/bench_serving.py --data-dir /work/shared/data --duration 20
    python benchmarks/bench_serving.py --ranker artifacts/bench_rank/ml1m-ctr/runs/bst-s0
    python benchmarks/bench_serving.py --ranker-config '{}'   # the paper's BST
    python benchmarks/bench_serving.py --in-process 300     # Pipeline.recommend per stage, no HTTP
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, ensure_samples, machine, now, timed, update_section, write_result

GOAL_P99_MS, GOAL_CLIENTS = 20.0, 4
# the BST served by default: what select_rank.py chose on the P1 valid split
SELECTION = RESULTS / "select_ml1m-ctr.json"
API_KEY = "bench-serving-key"
STAGES = ("store", "features", "retrieve", "prerank", "rank_features", "rank", "rules")


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if xs else float("nan")


# --- artifacts ------------------------------------------------------------------------------

def niced(args: list[str]) -> None:
    """Run this script's own child step at nice 5 (training shares the machine)."""
    cmd = ["nice", "-n", "5", sys.executable, __file__, *args]
    print("  $", " ".join(cmd[3:]))
    subprocess.run(cmd, check=True)


def selected_ranker(path: Path = SELECTION) -> dict[str, Any]:
    """The trial that select_rank.py chose in ``path`` (its best BST trial when it chose a
    baseline, since this benchmark serves BST): name, mean valid AUC, seeds, BST overrides."""
    sel = json.loads(path.read_text())
    name = sel["best_bst"]
    trial = next(t for t in sel["selection"]["trials"] if t["name"] == name)
    return {"file": str(path.relative_to(ROOT)), "trial": name,
            "chosen": sel["chosen"], "mean_valid_auc": trial["mean_valid_auc"],
            "seeds": sel["seeds"], "date": sel["date"], "overrides": trial["model_overrides"]}


def ensure_ranker(work: Path, samples: Path, given: str | None, steps: int,
                  config: dict[str, Any]) -> Path:
    """``given``, else a BST trained here with the ``config`` overrides (one run directory per
    distinct config, so that switching configs never serves a stale ranker)."""
    if given:
        return Path(given)
    tag = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
    run = work / ("ranker-bst" if not config else f"ranker-bst-{tag}")
    if not (run / "best").is_dir():
        niced(["--child", "ranker", "--samples", str(samples), "--out", str(run),
               "--steps", str(steps), "--ranker-config", json.dumps(config)])
    return run


def ensure_two_tower(work: Path, samples: Path) -> Path:
    out = work / "two_tower"
    if not (out / "best").is_dir():
        niced(["--child", "two_tower", "--samples", str(samples), "--out", str(out)])
    return out


def child(kind: str, samples: str, out: str, steps: int, config: dict[str, Any]) -> None:
    if kind == "ranker":
        from bstrec.training.task import train_ranker

        train = {"max_epochs": 1, "num_threads": 2, **({"max_steps": steps} if steps else {})}
        train_ranker("bst", samples, out, model_overrides=config, train_overrides=train,
                     progress=False)
    else:
        from bstrec.data.samples import SampleSet
        from bstrec.retrieval.train import RetrieverTrainConfig, train_two_tower

        train_two_tower(SampleSet.load(samples), RetrieverTrainConfig(max_epochs=1, num_threads=2),
                        out_dir=out, progress=False)


def ensure_bundle(work: Path, samples: Path, ranker: Path, two_tower: Path, retrieved: int,
                  ranked: int, rebuild: bool) -> Path:
    from bstrec.retrieval.candidates import CandidateConfig
    from bstrec.serving.bundle import build_bundle
    from bstrec.serving.config import PipelineConfig

    out = work / "bundle"
    want = {"retrieved": retrieved, "ranked": ranked, "ranker": str(ranker.resolve()),
            "request_graph": True, "user_tower_graph": True, "item_parts_graph": True}
    stamp = work / "bundle.json"
    if not rebuild and (out / "manifest.json").exists() and stamp.exists() \
            and json.loads(stamp.read_text()) == want:
        return out
    # 60/30/10 as the offline default; each source lists more than its quota so that merged
    # duplicates are backfilled and the request really carries ``retrieved`` candidates
    tt, cf = round(retrieved * 0.6), round(retrieved * 0.3)
    quotas = (("two_tower", tt), ("item_cf", cf), ("popular", retrieved - tt - cf))
    config = PipelineConfig(candidates=CandidateConfig(quotas=quotas, source_k=retrieved),
                            rank_n=ranked)
    build_bundle(samples, ranker, out, retriever_dir=two_tower, pipeline_config=config)
    stamp.write_text(json.dumps(want))
    return out


def int8_bundle(bundle: Path) -> Path:
    """A copy of ``bundle`` whose ranker graphs (batch and request-shaped) are dynamically
    quantised (int8 weights of MatMul / Gemm, activations quantised per call); the manifest's
    hashes are rewritten to match."""
    from onnxruntime.quantization import QuantType, quantize_dynamic  # type: ignore[import-untyped]

    from bstrec.data.io import sha256_file
    from bstrec.serving.bundle import MANIFEST, RANKER, RANKER_REQUEST

    out = bundle.with_name(bundle.name + "-int8")
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(bundle, out)
    manifest = json.loads((out / MANIFEST).read_text())
    for name in (RANKER, RANKER_REQUEST):
        if name in manifest["files"]:
            quantize_dynamic(str(bundle / name), str(out / name), weight_type=QuantType.QInt8)
            manifest["files"][name] = sha256_file(out / name)
    manifest["version"] = manifest["version"] + "-int8"
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


# --- the ranker's cost, offline -------------------------------------------------------------

def matmul_peak(reps: int) -> dict[str, float]:
    """Achieved fp32 GFLOP/s of a 1024x1024 GEMM, median of ``reps``, torch at 1 and 2 threads
    and NumPy (its BLAS, default threads)."""
    import torch

    n = 1024
    flop = 2.0 * n ** 3
    out: dict[str, float] = {}
    a, b = torch.randn(n, n), torch.randn(n, n)
    saved = torch.get_num_threads()
    for t in (1, 2):
        torch.set_num_threads(t)
        out[f"torch_{t}t_gflops"] = flop / timed(lambda: a @ b, reps) / 1e6
    torch.set_num_threads(saved)
    an, bn = a.numpy(), b.numpy()
    out["numpy_gflops"] = flop / timed(lambda: an @ bn, reps) / 1e6
    return out


def ort_levels(path: Path, feed: dict[str, np.ndarray], reps: int) -> dict[str, float]:
    """Milliseconds per call at each ONNX Runtime graph optimisation level, one thread (the
    serving runtime uses the default, ``all``)."""
    import onnxruntime as ort

    from bstrec.ranking.export import OnnxRanker

    out = {}
    for name, level in (("basic", ort.GraphOptimizationLevel.ORT_ENABLE_BASIC),
                        ("extended", ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED),
                        ("all", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
        opts.graph_optimization_level = level
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        types = OnnxRanker(path, threads=1).input_types
        inputs = {n: np.ascontiguousarray(feed[n], dtype=t) for n, t in types.items()}
        out[name] = timed(lambda s=sess, x=inputs: s.run(["logits"], x), reps)
    return out


def ranker_cost(samples: Path, ranker: Path, bundles: dict[str, Path], ranked: int, reps: int,
                auc_rows: int) -> dict[str, Any]:
    """FLOPs of one forward over ``ranked`` candidates; eager and ONNX Runtime latency at 1 and
    2 threads; AUC of each exported variant on (a prefix of) the valid split. The same for the
    request-shaped path the server runs (``request``): one valid row's user, context and
    history with the ``ranked`` rows' items as its candidates."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bstrec.data.samples import SampleSet
    from bstrec.evaluation.metrics import auc
    from bstrec.ranking.bst import BST
    from bstrec.ranking.export import PARTS, OnnxGraph, OnnxRanker
    from bstrec.ranking.request import forward_request, item_names, shared_names
    from bstrec.serving.bundle import RANKER, RANKER_ITEMS, RANKER_REQUEST
    from bstrec.training.checkpoint import load_checkpoint
    from bstrec.training.tensors import TensorSplit

    path = ranker / "best" if (ranker / "best").is_dir() else ranker
    model = load_checkpoint(path).model.eval()
    data = SampleSet.load(samples, splits=("valid",))
    valid = TensorSplit.from_frame(data.splits["valid"], data.spec)
    batch = valid.batch(torch.arange(ranked))
    shared = {k: batch[k][:1] for k in shared_names(data.spec)}
    items = {k: batch[k] for k in item_names(data.spec)}

    def count(fn: Any) -> tuple[float, float]:
        """Total FLOPs of ``fn()``, and those of the MLP module (embeddings are lookups). The
        request path runs the MLP's layers one by one after its split first layer: there the
        MLP's count is that of the layers after the first."""
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            fn()
        counts = fc.get_flop_counts()
        whole = [n for n in counts if n.endswith(".mlp")]
        mlp = sum(counts[whole[0]].values()) if whole else \
            sum(v for n, c in counts.items() if re.fullmatch(r".*\.mlp\.\d+", n)
                for v in c.values())
        return float(fc.get_total_flops()), float(mlp)

    # what the server runs per request: with item parts (BST, target output, one block) those
    # are computed once per catalogue item, not per request (serving/pipeline.py)
    bst = model if isinstance(model, BST) and model.request_shaped else None
    with torch.no_grad():
        parts = None if bst is None else bst.item_parts(items)

    def request_fn() -> Any:
        if bst is not None and parts is not None:
            return bst.forward_parts(shared, parts, items)
        return forward_request(model, shared, items)

    class Request(torch.nn.Module):
        """The request path as a module call, so that FLOPs are attributed to submodules."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self) -> Any:
            return request_fn()

    flops, mlp = count(lambda: model(batch))
    req_flops, req_mlp = count(lambda: Request()())
    # where the FLOPs are: the MLP, and the rest (the Transformer block; embeddings are lookups)
    by_module = {"mlp": mlp, "transformer_and_rest": flops - mlp}
    config = getattr(model, "config", None)
    out: dict[str, Any] = {"flops": flops, "gflop": flops / 1e9, "candidates": ranked,
                           "flops_by_module": by_module, "latency_ms": {}, "gflops": {},
                           "auc_valid": {}, "opt_level_ms": {},
                           "config": dataclasses.asdict(config) if config is not None else None}
    req: dict[str, Any] = {
        "flops": req_flops, "gflop": req_flops / 1e9,
        "flops_by_module": {"mlp": req_mlp, "transformer_and_rest": req_flops - req_mlp},
        "shares_work": bool(getattr(model, "request_shaped", False)),
        "latency_ms": {}, "opt_level_ms": {}, "max_abs_vs_batch_graph": {}}
    saved = torch.get_num_threads()
    with torch.no_grad():
        for t in (1, 2):
            torch.set_num_threads(t)
            out["latency_ms"][f"eager_{t}t"] = timed(lambda: model(batch), reps)
            req["latency_ms"][f"eager_{t}t"] = timed(request_fn, reps)
    torch.set_num_threads(saved)
    feed = {k: v.numpy() for k, v in batch.items()}
    req_feed = {k: v.numpy() for k, v in (shared | items).items()}
    broadcast_feed = feed | {k: np.broadcast_to(v, (ranked, *v.shape[1:]))
                             for k, v in req_feed.items() if k in shared}
    n = min(auc_rows, len(valid)) if auc_rows else len(valid)
    labels = valid.tensors["label"][:n].numpy()
    for name, bundle in bundles.items():
        for t in (1, 2):
            sess = OnnxRanker(bundle / RANKER, threads=t)
            out["latency_ms"][f"onnx_{name}_{t}t"] = timed(lambda s=sess: s.predict(feed), reps)
        out["opt_level_ms"][name] = ort_levels(bundle / RANKER, feed, reps)
        sess = OnnxRanker(bundle / RANKER, threads=2)
        if (bundle / RANKER_REQUEST).exists():
            if (bundle / RANKER_ITEMS).exists():
                req_feed[PARTS] = OnnxGraph(bundle / RANKER_ITEMS).run(req_feed)
            for t in (1, 2):
                rs = OnnxRanker(bundle / RANKER_REQUEST, threads=t)
                req["latency_ms"][f"onnx_{name}_{t}t"] = timed(lambda s=rs: s.predict(req_feed),
                                                               reps)
            req["opt_level_ms"][name] = ort_levels(bundle / RANKER_REQUEST, req_feed, reps)
            # the AUC below is the batch graph's; the served request graph must agree with it
            req["max_abs_vs_batch_graph"][name] = float(np.abs(
                rs.predict(req_feed) - sess.predict(broadcast_feed)).max())
        logits = np.concatenate([sess.predict({k: v.numpy() for k, v in
                                               valid.batch(torch.arange(lo, min(lo + 4096, n))
                                                           ).items()})
                                 for lo in range(0, n, 4096)])
        out["auc_valid"][name] = auc(labels, logits)
    out["auc_valid_rows"], out["valid_rows"] = int(n), len(valid)
    out["gflops"] = {k: flops / v / 1e6 for k, v in out["latency_ms"].items()}
    req["gflops"] = {k: req_flops / v / 1e6 for k, v in req["latency_ms"].items()}
    out["request"] = req
    return out


def candidate_rows_ab(bundle: Path, store_path: Path, ranked: int, n: int) -> dict[str, Any]:
    """The rank stage's input built two ways on the same requests, interleaved: the offline
    builder's rows for every candidate (``rows`` + ``tensors``, what the pipeline did first)
    against what it does now: the query row without frames (``query_row``) and the candidates'
    item columns (``item_inputs``), the shared inputs going to the ranker once. Checks that
    both give identical tensors once broadcast."""
    import torch

    from bstrec.features.store import StoreConfig, open_store
    from bstrec.serving.bundle import load_bundle
    from bstrec.serving.guard import StoreGuard
    from bstrec.serving.pipeline import Pipeline

    store = open_store(StoreConfig(path=str(store_path)))
    try:
        pipe = Pipeline(load_bundle(bundle, verify=False), StoreGuard(store, "embedded"))
        f, rng = pipe.features, random.Random(0)
        catalog, ts = list(pipe.bundle.items), int(time.time())
        before, after = [], []
        for k in range(n + 10):
            snap = store.snapshot(rng.randint(1, 6040))
            cands = rng.sample(catalog, ranked)
            items = store.items(f.item_ids_needed(snap, [pipe.probe_item, *cands]))
            t0 = time.perf_counter()
            full = f.tensors(f.rows(snap, items, cands, ts))
            t1 = time.perf_counter()
            query = f.query_row(snap, items, pipe.probe_item, ts)
            item_cols = f.item_inputs(items, cands)
            t2 = time.perf_counter()
            fast = f.candidate_batch(query, items, cands)
            if full.keys() != fast.keys() or not all(torch.equal(full[c], fast[c]) for c in full) \
                    or not all(torch.equal(full[c], item_cols[c]) for c in item_cols):
                raise SystemExit("query_row + item_inputs differ from rows() + tensors()")
            if k >= 10:  # the first requests fill the encoders' caches
                before.append((t1 - t0) * 1e3)
                after.append((t2 - t1) * 1e3)
    finally:
        store.close()
    return {"rows_tensors_ms": statistics.median(before),
            "query_row_item_inputs_ms": statistics.median(after), "requests": n,
            "identical": True}


def in_process(bundle: Path, store_path: Path, n: int, *, warmup: int = 20,
               seed: int = 0) -> dict[str, Any]:
    """``Pipeline.recommend`` timed in this process, without HTTP, one thread: p50/p99 ms of
    each stage (``timings_ms``) and of the whole call over ``n`` requests for random users of
    the bundle's vocabulary (after ``warmup`` requests). The store is read, never written."""
    import torch

    from bstrec.features.store import StoreConfig, open_store
    from bstrec.serving.bundle import load_bundle
    from bstrec.serving.guard import StoreGuard
    from bstrec.serving.pipeline import Pipeline

    torch.set_num_threads(1)  # the server's default (settings.torch_threads)
    store = open_store(StoreConfig(path=str(store_path)))
    try:
        pipe = Pipeline(load_bundle(bundle, verify=False), StoreGuard(store, "embedded"))
        pipe.warmup()
        rng = random.Random(seed)
        users = list(pipe.bundle.vocabs["user_id"].values)
        total: list[float] = []
        stages: dict[str, list[float]] = {s: [] for s in STAGES}
        for k in range(warmup + n):
            t0 = time.perf_counter()
            rec = pipe.recommend(rng.choice(users), k=10)
            if k >= warmup:
                total.append((time.perf_counter() - t0) * 1e3)
                for s in STAGES:
                    stages[s].append(rec.timings_ms[s])
    finally:
        store.close()
    summary = {s: {"p50": pct(v, 50), "p99": pct(v, 99)} for s, v in stages.items()}
    return {"requests": n, "total_ms": {"p50": pct(total, 50), "p99": pct(total, 99)},
            "stages_ms": summary, "bundle": str(bundle)}


# --- the server and the load --------------------------------------------------------------

def start_server(bundle: Path, samples: Path, work: Path, port: int, ort_threads: int,
                 workers: int, timeout_s: float) -> subprocess.Popen[bytes]:
    import urllib.error
    import urllib.request

    store = work / "feature_store.sqlite"
    for p in work.glob("feature_store.sqlite*"):
        p.unlink()
    env = {**os.environ, "BSTREC_API_KEY": API_KEY, "BSTREC_ORT_THREADS": str(ort_threads),
           "BSTREC_WORKERS": str(workers)}
    cmd = [str(Path(sys.executable).with_name("bstrec")), "serve", "--bundle", str(bundle),
           "--port", str(port), "--seed-events", str(samples), "--store-path", str(store)]
    log = (work / "server.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; see {work / 'server.log'}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return proc
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    raise SystemExit(f"the server was not ready in {timeout_s:.0f} s")


@dataclass
class Level:
    rec_ms: list[float] = field(default_factory=list)
    ev_ms: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})
    server_ms: list[float] = field(default_factory=list)
    candidates: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    freshness_ms: list[float] = field(default_factory=list)
    client_cpu_s: float = 0.0  # CPU of this load process while the level ran (process_time)
    connections_per_worker: dict[int, int] = field(default_factory=dict)  # by worker pid
    server_cpu_s: float = 0.0  # CPU of the server's processes (workers included), from /proc


@dataclass
class Deadline:
    """Shared by a level's clients: the probe ends the freshness level once it is done."""

    at: float


class Client:
    """One keep-alive HTTP connection (aiohttp): ``get`` / ``post`` -> (status, body bytes).
    aiohttp rather than httpx: the load generator shares the server's cores, and this
    benchmark's ``client_cpu_ms_per_request`` at 4 clients went from 1.61 ms (httpx) to about
    0.5 ms (aiohttp) in the results of the runs before and after the switch."""

    def __init__(self, url: str) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(
            url, connector=aiohttp.TCPConnector(limit=1),
            timeout=aiohttp.ClientTimeout(total=30.0))

    async def get(self, path: str, **params: Any) -> tuple[int, bytes]:
        async with self.session.get(path, params=params) as r:
            return r.status, await r.read()

    async def post(self, path: str, body: Any) -> tuple[int, bytes]:
        async with self.session.post(path, json=body, headers={"X-API-Key": API_KEY}) as r:
            return r.status, await r.read()

    async def close(self) -> None:
        await self.session.close()


async def client_loop(http: Client, level: Level, users: list[int], items: list[int],
                      share: float, deadline: Deadline, rng: random.Random, record: bool) -> None:
    while time.perf_counter() < deadline.at:
        user = rng.choice(users)
        event = rng.random() < share
        t0 = time.perf_counter()
        try:
            if event:
                status, raw = await http.post("/events", {"user_id": user,
                                                          "item_id": rng.choice(items)})
            else:
                status, raw = await http.get("/recommend", user_id=user, k=10)
            ms = (time.perf_counter() - t0) * 1e3
            if status != 200:
                level.errors.append(f"{status} {raw[:200]!r}")
                continue
        except Exception as exc:  # a refused or dropped connection is an error too
            level.errors.append(repr(exc))
            continue
        if not record:
            continue
        if event:
            level.ev_ms.append(ms)
            continue
        body = json.loads(raw)
        level.rec_ms.append(ms)
        t = body["timings_ms"]
        for s in STAGES:
            level.stages[s].append(float(t.get(s, 0.0)))
        level.server_ms.append(float(sum(t.values())))
        level.candidates.append(int(sum(body["candidates"].values())))
        if body.get("degraded"):
            level.errors.append(f"degraded: {body.get('degraded_reasons')}")


async def probe_loop(http: Client, level: Level, users: list[int], deadline: Deadline) -> None:
    """Freshness: post a user's current top item as an event; poll /recommend until the seen
    filter drops it. Time from sending the POST to the first answer that reflects it."""
    await asyncio.sleep(0.5)  # let the load clients get going first
    for user in users:
        if time.perf_counter() > deadline.at:
            break
        top = json.loads((await http.get("/recommend", user_id=user, k=10))[1])["items"][0][
            "item_id"]
        t0 = time.perf_counter()
        status, _ = await http.post("/events", {"user_id": user, "item_id": top})
        if status != 200:
            level.errors.append(f"probe event {status}")
            continue
        for _ in range(200):
            raw = (await http.get("/recommend", user_id=user, k=10))[1]
            if top not in {i["item_id"] for i in json.loads(raw)["items"]}:
                level.freshness_ms.append((time.perf_counter() - t0) * 1e3)
                break
        else:
            level.errors.append(f"probe: user {user} still gets item {top} after 200 polls")
        await asyncio.sleep(0.05)
    deadline.at = time.perf_counter()


def tree_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` and its descendants (Linux /proc; 0.0
    elsewhere or without a pid)."""
    if pid is None or not Path("/proc").is_dir():
        return 0.0
    stats: dict[int, list[str]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stats[int(d.name)] = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        if p in stats:
            total += (int(stats[p][11]) + int(stats[p][12])) / tick
        todo += [c for c, f in stats.items() if int(f[1]) == p]
    return total


async def worker_clients(url: str, n: int, workers: int
                         ) -> tuple[list[Client], dict[int, int]]:
    """``n`` HTTP clients of one keep-alive connection each, spread evenly over the server's
    worker processes, as a load balancer in front of them would spread them. Workers share one
    listening socket and the kernel gives a new connection to whichever accepts first, so left
    alone 4 connections can all land on one worker, leaving a core idle: a connection whose
    worker (``/healthz`` says which) already has its share is closed and opened again."""
    share = -(-n // workers)
    per_worker: dict[int, int] = {}
    out = []
    for _ in range(n):
        for attempt in range(50):
            http = Client(url)
            pid = int(json.loads((await http.get("/healthz"))[1])["pid"])
            if per_worker.get(pid, 0) < share or attempt == 49:
                break
            await http.close()
        per_worker[pid] = per_worker.get(pid, 0) + 1
        out.append(http)
    return out, per_worker


async def run_level(url: str, clients: int, duration: float, warmup: float, users: list[int],
                    items: list[int], share: float, seed: int, probes: int = 0,
                    server_pid: int | None = None, workers: int = 1) -> Level:
    level = Level()
    https, level.connections_per_worker = await worker_clients(url, clients + bool(probes),
                                                               workers)
    try:
        rngs = [random.Random(seed * 1000 + i) for i in range(clients)]
        end = Deadline(time.perf_counter() + warmup)
        await asyncio.gather(*(client_loop(h, Level(), users, items, share, end, r, False)
                               for h, r in zip(https, rngs, strict=False)))
        t0, cpu0, server0 = time.perf_counter(), time.process_time(), tree_cpu_s(server_pid)
        end = Deadline(t0 + duration)
        tasks = [client_loop(h, level, users, items, share, end, r, True)
                 for h, r in zip(https, rngs, strict=False)]
        if probes:
            tasks.append(probe_loop(https[-1], level, random.Random(seed).sample(users, probes),
                                    end))
        await asyncio.gather(*tasks)
        level.seconds = time.perf_counter() - t0
        level.client_cpu_s = time.process_time() - cpu0
        level.server_cpu_s = tree_cpu_s(server_pid) - server0
    finally:
        for h in https:
            await h.close()
    return level


async def healthz_ms(url: str, n: int) -> list[float]:
    """Round trips of the cheapest route, one client: the HTTP stack's own share of a request."""
    out = []
    http = Client(url)
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            status, raw = await http.get("/healthz")
            if status != 200:
                raise SystemExit(f"/healthz answered {status}: {raw[:200]!r}")
            out.append((time.perf_counter() - t0) * 1e3)
    finally:
        await http.close()
    return out[10:]


def summarize(level: Level) -> dict[str, Any]:
    n = len(level.rec_ms) + len(level.ev_ms)
    return {
        "p50_ms": pct(level.rec_ms, 50), "p95_ms": pct(level.rec_ms, 95),
        "p99_ms": pct(level.rec_ms, 99), "max_ms": max(level.rec_ms, default=float("nan")),
        "requests_per_s": n / level.seconds, "recommend_per_s": len(level.rec_ms) / level.seconds,
        "requests": n, "recommend_requests": len(level.rec_ms), "event_requests": len(level.ev_ms),
        "errors": len(level.errors), "error_samples": level.errors[:5],
        "events_p50_ms": pct(level.ev_ms, 50), "events_p99_ms": pct(level.ev_ms, 99),
        "server_p50_ms": pct(level.server_ms, 50), "server_p99_ms": pct(level.server_ms, 99),
        "source_attributions_mean": float(np.mean(level.candidates)) if level.candidates else 0.0,
        "stages_ms": {s: {"p50": pct(v, 50), "p99": pct(v, 99)} for s, v in level.stages.items()},
        "seconds": level.seconds,
        # CPU per request (/recommend and /events alike) of the load generator and the server:
        # they share the machine's cores
        "client_cpu_ms_per_request": level.client_cpu_s / max(n, 1) * 1e3,
        "client_cores": level.client_cpu_s / level.seconds,
        "server_cpu_ms_per_request": level.server_cpu_s / max(n, 1) * 1e3,
        "server_cores": level.server_cpu_s / level.seconds,
        "connections_per_worker": sorted(level.connections_per_worker.values(), reverse=True),
    }


# --- report ---------------------------------------------------------------------------------

def ranker_origin(r: dict[str, Any]) -> str:
    """Which BST configuration the server ran, and where it was chosen."""
    if r["ranker_config"] is None:
        return f"The ranker: the training run `{r['ranker_run']}`."
    cfg = json.dumps(r["ranker_config"]) if r["ranker_config"] else "the paper's defaults"
    sel = r.get("ranker_selection")
    if not sel:
        return f"The ranker: BST with overrides {cfg}, trained here for one epoch."
    why = ("" if sel["trial"] == sel["chosen"] else
           f"; the selection chose {sel['chosen']}, and this is its best BST trial")
    return (f"The ranker is the trial select_rank.py chose on the P1 valid split, "
            f"**{sel['trial']}** (BST overrides {cfg}; mean valid AUC "
            f"{sel['mean_valid_auc']:.4f} over seeds {sel['seeds']}, `{sel['file']}` of "
            f"{sel['date']}{why}), trained here for one epoch.")


def markdown(r: dict[str, Any]) -> str:
    m, c = r["machine"], r["ranker_cost"]
    lv = r["concurrency"]
    goal = lv.get(str(GOAL_CLIENTS))
    met = goal is not None and goal["p99_ms"] < GOAL_P99_MS and goal["errors"] == 0
    lines = [
        "## Serving: latency, throughput and freshness of the HTTP service (ML-1M bundle)",
        "",
        f"`{r['command']}` on {r['date']}, {m['cores']} cores ({m['cpu']}), Python {m['python']}; "
        f"load average at start {r['loadavg_start'][0]:.1f} / {r['loadavg_start'][1]:.1f} / "
        f"{r['loadavg_start'][2]:.1f} (1/5/15 min) on a machine other jobs may share. "
        f"The load generator (asyncio aiohttp, same machine) runs {r['duration_s']:.0f} s per "
        f"level after {r['warmup_s']:.0f} s of warm-up (and each new server first "
        f"{r.get('server_warmup_s', 0):.0f} s at {GOAL_CLIENTS} clients, unrecorded); 10% of "
        "requests are `POST /events`. "
        f"Each `/recommend` retrieves {r['retrieved']} candidates (two-tower + item-CF + "
        f"popular quotas) and BST-ranks {r['ranked']} in ONNX Runtime, {r['ort_threads']} "
        "intra-op thread(s); one server per ranker variant (fp32, or int8: "
        "MatMul/Gemm weights dynamically quantised), each on a freshly seeded store. "
        + ranker_origin(r),
        "",
        "| server (ranker, uvicorn workers) | clients | p50 (ms) | p95 (ms) | p99 (ms) | "
        "requests/s | requests | errors | "
        "server p50 / p99 (ms) | /events p50 (ms) | CPU ms/request server / load generator |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, var in r["servers"].items():
        for k, v in var["concurrency"].items():
            lines.append(f"| {name} | {k} | {v['p50_ms']:.1f} | {v['p95_ms']:.1f} | "
                         f"{v['p99_ms']:.1f} | {v['requests_per_s']:.1f} | {v['requests']} | "
                         f"{v['errors']} | {v['server_p50_ms']:.1f} / {v['server_p99_ms']:.1f} | "
                         f"{v['events_p50_ms']:.1f} | "
                         f"{v.get('server_cpu_ms_per_request', float('nan')):.2f} / "
                         f"{v.get('client_cpu_ms_per_request', float('nan')):.2f} |")
    lines += ["", "Per-stage server time of `/recommend` (the response's `timings_ms`), "
              "median / p99 in ms:", "",
              "| server | clients | " + " | ".join(STAGES) + " |",
              "|---|---:|" + "---:|" * len(STAGES)]
    for name, var in r["servers"].items():
        for k, v in var["concurrency"].items():
            st = v["stages_ms"]
            lines.append(f"| {name} | {k} | " + " | ".join(
                f"{st[s]['p50']:.1f} / {st[s]['p99']:.1f}" for s in STAGES) + " |")
    f = r["freshness_ms"]
    lines += [
        "",
        f"Freshness under load ({GOAL_CLIENTS} clients plus a probe, server `{r['headline']}`): "
        "from sending "
        "`POST /events` (a user's current top item) to the first `/recommend` that no longer "
        f"returns it: p50 {f['p50']:.1f} ms, p99 {f['p99']:.1f} ms over {f['probes']} probes. "
        "The store write is synchronous, so this is one event write plus one recommendation.",
        "",
        f"Ranker cost: one BST forward over {c['candidates']} candidates is "
        f"{c['gflop']:.2f} GFLOP (FlopCounterMode, eager model; the MLP "
        f"{c['flops_by_module']['mlp'] / 1e9:.2f}, the Transformer block and the rest "
        f"{c['flops_by_module']['transformer_and_rest'] / 1e9:.2f}). Matrix-multiply peak measured "
        f"in the same run (1024x1024 fp32 GEMM, median): torch {r['matmul']['torch_1t_gflops']:.1f}"
        f" GFLOP/s on 1 thread, {r['matmul']['torch_2t_gflops']:.1f} on 2; NumPy "
        f"{r['matmul']['numpy_gflops']:.1f}.",
        "",
        "| runtime | ms per 200 candidates | GFLOP/s | valid AUC |",
        "|---|---:|---:|---:|",
    ]
    for k, ms in c["latency_ms"].items():
        variant = k.split("_")[1] if k.startswith("onnx_") else None
        a = c["auc_valid"].get(variant) if variant else None
        lines.append(f"| {k} | {ms:.1f} | {c['gflops'][k]:.1f} | "
                     f"{'' if a is None else f'{a:.4f}'} |")
    req = c.get("request")
    if req:
        sharing = "work shared across candidates" if req["shares_work"] else \
            "shared inputs broadcast, nothing shared"
        lines += [
            "",
            f"Request-shaped path (what the server runs: one user's history, profile and context "
            f"once, {c['candidates']} candidates' item columns; BST config "
            f"`{json.dumps({k: c['config'][k] for k in ('output', 'blocks', 'mlp')})}`, "
            f"{sharing}): {req['gflop']:.3f} GFLOP per request "
            f"(MLP layers after the first {req['flops_by_module']['mlp'] / 1e9:.3f}); "
            "request graph against the batch graph on the same inputs, max |logit difference| "
            + ", ".join(f"{v} {d:.1e}" for v, d in req["max_abs_vs_batch_graph"].items()) + ".",
            "",
            "| runtime (request-shaped) | ms per request | GFLOP/s |",
            "|---|---:|---:|",
        ]
        lines += [f"| {k} | {ms:.2f} | {req['gflops'][k]:.1f} |" for k, ms in req["latency_ms"].items()]
    hz = r["servers"][r["headline"]]["healthz_ms"]
    lines += ["", f"`GET /healthz` round trip (one client, same HTTP stack, no pipeline): p50 "
              f"{hz['p50']:.1f} ms, p99 {hz['p99']:.1f} ms: the share of a request's latency that "
              "is the HTTP client, uvicorn and FastAPI rather than the pipeline."]
    ab = r["candidate_rows"]
    lines += [
        "",
        f"Ranker input for {r['ranked']} candidates, median over {ab['requests']} requests "
        "in this process: the offline builder's rows for every candidate (`rows` + `tensors`, "
        f"the first pipeline) {ab['rows_tensors_ms']:.2f} ms; the query row without frames and "
        "the candidates' item columns (`query_row` + `item_inputs`, what the pipeline does; "
        f"identical tensors once broadcast) {ab['query_row_item_inputs_ms']:.2f} ms.",
    ]
    lines += ["", "ONNX Runtime graph optimisation level, one thread, ms per 200 candidates: "
              + "; ".join(f"{v}: " + ", ".join(f"{k} {ms:.1f}" for k, ms in lv_ms.items())
                          for v, lv_ms in c["opt_level_ms"].items()) + "."]
    at = str(GOAL_CLIENTS) if str(GOAL_CLIENTS) in lv else next(iter(lv))
    served = (req or c)["gflop"]  # FLOPs of what the server runs per request
    ranks = {name: var["concurrency"][at]["stages_ms"]["rank"]["p50"]
             for name, var in r["servers"].items()}
    need = GOAL_CLIENTS / GOAL_P99_MS * 1e3 * served
    peak = r["matmul"]["torch_1t_gflops"]
    lines += [
        "",
        "int8 GFLOP/s count the fp32 model's FLOPs. In the server, the rank stage's median at "
        f"{at} client(s): " + ", ".join(
            f"{name} {ms:.1f} ms ({served / ms * 1e3:.1f} GFLOP/s)" for name, ms in ranks.items())
        + f". AUC on {c['auc_valid_rows']:,} of the {c['valid_rows']:,} rows "
        f"of the P1 valid split, fp32 and int8 scoring the same rows (ranker trained "
        f"{r['ranker_training']}: latency does not depend on the weights, AUC parity does).",
        "",
        # the arithmetic of the goal: closed-loop clients whose every request is under the
        # limit complete at least clients / limit requests a second, and the CPU a request
        # costs (server and load generator share the cores) bounds the rate the cores allow
        f"What the goal asks: {GOAL_CLIENTS} closed-loop clients each waiting under "
        f"{GOAL_P99_MS:.0f} ms complete at least {GOAL_CLIENTS / GOAL_P99_MS * 1e3:.0f} "
        "requests/s"
        + (f"; at {GOAL_CLIENTS} clients a request cost {goal['server_cpu_ms_per_request']:.2f} "
           f"ms of server CPU and {goal['client_cpu_ms_per_request']:.2f} ms of load-generator "
           f"CPU, so {m['cores']} cores allow at most "
           f"{m['cores'] * 1e3 / (goal['server_cpu_ms_per_request'] + goal['client_cpu_ms_per_request']):.0f}"
           f" requests/s (measured {goal['requests_per_s']:.0f}) and each client waits about "
           f"{GOAL_CLIENTS / m['cores']:.0f} requests' CPU time"
           if goal and "server_cpu_ms_per_request" in goal else "")
        + f". The BST itself needs {need:.1f} GFLOP/s at that rate against a 1-thread GEMM "
        f"peak of {peak:.0f} GFLOP/s measured in the same run ({need / peak:.0%} of it): "
        + ("the ranker is not what limits the service." if need / peak < 0.25 else
           f"the ranker is a large share of the server's CPU (rank stage {ranks[r['headline']]:.1f}"
           f" ms of a request's {goal['server_cpu_ms_per_request']:.2f} ms at {at} clients)."
           if goal and "server_cpu_ms_per_request" in goal else "the ranker is a large share "
           "of the work."),
        "",
        f"**Goal: p99 under {GOAL_P99_MS:.0f} ms at {GOAL_CLIENTS} concurrent clients on 2 "
        f"cores: {'met' if met else 'not met'}** with `{r['headline']}` "
        + (f"(measured p99 {goal['p99_ms']:.1f} ms, {goal['errors']} errors)." if goal else
           "(that level was not run)."),
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("BSTREC_DATA_DIR", "../shared/data"))
    ap.add_argument("--workdir", default="artifacts/bench_serving")
    ap.add_argument("--ranker", help="reuse a BST training run (or checkpoint) of these samples")
    ap.add_argument("--ranker-config", type=json.loads, metavar="JSON",
                    help='BST config overrides when the ranker is trained here (default: the '
                    f'trial select_rank.py chose on the P1 valid split, read from {SELECTION}; '
                    'the request-shaped graph shares work across candidates with output '
                    '"target" and one block; {} is the paper\'s BST)')
    ap.add_argument("--ranker-steps", type=int, default=0,
                    help="cap the one training epoch at this many steps (0: the whole epoch)")
    ap.add_argument("--retrieved", type=int, default=500)
    ap.add_argument("--ranked", type=int, default=200)
    ap.add_argument("--variants", nargs="+", choices=("fp32", "int8"), default=["fp32", "int8"],
                    help="rankers served, one server each; the first is the headline")
    ap.add_argument("--ort-threads", type=int, default=1)
    ap.add_argument("--workers", type=int, nargs="+", default=[1],
                    help="uvicorn worker processes; one server per (workers, variant)")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--duration", type=float, default=20.0, help="seconds measured per level")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds unrecorded per level")
    ap.add_argument("--server-warmup", type=float, default=15.0,
                    help=f"seconds of {GOAL_CLIENTS}-client load, unrecorded, on each new server "
                    "before its first level")
    ap.add_argument("--events-share", type=float, default=0.1)
    ap.add_argument("--probes", type=int, default=50)
    ap.add_argument("--reps", type=int, default=30, help="repetitions of the offline timings")
    ap.add_argument("--auc-rows", type=int, default=0, help="0: the whole valid split")
    ap.add_argument("--rebuild-bundle", action="store_true")
    ap.add_argument("--no-markdown", action="store_true")
    ap.add_argument("--name", default="serving", help="results file benchmarks/results/NAME.json "
                    "(experiments other than the headline run)")
    ap.add_argument("--in-process", type=int, default=0, metavar="N",
                    help="only time N Pipeline.recommend calls in this process (no HTTP, no "
                    "training): per-stage p50/p99 of --bundle (default WORKDIR/bundle) on a copy "
                    "of --store (default WORKDIR/feature_store.sqlite, seeded by a server run)")
    ap.add_argument("--bundle")
    ap.add_argument("--store")
    ap.add_argument("--child")
    ap.add_argument("--samples")
    ap.add_argument("--out")
    ap.add_argument("--steps", type=int, default=0)
    args = ap.parse_args()
    selection = None
    if args.ranker_config is None and not args.ranker:
        selection = selected_ranker()
        args.ranker_config = selection["overrides"]
    if args.child:
        child(args.child, args.samples, args.out, args.steps, args.ranker_config)
        return

    if args.in_process:
        work = Path(args.workdir)
        src = Path(args.store or work / "feature_store.sqlite")
        with tempfile.TemporaryDirectory() as tmp:  # the store is opened read-write
            copy = Path(tmp) / src.name
            shutil.copy(src, copy)
            res = in_process(Path(args.bundle or work / "bundle"), copy, args.in_process)
        print(json.dumps(res, indent=1))
        return

    load0 = os.getloadavg()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print("samples, ranker, two-tower, bundle ...")
    samples = ensure_samples("ml-1m", work / "samples", args.data_dir)
    ranker = ensure_ranker(work, samples, args.ranker, args.ranker_steps, args.ranker_config or {})
    two_tower = ensure_two_tower(work, samples)
    bundle = ensure_bundle(work, samples, ranker, two_tower, args.retrieved, args.ranked,
                           args.rebuild_bundle)
    bundles = {"fp32": bundle, "int8": int8_bundle(bundle)}
    train_result = json.loads((ranker / "train_result.json").read_text()) \
        if (ranker / "train_result.json").exists() else {}

    print("ranker cost (offline) and matmul peak ...")
    cost = ranker_cost(samples, ranker, bundles, args.ranked, args.reps, args.auc_rows)
    peak = matmul_peak(args.reps)
    print(json.dumps({"gflop": cost["gflop"], "latency_ms": cost["latency_ms"],
                      "auc": cost["auc_valid"], "matmul": peak}, indent=1))

    from bstrec.data.samples import SampleSet
    from bstrec.serving.server import free_port

    ds = SampleSet.load(samples, splits=()).dataset
    assert ds is not None
    users = [int(u) for u in ds.users["user_id"].to_list()]
    items = [int(i) for i in ds.items["item_id"].to_list()]
    served: dict[str, dict[str, Any]] = {}
    fresh: dict[str, Any] = {}
    servers = [(v, w) for w in args.workers for v in args.variants]
    for n, (variant, workers) in enumerate(servers):
        label = f"{variant}, {workers} worker{'s' if workers > 1 else ''}"
        port = free_port()
        print(f"server ({label}) on port {port}, seeding the store with the ML-1M log ...")
        t0 = time.perf_counter()
        proc = start_server(bundles[variant], samples, work, port, args.ort_threads, workers,
                            600)
        out: dict[str, Any] = {"server_ready_s": time.perf_counter() - t0, "concurrency": {},
                               "variant": variant, "workers": workers}
        url = f"http://127.0.0.1:{port}"
        try:
            hz = asyncio.run(healthz_ms(url, 210))
            out["healthz_ms"] = {"p50": pct(hz, 50), "p99": pct(hz, 99)}
            if args.server_warmup > 0:  # a fresh server (and store file) to steady state first
                asyncio.run(run_level(url, GOAL_CLIENTS, args.server_warmup, 0.0, users, items,
                                      args.events_share, seed=7, workers=workers))
            for c in args.levels:
                lv = asyncio.run(run_level(url, c, args.duration, args.warmup, users, items,
                                           args.events_share, seed=c, server_pid=proc.pid,
                                           workers=workers))
                out["concurrency"][str(c)] = s = summarize(lv)
                print(f"  {c:>2} clients: p50 {s['p50_ms']:.1f} p95 {s['p95_ms']:.1f} "
                      f"p99 {s['p99_ms']:.1f} ms, {s['requests_per_s']:.1f} req/s, "
                      f"{s['requests']} requests, {s['errors']} errors; CPU ms/request "
                      f"server {s['server_cpu_ms_per_request']:.2f} client "
                      f"{s['client_cpu_ms_per_request']:.2f}; stages p50 "
                      + " ".join(f"{k}={v['p50']:.1f}" for k, v in s["stages_ms"].items()))
            if n == 0:  # freshness with the primary variant only: it does not depend on the ranker
                print(f"freshness: {GOAL_CLIENTS} clients + a probe ...")
                # up to 120 s: the level ends when the probes are done
                lv = asyncio.run(run_level(url, GOAL_CLIENTS, 120.0, args.warmup, users, items,
                                           args.events_share, seed=99, probes=args.probes,
                                           workers=workers))
                fresh = {"p50": pct(lv.freshness_ms, 50), "p99": pct(lv.freshness_ms, 99),
                         "max": max(lv.freshness_ms, default=float("nan")),
                         "probes": len(lv.freshness_ms), "errors": len(lv.errors),
                         "load": summarize(lv)}
                print(f"  freshness p50 {fresh['p50']:.1f} p99 {fresh['p99']:.1f} ms "
                      f"over {fresh['probes']} probes, {len(lv.errors)} errors")
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        served[label] = out
    print("rank-stage input, before/after on the same requests ...")
    rows_ab = candidate_rows_ab(bundle, work / "feature_store.sqlite", args.ranked, 100)
    print(f"  rows+tensors {rows_ab['rows_tensors_ms']:.2f} ms, query_row+item_inputs "
          f"{rows_ab['query_row_item_inputs_ms']:.2f} ms")

    argv = " ".join(sys.argv[1:])
    result = {
        "bundle": "ml-1m", "retrieved": args.retrieved, "ranked": args.ranked,
        "concurrency": served[next(iter(served))]["concurrency"], "freshness_ms": fresh,
        "headline": next(iter(served)), "variant": servers[0][0], "workers": servers[0][1],
        "servers": served, "ort_threads": args.ort_threads,
        "duration_s": args.duration, "warmup_s": args.warmup, "events_share": args.events_share,
        "server_warmup_s": args.server_warmup,
        "ranker_cost": cost, "matmul": peak, "candidate_rows": rows_ab,
        "ranker_config": args.ranker_config, "ranker_selection": selection,
        "ranker_run": str(ranker), "ranker_training": (
            f"{train_result['result']['steps']} steps of batch "
            f"{train_result['train_config']['batch_size']}, valid AUC "
            f"{train_result['result']['best_valid_auc']:.4f}" if train_result else "elsewhere"),
        "loadavg_start": list(load0), "loadavg_end": list(os.getloadavg()),
        "date": now(), "machine": machine(),
        "command": f"python benchmarks/bench_serving.py {argv}".strip(),
        "workdir": str(Path(args.workdir)),
    }
    path = write_result(args.name, result)
    print(f"wrote {path}")
    if not args.no_markdown:
        update_section("serving", markdown(result))


if __name__ == "__main__":
    main()
