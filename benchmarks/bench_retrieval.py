"""Retrieval benchmark, protocol P2 (ml1m-retrieval, ml100k-retrieval; ../shared/PROTOCOL.md).

For each protocol: build the P1 samples, fit popularity and item-to-item co-occurrence on the
train split, train the two-tower (epoch chosen on valid P2 queries), index its item vectors
(exact inner product), then on every test query (label-1 test sample; history as of its time;
seen items excluded; catalog = every movie seen in train):

- each source's own top 500 (two_tower, item_cf, popular, item2vec);
- the merged candidates (quotas two_tower 300 / item_cf 150 / popular 50, deduplicated,
  cold-start routing for users with no or few behaviours), in their own merged order, and
  ``merged+item2vec``: the same total with item2vec under its own quota (``--item2vec-quota``,
  taken from two_tower and item_cf in proportion), and the share of targets each source put
  into it;
- item2vec (skip-gram over sessions, retrieval/item2vec.py) trained by both backends (gensim,
  torch) over a grid of learning rates and epochs each (``--item2vec-grid``), ``--seeds``
  seeds a cell: train time and valid Recall/NDCG; the model kept for the test rows is the
  fastest cell whose mean valid Recall@50 is within ``--equal-recall`` of the best cell's (the
  faster at equal recall; selection on valid, test once);
- the full funnel: the merged candidates pre-ranked by the two-tower's dot product, the top
  ``--rerank`` of them ranked with a BST ranker trained by ``train_ranker("bst", ...)`` (see
  ``funnel``), followed by the rest in pre-rank order.

Recall@10/50/100/200/500 and NDCG@10 averaged over the queries. Models and samples are cached
in ``--workdir`` (``--retrain`` trains again). ``--skip-funnel`` leaves out the BST funnel
(its BST pass is most of ML-1M's run time).

    python benchmarks/bench_retrieval.py [--protocols ml1m-retrieval ml100k-retrieval]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bstrec.config import from_dict
from bstrec.data.build import build
from bstrec.data.samples import SampleSet
from bstrec.retrieval.candidates import SOURCES, CandidateConfig, CandidateGenerator
from bstrec.retrieval.catalog import Catalog, QuerySet, item_feature_names
from bstrec.retrieval.coldstart import COLD, FEW, REGULAR, route
from bstrec.retrieval.index import IndexConfig, build_index
from bstrec.retrieval.item2vec import Item2Vec, Item2VecConfig
from bstrec.retrieval.item_cf import ItemCF, ItemCFConfig
from bstrec.retrieval.merge import Candidates
from bstrec.retrieval.popular import PopularConfig, Popularity
from bstrec.retrieval.topk import KS, list_metrics
from bstrec.retrieval.train import (
    RetrieverTrainConfig,
    item_vectors,
    load_retriever,
    retrieve,
    train_two_tower,
    user_vectors,
)
from bstrec.retrieval.two_tower import TwoTower, TwoTowerConfig
from bstrec.training.checkpoint import load_checkpoint
from bstrec.training.task import train_ranker
from common import RESULTS, machine, now, update_section, write_result

DATASETS = {"ml1m-retrieval": "ml-1m", "ml100k-retrieval": "ml-100k"}
# item2vec cells per backend (overrides of Item2VecConfig), the library's former defaults first
# (word2vec's alpha for gensim); the others bracket each backend's best recall and time on
# both MovieLens protocols' valid queries (results/retrieval_*.json, "item2vec": gensim
# diverged on ML-1M at alpha 0.2, and gained on both up to 40 epochs at 0.1)
ITEM2VEC_GRID: dict[str, list[dict[str, Any]]] = {
    "torch": [{"lr": 0.01, "epochs": 10}, {"lr": 0.03, "epochs": 5}, {"lr": 0.03, "epochs": 10},
              {"lr": 0.03, "epochs": 20}],
    "gensim": [{"lr": 0.025, "epochs": 10}, {"lr": 0.1, "epochs": 10}, {"lr": 0.1, "epochs": 20},
               {"lr": 0.1, "epochs": 40}, {"lr": 0.2, "epochs": 20}],
}
RANKER_TRAIN = {"max_epochs": 1, "batch_size": 512, "patience": 0}
console = Console(stderr=True)


def samples_for(protocol: str, data_dir: Path, workdir: Path) -> Path:
    out = workdir / protocol / "samples"
    if not (out / "manifest.json").exists():
        build(DATASETS[protocol], out, data_dir=data_dir)
    return out


def fit_counting_sources(samples: SampleSet, catalog: Catalog, pop_cfg: PopularConfig,
                         cf_cfg: ItemCFConfig) -> tuple[Popularity, ItemCF]:
    train = samples.splits["train"]
    sizes = {f.name: f.vocab_size for f in samples.spec.features}
    pop = Popularity.fit(train, catalog.features["category"].numpy(),
                         samples.spec.vocab_size("category"), sizes, pop_cfg)
    return pop, ItemCF.fit(train, catalog.size, cf_cfg)


@torch.no_grad()
def bst_logits(ranker: torch.nn.Module, queries: QuerySet, catalog: Catalog, ids: np.ndarray,
               chunk: int = 16_384) -> tuple[np.ndarray, float]:
    """(Q, R) candidate ids (-1 = none) -> (Q, R) BST logits (-inf at -1), pairs per second."""
    ranker.eval()
    out = np.full(ids.shape, -np.inf, dtype=np.float32)
    qi, ci = np.nonzero(ids >= 0)  # (pairs,) query row, candidate column
    item_cols = item_feature_names(catalog.spec)
    t0 = time.perf_counter()
    with Progress(console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task("BST ranking", total=len(qi))
        for lo in range(0, len(qi), chunk):
            q, c = qi[lo:lo + chunk], ci[lo:lo + chunk]
            batch = queries.data.batch(torch.from_numpy(q))
            items = catalog.batch(torch.from_numpy(ids[q, c]))
            for name in item_cols:  # the candidate becomes the sample's target item
                batch[name] = items[name]
            out[q, c] = ranker(batch).float().numpy()
            bar.advance(task, len(q))
    return out, len(qi) / max(time.perf_counter() - t0, 1e-9)


def sort_rows(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    order = np.argsort(-scores, axis=1, kind="stable")
    out: np.ndarray = np.take_along_axis(ids, order, 1)
    return out


def funnel(model: TwoTower, ranker: torch.nn.Module, queries: QuerySet, catalog: Catalog,
           vecs: np.ndarray, cands: np.ndarray, depth: int, temperature: float,
           bst_only: bool = False) -> tuple[dict[str, np.ndarray], float]:
    """Merged candidates -> pre-rank -> BST rank. Returns the final lists and two diagnostics:

    - ``prerank``: every merged candidate ordered by its two-tower logit u.v / T (a dot
      product per candidate: the pre-rank stage of DESIGN.md);
    - ``funnel``: the pre-ranked top ``depth`` ordered by log P(watch) + log P(like | watch):
      the two-tower logit (a log-softmax over the catalog up to a per-query constant, trained
      on every rating) plus BST's log-sigmoid (trained on rated movies only, so it knows how
      much a watched movie is liked, not whether it is watched); the rest in pre-rank order;
    - ``bst_only`` (with ``bst_only``): the merged top ``depth`` ordered by the BST logit
      alone, the rest in merged order (a diagnostic: it costs a second BST pass).
    """
    u = user_vectors(model, queries.data)
    safe = np.maximum(cands, 0)
    pre = np.einsum("qd,qkd->qk", u.numpy(), vecs[safe]) / temperature  # (Q, K)
    pre = np.where(cands >= 0, pre, -np.inf)
    order = np.argsort(-pre, axis=1, kind="stable")
    pre_ids = np.take_along_axis(cands, order, 1)
    pre_s = np.take_along_axis(pre, order, 1)
    top = pre_ids[:, :depth]
    logit, rate = bst_logits(ranker, queries, catalog, top)
    combined = pre_s[:, :depth] + torch.nn.functional.logsigmoid(torch.from_numpy(logit)).numpy()
    final = pre_ids.copy()
    final[:, :depth] = sort_rows(top, np.where(top >= 0, combined, -np.inf))
    out = {"prerank": pre_ids, "funnel": final}
    if bst_only:
        m_top = cands[:, :depth]
        m_logit, _ = bst_logits(ranker, queries, catalog, m_top)
        out["bst_only"] = cands.copy()
        out["bst_only"][:, :depth] = sort_rows(m_top, m_logit)
    return out, rate


def run(protocol: str, args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(args.workdir) / protocol
    sdir = samples_for(protocol, Path(args.data_dir), Path(args.workdir))
    samples = SampleSet.load(sdir)
    catalog = Catalog.from_samples(samples)
    test = QuerySet.from_samples(samples, "test")
    console.log(f"{protocol}: {len(test):,} test queries, catalog {len(catalog.candidates):,}")
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)

    t0 = time.perf_counter()
    pop_cfg, cf_cfg = PopularConfig(), ItemCFConfig()
    pop, cf = fit_counting_sources(samples, catalog, pop_cfg, cf_cfg)
    fit_s = time.perf_counter() - t0

    tt_dir = workdir / "two_tower"
    train_cfg = from_dict(RetrieverTrainConfig, {**args.tt_train, "num_threads": threads})
    model_cfg = from_dict(TwoTowerConfig, args.tt_model)
    if args.retrain or not (tt_dir / "best").exists():
        _, tt_result = train_two_tower(samples, train_cfg, model_cfg, out_dir=tt_dir,
                                       console=console)
        (tt_dir / "result.json").write_text(json.dumps(tt_result.to_dict(), indent=2) + "\n")
    model, _ = load_retriever(tt_dir)
    tt_result_d = json.loads((tt_dir / "result.json").read_text())

    vecs = item_vectors(model, catalog).numpy()
    index = build_index(catalog.candidates, vecs[catalog.candidates], IndexConfig(kind="exact"))
    valid = QuerySet.from_samples(samples, "valid")
    i2v, i2v_cmp = compare_item2vec(samples, catalog, valid, args)
    cand_cfg = CandidateConfig()
    cand_i2v = dataclasses.replace(cand_cfg, quotas=with_item2vec(cand_cfg.quotas,
                                                                  args.item2vec_quota))
    gen = CandidateGenerator(catalog, model=model, index=index, item_cf=cf, popular=pop,
                             config=cand_cfg, item2vec=i2v)
    gen_i2v = CandidateGenerator(catalog, model=model, index=index, item_cf=cf, popular=pop,
                                 config=cand_i2v, item2vec=i2v)
    t0 = time.perf_counter()
    # one pass of the sources, merged under both quota sets (the default merge ignores item2vec)
    parts: dict[str, list[Candidates]] = {"merged": [], "merged+item2vec": []}
    per_source: dict[str, list[np.ndarray]] = {}
    for rows in gen.batches(test):
        batch_lists = gen.source_lists(test, rows)
        for n, v in batch_lists.items():
            per_source.setdefault(n, []).append(v)
        parts["merged"].append(gen.merge_rows(test, rows, batch_lists))
        parts["merged+item2vec"].append(gen_i2v.merge_rows(test, rows, batch_lists))
    lists = {n: np.concatenate(v) for n, v in per_source.items()}
    merges = {n: Candidates(np.concatenate([c.ids for c in v]),
                            np.concatenate([c.sources for c in v]), SOURCES)
              for n, v in parts.items()}
    merged = merges["merged"]
    gen_s = time.perf_counter() - t0

    sources: dict[str, dict[str, float]] = {}
    for name in ("two_tower", "item_cf", "popular", "item2vec"):
        sources[name] = list_metrics(lists[name], test.targets)
    for name, m in merges.items():
        sources[name] = list_metrics(m.ids, test.targets)

    bst_dir = workdir / "bst"
    diagnostics: dict[str, dict[str, float]] = {}
    pair_rate = float("nan")
    if not args.skip_funnel:
        if args.retrain or not (bst_dir / "best").exists():
            train_ranker("bst", sdir, bst_dir, train_overrides={**RANKER_TRAIN,
                                                                "num_threads": threads},
                         console=console)
        ranker = load_checkpoint(bst_dir / "best").model
        lists_f, pair_rate = funnel(model, ranker, test, catalog, vecs, merged.ids, args.rerank,
                                    train_cfg.temperature, bst_only=args.bst_only)
        sources["funnel"] = list_metrics(lists_f["funnel"], test.targets)
        diagnostics = {n: list_metrics(v, test.targets) for n, v in lists_f.items()
                       if n != "funnel"}

    # which sources put the target into the merged list (a hit may have several)
    found, share = {}, {}
    for name, m in merges.items():
        hit = m.ids == test.targets[:, None]
        found[name] = {n: float((hit & m.from_source(n)).any(1).mean()) for n in SOURCES}
        share[name] = {n: float(m.from_source(n)[m.ids >= 0].mean()) for n in SOURCES}
    m = merges["merged+item2vec"]
    hit = m.ids == test.targets[:, None]
    only_i2v = float((hit & (m.sources == 1 << SOURCES.index("item2vec"))).any(1).mean())
    paths = route(test.data.tensors["hist_mask"], cand_cfg.cold)
    bst_meta = json.loads((bst_dir / "best" / "checkpoint.json").read_text()) \
        if not args.skip_funnel else {}
    return {
        "protocol": protocol, "date": now(), "machine": machine(), "threads": threads,
        "command": "python benchmarks/bench_retrieval.py " + " ".join(sys.argv[1:]),
        "queries": len(test), "catalog": len(catalog.candidates),
        "targets_not_in_catalog": int((test.targets < 2).sum()),
        "sources": {n: {k: round(v, 4) for k, v in m.items()} for n, m in sources.items()},
        "funnel_diagnostics": {n: {k: round(v, 4) for k, v in m.items()}
                               for n, m in diagnostics.items()},
        "funnel_skipped": bool(args.skip_funnel),
        "merged_target_found_by": {k: round(v, 4) for k, v in found["merged"].items()},
        "merged_share_by_source": {k: round(v, 4) for k, v in share["merged"].items()},
        "merged_item2vec_target_found_by": {k: round(v, 4)
                                            for k, v in found["merged+item2vec"].items()},
        "merged_item2vec_target_found_by_item2vec_only": round(only_i2v, 4),
        "merged_item2vec_share_by_source": {k: round(v, 4)
                                            for k, v in share["merged+item2vec"].items()},
        "item2vec": i2v_cmp,
        "cold_start_paths": {"no_history": int((paths == COLD).sum()),
                             "few_events": int((paths == FEW).sum()),
                             "regular": int((paths == REGULAR).sum())},
        "config": {"popular": dataclasses.asdict(pop_cfg), "item_cf": dataclasses.asdict(cf_cfg),
                   "two_tower": dataclasses.asdict(model_cfg),
                   "two_tower_train": dataclasses.asdict(train_cfg),
                   "candidates": dataclasses.asdict(cand_cfg),
                   "candidates_item2vec": dataclasses.asdict(cand_i2v),
                   "rerank_depth": args.rerank,
                   "ranker": {"model": "bst", "train": RANKER_TRAIN,
                              "valid_auc": bst_meta.get("metrics", {}).get("valid_auc")}},
        "two_tower_training": {"best_epoch": tt_result_d["best_epoch"],
                               "valid_recall@50": tt_result_d["best_valid"],
                               "seconds": round(tt_result_d["seconds"], 1),
                               "history": tt_result_d["history"]},
        "seconds": {"fit_popular_item_cf": round(fit_s, 2), "generate_all_queries": round(gen_s, 2),
                    "bst_pairs_per_second": None if args.skip_funnel else round(pair_rate, 1)},
    }


def with_item2vec(quotas: tuple[tuple[str, int], ...], quota: int
                  ) -> tuple[tuple[str, int], ...]:
    """The quotas with item2vec's ``quota`` taken from two_tower and item_cf in proportion to
    theirs, so the merged list keeps its total (and its Recall@K stays comparable)."""
    q = dict(quotas)
    tt, cf = q.get("two_tower", 0), q.get("item_cf", 0)
    if quota > tt + cf:
        raise ValueError(f"item2vec quota {quota} exceeds two_tower + item_cf ({tt + cf})")
    d_tt = round(quota * tt / max(tt + cf, 1))
    q["two_tower"], q["item_cf"] = tt - d_tt, cf - (quota - d_tt)
    return (*((n, v) for n, v in q.items() if v > 0), ("item2vec", quota))


def item2vec_list(model: Item2Vec, catalog: Catalog, queries: QuerySet, k: int = 500
                  ) -> np.ndarray:
    """(Q, k) item2vec's own list of every query, seen items excluded."""
    gen = CandidateGenerator(catalog, item2vec=model)
    return np.concatenate([gen.source_lists(queries, rows, k, only=["item2vec"])["item2vec"]
                           for rows in gen.batches(queries)])


def compare_item2vec(samples: SampleSet, catalog: Catalog, valid: QuerySet,
                     args: argparse.Namespace) -> tuple[Item2Vec, dict[str, Any]]:
    """item2vec trained by each backend over its cells of ``args.item2vec_grid`` (learning rate
    and epochs), ``args.seeds`` seeds a cell: train seconds and valid metrics.

    The rule is "the faster at equal recall", and each backend's speed and recall both hang on
    its own learning rate and epochs (results/retrieval_*.json, "item2vec": gensim at
    word2vec's alpha of 0.025 stays far below torch), so backends are compared cell by cell: a
    cell has "equal recall" when its mean valid Recall@50 is within ``args.equal_recall`` of the
    best cell's, and the kept cell is the fastest of those (mean seconds). Its seed-0 model is
    returned."""
    train = samples.splits["train"]
    cells: list[dict[str, Any]] = []
    models: list[Item2Vec] = []
    for backend in args.item2vec_backends:
        for cell in args.item2vec_grid[backend]:
            runs = []
            for seed in range(args.seeds):
                cfg = from_dict(Item2VecConfig, {**args.item2vec, **cell, "backend": backend,
                                                 "seed": seed}, where="--item2vec")
                m = Item2Vec.fit(train, catalog.size, cfg)
                met = list_metrics(item2vec_list(m, catalog, valid), valid.targets)
                runs.append({"seed": seed, "seconds": m.info["seconds"],
                             **{f"valid_{k}": round(v, 4) for k, v in met.items()}})
                console.log(f"item2vec {backend} {cell} seed {seed}: {m.info['seconds']:.1f} s, "
                            f"valid recall@50 {met['recall@50']:.4f}")
                if seed == 0:
                    models.append(m)
            r50 = [r["valid_recall@50"] for r in runs]
            cells.append({"backend": backend, "lr": models[-1].config.start_lr,
                          "epochs": models[-1].config.n_epochs,
                          "seconds_mean": round(float(np.mean([r["seconds"] for r in runs])), 2),
                          "valid_recall@50_mean": round(float(np.mean(r50)), 4),
                          "valid_recall@50_std": round(float(np.std(r50)), 4),
                          "valid_ndcg@10_mean": round(float(np.mean([r["valid_ndcg@10"]
                                                                     for r in runs])), 4),
                          "runs": runs})
    best = max(c["valid_recall@50_mean"] for c in cells)
    for c in cells:
        c["equal_recall"] = c["valid_recall@50_mean"] >= best - args.equal_recall
    kept = min((i for i, c in enumerate(cells) if c["equal_recall"]),
               key=lambda i: cells[i]["seconds_mean"])
    model = models[kept]
    return model, {"kept": cells[kept]["backend"], "kept_cell": kept,
                   "rule": f"the fastest cell whose mean valid Recall@50 is within "
                   f"{args.equal_recall} of the best cell's",
                   "config": dataclasses.asdict(model.config), "train_info": model.info,
                   "cells": cells, "quota": args.item2vec_quota, "seeds": args.seeds}


ABLATIONS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    # (name, train overrides, model overrides) on top of the benchmark's two-tower settings
    ("default (mean encoder, logQ, in-batch only)", {}, {}),
    ("no logQ correction", {"logq": False}, {}),
    ("+16 uniform negatives", {"negatives": "uniform"}, {}),
    ("+16 popularity negatives", {"negatives": "popularity"}, {}),
    ("+16 hard negatives (from epoch 2)", {"negatives": "hard"}, {}),
    ("transformer encoder", {}, {"encoder": "transformer"}),
]


def ablation(protocol: str, args: argparse.Namespace) -> dict[str, Any]:
    """Two-tower variants on one protocol: test metrics of each (epoch chosen on valid)."""
    sdir = samples_for(protocol, Path(args.data_dir), Path(args.workdir))
    samples = SampleSet.load(sdir)
    catalog = Catalog.from_samples(samples)
    test = QuerySet.from_samples(samples, "test")
    valid = QuerySet.from_samples(samples, "valid")
    threads = args.threads or len(os.sched_getaffinity(0))
    rows = []
    for name, tr, mo in ABLATIONS:
        train_cfg = from_dict(RetrieverTrainConfig, {**args.tt_train, **tr, "num_threads": threads})
        model_cfg = from_dict(TwoTowerConfig, {**args.tt_model, **mo})
        model, res = train_two_tower(samples, train_cfg, model_cfg, console=console, valid=valid)
        _, ids = retrieve(model, catalog, test, 500)
        met = {k: round(v, 4) for k, v in list_metrics(ids, test.targets).items()}
        rows.append({"variant": name, "train": tr, "model": mo, "best_epoch": res.best_epoch,
                     "valid_recall@50": round(res.best_valid, 4), "seconds": round(res.seconds, 1),
                     "test": met})
        console.log(f"{name}: {met}")
    return {"protocol": protocol, "date": now(), "machine": machine(), "queries": len(test),
            "command": "python benchmarks/bench_retrieval.py " + " ".join(sys.argv[1:]),
            "base_train": args.tt_train, "base_model": args.tt_model, "variants": rows}


def ablation_markdown(r: dict[str, Any]) -> list[str]:
    lines = ["", f"**Two-tower variants on {r['protocol']}** (`{r['command'].strip()}`, "
             f"{r['date']}; epoch chosen on valid Recall@50, test figures):", "",
             "| variant | best epoch | valid Recall@50 | test Recall@50 | test Recall@200 | "
             "test NDCG@10 | train time (s) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for v in r["variants"]:
        m = v["test"]
        lines.append(f"| {v['variant']} | {v['best_epoch']} | {v['valid_recall@50']:.4f} | "
                     f"{m['recall@50']:.4f} | {m['recall@200']:.4f} | {m['ndcg@10']:.4f} | "
                     f"{v['seconds']:.0f} |")
    return lines


def item2vec_markdown(r: dict[str, Any]) -> list[str]:
    """The item2vec paragraph of one protocol: the backends' cells compared on valid, the kept
    one's share of the merged+item2vec targets."""
    iv = r["item2vec"]
    cfg = iv["config"]
    quotas = r["config"]["candidates_item2vec"]["quotas"]
    found = r["merged_item2vec_target_found_by"]
    cells = iv["cells"]
    lines = [f"item2vec (skip-gram with negative sampling over sessions cut at gaps over "
             f"{cfg['session_gap_minutes']:g} min; dim {cfg['dim']}, window {cfg['window']}, "
             f"{cfg['negatives']} negatives; query = decayed mean of the {cfg['query_items']} "
             f"latest behaviours' vectors, searched in an exact index); each backend over a "
             f"grid of learning rates (torch: Adam; gensim: word2vec's alpha, decayed linearly) "
             f"and epochs, {iv['seeds']} seeds a cell, {cfg['threads']} thread, valid queries:",
             "",
             "| backend | lr | epochs | train time (s, mean) | valid Recall@50 (mean ± std) "
             "| valid NDCG@10 | equal recall |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for i, c in enumerate(cells):
        lines.append(f"| {c['backend']}{' (kept)' if i == iv['kept_cell'] else ''} | {c['lr']:g} "
                     f"| {c['epochs']} | {c['seconds_mean']:.1f} | "
                     f"{c['valid_recall@50_mean']:.4f} ± {c['valid_recall@50_std']:.4f} | "
                     f"{c['valid_ndcg@10_mean']:.4f} | {'yes' if c['equal_recall'] else ''} |")
    k = cells[iv["kept_cell"]]
    others = []
    for b in dict.fromkeys(c["backend"] for c in cells):
        if b == k["backend"]:
            continue
        eq = [c for c in cells if c["backend"] == b and c["equal_recall"]]
        others.append(f"{b}'s fastest cell at equal recall took "
                      f"{min(c['seconds_mean'] for c in eq):.1f} s" if eq else
                      f"no {b} cell reached equal recall (its best: "
                      f"{max(c['valid_recall@50_mean'] for c in cells if c['backend'] == b):.4f})")
    lines += ["", f"Kept: {k['backend']}, lr {k['lr']:g}, {k['epochs']} epochs "
              f"({k['seconds_mean']:.1f} s; rule: {iv['rule']}"
              + "".join(f"; {o}" for o in others) + "); its seed-0 model gives the test rows "
              "`item2vec` and `merged+item2vec` (quotas "
              + " / ".join(f"{n} {q}" for n, q in quotas) + "). Targets in merged+item2vec, by "
              "the sources that proposed them: "
              + ", ".join(f"{k} {v:.4f}" for k, v in found.items() if v > 0)
              + "; proposed by item2vec alone: "
              f"{r['merged_item2vec_target_found_by_item2vec_only']:.4f} of the queries."]
    return lines


def markdown(results: list[dict[str, Any]]) -> str:
    r0 = results[0]
    m = r0["machine"]
    lines = [
        "## Retrieval (P2): candidate sources, merged candidates and the full funnel",
        "",
        f"`{r0['command'].strip()}` on {r0['date']}, {m['cores']} cores ({m['cpu']}). Queries: every "
        "label-1 test sample; the user's history as of its time; catalog = every movie seen in "
        "train; movies the user rated before are excluded. Popularity (half-life "
        f"{r0['config']['popular']['half_life_days']:.0f} days, per gender x age segment) and "
        "item-to-item co-occurrence are fitted on the train split; the two-tower is trained on "
        "it with in-batch sampled softmax (logQ correction, temperature "
        f"{r0['config']['two_tower_train']['temperature']}), epoch chosen on valid Recall@50. "
        "Merged = quotas " + " / ".join(f"{n} {q}" for n, q in r0["config"]["candidates"]["quotas"])
        + ", deduplicated, seen items removed, users with no or one-two behaviours on the "
        "cold-start paths, in merged order; funnel = the merged top "
        f"{r0['config']['rerank_depth']} after pre-rank, ranked with BST (one epoch of "
        "`train_ranker`), then the rest in pre-rank order.",
        "",
        "The funnel orders the merged candidates by the two-tower logit u.v/T (pre-rank: one dot "
        "product per candidate), then ranks the pre-ranked top ones by log P(watch) + log P(like | "
        "watch): the two-tower logit (a log-softmax over the catalog up to a per-query constant) "
        "plus BST's log-sigmoid. BST is trained on rated movies only (P1 labels: rating >= 4), so "
        "it knows how much a watched movie will be liked, not whether it will be watched; "
        "ordered by BST alone (diagnostic row `bst_only`, where measured) the merged candidates "
        "lose most of their NDCG@10. `prerank` is the pre-rank order without BST.",
        "",
    ]
    for r in results:
        lines += [f"**{r['protocol']}**: {r['queries']:,} queries, catalog {r['catalog']:,} "
                  f"({r['targets_not_in_catalog']} targets never rated in train: a miss for all)",
                  "",
                  "| source | " + " | ".join(f"Recall@{k}" for k in KS) + " | NDCG@10 |",
                  "|---|" + "---:|" * (len(KS) + 1)]
        rows = [*r["sources"].items(), *((f"({n}: diagnostic)", m) for n, m in
                                          r.get("funnel_diagnostics", {}).items())]
        for name, met in rows:
            lines.append(f"| {name} | " + " | ".join(f"{met[f'recall@{k}']:.4f}" for k in KS)
                         + f" | {met['ndcg@10']:.4f} |")
        tt = r["two_tower_training"]
        found = r["merged_target_found_by"]
        bst_rate = r["seconds"]["bst_pairs_per_second"]
        lines += ["", f"Two-tower: best epoch {tt['best_epoch']} (valid Recall@50 "
                  f"{tt['valid_recall@50']:.4f}), trained in {tt['seconds']:.0f} s. Targets in the "
                  "merged list, by the sources that proposed them: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in found.items() if v > 0)
                  + (f". BST scored {bst_rate:,.0f} candidate pairs/s." if bst_rate else
                     ". The BST funnel was not run (`--skip-funnel`)."),
                  ""]
        if "item2vec" in r:
            lines += [*item2vec_markdown(r), ""]
        abl = RESULTS / f"retrieval_ablation_{r['protocol']}.json"
        if abl.exists():
            lines += [*ablation_markdown(json.loads(abl.read_text())), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--protocols", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--data-dir", default=os.environ.get("BSTREC_DATA_DIR", "../shared/data"))
    ap.add_argument("--workdir", default="artifacts/bench-retrieval")
    ap.add_argument("--rerank", type=int, default=50,
                    help="candidates per query the BST ranker scores (after pre-rank)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--bst-only", action="store_true",
                    help="also rank the merged top --rerank by BST alone (a second BST pass)")
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--tt-train", type=json.loads, default={},
                    help='two-tower train config overrides as JSON, e.g. \'{"max_epochs": 6}\'')
    ap.add_argument("--tt-model", type=json.loads, default={"encoder": "mean"},
                    help="two-tower model config overrides as JSON")
    ap.add_argument("--no-markdown", action="store_true")
    ap.add_argument("--skip-funnel", action="store_true",
                    help="leave out the BST funnel (no BST training or ranking)")
    ap.add_argument("--item2vec", type=json.loads, default={},
                    help='item2vec config overrides as JSON (both backends), e.g. '
                    '\'{"session_gap_minutes": 60}\'')
    ap.add_argument("--item2vec-backends", nargs="+", default=["torch", "gensim"],
                    choices=["torch", "gensim"])
    ap.add_argument("--item2vec-quota", type=int, default=100,
                    help="item2vec's quota in merged+item2vec (taken from two_tower, item_cf)")
    ap.add_argument("--item2vec-grid", type=json.loads, default=ITEM2VEC_GRID,
                    help="per backend, the list of item2vec overrides (cells) to compare, as "
                    "JSON; default: ITEM2VEC_GRID")
    ap.add_argument("--seeds", type=int, default=3, help="item2vec seeds per grid cell")
    ap.add_argument("--equal-recall", type=float, default=0.005,
                    help="valid Recall@50 difference under which backends count as equal")
    ap.add_argument("--ablation", action="store_true",
                    help="train the two-tower variants of ABLATIONS instead (test metrics each)")
    ap.add_argument("--markdown-only", action="store_true",
                    help="rewrite the BENCHMARKS.md section from the saved results, run nothing")
    args = ap.parse_args()
    if missing := [b for b in args.item2vec_backends if not args.item2vec_grid.get(b)]:
        ap.error(f"--item2vec-grid has no cells for {', '.join(missing)}")
    results = []
    if args.ablation:
        for protocol in args.protocols:
            write_result(f"retrieval_ablation_{protocol}", ablation(protocol, args))
        return
    if args.markdown_only:
        results = [json.loads((RESULTS / f"retrieval_{p}.json").read_text())
                   for p in args.protocols if (RESULTS / f"retrieval_{p}.json").exists()]
        update_section("retrieval", markdown(results))
        return
    for protocol in args.protocols:
        if not (Path(args.data_dir) / DATASETS[protocol]).is_dir():
            console.print(f"skip {protocol}: {DATASETS[protocol]} not in {args.data_dir}")
            continue
        r = run(protocol, args)
        write_result(f"retrieval_{protocol}", r)
        results.append(r)
        console.print_json(data={"protocol": protocol, "sources": r["sources"]})
    if not results:
        raise SystemExit("no dataset found: nothing measured")
    if not args.no_markdown:
        update_section("retrieval", markdown(results))


if __name__ == "__main__":
    main()
