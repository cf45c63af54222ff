"""How the valid and test splits of a MovieLens protocol differ, and how each trained ranker fares
on the parts of a split: an analysis of runs bench_rank.py already trained (it selects nothing).

The protocol splits by global time; MovieLens users rate in bursts. So valid (the 10% of time
after train) holds many users who are new, and test (the last 10%) mostly users of train who came
back, often months later. Per split this script measures

- the share of samples whose user is in train, of history entries older than 1 hour / 30 days,
  and of history entries in a time-difference bucket that no train history holds (BST's
  embedding of such a bucket never received a gradient);
- each model's AUC on the samples of users in train and of new users, and by the age of the
  sample's newest history entry (none; within 1 hour: the same session; 1 hour to 30 days; older),
  mean over the seeds bench_rank.py trained; for models with time-difference positions also
  the AUC with every unseen bucket replaced by the oldest bucket train holds,

and writes ``benchmarks/results/split_shift_<protocol>.json`` and its BENCHMARKS.md section.

    python benchmarks/split_shift.py --protocol ml1m-ctr --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rank import DATASETS
from bstrec.evaluation.metrics import auc, auc_by_bucket
from bstrec.features.spec import FeatureSpec
from bstrec.features.timebuckets import N_TIME_BUCKETS, bucket_edges, time_bucket_np
from bstrec.ranking.bst import BST
from bstrec.training.checkpoint import load_checkpoint
from bstrec.training.loop import predict_logits
from bstrec.training.task import RESULT
from bstrec.training.tensors import TensorSplit
from common import ensure_samples, machine, now, update_section, write_result
from peers import build_peer

HOUR, MONTH = 3600, 30 * 86400
# two ways to cut a split into buckets: by user, and by the age of the newest history entry
BUCKETINGS = {"user": ("user in train", "new user"),
              "age": ("no history", "newest <= 1 h", "newest 1 h - 30 d", "newest > 30 d")}
GROUPS = tuple(g for names in BUCKETINGS.values() for g in names)
COLUMNS = (*GROUPS, "all, unseen buckets remapped")
MIN_GROUP = 200  # fewer samples than this: no AUC (too noisy to read)
MODELS = ("wdl", "din", "bst", "bst_target_bn", "torch_rechub_bst", "torch_rechub_din",
          "torch_rechub_widedeep")


def bucket_ids(frame: pl.DataFrame, train_users: pl.Series) -> dict[str, np.ndarray]:
    """BUCKETINGS key -> (N,) index into its names. Histories are oldest first: the newest
    entry is the last."""
    seen = frame["user_id"].is_in(train_users.implode()).to_numpy()
    has = frame["hist_dt"].list.len().to_numpy() > 0
    age = frame["hist_dt"].list.last().fill_null(0).to_numpy()
    return {"user": np.where(seen, 0, 1),
            "age": np.where(~has, 0, np.where(age <= HOUR, 1, np.where(age <= MONTH, 2, 3)))}


def trained_buckets(train: pl.DataFrame) -> np.ndarray:
    """bucket -> the oldest bucket at or below it that a train history entry falls in (padding
    0 and the target's 1 map to themselves)."""
    held = np.bincount(time_bucket_np(train["hist_dt"].explode().drop_nulls().to_numpy()),
                       minlength=N_TIME_BUCKETS) > 0
    held[:2] = True
    out: np.ndarray = np.maximum.accumulate(np.where(held, np.arange(len(held)), 0))
    return out


def remap_dt(dt: np.ndarray, buckets: np.ndarray) -> np.ndarray:
    """Time differences moved into the bucket ``buckets`` maps theirs to (its lower edge when it
    changes): the models bucket seconds themselves, so the remapping happens in seconds."""
    lower = np.asarray([0, 0, *bucket_edges(N_TIME_BUCKETS)], dtype=np.int64)
    b = time_bucket_np(dt)
    target = buckets[b]
    out: np.ndarray = np.where(target == b, dt, lower[target])
    return out


def split_facts(frame: pl.DataFrame, ids: dict[str, np.ndarray], buckets: np.ndarray
                ) -> dict[str, Any]:
    dt = frame["hist_dt"].explode().drop_nulls().to_numpy()
    b = time_bucket_np(dt)
    share = {g: float(c) / frame.height for key, names in BUCKETINGS.items()
             for g, c in zip(names, np.bincount(ids[key], minlength=len(names)), strict=True)}
    return {
        "samples": frame.height,
        "days": float(np.ptp(frame["timestamp"].to_numpy())) / 86400,
        "history_older_than_1h": float((dt > HOUR).mean()),
        "history_older_than_30d": float((dt > MONTH).mean()),
        "history_unseen_bucket": float((buckets[b] != b).mean()),
        "share": share,
    }


def group_aucs(labels: np.ndarray, scores: np.ndarray, ids: dict[str, np.ndarray]
               ) -> dict[str, float | None]:
    out: dict[str, float | None] = {"all": auc(labels, scores)}
    for key, names in BUCKETINGS.items():
        for b in auc_by_bucket(labels, scores, ids[key], list(names)):
            out[b.name] = b.auc if b.n >= MIN_GROUP and 0 < b.n_pos < b.n else None
    return out


def mean_or_none(xs: list[float | None]) -> float | None:
    known = [x for x in xs if x is not None]
    return float(np.mean(known)) if len(known) == len(xs) else None


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"## Valid and test splits of {r['protocol']}: what differs, and AUC by group",
        "",
        f"`{r['command']}` on {r['date']}, {r['machine']['cores']} cores. An analysis of the runs "
        "bench_rank.py trained (nothing here selects a model). AUC on the samples of users in "
        "train, of new users, and by the age of the sample's newest history entry; mean over the "
        f"seeds listed; '-': fewer than {MIN_GROUP} samples or one label only. 'Unseen "
        "buckets': history entries whose time-difference bucket no train history holds, so that "
        "BST's embedding of it never had a gradient; the last column scores the models with "
        "time-difference positions with each such bucket replaced by the oldest one train holds "
        "('-': the model has no such positions).",
        "",
        "| split | samples | days | history entries > 1 h | > 30 d | in unseen buckets | "
        + " | ".join(f"share {g}" for g in GROUPS) + " |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(GROUPS),
    ]
    for split, f in r["splits"].items():
        lines.append(f"| {split} | {f['samples']:,} | {f['days']:.0f} | "
                     f"{f['history_older_than_1h']:.0%} | "
                     f"{f['history_older_than_30d']:.0%} | "
                     f"{f['history_unseen_bucket']:.0%} | "
                     + " | ".join(f"{f['share'][g]:.0%}" for g in GROUPS) + " |")
    for split in ("valid", "test"):
        lines += ["", f"{split} AUC:", "",
                  "| model | seeds | all | " + " | ".join(COLUMNS) + " |",
                  "|---|---|---:|" + "---:|" * len(COLUMNS)]
        for name, m in r["models"].items():
            a = m[split]
            lines.append(f"| {name} | {','.join(map(str, m['seeds']))} | {a['all']:.4f} | "
                         + " | ".join("-" if a[g] is None else f"{a[g]:.4f}" for g in COLUMNS)
                         + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--protocol", default="ml1m-ctr", choices=[p for p in DATASETS
                                                               if p != "synthetic-order"])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--workdir", default="artifacts/bench_rank")
    ap.add_argument("--data-dir", default=os.environ.get("BSTREC_DATA_DIR", "../shared/data"))
    args = ap.parse_args()
    root = Path(args.workdir) / args.protocol
    samples = ensure_samples(DATASETS[args.protocol], root / "samples", args.data_dir)
    frames = {s: pl.read_parquet(samples / "samples" / f"{s}.parquet")
              for s in ("train", "valid", "test")}
    train_users = frames["train"]["user_id"].unique()
    ids = {s: bucket_ids(f, train_users) for s, f in frames.items()}
    spec = FeatureSpec.load(samples / "feature_spec.json")
    scored = {s: TensorSplit.from_frame(frames[s], spec) for s in ("valid", "test")}
    buckets = trained_buckets(frames["train"])
    remapped = {s: TensorSplit(d.tensors | {"hist_dt": torch.from_numpy(
        remap_dt(d.tensors["hist_dt"].numpy(), buckets))}) for s, d in scored.items()}
    res: dict[str, Any] = {
        "protocol": args.protocol, "date": now(), "machine": machine(),
        "command": "python benchmarks/split_shift.py " + " ".join(sys.argv[1:]),
        "groups": list(GROUPS), "min_group": MIN_GROUP,
        "splits": {s: split_facts(f, ids[s], buckets) for s, f in frames.items()},
        "models": {},
    }
    for name in args.models:
        runs = sorted(p for p in root.glob(f"runs/{name}-s*") if (p / RESULT).exists())
        if not runs:
            print(f"{name}: no finished run in {root / 'runs'}, skipped")
            continue
        per_split: dict[str, list[dict[str, float | None]]] = {s: [] for s in scored}
        for run in runs:
            with warnings.catch_warnings():  # torch's nested-tensor notice on their BST
                warnings.simplefilter("ignore", UserWarning)
                model = load_checkpoint(run / "best", builder=build_peer).model
            timed = isinstance(model, BST) and model.config.position == "time"
            for split, data in scored.items():
                labels = data.tensors["label"].numpy()
                aucs = group_aucs(labels, predict_logits(model, data), ids[split])
                aucs["all, unseen buckets remapped"] = (
                    auc(labels, predict_logits(model, remapped[split])) if timed else None)
                per_split[split].append(aucs)
        res["models"][name] = {
            "seeds": [int(p.name.rsplit("-s", 1)[1]) for p in runs],
            **{s: {k: mean_or_none([a[k] for a in aucs]) for k in aucs[0]}
               for s, aucs in per_split.items()}}
        print(f"{name}: test AUC {res['models'][name]['test']['all']:.4f}", flush=True)
    path = write_result(f"split_shift_{args.protocol}", res)
    update_section(f"split_shift_{args.protocol}", markdown(res))
    print(f"wrote {path} and its BENCHMARKS.md section")


if __name__ == "__main__":
    main()
