"""Training the two-tower retriever: sampled softmax over in-batch items and optional extra
negatives, early stopping on valid Recall@K of protocol P2 (never test).

The ranker loop (training/loop.py) optimises BCE on one logit per row; a retriever's loss is
over a batch's user-item score matrix, so it has this small loop of its own. The checkpoint is
the ranker's self-describing format (``training/checkpoint.py``: config, feature spec,
vocabularies, safetensors weights) under the model name ``two_tower``.

Data parallel (``bstrec train retriever --nproc N``, ``bstrec.distributed.ddp``): under an
initialised process group every rank takes its slice of each global batch of the same seeded
permutation, and the other ranks' positives join each row's logits as extra negatives (gathered
with their gradient), so that every row is scored against the whole global batch as in one
process, and DDP's average of the ranks' mean losses is the global batch's mean loss. What
differs from one process: float reduction order, dropout masks and sampled extra negatives
(each rank draws its own). Rank 0 evaluates (the others receive its metrics, so that all stop
together) and writes; a global batch with fewer rows than processes is skipped.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from bstrec.config import from_dict
from bstrec.data.samples import SampleSet
from bstrec.distributed.ddp import all_reduce_sum, gather_objects, world
from bstrec.features.spec import FeatureSpec
from bstrec.retrieval.catalog import Catalog, QuerySet, item_feature_names
from bstrec.retrieval.loss import sampled_softmax_loss
from bstrec.retrieval.negatives import NegativeSampler, build_sampler, in_batch_log_q, item_counts
from bstrec.retrieval.topk import list_metrics, top_k
from bstrec.retrieval.two_tower import TwoTower, TwoTowerConfig
from bstrec.training.checkpoint import load_checkpoint, save_checkpoint
from bstrec.training.loop import default_threads, derive_seed, seed_model_init
from bstrec.training.tensors import Batch, TensorSplit

log = logging.getLogger(__name__)

MODEL_NAME = "two_tower"
CATALOG = "catalog.parquet"


@dataclass(frozen=True)
class RetrieverTrainConfig:
    """How the two-tower is trained (``bstrec.config.from_dict`` fills it; unknown keys are errors)."""

    lr: float = 2e-3
    weight_decay: float = 0.0
    batch_size: int = 1024
    max_epochs: int = 8
    patience: int = 2  # epochs without a valid Recall@eval_k gain before stopping; 0 = never
    temperature: float = 0.05
    logq: bool = True  # subtract log Q from every logit (sampling-bias correction)
    # which train samples are positives: rated >= threshold ("label") or every rating ("all")
    positives: Literal["label", "all"] = "all"
    # extra negatives per row on top of the in-batch ones (none: in-batch only)
    negatives: Literal["none", "uniform", "popularity", "hard"] = "none"
    n_negatives: int = 16
    hard_pool: int = 50  # hard negatives are drawn among each row's top hard_pool items
    hard_from_epoch: int = 2  # 1-based epoch from which hard negatives are mined (warm-up)
    popularity_power: float = 0.75
    eval_queries: int = 5000  # valid queries scored each epoch (a seeded subset)
    eval_k: int = 50
    seed: int = 0
    num_threads: int = 0  # 0 = every core this process may use

    def __post_init__(self) -> None:
        for name in ("lr", "batch_size", "max_epochs", "temperature", "n_negatives", "hard_pool",
                     "eval_queries", "eval_k"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.positives not in ("label", "all"):
            raise ValueError(f"positives must be label|all, got {self.positives!r}")
        if self.negatives not in ("none", "uniform", "popularity", "hard"):
            raise ValueError(f"negatives must be none|uniform|popularity|hard, got {self.negatives!r}")


@dataclass
class RetrieverResult:
    best_epoch: int
    best_valid: float  # Recall@eval_k on the valid queries of the best epoch
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def build_two_tower(name: str, spec: FeatureSpec, overrides: dict[str, Any]) -> nn.Module:
    """Checkpoint builder (``training.checkpoint.Builder``) for the two-tower."""
    if name != MODEL_NAME:
        raise ValueError(f"not a two-tower checkpoint: {name!r}")
    return TwoTower(spec, from_dict(TwoTowerConfig, overrides, where="two_tower"))


class _GatherRows(torch.autograd.Function):
    """Every rank's (R, D) rows -> (world, R, D) on every rank, with the gradient: the backward
    sums each rank's gradient of the gathered rows and hands each rank the part of its own.
    (torch.distributed.nn.functional.all_gather does this too, but is deprecated.)"""

    @staticmethod
    def forward(ctx: Any, rows: Tensor) -> Tensor:
        out = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(out, rows.contiguous())
        return torch.stack(out)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total[dist.get_rank()]


def _gather_padded(x: Tensor, rows: int, grad: bool) -> Tensor:
    """(n, ...) on each rank, n <= rows -> (world * rows, ...): each rank's block zero-padded."""
    padded = torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))])
    if grad:
        gathered: Tensor = _GatherRows.apply(padded)  # type: ignore[no-untyped-call]
        return gathered.flatten(0, 1)
    out = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
    dist.all_gather(out, padded)
    return torch.cat(out)


class _Objective(nn.Module):
    """The training loss as one ``forward``, so that DistributedDataParallel (which hooks the
    forward of the module it wraps) can sync the gradients of both towers."""

    def __init__(self, model: TwoTower, cfg: RetrieverTrainConfig, item_cols: list[str],
                 log_q_all: Tensor, catalog: Catalog, sampler: NegativeSampler | None,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.model, self.cfg, self.item_cols = model, cfg, item_cols
        self.log_q_all, self.catalog = log_q_all, catalog
        self.sampler, self.generator = sampler, generator

    def forward(self, batch: Batch, global_rows: int, use_sampler: bool) -> Tensor:
        """Mean sampled-softmax loss of the batch's rows (scalar), of a global batch of
        ``global_rows``; ``use_sampler``: with the sampler's extra negatives."""
        cfg, model = self.cfg, self.model
        u = model.encode_users(batch)  # (B, D)
        v = model.encode_items({c: batch[c] for c in self.item_cols})  # (B, D)
        pos = batch["item"]
        log_q = self.log_q_all[pos] if cfg.logq else None
        extra = None
        if use_sampler and self.sampler is not None:
            scores = None
            if cfg.negatives == "hard":
                with torch.no_grad():
                    model.eval()
                    scores = u.detach() @ item_vectors(model, self.catalog).T  # (B, N)
                    model.train()
                    # the user's own history is no negative either
                    scores.scatter_(1, batch["hist_item"], -torch.inf)
            e_ids = self.sampler.sample(pos, self.generator, scores)  # (B, M)
            uniq, inv = torch.unique(e_ids, return_inverse=True)
            e_v = model.encode_items(self.catalog.batch(uniq))[inv]  # (B, M, D)
            # without the correction, a log Q of 0 subtracts nothing
            e_lq = self.sampler.log_q(e_ids) if cfg.logq else torch.zeros(e_ids.shape)
            extra = (e_v, e_ids, e_lq)
        neg = neg_ids = neg_lq = None
        n_world, rank = world()
        if n_world > 1:
            # the other ranks' in-batch items, as extra negatives of every local row
            rows = math.ceil(global_rows / n_world)
            all_v = _gather_padded(v, rows, grad=True)  # (W*rows, D)
            all_ids = _gather_padded(pos, rows, grad=False)  # (W*rows,), 0 = padding
            # the sizes of Tensor.tensor_split's slices, with which the ranks took their rows
            sizes = [global_rows // n_world + (r < global_rows % n_world) for r in range(n_world)]
            keep = torch.cat([torch.arange(rows) < sizes[r] if r != rank
                              else torch.zeros(rows, dtype=torch.bool) for r in range(n_world)])
            others_v, others_ids = all_v[keep], all_ids[keep]
            B = pos.shape[0]
            neg = others_v.unsqueeze(0).expand(B, -1, -1)  # (B, G-B, D)
            neg_ids = others_ids.unsqueeze(0).expand(B, -1)  # (B, G-B)
            neg_lq = (self.log_q_all[others_ids].unsqueeze(0).expand(B, -1) if cfg.logq
                      else torch.zeros(neg_ids.shape))
        if extra is not None:
            e_v, e_ids, e_lq = extra
            if neg is None or neg_ids is None or neg_lq is None:
                neg, neg_ids, neg_lq = e_v, e_ids, e_lq
            else:
                neg = torch.cat([neg, e_v], 1)
                neg_ids = torch.cat([neg_ids, e_ids], 1)
                neg_lq = torch.cat([neg_lq, e_lq], 1)
        return sampled_softmax_loss(u, v, pos, temperature=cfg.temperature, log_q=log_q,
                                    neg=neg, neg_ids=neg_ids, neg_log_q=neg_lq)


@torch.no_grad()
def item_vectors(model: TwoTower, catalog: Catalog, batch: int = 8192) -> torch.Tensor:
    """(N, D) vectors of every catalog row (reserved rows included, never retrieved)."""
    model.eval()
    ids = torch.arange(catalog.size)
    return torch.cat([model.encode_items(catalog.batch(ids[i:i + batch]))
                      for i in range(0, catalog.size, batch)])


@torch.no_grad()
def user_vectors(model: TwoTower, data: TensorSplit, batch: int = 4096) -> torch.Tensor:
    """(Q, D) user vectors of every row of ``data``."""
    model.eval()
    return torch.cat([model.encode_users(b) for b in data.batches(batch)])


@torch.no_grad()
def retrieve(model: TwoTower, catalog: Catalog, queries: QuerySet, k: int,
             batch: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Exact top k catalog items per query, seen items excluded -> scores, ids (Q, k)."""
    items = item_vectors(model, catalog)
    out_s, out_i = [], []
    for lo in range(0, len(queries), batch):
        rows = np.arange(lo, min(lo + batch, len(queries)))
        u = model.encode_users(queries.data.batch(torch.from_numpy(rows)))
        s, i = top_k((u @ items.T).numpy(), k, queries.seen_mask(rows, catalog.size))
        out_s.append(s)
        out_i.append(i)
    return np.concatenate(out_s), np.concatenate(out_i)


def train_two_tower(samples: SampleSet, cfg: RetrieverTrainConfig | None = None,
                    model_cfg: TwoTowerConfig | None = None, *, out_dir: str | Path | None = None,
                    progress: bool = True, console: Console | None = None,
                    valid: QuerySet | None = None) -> tuple[TwoTower, RetrieverResult]:
    """Train on the train split, select the epoch on valid P2 queries; with ``out_dir`` write
    ``best/`` (checkpoint) and ``catalog.parquet``. Returns the best model (eval mode)."""
    cfg = cfg or RetrieverTrainConfig()
    torch.set_num_threads(cfg.num_threads or default_threads())
    spec = samples.spec
    catalog = Catalog.from_samples(samples)
    frame = samples.splits["train"]
    if cfg.positives == "label":
        frame = frame.filter(frame["label"] == 1)
    train = TensorSplit.from_frame(frame, spec)
    valid = valid if valid is not None else QuerySet.from_samples(samples, "valid")
    rng = np.random.default_rng(cfg.seed)
    if len(valid) > cfg.eval_queries:
        valid = valid.subset(np.sort(rng.choice(len(valid), cfg.eval_queries, replace=False)))

    n_world, rank = world()
    if cfg.batch_size % n_world:
        raise ValueError(f"batch_size {cfg.batch_size} does not divide among {n_world} "
                         "processes: the global batch is split evenly")
    seed_model_init(cfg.seed)
    model = TwoTower(spec, model_cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    counts = item_counts(train.tensors["item"].numpy(), catalog.size)
    log_q_all = in_batch_log_q(counts, cfg.batch_size)
    sampler: NegativeSampler | None = None
    if cfg.negatives != "none":
        sampler = build_sampler(cfg.negatives, counts, cfg.n_negatives,
                                power=cfg.popularity_power, pool=cfg.hard_pool)
    # rank 0 keeps the one-process streams; the others draw their own
    torch.manual_seed(derive_seed(cfg.seed, 2, *([rank] if rank else [])))
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, 3, *([rank] if rank else [])))
    objective: nn.Module = _Objective(model, cfg, item_feature_names(spec), log_q_all, catalog,
                                      sampler, gen)
    if n_world > 1:
        # some configs leave parameters out of the graph (encoder="mean": the summary token)
        objective = DistributedDataParallel(objective, find_unused_parameters=True)

    result = RetrieverResult(best_epoch=0, best_valid=-1.0)
    best_state: dict[str, torch.Tensor] | None = None
    bad = 0
    n_batches = math.ceil(len(train) / cfg.batch_size)
    console = console or Console(stderr=True)
    started = time.perf_counter()
    bar = Progress(TextColumn("two-tower epoch {task.fields[epoch]}"), BarColumn(),
                   MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("loss {task.fields[loss]:.4f}"), console=console,
                   disable=not (progress and rank == 0 and console.is_terminal))
    with bar:
        for epoch in range(1, cfg.max_epochs + 1):
            task = bar.add_task("", total=n_batches, epoch=epoch, loss=float("nan"))
            shuffle = torch.Generator().manual_seed(derive_seed(cfg.seed, 1, epoch))
            order = torch.randperm(len(train), generator=shuffle)
            model.train()
            totals = torch.zeros(2, dtype=torch.float64)  # loss sum, rows: this rank's
            t0 = time.perf_counter()
            for step in range(n_batches):
                rows = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
                m = int(rows.shape[0])
                if m < n_world:
                    continue  # a rank would get no row (see the module docstring)
                mine = rows.tensor_split(n_world)[rank] if n_world > 1 else rows
                batch = train.batch(mine)
                use_sampler = cfg.negatives != "hard" or epoch >= cfg.hard_from_epoch
                loss = objective(batch, m, use_sampler)
                n = int(mine.shape[0])
                # DDP averages the ranks' gradients: weight each mean by its share of the rows
                scale = n * n_world / m
                opt.zero_grad(set_to_none=True)
                (loss * scale if scale != 1.0 else loss).backward()
                opt.step()
                totals += torch.tensor([float(loss.detach()) * n, n], dtype=torch.float64)
                if step % 20 == 0 or step == n_batches - 1:
                    bar.update(task, completed=step + 1, loss=float(totals[0] / totals[1]))
            train_s = time.perf_counter() - t0
            loss_sum, seen = (float(x) for x in all_reduce_sum(totals))
            metrics: dict[str, float] | None = None
            if rank == 0:
                _, ids = retrieve(model, catalog, valid, cfg.eval_k)
                metrics = list_metrics(ids, valid.targets, (10, cfg.eval_k))
            metrics = gather_objects(metrics)[0]
            assert metrics is not None
            score = metrics[f"recall@{cfg.eval_k}"]
            result.history.append({"epoch": epoch, "train_loss": loss_sum / max(seen, 1),
                                   **{f"valid_{k}": v for k, v in metrics.items()},
                                   "train_seconds": train_s})
            log.info("two-tower epoch %d: loss %.4f, valid recall@%d %.4f (%.0f s)", epoch,
                     loss_sum / max(seen, 1), cfg.eval_k, score, train_s)
            if score > result.best_valid:
                result.best_valid, result.best_epoch, bad = score, epoch, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
                if cfg.patience and bad >= cfg.patience:
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    result.seconds = time.perf_counter() - started
    if out_dir is not None and rank == 0:
        save_retriever(out_dir, model, samples, catalog, cfg, result)
    return model, result


def save_retriever(out_dir: str | Path, model: TwoTower, samples: SampleSet, catalog: Catalog,
                   cfg: RetrieverTrainConfig, result: RetrieverResult) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "best", model, MODEL_NAME, samples.spec, samples.vocabs,
                    metrics={"valid_recall": result.best_valid, "epoch": result.best_epoch},
                    train_config=dataclasses.asdict(cfg),
                    extra={"history": result.history, "manifest_hash":
                           samples.manifest.get("config_hash")})
    catalog.save(out / CATALOG)
    return out


def load_retriever(out_dir: str | Path) -> tuple[TwoTower, Catalog]:
    """The two-tower and its catalog saved by ``train_two_tower(out_dir=...)``."""
    root = Path(out_dir)
    ckpt = load_checkpoint(root / "best", builder=build_two_tower)
    model = ckpt.model
    assert isinstance(model, TwoTower)
    return model, Catalog.load(root / CATALOG, ckpt.spec)
