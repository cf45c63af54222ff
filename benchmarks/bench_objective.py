"""Multi-task ranking and the business objective on a synthetic Taobao-format log (issue 25).

1. Generates the Taobao-format log (``bstrec.data.synthetic.generate_taobao``: pv, fav, cart,
   buy; item prices; purchases that depend on the order of the history and on the price) and
   builds P5 samples of its views (``positive_actions=("pv",)``, one uniform negative each).
   Labels: click = P5's label, buy = a buy of the same item within a day
   (``bstrec.data.samples.with_conversion_labels``).
2. Trains, on each seed, with the one training loop (``bstrec.training.loop.train``; early
   stopping on valid, test read once at the end):
   - ``multitask``: ESMM on a BST body (ranking/multitask.py) on (click, click x buy);
   - ``ctr_only``: the same BST on click alone, over every sample;
   - ``cvr_only``: the same BST on buy, trained on the clicked samples only (the classic CVR
     model ESMM replaces).
3. Per head, test AUC of the multi-task model against the single-task one (CTR: every test
   sample; CVR: the clicked test samples), with a paired bootstrap over users of the
   difference (the seeds' mean AUC on each resample).
4. For each objective (engagement pCTR, conversion pCTCVR, revenue pCTCVR x price, a blend
   pCTR x pCVR x price^0.5) the multi-task model's scores ranked: test CTR-AUC, CVR-AUC (clicked
   samples), CTCVR-AUC (every sample) and revenue@10: the mean over test users of the price of
   the bought items among the 10 best-scored of the user's test samples (every clicked item and
   every sampled negative of the user's test period).

Writes ``benchmarks/results/objective.json`` and the ``objective`` section of BENCHMARKS.md.
The log is small (1,000 users, 5,000 items) and the models narrow, so that the whole run takes
minutes on one core.

    python benchmarks/bench_objective.py
    python benchmarks/bench_objective.py --markdown-only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bstrec.data.samples import SampleConfig, build_samples, with_conversion_labels
from bstrec.data.synthetic import TaobaoConfig, generate_taobao
from bstrec.evaluation.metrics import auc, paired_bootstrap_auc_diff
from bstrec.evaluation.objective import ObjectiveConfig, objective_scores, revenue_at_k
from bstrec.ranking.bst import BST, BSTConfig
from bstrec.ranking.multitask import ESMM, ESMMConfig
from bstrec.training.loop import TrainConfig, predict_logits, seed_model_init, train
from bstrec.training.tensors import TensorSplit
from common import RESULTS, machine, now, update_section, write_result

NAME = "objective"
DATA = TaobaoConfig(seed=0, n_users=1000)
SAMPLES = SampleConfig(positive_actions=("pv",), max_len=20, negatives=1)
CONVERSION_WINDOW_S = 86_400
BODY: dict[str, Any] = {"item_dim": 16, "cat_dim": 8, "pos_dim": 8, "embed_dim": 8, "heads": 4,
                        "mlp": (128, 64), "dropout": 0.1}
TRAIN = TrainConfig(lr=2e-3, batch_size=256, max_epochs=4, patience=1, num_threads=1)
K = 10
OBJECTIVES = {"engagement": ObjectiveConfig("engagement"),
              "conversion": ObjectiveConfig("conversion"),
              "revenue": ObjectiveConfig("revenue"),
              "blend": ObjectiveConfig("blend", ctr_weight=1.0, cvr_weight=1.0,
                                       price_weight=0.5)}


def sigmoid(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
    return out


def data(config: TaobaoConfig) -> tuple[dict[str, pl.DataFrame], Any, pl.DataFrame,
                                         dict[str, Any]]:
    ds = generate_taobao(config)
    samples = build_samples(ds, SAMPLES)
    frames = {name: with_conversion_labels(frame, ds.events, window_s=CONVERSION_WINDOW_S)
              .join(ds.items.select("item_id", "price"), on="item_id", how="left",
                    maintain_order="left")
              for name, frame in samples.splits.items()}
    facts = {"events": ds.events.height,
             "actions": dict(ds.events["action"].value_counts().sort("action").iter_rows()),
             "splits": {k: v.height for k, v in frames.items()},
             "clicked": {k: int(v["click"].sum()) for k, v in frames.items()},
             "bought": {k: int(v["buy"].sum()) for k, v in frames.items()},
             "test_users": frames["test"]["user_id"].n_unique(),
             "test_rows_per_user_median": float(
                 frames["test"].group_by("user_id").len()["len"].median() or 0)}
    return frames, samples.spec, ds.items, facts


def run_seed(seed: int, frames: dict[str, pl.DataFrame], spec: Any, train_cfg: TrainConfig
             ) -> dict[str, np.ndarray]:
    """Test predictions of the three models trained on ``seed``: logits of CTR and CVR heads."""
    cfg = dataclasses.replace(train_cfg, seed=seed)
    out: dict[str, np.ndarray] = {}
    clicked = {k: v.filter(pl.col("click") > 0) for k, v in frames.items()}

    def split(frame: pl.DataFrame, labels: tuple[str, ...]) -> TensorSplit:
        return TensorSplit.from_frame(frame, spec, labels)

    # multitask: (click, click x buy); buy implies click, so click x buy = buy
    seed_model_init(seed)
    esmm = ESMM(spec, ESMMConfig(**BODY))
    t0 = time.perf_counter()
    res = train(esmm, split(frames["train"], ("click", "buy")),
                split(frames["valid"], ("click", "buy")), cfg, progress=False)
    out["seconds_multitask"] = np.array(time.perf_counter() - t0)
    print(f"  multitask: {float(out['seconds_multitask']):.0f} s, best epoch {res.best_epoch}, "
          f"valid mean AUC {res.best_valid_auc:.4f}", flush=True)
    out["epochs_multitask"] = np.array(res.best_epoch)
    test = split(frames["test"], ("click", "buy"))
    with torch.no_grad():
        esmm.eval()
        ctr, cvr = [], []
        for batch in test.batches(4096):
            a, b = esmm.heads(batch)
            ctr.append(a.numpy())
            cvr.append(b.numpy())
    out["multitask_ctr"], out["multitask_cvr"] = np.concatenate(ctr), np.concatenate(cvr)

    def single(name: str, data: dict[str, pl.DataFrame], label: str) -> None:
        """Train a single-task BST on ``label`` of ``data`` and score every test sample (so
        that its predictions line up with the other models' rows)."""
        seed_model_init(seed)
        bst = BST(spec, BSTConfig(**BODY))
        t0 = time.perf_counter()
        res = train(bst, split(data["train"], (label,)), split(data["valid"], (label,)), cfg,
                    progress=False)
        out[f"seconds_{name}"] = np.array(time.perf_counter() - t0)
        print(f"  {name}: {float(out[f'seconds_{name}']):.0f} s, best epoch {res.best_epoch}, "
              f"valid AUC {res.best_valid_auc:.4f}", flush=True)
        out[f"{name}_{name[:3]}"] = predict_logits(bst, split(frames["test"], (label,)))

    single("ctr_only", frames, "click")
    single("cvr_only", clicked, "buy")  # trained on the clicked views only
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--markdown-only", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny log and one epoch, to check the script; writes nothing")
    args = ap.parse_args()
    path = RESULTS / f"{NAME}.json"
    if args.markdown_only:
        update_section(NAME, markdown(json.loads(path.read_text())))
        print(f"rewrote the {NAME} section from {path}")
        return
    torch.set_num_threads(1)
    started = time.perf_counter()
    config = dataclasses.replace(DATA, n_users=150) if args.smoke else DATA
    train_cfg = dataclasses.replace(TRAIN, max_epochs=1) if args.smoke else TRAIN
    frames, spec, _, facts = data(config)
    print(f"data: {facts}", flush=True)
    runs = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        runs.append(run_seed(seed, frames, spec, train_cfg))
        print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)

    test = frames["test"]
    click = test["click"].to_numpy().astype(np.float64)
    buy = test["buy"].to_numpy().astype(np.float64)
    users = test["user_id"].to_numpy()
    price = test["price"].to_numpy().astype(np.float64)
    is_click = click > 0

    def per_seed(key: str, labels: np.ndarray, rows: np.ndarray | None = None) -> list[float]:
        sel = slice(None) if rows is None else rows
        return [auc(labels[sel], r[key][sel]) for r in runs]

    models = {
        "multitask": {"ctr_auc": per_seed("multitask_ctr", click),
                      "cvr_auc": per_seed("multitask_cvr", buy, is_click),
                      "epochs": [int(r["epochs_multitask"]) for r in runs],
                      "train_seconds": [round(float(r["seconds_multitask"]), 1) for r in runs]},
        "ctr_only": {"ctr_auc": per_seed("ctr_only_ctr", click),
                     "train_seconds": [round(float(r["seconds_ctr_only"]), 1) for r in runs]},
        "cvr_only": {"cvr_auc": per_seed("cvr_only_cvr", buy, is_click),
                     "train_seconds": [round(float(r["seconds_cvr_only"]), 1) for r in runs]},
    }
    boot = {}
    for head, key_a, key_b, labels, rows in (
            ("ctr", "multitask_ctr", "ctr_only_ctr", click, np.ones_like(is_click)),
            ("cvr", "multitask_cvr", "cvr_only_cvr", buy, is_click)):
        d = paired_bootstrap_auc_diff(labels[rows], np.stack([r[key_a][rows] for r in runs]),
                                      np.stack([r[key_b][rows] for r in runs]),
                                      n_boot=args.n_boot, groups=users[rows])
        boot[head] = {"diff": d.diff, "lo": d.lo, "hi": d.hi,
                      "vs": key_b.rsplit("_", 1)[0], "n": int(rows.sum()),
                      "users": int(np.unique(users[rows]).size)}

    revenue = buy * np.nan_to_num(price)
    objectives: dict[str, dict[str, Any]] = {}
    for name, cfg in OBJECTIVES.items():
        per: dict[str, list[float]] = {"ctr_auc": [], "cvr_auc": [], "ctcvr_auc": [],
                                       f"revenue@{K}": []}
        for r in runs:
            s = objective_scores(cfg, sigmoid(r["multitask_ctr"]), sigmoid(r["multitask_cvr"]),
                                 price)
            per["ctr_auc"].append(auc(click, s))
            per["cvr_auc"].append(auc(buy[is_click], s[is_click]))
            per["ctcvr_auc"].append(auc(buy, s))
            per[f"revenue@{K}"].append(revenue_at_k(users, s, revenue, K))
        objectives[name] = {k: float(np.mean(v)) for k, v in per.items()}
        objectives[name]["per_seed"] = per
        objectives[name]["exponents"] = list(cfg.exponents)
    # what a list could earn at most, and what a random order earns (the scale of revenue@10)
    rng = np.random.default_rng(0)
    reference = {"oracle": revenue_at_k(users, revenue, revenue, K),
                 "random": float(np.mean([revenue_at_k(users, rng.random(len(users)), revenue, K)
                                          for _ in range(20)]))}

    result = {
        "command": "python benchmarks/bench_objective.py" + (
            f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds != [0, 1, 2] else ""),
        "date": now(),
        "machine": machine(),
        "threads": 1,
        "protocol": "P5 on generate_taobao (views as samples, one uniform negative each)",
        "data_config": DATA.__dict__,
        "sample_config": {k: v for k, v in SAMPLES.__dict__.items()},
        "conversion_window_s": CONVERSION_WINDOW_S,
        "model_config": BODY,
        "train_config": TRAIN.__dict__,
        "seeds": args.seeds,
        "data": facts,
        "models": models,
        "bootstrap": boot,
        "objectives": objectives,
        "revenue_reference": reference,
        "k": K,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    if args.smoke:
        print(markdown(result))
        return
    out = write_result(NAME, json.loads(json.dumps(result, default=str)))
    update_section(NAME, markdown(result))
    print(f"wrote {out} in {result['wall_seconds']} s")


def markdown(res: dict[str, Any]) -> str:
    m, b, k = res["models"], res["bootstrap"], res["k"]

    def ms(xs: list[float]) -> str:
        return f"{np.mean(xs):.4f} ± {np.std(xs):.4f}"

    lines = [
        "## Multi-task ranking and the business objective (synthetic Taobao-format log)",
        "",
        f"`{res['command']}` ({res['date']}; {res['machine']['cores']} cores, "
        f"{res['threads']} thread; {res['wall_seconds']:.0f} s). Protocol: {res['protocol']}; "
        f"{res['data']['events']:,} events, samples train/valid/test "
        f"{'/'.join(f'{v:,}' for v in res['data']['splits'].values())}, clicked test samples "
        f"{res['data']['clicked']['test']:,} of which bought {res['data']['bought']['test']:,}. "
        f"Seeds {res['seeds']}; test read once, after early stopping on valid.",
        "",
        "Per head, ESMM (shared BST body) against the single-task BST (mean ± sd over seeds; "
        "CVR on the clicked test samples; the CVR-only model trained on clicked samples only); "
        "difference with a paired bootstrap over users (95%):",
        "",
        "| head | multitask AUC | single-task AUC | difference | 95% interval |",
        "|---|---|---|---|---|",
        f"| CTR | {ms(m['multitask']['ctr_auc'])} | {ms(m['ctr_only']['ctr_auc'])} | "
        f"{b['ctr']['diff']:+.4f} | [{b['ctr']['lo']:+.4f}, {b['ctr']['hi']:+.4f}] |",
        f"| CVR | {ms(m['multitask']['cvr_auc'])} | {ms(m['cvr_only']['cvr_auc'])} | "
        f"{b['cvr']['diff']:+.4f} | [{b['cvr']['lo']:+.4f}, {b['cvr']['hi']:+.4f}] |",
        "",
        f"The multi-task model early-stops on the mean of its two heads' valid AUCs (best "
        f"epochs {m['multitask']['epochs']}), each single-task model on its own head's.",
        "",
        f"Objectives, the multi-task model's scores (mean over seeds). revenue@{k}: mean over "
        f"{res['data']['test_users']:,} test users of the price of bought items among the {k} "
        f"best-scored of the user's test samples (median "
        f"{res['data']['test_rows_per_user_median']:.0f} per user); best possible "
        f"{res['revenue_reference']['oracle']:.2f}, random order "
        f"{res['revenue_reference']['random']:.2f}:",
        "",
        f"| objective | score | CTR-AUC | CVR-AUC | CTCVR-AUC | revenue@{k} |",
        "|---|---|---|---|---|---|",
    ]
    names = {"engagement": "pCTR", "conversion": "pCTR x pCVR", "revenue": "pCTR x pCVR x price"}
    for name, o in res["objectives"].items():
        a, c, p = o["exponents"]
        score = names.get(name, f"pCTR^{a:g} x pCVR^{c:g} x price^{p:g}")
        lines.append(f"| {name} | {score} | {o['ctr_auc']:.4f} | {o['cvr_auc']:.4f} | "
                     f"{o['ctcvr_auc']:.4f} | {o[f'revenue@{k}']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
