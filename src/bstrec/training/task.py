"""The ranker training task: samples on disk -> trained model, checkpoints and a result file.

``out_dir`` of ``train_ranker``::

    best/               the best epoch by valid AUC (self-describing checkpoint, see checkpoint.py)
    last/               the resumable state of the run
    train_result.json   configs, valid metrics and throughput per epoch, best epoch, stop reason
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from rich.console import Console

import bstrec
from bstrec.config import from_dict
from bstrec.data.io import atomic_file
from bstrec.data.samples import SPLITS, SampleSet
from bstrec.distributed.ddp import is_lead, world
from bstrec.evaluation.metrics import auc
from bstrec.features.spec import FeatureSpec
from bstrec.features.vocab import Vocabularies
from bstrec.training.checkpoint import (
    META,
    Builder,
    CheckpointError,
    load_checkpoint,
    model_config_dict,
    read_meta,
)
from bstrec.training.loop import (
    BEST,
    LAST,
    ModelInfo,
    TrainConfig,
    TrainResult,
    binary_logloss,
    default_threads,
    predict_logits,
    seed_model_init,
    train,
)
from bstrec.training.tensors import TensorSplit

log = logging.getLogger(__name__)

RESULT = "train_result.json"


def _default_builder() -> Builder:
    from bstrec.ranking import build_ranker

    return build_ranker


def train_ranker(
    model_name: str,
    samples_dir: str | Path,
    out_dir: str | Path,
    *,
    model_overrides: Mapping[str, Any] | None = None,
    train_overrides: Mapping[str, Any] | None = None,
    resume: bool = False,
    progress: bool = True,
    builder: Builder | None = None,
    console: Console | None = None,
) -> TrainResult:
    """Train ranker ``model_name`` on the samples of ``bstrec data build`` in ``samples_dir``.

    The model is built by ``bstrec.ranking.build_ranker`` (or ``builder``) after seeding with
    the train config's seed. With ``resume`` the configs saved in ``out_dir/last`` are the
    defaults, so that only what changes (e.g. ``max_epochs``) need be given again. The
    progress bar goes to ``console`` (see ``bstrec.training.loop.train``). Under a process
    group it is one rank of a data-parallel run (``bstrec.distributed.ddp``); rank 0 writes.
    """
    out = Path(out_dir)
    model_cfg: dict[str, Any] = {}
    train_cfg: dict[str, Any] = {}
    last_meta = read_meta(out / LAST, verify=False) if resume and (out / LAST / META).exists() \
        else None
    if last_meta is not None:
        model_cfg.update(last_meta.get("model_config") or {})
        train_cfg.update(last_meta.get("train_config") or {})
    model_cfg.update(model_overrides or {})
    train_cfg.update(train_overrides or {})
    cfg = from_dict(TrainConfig, train_cfg, where="train")
    build = builder or _default_builder()

    samples = SampleSet.load(samples_dir, splits=("train", "valid"))
    labels = _labels(model_name) if builder is None else ("label",)
    splits = {name: TensorSplit.from_frame(_with_labels(frame, labels, samples, samples_dir),
                                           samples.spec, labels)
              for name, frame in samples.splits.items()}
    seed_model_init(cfg.seed)
    model = build(model_name, samples.spec, model_cfg)
    if last_meta is not None and last_meta.get("model_config") != model_config_dict(model):
        raise CheckpointError(
            f"cannot resume {out / LAST}: model config {model_config_dict(model)} differs from "
            f"the saved {last_meta.get('model_config')}")
    n_params = sum(p.numel() for p in model.parameters())
    log.info("%s: %d parameters; %d train, %d valid samples", model_name, n_params,
             len(splits["train"]), len(splits["valid"]))
    info = ModelInfo(model_name, samples.spec, samples.vocabs, extra=_data_facts(samples,
                                                                                 samples_dir))
    result = train(model, splits["train"], splits["valid"], cfg, out_dir=out, resume=resume,
                   progress=progress, info=info, console=console)
    report = {
        "model": model_name,
        "model_config": model_config_dict(model),
        "train_config": dataclasses.asdict(cfg),
        "n_parameters": n_params,
        "threads": cfg.num_threads or default_threads(),
        "processes": world()[0],
        "data": dict(info.extra),
        "best_checkpoint": BEST,
        "result": result.to_dict(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "bstrec_version": bstrec.__version__,
    }
    if is_lead():
        with atomic_file(out / RESULT) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
    return result


def _labels(model_name: str) -> tuple[str, ...]:
    from bstrec.ranking import RANKERS

    entry = RANKERS.get(model_name)
    return entry.labels if entry is not None else ("label",)


def _with_labels(frame: pl.DataFrame, labels: tuple[str, ...], samples: SampleSet,
                 samples_dir: str | Path) -> pl.DataFrame:
    """``frame`` with the ``labels`` columns: as built, or a multi-task ranker's click and buy
    derived from the samples' log (``with_conversion_labels``)."""
    if all(c in frame.columns for c in labels):
        return frame
    if labels != ("click", "buy"):
        raise ValueError(f"the samples in {samples_dir} have no columns {list(labels)}")
    from bstrec.data.samples import with_conversion_labels

    events = samples.dataset.events if samples.dataset is not None else None
    if events is None or "action" not in events.columns \
            or not (events["action"] == "buy").any():
        raise ValueError(f"a click-and-conversion ranker needs buy events in the log of "
                         f"{samples_dir} (an implicit log with actions, e.g. Taobao's pv/cart/"
                         "fav/buy): it has none")
    return with_conversion_labels(frame, events)


def evaluate_checkpoint(checkpoint_dir: str | Path, samples_dir: str | Path,
                        split: str = "test", *, batch_size: int = 4096,
                        builder: Builder | None = None) -> dict[str, Any]:
    """AUC and logloss of a checkpoint on one split of the samples it was trained on.

    Returns ``{"split", "n", "auc", "logloss", "positive_rate", "labels", "predictions",
    "model"}``: labels and predictions (probabilities) are (N,) arrays in the split's row
    order, model the checkpoint's model (in eval mode).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    ckpt = load_checkpoint(checkpoint_dir, builder=builder)
    root = Path(samples_dir)
    try:
        spec = FeatureSpec.load(root / "feature_spec.json")
        vocabs = Vocabularies.load(root / "vocab.json")
        frame = pl.read_parquet(root / "samples" / f"{split}.parquet")
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{root} is not the output of `bstrec data build`: {exc}") from None
    _check_same_encoding(ckpt.spec, ckpt.vocabs, spec, vocabs, checkpoint_dir, root)
    data = TensorSplit.from_frame(frame, spec)
    logits = predict_logits(ckpt.model, data, batch_size)
    if logits.ndim != 1:
        raise ValueError(f"{checkpoint_dir} is a multi-task ranker ({ckpt.model_name}): this "
                         "evaluation scores one click label; benchmarks/bench_objective.py "
                         "evaluates each head and objective")
    labels = data.tensors["label"].numpy()
    probs = (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)
    return {
        "split": split,
        "n": int(labels.size),
        "auc": auc(labels, logits),
        "logloss": binary_logloss(labels, logits),
        "positive_rate": float(labels.mean()) if labels.size else float("nan"),
        "labels": labels,
        "predictions": probs,
        "model": ckpt.model,
    }


def _check_same_encoding(ckpt_spec: FeatureSpec, ckpt_vocabs: Vocabularies, spec: FeatureSpec,
                         vocabs: Vocabularies, ckpt_dir: str | Path, samples_dir: Path) -> None:
    """Samples encoded with other vocabularies would be scored as garbage, silently."""
    if ckpt_spec.to_dict() != spec.to_dict():
        raise ValueError(f"{ckpt_dir} was trained on another feature spec than {samples_dir}'s")
    differ = sorted(k for k in set(ckpt_vocabs) | set(vocabs)
                    if k not in ckpt_vocabs or k not in vocabs
                    or ckpt_vocabs[k].values != vocabs[k].values)
    if differ:
        raise ValueError(f"{ckpt_dir} was trained with other vocabularies than {samples_dir}'s "
                         f"(differ: {differ})")


def _data_facts(samples: SampleSet, samples_dir: str | Path) -> dict[str, Any]:
    m = samples.manifest
    return {"samples": str(samples_dir), "protocol": m.get("protocol"),
            "dataset": m.get("dataset"), "config_hash": m.get("config_hash"),
            "splits": m.get("splits")}
