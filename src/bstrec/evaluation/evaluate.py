"""``bstrec evaluate``: score trained rankers on the test split and write the offline report.

Runs are grouped by model name: several runs under one name are seeds of one model, so the report
shows their mean and standard deviation and the bootstrap compares the seeds' mean AUCs. A run is
a training folder (its ``best/`` checkpoint is used) or a checkpoint folder itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl
import torch
from torch import nn

from bstrec.data.samples import SampleSet
from bstrec.evaluation.references import reference_scores
from bstrec.evaluation.report import write_report
from bstrec.training.checkpoint import META, Builder
from bstrec.training.loop import BEST
from bstrec.training.task import evaluate_checkpoint
from bstrec.training.tensors import TensorSplit


def checkpoint_dir(run: str | Path) -> Path:
    """The checkpoint of a run folder (its ``best/``) or the folder itself if it is one."""
    path = Path(run)
    if (path / BEST / META).exists():
        return path / BEST
    if (path / META).exists():
        return path
    raise FileNotFoundError(f"{path} holds no checkpoint (neither {path / BEST / META} nor "
                            f"{path / META}): is it the --out of `bstrec train ranker`?")


def parse_runs(specs: Sequence[str]) -> dict[str, list[Path]]:
    """``["bst=runs/bst_s0", "bst=runs/bst_s1", "din=runs/din"]`` -> {name: [paths]} in order."""
    runs: dict[str, list[Path]] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"--run {spec!r}: expected NAME=PATH, e.g. bst=runs/bst")
        runs.setdefault(name.strip(), []).append(Path(path.strip()))
    if not runs:
        raise ValueError("no runs to evaluate: give at least one --run NAME=PATH")
    return runs


def attention_of_one_user(model: nn.Module, test: pl.DataFrame, samples: SampleSet
                          ) -> tuple[npt.NDArray[np.float32], list[str]] | None:
    """First-block attention (heads, L+1, L+1) of the test sample with the longest history, and
    token labels (behaviours oldest first, then the target: titles where the dataset has them,
    else item ids; "" for padding); None for non-BST models."""
    maps = getattr(model, "attention_maps", None)
    if maps is None or test.height == 0:
        return None
    row = int(test["hist_item"].list.len().arg_max() or 0)
    one = test.slice(row, 1)
    batch = TensorSplit.from_frame(one, samples.spec).tensors
    model.eval()
    with torch.no_grad():
        att = maps(batch)[0].numpy()  # (heads, L+1, L+1)
    items = samples.vocabs["item_id"].values
    names = _titles(samples)
    L = samples.spec.max_len
    hist = batch["hist_item"][0].tolist()
    tokens = ["" if i == 0 else ("oov" if i == 1 else names.get(items[i - 2], str(items[i - 2])))
              for i in hist[-L:]]
    target = one["item_id"][0]
    tokens.append(f"target: {names.get(target, target)}")
    return att.astype(np.float32), tokens


def _titles(samples: SampleSet) -> dict[Any, str]:
    """Item id -> title where the dataset's item table has titles (MovieLens), else empty."""
    items = samples.dataset.items if samples.dataset is not None else None
    if items is None or "title" not in items.columns:
        return {}
    return {i: str(t) for i, t in zip(items["item_id"].to_list(), items["title"].to_list(),
                                      strict=True) if t is not None}


def evaluate_runs(samples_dir: str | Path, runs: Mapping[str, Sequence[str | Path]],
                  out_dir: str | Path, *, baseline: str = "wdl",
                  compare: tuple[str, str] = ("bst", "din"),
                  also_compare: Sequence[tuple[str, str]] = (), n_boot: int = 1000,
                  seed: int = 0, builder: Builder | None = None) -> Path:
    """Score every run on the test split of ``samples_dir`` and write the report into
    ``out_dir`` (see ``evaluation.report.write_report``). ``builder`` rebuilds models that
    ``bstrec.ranking.build_ranker`` does not know (e.g. the peers of benchmarks/). Returns the
    path of ``report.md``."""
    samples = SampleSet.load(samples_dir)
    test = samples.splits["test"]
    predictions: dict[str, list[npt.NDArray[np.float32]]] = {}
    attention: tuple[npt.NDArray[np.float32], list[str]] | None = None
    for name, paths in runs.items():
        for path in paths:
            ckpt = checkpoint_dir(path)
            res = evaluate_checkpoint(ckpt, samples_dir, "test", builder=builder)
            predictions.setdefault(name, []).append(res["predictions"])
            if attention is None and name.lower() == compare[0]:
                attention = attention_of_one_user(res["model"], test, samples)
    refs = reference_scores(samples.splits)
    protocol = str(samples.manifest.get("protocol", "unknown"))
    kwargs: dict[str, Any] = {}
    if attention is not None:
        kwargs = {"attention": attention[0], "attention_tokens": attention[1]}
    return write_report(out_dir, protocol=protocol, test_frame=test,
                        predictions={k: np.stack(v) for k, v in predictions.items()},
                        references=refs, baseline=baseline, compare=compare,
                        also_compare=also_compare, n_boot=n_boot,
                        seed=seed, **kwargs)
