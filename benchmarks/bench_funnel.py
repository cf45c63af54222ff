"""Three-layer funnel benchmark, protocol P2 (issue 25): what each millisecond of server time
buys in NDCG@10.

On one P2 protocol (../shared/PROTOCOL.md): the counting sources, the two-tower, BST and a light
ranker (DIN) are trained on the train split as in bench_retrieval.py; the distilled pre-ranker
(ranking/prerank.py) is trained on BST's logits over retrieved candidates of train samples,
its epoch chosen on valid samples' candidates (training/distill.py). Then for the test queries
(``--queries`` of them, seeded; every label-1 test sample when 0), with the merged candidates of
the serving pipeline's default quotas (serving/config.py), each configuration orders the
candidates and NDCG@10 / Recall@10 are averaged over the queries:

- ``two_tower_only``: every candidate by the two-tower logit u.v/T;
- ``bst_all``: every candidate by BST;
- ``two_layer`` (today's pipeline): the two-tower's top N3 by BST, the rest in two-tower order;
- ``points`` (the three layers): every candidate by the pre-ranker, its top N2 by DIN, DIN's top
  N3 by BST; each layer's rest stays in the previous layer's order.

A model's order is by the two-tower logit plus the model's log-sigmoid (log P(watch) + log
P(like | watch), bench_retrieval.py's funnel): the rankers are trained on P1 labels (rating >= 4
among rated movies), so alone they know how much a watched movie is liked, not whether it is
watched.

Server time: for ``--timing-requests`` of the test queries, each configuration end to end on one
request as the server runs it (every model's graphs as a bundle holds them, in ONNX Runtime, one
thread: a request-shaped graph over the candidates' item inputs, or, for the models that split
their item parts off (the pre-ranker's item vectors), over rows of those parts computed once for
the catalogue; the scores sorted at each layer), all
configurations interleaved per request; the median over requests. It counts what follows the
match stage (the same for every configuration), whose median per request is reported apart.

    python benchmarks/bench_funnel.py [--protocol ml100k-retrieval] [--queries 1000]

Results: ``benchmarks/results/funnel.json`` and ``.png`` for ml100k-retrieval, the issue's file;
``funnel_<protocol>.json`` and ``.png`` for another protocol, each with its BENCHMARKS.md section.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_retrieval import DATASETS, RANKER_TRAIN, bst_logits, console, fit_counting_sources
from bstrec.config import from_dict
from bstrec.data.samples import SampleSet
from bstrec.features.spec import FeatureSpec
from bstrec.ranking.export import (
    export_ranker,
    export_request_parts,
    export_request_ranker,
    splits_items,
)
from bstrec.ranking.prerank import PreRankConfig, PreRanker
from bstrec.ranking.request import item_names, shared_names
from bstrec.retrieval.candidates import CandidateGenerator
from bstrec.retrieval.catalog import Catalog, QuerySet
from bstrec.retrieval.index import IndexConfig, build_index
from bstrec.retrieval.topk import list_metrics
from bstrec.retrieval.train import (
    RetrieverTrainConfig,
    item_vectors,
    load_retriever,
    train_two_tower,
    user_vectors,
)
from bstrec.retrieval.two_tower import TwoTowerConfig
from bstrec.serving.config import PipelineConfig
from bstrec.serving.runtime import RankerRuntime
from bstrec.training.checkpoint import load_checkpoint, save_checkpoint
from bstrec.training.distill import (
    PRERANK,
    DistillConfig,
    build_prerank,
    distillation_rows,
    train_prerank,
)
from bstrec.training.task import train_ranker
from bstrec.training.tensors import TensorSplit
from common import RESULTS, machine, now, update_section, write_result

DEFAULT_PROTOCOL = "ml100k-retrieval"


def result_name(protocol: str) -> str:
    """funnel (.json, .png, the BENCHMARKS.md section) for the default protocol, the issue's
    results file; funnel_<protocol> for the others."""
    return "funnel" if protocol == DEFAULT_PROTOCOL else f"funnel_{protocol}"


def samples_for(protocol: str, data_dir: Path, workdir: Path) -> Path:
    from bstrec.data.build import build

    out = workdir / "samples"
    if not (out / "manifest.json").exists():
        build(DATASETS[protocol], out, data_dir=data_dir)
    return out


def ranked(ids: np.ndarray, key: np.ndarray, depth: np.ndarray | int | None = None) -> np.ndarray:
    """Rows of ``ids`` (-1 = none) ordered by ``key`` (best first); with ``depth`` only each
    row's first ``depth`` entries are reordered, the rest keep their place."""
    key = np.where(ids >= 0, key, -np.inf)
    if depth is None:
        order = np.argsort(-key, axis=1, kind="stable")
        out: np.ndarray = np.take_along_axis(ids, order, 1)
        return out
    d = int(depth)
    out = ids.copy()
    order = np.argsort(-key[:, :d], axis=1, kind="stable")
    out[:, :d] = np.take_along_axis(ids[:, :d], order, 1)
    return out


def log_sigmoid(z: np.ndarray) -> np.ndarray:
    out: np.ndarray = -np.logaddexp(0.0, -z)
    return out


class Offline:
    """Every model's logit on every (query, merged candidate) pair, and the lists they give."""

    def __init__(self, cands: np.ndarray, tt: np.ndarray, pre: np.ndarray, light: np.ndarray,
                 bst: np.ndarray, targets: np.ndarray) -> None:
        self.cands, self.targets = cands, targets
        self.tt = np.where(cands >= 0, tt, -np.inf)
        # each model's key: log P(watch) (the two-tower logit) + log P(like | watch)
        self.keys = {"pre": self.tt + log_sigmoid(pre), "light": self.tt + log_sigmoid(light),
                     "bst": self.tt + log_sigmoid(bst)}
        self.keys["pre_uncached"] = self.keys["pre"]

    def _reorder(self, ids_pos: np.ndarray, model: str, depth: int) -> np.ndarray:
        """Positions (Q, K) into the candidates, in the previous layer's order -> the first
        ``depth`` reordered by ``model``'s key."""
        key = np.take_along_axis(self.keys[model], ids_pos, 1)
        return ranked(ids_pos, key, depth)

    def metrics(self, layers: list[tuple[str, int]]) -> dict[str, float]:
        """``layers``: (model, depth) applied in turn to the two-tower order."""
        pos = np.broadcast_to(np.arange(self.cands.shape[1]), self.cands.shape)
        pos = ranked(pos.copy(), self.tt)
        for model, depth in layers:
            pos = self._reorder(pos, model, depth)
        ids = np.take_along_axis(self.cands, pos, 1)
        m = list_metrics(ids, self.targets, ks=(10,))
        return {"ndcg@10": round(m["ndcg@10"], 4), "recall@10": round(m["recall@10"], 4)}


class Server:
    """One request end to end, as the service scores it (module docstring)."""

    def __init__(self, graphs: dict[str, RankerRuntime], spec: FeatureSpec, catalog: Catalog,
                 vecs: np.ndarray, temperature: float) -> None:
        self.graphs = graphs
        self.items = {n: catalog.features[n].numpy() for n in item_names(spec)}
        # item parts of every catalogue item, where a model's request graph reads them (the
        # pipeline caches them per item table, serving/pipeline.py)
        self.parts = {n: g.item_parts(self.items) for n, g in graphs.items()}
        self.shared_names = shared_names(spec)
        self.vecs, self.t = vecs, temperature

    def logits(self, model: str, shared: dict[str, np.ndarray], top: np.ndarray) -> np.ndarray:
        parts = self.parts[model]
        if parts is not None:
            return self.graphs[model].logits_request(shared, {}, parts[top])
        return self.graphs[model].logits_request(shared, {n: v[top] for n, v in
                                                          self.items.items()})

    def run(self, row: dict[str, np.ndarray], u: np.ndarray, cands: np.ndarray,
            layers: list[tuple[str, int]]) -> tuple[np.ndarray, list[float]]:
        """(K,) merged candidate ids, ``layers`` (model, depth) -> the final (K,) order and
        the milliseconds of each stage: the two-tower order, then each layer."""
        t0 = time.perf_counter()
        tt = self.vecs[cands] @ u / self.t  # (K,)
        order = np.argsort(-tt, kind="stable")
        ids, tt = cands[order], tt[order]
        shared = {n: row[n] for n in self.shared_names}
        laps = []
        for model, depth in layers:
            t1 = time.perf_counter()
            laps.append((t1 - t0) * 1e3)
            t0 = t1
            d = min(depth, len(ids))
            top = ids[:d]
            logits = self.logits(model, shared, top)
            key = tt[:d] + log_sigmoid(logits)
            o = np.argsort(-key, kind="stable")
            ids = np.concatenate([top[o], ids[d:]])
            tt = np.concatenate([tt[:d][o], tt[d:]])
        laps.append((time.perf_counter() - t0) * 1e3)
        return ids, laps


def configurations(n2s: list[int], n3s: list[int], total: int
                   ) -> dict[str, tuple[str, dict[str, int], list[tuple[str, int]]]]:
    """name -> (group, its sizes, layers)."""
    out: dict[str, tuple[str, dict[str, int], list[tuple[str, int]]]] = {
        "two_tower_only": ("two_tower_only", {}, []),
        "bst_all": ("bst_all", {}, [("bst", total)]),
        "prerank_only": ("prerank_only", {}, [("pre", total)]),
        # the same pre-ranker scoring the candidates' item inputs: what the vector cache saves
        "prerank_only_uncached": ("prerank_only_uncached", {}, [("pre_uncached", total)]),
    }
    for n3 in sorted({*n3s, *n2s}):
        out[f"two_layer_{n3}"] = ("two_layer", {"n3": n3}, [("bst", n3)])
    for n2 in n2s:
        for n3 in n3s:
            if n3 < n2:
                out[f"funnel_{n2}_{n3}"] = ("points", {"n2": n2, "n3": n3},
                                            [("pre", total), ("light", n2), ("bst", n3)])
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    protocol = args.protocol
    workdir = Path(args.workdir) / protocol
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    sdir = samples_for(protocol, Path(args.data_dir), workdir)
    samples = SampleSet.load(sdir)
    spec = samples.spec
    catalog = Catalog.from_samples(samples)
    test_all = QuerySet.from_samples(samples, "test")
    rng = np.random.default_rng(args.seed)
    rows = np.arange(len(test_all)) if not args.queries or args.queries >= len(test_all) else \
        np.sort(rng.choice(len(test_all), size=args.queries, replace=False))
    test = test_all.subset(rows)
    console.log(f"{protocol}: {len(test):,} of {len(test_all):,} test queries")
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    pop, cf = fit_counting_sources(samples, catalog, *_counting_configs())
    tt_dir = workdir / "two_tower"
    tt_train = from_dict(RetrieverTrainConfig, {**args.tt_train, "num_threads": threads})
    if not (tt_dir / "best").exists():
        _, res = train_two_tower(samples, tt_train, from_dict(TwoTowerConfig, {"encoder": "mean"}),
                                 out_dir=tt_dir, console=console)
        (tt_dir / "result.json").write_text(json.dumps(res.to_dict(), indent=2) + "\n")
    tt, _ = load_retriever(tt_dir)
    vecs = item_vectors(tt, catalog).numpy()
    index = build_index(catalog.candidates, vecs[catalog.candidates], IndexConfig(kind="exact"))
    cand_cfg = PipelineConfig().candidates
    gen = CandidateGenerator(catalog, model=tt, index=index, item_cf=cf, popular=pop,
                             config=cand_cfg)
    seconds["sources"] = time.perf_counter() - t0

    rankers: dict[str, torch.nn.Module] = {}
    valid_auc: dict[str, float | None] = {}
    for name, model_name in (("bst", "bst"), ("light", "din")):
        d = workdir / name
        t0 = time.perf_counter()
        if not (d / "best").exists():
            train_ranker(model_name, sdir, d, train_overrides={**RANKER_TRAIN,
                                                               "num_threads": threads},
                         console=console, progress=False)
        ck = load_checkpoint(d / "best")
        rankers[name] = ck.model.eval()
        valid_auc[name] = ck.metrics.get("valid_auc")
        seconds[f"train_{name}"] = time.perf_counter() - t0

    # the pre-ranker, one per training seed (init and shuffling; the same distillation rows,
    # drawn with --seed): the model comparison carries the seeds' spread
    t0 = time.perf_counter()
    pre_cfg = from_dict(PreRankConfig, args.prerank)
    cfgs = {s: from_dict(DistillConfig, {**args.distill, "seed": s, "num_threads": threads})
            for s in args.seeds}
    rows_cache: list[TensorSplit] = []
    students: dict[int, torch.nn.Module] = {}
    distill: dict[int, dict[str, Any]] = {}
    for s, distill_cfg in cfgs.items():
        pre_dir = workdir / "prerank" / f"seed{s}"
        if not (pre_dir / "checkpoint.json").exists():
            if not rows_cache:
                rows_cache += [
                    distillation_rows(samples, "train", gen, rankers["bst"],
                                      args.distill_samples, args.distill_k, args.seed),
                    distillation_rows(samples, "valid", gen, rankers["bst"],
                                      args.distill_samples // 4, args.distill_k, args.seed + 1)]
            d_train, d_valid = rows_cache
            torch.manual_seed(s)
            student = PreRanker(spec, pre_cfg)
            dres = train_prerank(student, d_train, d_valid, distill_cfg)
            save_checkpoint(pre_dir, student, PRERANK, spec, samples.vocabs,
                            metrics={**dres.to_dict(), "train_rows": len(d_train),
                                     "valid_rows": len(d_valid)},
                            train_config=asdict(distill_cfg))
        pre_ck = load_checkpoint(pre_dir, builder=build_prerank)
        students[s] = pre_ck.model.eval()
        distill[s] = dict(pre_ck.metrics)
    first = args.seeds[0]
    rankers["pre"] = students[first]  # the one timed (every seed has the same architecture)
    rankers["pre_uncached"] = students[first]  # exported without its item-vector graph
    seconds["distill"] = time.perf_counter() - t0

    # offline: every model on every merged candidate of the test queries
    t0 = time.perf_counter()
    merged, _ = gen.generate(test)
    cands = merged.ids
    u = user_vectors(tt, test.data).numpy()
    tt_logit = np.einsum("qd,qkd->qk", u, vecs[np.maximum(cands, 0)]) / tt_train.temperature
    # BST's and DIN's logits are the slow part: kept for reruns on the same queries
    cache = workdir / f"logits_q{len(test)}_seed{args.seed}.npz"
    if cache.exists() and np.array_equal(np.load(cache)["cands"], cands):
        logits = {k: np.load(cache)[k] for k in ("bst", "light")}
    else:
        logits = {n: bst_logits(rankers[n], test, catalog, cands)[0] for n in ("bst", "light")}
        np.savez(cache, cands=cands, **logits)
    pre_logits = {s: bst_logits(m, test, catalog, cands)[0] for s, m in students.items()}
    seconds["offline_scoring"] = time.perf_counter() - t0
    total = cands.shape[1]
    configs = configurations(args.n2, args.n3, total)
    per_seed = {s: {name: Offline(cands, tt_logit, pre_logits[s], logits["light"],
                                  logits["bst"], test.targets).metrics(layers)
                    for name, (_, _, layers) in configs.items()} for s in args.seeds}
    quality: dict[str, dict[str, Any]] = {}
    for name, (_, _, layers) in configs.items():
        q = {m: round(float(np.mean([per_seed[s][name][m] for s in args.seeds])), 4)
             for m in ("ndcg@10", "recall@10")}
        if any(model == "pre" for model, _ in layers):  # the seeds matter: show each
            q["ndcg@10_by_seed"] = [per_seed[s][name]["ndcg@10"] for s in args.seeds]
        quality[name] = q

    # server time per request: exported graphs, one thread, configurations interleaved
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        graphs = {}
        for name, m in rankers.items():
            # the graphs a bundle holds (serving/bundle.py): batch, request, item parts
            batch, request, parts = (Path(tmp) / f"{name}{x}.onnx" for x in ("", "_req", "_items"))
            export_ranker(m, spec, batch)
            if splits_items(m) and name != "pre_uncached":
                export_request_parts(m, spec, request, parts)
            else:
                export_request_ranker(m, spec, request)
            graphs[name] = RankerRuntime(batch, threads=1, request_path=request,
                                         items_path=parts if parts.exists() else None)
        server = Server(graphs, spec, catalog, vecs, tt_train.temperature)
        times: dict[str, list[float]] = {n: [] for n in configs}
        laps: dict[str, list[list[float]]] = {n: [] for n in configs}
        match_ms: list[float] = []
        req_rows = np.arange(min(args.timing_requests, len(test)))
        for q in req_rows:
            row = {k: v.numpy() for k, v in test.data.batch(torch.tensor([int(q)])).items()}
            sub = test.subset(np.array([q]))
            t1 = time.perf_counter()
            m1, _ = gen.generate(sub)
            match_ms.append((time.perf_counter() - t1) * 1e3)
            c = m1.ids[0][m1.ids[0] >= 0]
            for name, (_, _, layers) in configs.items():
                t1 = time.perf_counter()
                _, lap = server.run(row, u[q], c, layers)
                times[name].append((time.perf_counter() - t1) * 1e3)
                laps[name].append(lap)
    seconds["timing"] = time.perf_counter() - t0
    ms = {n: round(float(np.median(v)), 3) for n, v in times.items()}

    def entry(name: str) -> dict[str, Any]:
        sizes = configs[name][1]
        stages = ["two_tower", *(m for m, _ in configs[name][2])]
        per_stage = np.median(np.array(laps[name]), axis=0)
        return {**sizes, **quality[name], "server_ms": ms[name],
                "stage_ms": {s: round(float(v), 3) for s, v in zip(stages, per_stage,
                                                                     strict=True)}}

    return {
        "protocol": protocol, "date": now(), "machine": machine(), "threads": threads,
        "command": "python benchmarks/bench_funnel.py " + " ".join(sys.argv[1:]),
        "queries": len(test), "queries_in_protocol": len(test_all),
        "timing_requests": len(req_rows),
        "candidates": {"quotas": [list(q) for q in cand_cfg.quotas],
                       "mean_per_query": round(float((cands >= 0).sum(1).mean()), 1),
                       "max": total},
        "points": [entry(n) for n, c in configs.items() if c[0] == "points"],
        "bst_all": entry("bst_all"),
        "two_tower_only": entry("two_tower_only"),
        "prerank_only": entry("prerank_only"),
        "prerank_only_uncached": entry("prerank_only_uncached"),
        "two_layer": [entry(n) for n, c in configs.items() if c[0] == "two_layer"],
        "match_ms": round(float(np.median(match_ms)), 3),
        "models": {"bst": {"train": RANKER_TRAIN, "valid_auc": valid_auc["bst"]},
                   "light": {"model": "din", "train": RANKER_TRAIN,
                             "valid_auc": valid_auc["light"]},
                   "prerank": {"config": asdict(pre_cfg), "distill": asdict(cfgs[first]),
                               "seeds": args.seeds,
                               "distill_samples": args.distill_samples,
                               "candidates_per_sample": args.distill_k,
                               "best_epoch": [distill[s].get("best_epoch") for s in args.seeds],
                               "history": {str(s): distill[s].get("history")
                                           for s in args.seeds},
                               "train_rows": distill[first].get("train_rows"),
                               "n_parameters": sum(p.numel() for p in rankers["pre"].parameters())},
                   "n_parameters": {n: sum(p.numel() for p in m.parameters())
                                    for n, m in rankers.items()}},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }


def _counting_configs() -> tuple[Any, Any]:
    from bstrec.retrieval.item_cf import ItemCFConfig
    from bstrec.retrieval.popular import PopularConfig

    return PopularConfig(), ItemCFConfig()


def plot(r: dict[str, Any]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    series: list[tuple[str, list[dict[str, Any]], str, Callable[[dict[str, Any]], str]]] = [
        ("three layers (pre-ranker, DIN on N2, BST on N3)", r["points"], "o",
         lambda p: f"{p['n2']}/{p['n3']}"),
        ("two layers (two-tower, BST on N3)", r["two_layer"], "s", lambda p: f"{p['n3']}"),
    ]
    for label, pts, marker, name in series:
        pts = sorted(pts, key=lambda p: p["server_ms"])
        ax.plot([p["server_ms"] for p in pts], [p["ndcg@10"] for p in pts], marker=marker,
                linestyle="none", label=label)
        for p in pts:
            ax.annotate(name(p), (p["server_ms"], p["ndcg@10"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    for key, marker, label in (("two_tower_only", "v", "two-tower only"),
                               ("prerank_only", "D", "pre-ranker only"),
                               ("bst_all", "^", "BST on every candidate")):
        p = r[key]
        ax.plot([p["server_ms"]], [p["ndcg@10"]], marker=marker, linestyle="none", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("server time per request after match, ms (median, log scale)")
    ax.set_ylabel("NDCG@10")
    ax.set_title(f"{r['protocol']}: {r['queries']} test queries, "
                 f"{r['candidates']['mean_per_query']:.0f} candidates each")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{result_name(r['protocol'])}.png", dpi=110)


def markdown(r: dict[str, Any]) -> str:
    m, name = r["machine"], result_name(r["protocol"])
    pre = r["models"]["prerank"]
    lines = [
        f"## Funnel (P2, {r['protocol']}): what each millisecond of server time buys",
        "",
        f"`{r['command'].strip()}` on {r['date']}, {m['cores']} cores ({m['cpu']}), "
        f"{r['threads']} torch threads for training; protocol {r['protocol']}, "
        f"{r['queries']:,} test queries (seeded sample of {r['queries_in_protocol']:,}), merged "
        "candidates of the serving defaults (quotas "
        + " / ".join(f"{n} {q}" for n, q in r["candidates"]["quotas"])
        + f"; {r['candidates']['mean_per_query']:.0f} per query on average). BST and DIN: one "
        "epoch of `train_ranker`; the pre-ranker "
        f"({pre['n_parameters']:,} parameters, pooled history, no attention) distilled from "
        f"BST's logits on {pre['candidates_per_sample']} merged candidates of each of "
        f"{pre['distill_samples']:,} train samples plus their true labels "
        f"(`training/distill.py`), trained with seeds {pre['seeds']} (best epochs "
        f"{pre['best_epoch']} by valid loss); rows with the pre-ranker give the mean over those "
        "seeds and each seed's NDCG@10. Each model orders its "
        "candidates by the two-tower logit plus its log-sigmoid. Server time: every "
        "configuration end to end on one request (the bundle's ONNX graphs, the pre-ranker's "
        "item vectors cached per catalogue item, one thread), median over "
        f"{r['timing_requests']} requests; the match stage before it "
        f"(the same for all) took a median {r['match_ms']:.1f} ms. Plot: "
        f"`benchmarks/results/{name}.png`; data: `benchmarks/results/{name}.json`.",
        "",
        "| configuration | N2 | N3 | NDCG@10 | NDCG@10 by seed | Recall@10 | server ms | "
        "ms per stage |",
        "|---|---:|---:|---:|---|---:|---:|---|",
    ]

    def row(name: str, p: dict[str, Any]) -> str:
        seeds = " / ".join(f"{x:.4f}" for x in p.get("ndcg@10_by_seed", []))
        stages = ", ".join(f"{k} {v:.2f}" for k, v in p.get("stage_ms", {}).items())
        return (f"| {name} | {p.get('n2', '')} | {p.get('n3', '')} | {p['ndcg@10']:.4f} | "
                f"{seeds} | {p['recall@10']:.4f} | {p['server_ms']:.2f} | {stages} |")

    lines.append(row("two-tower only", r["two_tower_only"]))
    lines.append(row("pre-ranker only", r["prerank_only"]))
    if "prerank_only_uncached" in r:
        lines.append(row("pre-ranker only, item vectors not cached",
                         r["prerank_only_uncached"]))
    lines += [row("two layers: two-tower, BST", p) for p in r["two_layer"]]
    lines += [row("three layers: pre-ranker, DIN, BST", p) for p in r["points"]]
    lines.append(row("BST on every candidate", r["bst_all"]))
    lines += ["", f"Valid AUC (P1 labels): BST {r['models']['bst']['valid_auc']:.4f}, DIN "
              f"{r['models']['light']['valid_auc']:.4f} (one training seed each: rows that "
              "differ only in BST's or DIN's depth share those models). The key's two-tower "
              "part u.v/T (T = 0.05) spans far more than a log-sigmoid (at most a few units) "
              "can move, so each layer reorders within near-ties of the two-tower order: the "
              "gap between two-tower only and BST on every candidate is all that the layers "
              "together can add here.", ""]
    same = [p for p in r["points"] if len(set(p.get("ndcg@10_by_seed", []))) == 1]
    lines[-2] += (f" {len(same)} of the {len(r['points'])} three-layer rows came out the same "
                  "for every pre-ranker seed.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--protocol", default=DEFAULT_PROTOCOL, choices=list(DATASETS))
    ap.add_argument("--data-dir", default=os.environ.get("BSTREC_DATA_DIR", "../shared/data"))
    ap.add_argument("--workdir", default="artifacts/bench-funnel")
    ap.add_argument("--queries", type=int, default=1000,
                    help="test queries scored (seeded sample); 0 = all")
    ap.add_argument("--timing-requests", type=int, default=200)
    ap.add_argument("--n2", type=int, nargs="+", default=[50, 100, 200])
    ap.add_argument("--n3", type=int, nargs="+", default=[10, 25, 50])
    ap.add_argument("--distill-samples", type=int, default=8000,
                    help="train samples whose merged candidates the pre-ranker learns from")
    ap.add_argument("--distill-k", type=int, default=15, help="candidates drawn per sample")
    ap.add_argument("--distill", type=json.loads, default={},
                    help="DistillConfig overrides as JSON")
    ap.add_argument("--prerank", type=json.loads, default={},
                    help="PreRankConfig overrides as JSON")
    ap.add_argument("--tt-train", type=json.loads, default={"max_epochs": 4},
                    help="two-tower train config overrides as JSON")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0,
                    help="draws the test queries and the distillation rows")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="training seeds of the pre-ranker (the first is timed)")
    ap.add_argument("--markdown-only", action="store_true",
                    help="rewrite the plot and BENCHMARKS.md section from the results file")
    args = ap.parse_args()
    name = result_name(args.protocol)
    if args.markdown_only:
        r = json.loads((RESULTS / f"{name}.json").read_text())
    else:
        if not (Path(args.data_dir) / DATASETS[args.protocol]).is_dir():
            raise SystemExit(f"{DATASETS[args.protocol]} not in {args.data_dir}: nothing measured")
        r = run(args)
        write_result(name, r)
    plot(r)
    update_section(name, markdown(r))


if __name__ == "__main__":
    main()
