"""One plain training loop for every ranker: BCE on logits, Adam/Adagrad, early stopping on
valid AUC, resumable checkpoints.

Determinism (the same config and data give bit-identical weights on the same machine and
thread count, interrupted or not):

- model init: seed it before building the model with ``seed_model_init(cfg.seed)`` (the task
  ``bstrec.training.task.train_ranker`` does); ``train`` receives an already built model;
- shuffling: epoch ``e`` is the permutation drawn by a ``torch.Generator`` seeded from
  ``(seed, e)``, so a resumed run re-derives it and skips the batches already done;
- dropout and any other global-RNG use in ``forward``: ``train`` seeds the global torch RNG from
  ``seed`` when a run starts, and resumable checkpoints save and restore its state.

Stalls: a run whose valid AUC stays within ``stall_margin`` of 0.5 has learned nothing, and
must not finish looking like any other run. From ``stall_after`` optimizer steps on, every
evaluation (each epoch end, plus one at step ``stall_after`` itself) is checked: one at chance
is logged as a warning and recorded in ``TrainResult.chance_checks``; ``TrainResult.stalled``
says the returned model (the best epoch's) is still at chance, or that ``stall_action="stop"``
ended the run at the first check at chance.

Data parallel (``bstrec.distributed.ddp``): when a process group is initialised, ``train``
wraps the model in ``DistributedDataParallel`` and keeps the one-process trajectory with the
same global ``batch_size``: every rank draws the same seeded permutation and takes its slice
(``batch_size / world`` rows) of each global batch. DDP averages the gradients of the ranks'
mean losses, which, with equal slices, is the gradient of the global batch's mean loss; a last
partial batch split unevenly is weighted so that this stays true. What differs: the float
reduction order, dropout masks (each rank has its own stream, seeded from ``(seed, rank)``), and
BatchNorm statistics (per rank). Rank 0 alone evaluates valid (the others receive its metrics,
so that all ranks take the same early-stopping and stall decisions) and writes checkpoints.
Checkpoints hold the unwrapped model and the position as global counts (epoch, batch, step), so
a run resumes with another number of processes; with the same number, each rank also gets its
own dropout RNG state back (bit-identical resume), with another, ranks re-seed from
``(seed, rank, step)``.

Output directory of a run (``out_dir``)::

    last/   resumable checkpoint (weights, optimizer, RNG, train state), every
            ``checkpoint_every`` steps and at each epoch end
    best/   checkpoint of the best epoch by valid AUC (never test), written when it improves
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bstrec.distributed.ddp import (
    all_reduce_sum,
    broadcast_floats,
    gather_objects,
    local_device,
    local_world_size,
    world,
)
from bstrec.evaluation.metrics import auc
from bstrec.features.spec import FeatureSpec
from bstrec.features.vocab import Vocabularies
from bstrec.training.checkpoint import (
    CheckpointError,
    load_weights,
    read_meta,
    restore_optimizer,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from bstrec.training.tensors import Batch, TensorSplit

log = logging.getLogger(__name__)

LAST = "last"
BEST = "best"
# Streams derived from the one seed, so that init, shuffling and dropout never share draws.
_INIT, _SHUFFLE, _DROPOUT = 0, 1, 2
# Config fields a resumed run may change: they do not alter the trajectory of the weights.
_RESUME_MAY_CHANGE = frozenset({"max_epochs", "patience", "min_delta", "checkpoint_every",
                                "eval_batch_size", "num_threads", "max_steps", "device",
                                "stall_margin", "stall_after", "stall_action"})


@dataclass(frozen=True)
class TrainConfig:
    """How a ranker is trained (``bstrec.config.from_dict`` fills it; unknown keys are errors)."""

    optimizer: Literal["adam", "adagrad"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 256
    max_epochs: int = 10
    # epochs without a valid AUC gain > min_delta before stopping; 0 = never stop early
    patience: int = 2
    min_delta: float = 0.0
    seed: int = 0
    # steps between resumable checkpoints, on top of the one at each epoch end; 0 = epoch ends only
    checkpoint_every: int = 0
    eval_batch_size: int = 4096
    # torch intra-op threads; 0 = every core this process may use
    num_threads: int = 0
    # stop after this many optimizer steps in all (the partial epoch is evaluated); 0 = no limit
    max_steps: int = 0
    # clip the gradients' global L2 norm to this; 0 = no clipping
    grad_clip: float = 0.0
    # "cpu" or "cuda[:i]": the model and both splits are moved there once
    device: str = "cpu"
    # a valid AUC within this of 0.5 is chance (see the module docstring); 0 = no stall checks
    stall_margin: float = 0.02
    # steps before the checks begin; > 0 also evaluates valid at that step, mid-epoch if need be
    stall_after: int = 0
    # at a check at chance: "warn" logs it and goes on, "stop" also ends the run
    stall_action: Literal["warn", "stop"] = "warn"

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "adagrad"):
            raise ValueError(f"optimizer must be 'adam' or 'adagrad', got {self.optimizer!r}")
        if self.stall_action not in ("warn", "stop"):
            raise ValueError(f"stall_action must be 'warn' or 'stop', got {self.stall_action!r}")
        if not 0 <= self.stall_margin < 0.5:
            raise ValueError(f"stall_margin must be in [0, 0.5), got {self.stall_margin}")
        positive = {"lr": self.lr, "batch_size": self.batch_size, "max_epochs": self.max_epochs,
                    "eval_batch_size": self.eval_batch_size}
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        non_negative = {"weight_decay": self.weight_decay, "patience": self.patience,
                        "min_delta": self.min_delta, "seed": self.seed,
                        "checkpoint_every": self.checkpoint_every,
                        "num_threads": self.num_threads, "max_steps": self.max_steps,
                        "grad_clip": self.grad_clip, "stall_after": self.stall_after}
        for name, value in non_negative.items():
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")


@dataclass(frozen=True)
class ModelInfo:
    """What makes a checkpoint self-describing beyond the weights: registry name, feature spec,
    vocabularies, and ``extra`` facts recorded with it (e.g. which samples it was trained on)."""

    name: str
    spec: FeatureSpec
    vocabs: Vocabularies
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EpochStats:
    epoch: int  # 1-based
    steps: int  # optimizer steps in all after this epoch
    train_loss: float  # mean BCE over the epoch's samples
    valid_auc: float
    valid_logloss: float
    samples_per_s: float  # training throughput (forward, backward, step; no eval, no I/O)
    train_seconds: float


@dataclass(frozen=True)
class ChanceCheck:
    """An evaluation whose valid AUC was within ``stall_margin`` of 0.5."""

    epoch: int  # 1-based, the epoch under way (a check at step ``stall_after`` may be mid-epoch)
    steps: int  # optimizer steps in all at the check
    valid_auc: float


@dataclass
class TrainResult:
    best_valid_auc: float
    best_epoch: int  # 1-based; 0 when no epoch was evaluated
    history: list[EpochStats]
    steps: int
    stop_reason: str  # "max_epochs" | "early_stopping" | "max_steps" | "stalled"
    stalled: bool = False  # the returned model is at chance, or the run stopped at chance
    chance_checks: list[ChanceCheck] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainResult:
        """The inverse of ``to_dict`` (e.g. a result read back from train_result.json)."""
        data = dict(d)
        data["history"] = [EpochStats(**h) for h in data.get("history", [])]
        data["chance_checks"] = [ChanceCheck(**c) for c in data.get("chance_checks", [])]
        return cls(**data)


@dataclass
class _State:
    """Where a run stands; saved as JSON in every resumable checkpoint."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches done in the epoch under way
    step: int = 0
    epoch_loss_sum: float = 0.0  # sum over the epoch's samples so far
    epoch_samples: int = 0
    epoch_seconds: float = 0.0
    best_auc: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[EpochStats] = field(default_factory=list)
    finished: bool = False
    stop_reason: str = ""
    stalled: bool = False
    chance_checks: list[ChanceCheck] = field(default_factory=list)
    world_size: int = 1  # processes of the run that wrote the state (checkpoints before: 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> _State:
        data = dict(d)
        data["history"] = [EpochStats(**h) for h in data.get("history", [])]
        data["chance_checks"] = [ChanceCheck(**c) for c in data.get("chance_checks", [])]
        return cls(**data)

    def result(self) -> TrainResult:
        best = self.best_auc if self.best_auc is not None else float("nan")
        return TrainResult(best_valid_auc=best, best_epoch=self.best_epoch,
                           history=list(self.history), steps=self.step,
                           stop_reason=self.stop_reason, stalled=self.stalled,
                           chance_checks=list(self.chance_checks))


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (NumPy's SeedSequence mixing: nearby inputs do not collide)."""
    state = np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)
    return int(state[0]) >> 1


def seed_model_init(seed: int) -> None:
    """Seed the global torch RNG for building a model; call it right before the constructor."""
    torch.manual_seed(derive_seed(seed, _INIT))


def all_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """Intra-op threads for ``num_threads=0``: this process's share of the cores (the local
    ranks of a distributed run share them; oversubscribed cores slow every rank)."""
    return max(1, all_cores() // local_world_size())


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = list(model.parameters())
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adagrad(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def binary_logloss(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean binary cross-entropy of ``logits`` (any real) against ``labels`` in {0, 1}, computed
    stably as mean(log(1 + e^z) - y z)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if z.size == 0:
        return float("nan")
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def _model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def predict_logits(model: nn.Module, split: TensorSplit, batch_size: int = 4096) -> np.ndarray:
    """Logits (N,) float32 of every row of ``split`` in order (eval mode, no grad); (N, H)
    for a multi-task ranker whose forward returns (B, H) with H > 1."""
    was_training = model.training
    model.eval()
    device = _model_device(model)
    out: list[torch.Tensor] = []
    try:
        for batch in split.batches(batch_size):
            logits = model(_to(batch, device)).float()
            out.append(logits.reshape(logits.shape[0], -1).cpu())
    finally:
        model.train(was_training)
    if not out:
        return np.zeros(0, dtype=np.float32)
    flat = torch.cat(out)
    return (flat.squeeze(1) if flat.shape[1] == 1 else flat).numpy()


def predict(model: nn.Module, split: TensorSplit, batch_size: int = 4096) -> np.ndarray:
    """Click probabilities (N,) float32 of every row of ``split`` in order (eval mode, no grad)."""
    logits = predict_logits(model, split, batch_size)
    return torch.sigmoid(torch.from_numpy(logits)).numpy()


def evaluate(model: nn.Module, split: TensorSplit, batch_size: int = 4096) -> dict[str, float]:
    """AUC and logloss of ``model`` on ``split``; with (N, H) labels (multi-task), the means
    over the heads of each head's AUC and logloss (what early stopping then reads)."""
    logits = predict_logits(model, split, batch_size)
    labels = split.tensors["label"].cpu().numpy()
    if labels.ndim == 2:
        heads = [evaluate_arrays(labels[:, h], logits[:, h]) for h in range(labels.shape[1])]
        return {k: float(np.mean([m[k] for m in heads])) for k in ("auc", "logloss")}
    return evaluate_arrays(labels, logits)


def evaluate_arrays(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """AUC and logloss of logits (N,) against labels (N,)."""
    return {"auc": auc(labels, logits), "logloss": binary_logloss(labels, logits)}


def train(
    model: nn.Module,
    train: TensorSplit,
    valid: TensorSplit,
    cfg: TrainConfig,
    *,
    out_dir: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    info: ModelInfo | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    console: Console | None = None,
) -> TrainResult:
    """Train ``model`` (``forward(batch) -> logits (B,)``) on ``train``, early-stopping on the
    AUC of ``valid``; on return the model holds the best epoch's weights (eval mode).

    ``out_dir`` (requires ``info``) receives ``last/`` and ``best/`` checkpoints (see the module
    docstring). ``resume`` continues from ``out_dir/last`` (the model must be built like the saved
    one; if there is no checkpoint yet, the run starts from scratch). ``on_step(step, loss)`` is
    called after every optimizer step, once any checkpoint for that step is written.
    The progress bar (shown only on a terminal) goes to ``console`` (default: stderr); pass the
    console your logging handler writes to, so that log lines print above the bar.

    Under an initialised process group the run is data parallel (see the module docstring):
    call it on every rank with the same arguments; ``batch_size`` must divide by the world size.
    """
    if out_dir is not None and info is None:
        raise ValueError("checkpoints need a ModelInfo: pass info=ModelInfo(name, spec, vocabs)")
    if resume and out_dir is None:
        raise ValueError("resume=True needs the out_dir of the run to resume")
    if len(train) == 0 or len(valid) == 0:
        raise ValueError(f"empty split: train has {len(train)} rows, valid {len(valid)}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads or default_threads())
    try:
        run = _Run(model, train, valid, cfg, out_dir, info, on_step)
        return run.run(resume, progress, console or Console(stderr=True))
    finally:
        torch.set_num_threads(previous_threads)


class _Run:
    def __init__(self, model: nn.Module, train: TensorSplit, valid: TensorSplit, cfg: TrainConfig,
                 out_dir: Path | None, info: ModelInfo | None,
                 on_step: Callable[[int, torch.Tensor], None] | None) -> None:
        self.world, self.rank = world()
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size {cfg.batch_size} does not divide among {self.world} "
                             "processes: the global batch is split evenly")
        self.device = local_device(cfg.device)
        self.model = model.to(self.device)
        # the module that runs the training forward: DDP syncs gradients during backward
        self.net: nn.Module = self.model
        if self.device.type != "cpu":
            train = TensorSplit({k: v.to(self.device) for k, v in train.tensors.items()})
            valid = TensorSplit({k: v.to(self.device) for k, v in valid.tensors.items()})
        self.train_split, self.valid_split = train, valid
        self.cfg = cfg
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.info = info
        self.on_step = on_step
        self.optimizer = make_optimizer(self.model, cfg)
        self.state = _State()
        self.best_weights: dict[str, torch.Tensor] | None = None

    # -- checkpoints ----------------------------------------------------------------------
    def _save(self, name: str, *, resumable: bool, metrics: Mapping[str, Any] | None = None
              ) -> None:
        if self.out_dir is None or self.info is None:
            return
        # every rank's RNG, so that a resume with as many processes redraws the same masks
        rng = gather_objects(rng_state()) if resumable and self.world > 1 else None
        if self.rank != 0:
            return
        save_checkpoint(
            self.out_dir / name, self.model, self.info.name, self.info.spec, self.info.vocabs,
            optimizer=self.optimizer if resumable else None,
            train_state=self.state.to_dict() if resumable else None,
            metrics=metrics, train_config=dataclasses.asdict(self.cfg), extra=self.info.extra,
            rank_rng=rng)

    def _start(self, resume: bool) -> None:
        last = self.out_dir / LAST if self.out_dir is not None else None
        if not resume:
            if self.out_dir is not None and any(
                    (self.out_dir / d).exists() for d in (LAST, BEST)):
                raise FileExistsError(f"{self.out_dir} already holds a training run: resume it "
                                      "or choose another output directory")
            self._seed_dropout()
            return
        assert last is not None and self.out_dir is not None and self.info is not None
        if not last.exists():
            log.warning("no checkpoint in %s: starting from scratch", last)
            self._seed_dropout()
            return
        meta = read_meta(last)
        if meta.get("model_name") != self.info.name:
            raise CheckpointError(f"{last} holds a {meta.get('model_name')!r} model, "
                                  f"not {self.info.name!r}")
        saved_cfg = meta.get("train_config") or {}
        changed = sorted(k for k, v in dataclasses.asdict(self.cfg).items()
                         if k not in _RESUME_MAY_CHANGE and saved_cfg.get(k) != v)
        if changed:
            raise CheckpointError(
                f"cannot resume {last}: train config differs in {changed} "
                f"(saved: {({k: saved_cfg.get(k) for k in changed})})")
        if not meta.get("resumable") or not meta.get("train_state"):
            raise CheckpointError(f"{last} is not a resumable checkpoint")
        self.state = _State.from_dict(meta["train_state"])
        if (self.state.finished and self.state.stop_reason == "max_epochs"
                and self.state.epoch < self.cfg.max_epochs):
            # a finished run resumed with more epochs goes on where it stopped
            self.state.finished, self.state.stop_reason = False, ""
        if self.state.best_epoch:
            load_weights(self.model, self.out_dir / BEST)
            self.best_weights = self._copy_weights()
        load_weights(self.model, last)
        restore_optimizer(self.optimizer, last)
        if self.state.world_size == self.world == 1:
            restore_rng_state(last)
        elif self.state.world_size == self.world:
            restore_rng_state(last, rank=self.rank)
        else:
            # another process count splits each batch otherwise: no saved stream fits a rank
            torch.manual_seed(derive_seed(self.cfg.seed, _DROPOUT, self.rank, self.state.step))
            log.info("resuming a %d-process run on %d: dropout masks re-seeded",
                     self.state.world_size, self.world)
        self.state.world_size = self.world
        log.info("resuming %s at epoch %d, batch %d (step %d)", last, self.state.epoch + 1,
                 self.state.batch, self.state.step)

    def _seed_dropout(self) -> None:
        # rank 0 keeps the one-process stream; the others get their own
        parts = (self.cfg.seed, _DROPOUT) if self.rank == 0 else (self.cfg.seed, _DROPOUT,
                                                                  self.rank)
        torch.manual_seed(derive_seed(*parts))
        self.state.world_size = self.world

    def _copy_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    # -- the loop -------------------------------------------------------------------------
    def run(self, resume: bool, progress: bool, console: Console) -> TrainResult:
        self._start(resume)
        if self.world > 1:
            # after the resume, so that DDP's broadcast of rank 0's weights finds them loaded
            ids = [self.device.index] if self.device.type == "cuda" else None
            # the graph is the same every step; static_graph also lets a config leave a
            # parameter out of it (DDP would otherwise fail at the next step)
            self.net = DistributedDataParallel(self.model, device_ids=ids, static_graph=True)
        progress = progress and self.rank == 0
        cfg, state = self.cfg, self.state
        if state.finished:
            log.info("run in %s already finished (%s)", self.out_dir, state.stop_reason)
        n_batches = math.ceil(len(self.train_split) / cfg.batch_size)
        with _progress_bar(progress, console) as bar:
            while not state.finished:
                task = bar.add_task("", total=n_batches, completed=state.batch,
                                    epoch=state.epoch + 1, loss=float("nan"), rate=0.0)
                self._train_epoch(n_batches, bar, task)
                self._end_epoch()
        if self.best_weights is not None:
            self.model.load_state_dict(self.best_weights)
        self.model.eval()
        return state.result()

    def _train_epoch(self, n_batches: int, bar: Progress, task: TaskID) -> None:
        cfg, state, model = self.cfg, self.state, self.net
        shuffle = torch.Generator().manual_seed(derive_seed(cfg.seed, _SHUFFLE, state.epoch))
        order = torch.randperm(len(self.train_split), generator=shuffle)
        # the epoch's loss so far is a global sum: rank 0 carries it, the others add theirs
        base = state.epoch_loss_sum if self.rank == 0 else 0.0
        loss_sum = torch.tensor(base, dtype=torch.float64, device=self.device)
        # the bar's rows: those before this (re)start, and this rank's since
        shown = state.epoch_samples
        model.train()
        started = time.perf_counter()

        def clock() -> None:
            nonlocal started
            now = time.perf_counter()
            state.epoch_seconds += now - started
            started = now

        def sync() -> None:
            # Fold the running totals into the state (a collective in a group; the .item() also
            # syncs an accelerator): only where every rank calls it.
            clock()
            state.epoch_loss_sum = float(all_reduce_sum(loss_sum).item())

        for b in range(state.batch, n_batches):
            rows = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            mine = rows.tensor_split(self.world)[self.rank] if self.world > 1 else rows
            batch = _to(self.train_split.batch(mine), self.device)
            labels = batch["label"]
            logits = model(batch)
            if logits.shape != labels.shape:
                raise ValueError(f"{type(self.model).__name__}.forward returned logits of shape "
                                 f"{tuple(logits.shape)}, expected {tuple(labels.shape)}")
            n, m = int(labels.shape[0]), int(rows.shape[0])
            if n * self.world == m:
                loss = F.binary_cross_entropy_with_logits(logits, labels)
                loss_sum += loss.detach().double() * n
                objective = loss
            else:
                # an uneven last batch: DDP's average of these is the global batch's mean loss
                total = F.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
                loss = total.detach() / max(n, 1)
                loss_sum += total.detach().double()
                objective = total * (self.world / m)
            self.optimizer.zero_grad(set_to_none=True)
            objective.backward()  # type: ignore[no-untyped-call]
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            shown += n
            state.step += 1
            state.batch += 1
            state.epoch_samples += m
            if not bar.disable and (state.batch % 20 == 0 or state.batch == n_batches):
                clock()
                bar.update(task, completed=state.batch,
                           loss=float(loss_sum.item()) / max(shown, 1),
                           rate=state.epoch_samples / max(state.epoch_seconds, 1e-9))
            hit_max_steps = bool(cfg.max_steps) and state.step >= cfg.max_steps
            if (cfg.stall_margin and cfg.stall_after and state.step == cfg.stall_after
                    and state.batch < n_batches and not hit_max_steps):
                sync()
                # eval mode draws no random numbers: the trajectory is the same as without it
                auc_now = self._evaluate()["auc"]
                model.train()
                if self._check_chance(auc_now) and cfg.stall_action == "stop":
                    state.finished, state.stop_reason = True, "stalled"
                started = time.perf_counter()  # evaluation is not training time
            if (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0
                    and state.batch < n_batches and not hit_max_steps
                    and self.out_dir is not None):
                sync()
                self._save(LAST, resumable=True)
                started = time.perf_counter()  # checkpoint writing is not training time
            if self.on_step is not None:
                self.on_step(state.step, loss.detach())
            if hit_max_steps:
                state.finished, state.stop_reason = True, "max_steps"
            if state.finished:
                break
        sync()

    def _evaluate(self) -> dict[str, float]:
        """Valid AUC and logloss, computed by rank 0 and sent to the others."""
        metrics = {"auc": float("nan"), "logloss": float("nan")}
        if self.rank == 0:
            metrics = evaluate(self.model, self.valid_split, self.cfg.eval_batch_size)
        auc_, logloss = broadcast_floats([metrics["auc"], metrics["logloss"]], self.device)
        return {"auc": auc_, "logloss": logloss}

    def _end_epoch(self) -> None:
        cfg, state = self.cfg, self.state
        metrics = self._evaluate()
        samples = max(state.epoch_samples, 1)
        stats = EpochStats(
            epoch=state.epoch + 1, steps=state.step,
            train_loss=state.epoch_loss_sum / samples,
            valid_auc=metrics["auc"], valid_logloss=metrics["logloss"],
            samples_per_s=state.epoch_samples / max(state.epoch_seconds, 1e-9),
            train_seconds=state.epoch_seconds)
        state.history.append(stats)
        improved = state.best_auc is None or stats.valid_auc > state.best_auc + cfg.min_delta
        if improved:
            state.best_auc, state.best_epoch, state.bad_epochs = stats.valid_auc, stats.epoch, 0
            self.best_weights = self._copy_weights()
            self._save(BEST, resumable=False, metrics={
                "valid_auc": stats.valid_auc, "valid_logloss": stats.valid_logloss,
                "epoch": stats.epoch, "step": stats.steps})
        else:
            state.bad_epochs += 1
        log.info("epoch %d: train loss %.4f, valid AUC %.4f, valid logloss %.4f, "
                 "%.0f samples/s%s", stats.epoch, stats.train_loss, stats.valid_auc,
                 stats.valid_logloss, stats.samples_per_s, " (best)" if improved else "")
        at_chance = state.step >= cfg.stall_after and self._check_chance(stats.valid_auc)
        best = state.best_auc if state.best_auc is not None else float("nan")
        state.stalled = (state.stop_reason == "stalled"
                         or (state.step >= cfg.stall_after and self._at_chance(best)))
        state.epoch += 1
        state.batch = state.epoch_samples = 0
        state.epoch_loss_sum = state.epoch_seconds = 0.0
        if not state.finished:
            if at_chance and cfg.stall_action == "stop":
                state.finished, state.stop_reason, state.stalled = True, "stalled", True
            elif cfg.patience and state.bad_epochs >= cfg.patience:
                state.finished, state.stop_reason = True, "early_stopping"
            elif state.epoch >= cfg.max_epochs:
                state.finished, state.stop_reason = True, "max_epochs"
        self._save(LAST, resumable=True)
        if state.finished and state.stalled:
            log.warning("run stalled at chance: best valid AUC %.4f after %d steps (%s); the "
                        "model has learned nothing from the features", best, state.step,
                        state.stop_reason.replace("_", " "))

    def _at_chance(self, valid_auc: float) -> bool:
        return bool(self.cfg.stall_margin) and abs(valid_auc - 0.5) <= self.cfg.stall_margin

    def _check_chance(self, valid_auc: float) -> bool:
        """Record and warn about an evaluation at chance; whether it was one."""
        if not self._at_chance(valid_auc):
            return False
        state = self.state
        if state.chance_checks and state.chance_checks[-1].steps == state.step:
            return True  # the epoch end of a run stopped mid-epoch: the same weights again
        state.chance_checks.append(ChanceCheck(epoch=state.epoch + 1, steps=state.step,
                                               valid_auc=valid_auc))
        log.warning("valid AUC %.4f at step %d (epoch %d) is within %.3f of chance (0.5)%s",
                    valid_auc, state.step, state.epoch + 1, self.cfg.stall_margin,
                    ": stopping (stall_action=stop)" if self.cfg.stall_action == "stop" else "")
        return True


@contextmanager
def _progress_bar(enabled: bool, console: Console) -> Iterator[Progress]:
    bar = Progress(
        TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  {task.fields[rate]:,.0f} samples/s"),
        console=console, disable=not (enabled and console.is_terminal))
    with bar:
        yield bar
