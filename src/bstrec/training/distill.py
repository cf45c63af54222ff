"""The distillation task of the pre-ranker (ranking/prerank.py): BST teaches it on retrieved
candidates (issue 25).

Notation: Q query rows (samples), K retrieved candidates per row, R = Q * (K + 1) rows.

The pre-ranker only matters on the candidates retrieval merges for a request: most of them
were never rated, so they carry no label, but BST (the teacher) gives each a logit. The rows
(``teacher_rows``) are therefore, for every sample of a split:

- the sample itself: its target item, its P1 label (``has_label`` = 1) and BST's logit;
- its K retrieved candidates as targets (same user, history, context): BST's logit, no label.

The loss (``distill_loss``), per batch, with z_s the student's and z_t the teacher's logits,
T the temperature and alpha the weight of the teacher:

    alpha * T^2 * mean_rows BCE(sigmoid(z_t / T), sigmoid(z_s / T))
        + (1 - alpha) * mean_labelled BCE(y, sigmoid(z_s))

The first term (Hinton et al. 2015, for a Bernoulli output) is minimal at z_s = z_t on every
row, labelled or not; T > 1 softens both sides, so that logits far from 0 (BST's confident
scores) still pass gradient, and T^2 keeps the term's gradient scale independent of T. The
second term anchors the student on the truth where there is one, so that it does not copy the
teacher's errors on the rows where the data says otherwise. A batch without a labelled row has
only the first term.

The epoch is chosen on the valid rows' distillation loss (never on test).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bstrec.config import from_dict
from bstrec.data.samples import SampleSet
from bstrec.features.spec import FeatureSpec
from bstrec.ranking.prerank import PreRankConfig, PreRanker
from bstrec.retrieval.candidates import CandidateConfig, CandidateGenerator
from bstrec.retrieval.catalog import Catalog, QuerySet, item_feature_names
from bstrec.training.loop import derive_seed, predict_logits
from bstrec.training.tensors import TensorSplit

I64 = npt.NDArray[np.int64]
TEACHER = "teacher_logit"  # the extra columns teacher_rows adds to the batch contract
HAS_LABEL = "has_label"
PRERANK = "prerank"  # the model name in a checkpoint


def build_prerank(name: str, spec: FeatureSpec, overrides: dict[str, Any]) -> nn.Module:
    """Checkpoint builder (training/checkpoint.py ``Builder``) for pre-ranker checkpoints."""
    if name != PRERANK:
        raise ValueError(f"not a pre-ranker checkpoint: model {name!r}")
    return PreRanker(spec, from_dict(PreRankConfig, overrides, where="prerank"))


@dataclass(frozen=True)
class DistillConfig:
    """(``bstrec.config.from_dict`` fills it; unknown keys are errors)."""

    alpha: float = 0.5  # weight of the teacher term; 1 - alpha weighs the true labels
    temperature: float = 2.0
    lr: float = 2e-3
    batch_size: int = 1024
    max_epochs: int = 5
    seed: int = 0
    num_threads: int = 0  # 0: torch's current setting

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        for name in ("lr", "batch_size", "max_epochs"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.num_threads < 0:
            raise ValueError(f"num_threads must be >= 0, got {self.num_threads}")


@dataclass
class DistillResult:
    best_epoch: int
    best_valid_loss: float
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def teacher_rows(teacher: nn.Module, data: TensorSplit, catalog: Catalog, candidates: I64,
                 batch_size: int = 4096) -> TensorSplit:
    """Samples (Q rows of the batch contract) and their retrieved candidates (Q, K) item ids
    (-1 = none, skipped) -> R rows: each sample, then its candidates as targets, with the
    ``teacher``'s logit (``TEACHER``, (R,) float) and ``HAS_LABEL`` ((R,) float: 1 on the
    samples' own rows, whose ``label`` is the true one; 0 on candidates, label 0 unused)."""
    q = len(data)
    if candidates.ndim != 2 or candidates.shape[0] != q:
        raise ValueError(f"candidates must be (Q={q}, K) item ids, got {candidates.shape}")
    if candidates.size and int(candidates.max()) >= catalog.size:
        raise ValueError(f"candidate id {int(candidates.max())} outside the catalog "
                         f"({catalog.size} items)")
    qi, ci = np.nonzero(candidates >= 0)
    rows = torch.from_numpy(np.concatenate([np.arange(q), qi]).astype(np.int64))
    out = data.batch(rows)
    n_own = q
    items = catalog.batch(torch.from_numpy(candidates[qi, ci].astype(np.int64)))
    for name in item_feature_names(catalog.spec):  # each candidate becomes the target item
        col = out[name]
        cand = items[name]
        if col.ndim == 2 and col.shape[1] != cand.shape[1]:  # multi-hot widths differ: pad
            width = max(col.shape[1], cand.shape[1])
            col = F.pad(col, (0, width - col.shape[1]))
            cand = F.pad(cand, (0, width - cand.shape[1]))
        out[name] = torch.cat([col[:n_own], cand])
    out["label"] = torch.cat([out["label"][:n_own], torch.zeros(len(qi))])
    out[HAS_LABEL] = torch.cat([torch.ones(n_own), torch.zeros(len(qi))])
    split = TensorSplit(out)
    split.tensors[TEACHER] = torch.from_numpy(predict_logits(teacher, split, batch_size))
    return split


def distill_loss(student: Tensor, teacher: Tensor, label: Tensor, has_label: Tensor,
                 alpha: float, temperature: float) -> Tensor:
    """The module docstring's loss: (B,) student and teacher logits, (B,) labels and (B,)
    1/0 whether the label is a true one -> scalar."""
    t = temperature
    soft = torch.sigmoid(teacher / t)
    kd = F.binary_cross_entropy_with_logits(student / t, soft) * t * t
    n = has_label.sum()
    if float(n) == 0.0:
        return alpha * kd
    bce = (F.binary_cross_entropy_with_logits(student, label, reduction="none")
           * has_label).sum() / n
    return alpha * kd + (1.0 - alpha) * bce


@torch.no_grad()
def _evaluate(model: nn.Module, split: TensorSplit, cfg: DistillConfig) -> dict[str, float]:
    logits = torch.from_numpy(predict_logits(model, split, 8192))
    t = split.tensors
    loss = distill_loss(logits, t[TEACHER], t["label"], t[HAS_LABEL], cfg.alpha, cfg.temperature)
    # how well the student orders pairs as the teacher does (rank correlation of the logits)
    s_rank = logits.argsort().argsort().double()
    t_rank = t[TEACHER].argsort().argsort().double()
    spearman = float(torch.corrcoef(torch.stack([s_rank, t_rank]))[0, 1])
    return {"loss": float(loss), "spearman": spearman}


def train_prerank(model: nn.Module, train: TensorSplit, valid: TensorSplit,
                  cfg: DistillConfig | None = None) -> DistillResult:
    """Fit ``model`` (``forward(batch) -> logits (B,)``) on ``teacher_rows`` output with
    ``distill_loss``; on return it holds the best epoch's weights by valid loss (eval mode)."""
    cfg = cfg or DistillConfig()
    for name, split in (("train", train), ("valid", valid)):
        if len(split) == 0 or TEACHER not in split.tensors or HAS_LABEL not in split.tensors:
            raise ValueError(f"{name} must be non-empty rows of teacher_rows (with {TEACHER} "
                             f"and {HAS_LABEL})")
    threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    result = DistillResult(best_epoch=0, best_valid_loss=math.inf)
    best: dict[str, Tensor] | None = None
    t0 = time.perf_counter()
    try:
        for epoch in range(1, cfg.max_epochs + 1):
            gen = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch))
            model.train()
            total, seen = 0.0, 0
            for batch in train.batches(cfg.batch_size, shuffle=True, generator=gen):
                loss = distill_loss(model(batch), batch[TEACHER], batch["label"],
                                    batch[HAS_LABEL], cfg.alpha, cfg.temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
                total += float(loss.detach()) * len(batch["label"])
                seen += len(batch["label"])
            metrics = _evaluate(model, valid, cfg)
            result.history.append({"epoch": epoch, "train_loss": total / seen,
                                   "valid_loss": metrics["loss"],
                                   "valid_spearman": metrics["spearman"]})
            if metrics["loss"] < result.best_valid_loss:
                result.best_epoch, result.best_valid_loss = epoch, metrics["loss"]
                best = {k: v.detach().clone() for k, v in model.state_dict().items()}
    finally:
        torch.set_num_threads(threads)
    if best is not None:
        model.load_state_dict(best)
    model.eval()
    result.seconds = time.perf_counter() - t0
    return result


# --- the rows from a sample set and a retriever -----------------------------------------------

def _as_queries(data: TensorSplit) -> QuerySet:
    """Samples of any label as retrieval queries, nothing excluded: the candidates a request
    for that user at that time would be offered."""
    q = len(data)
    return QuerySet(data=data, targets=np.full(q, -1, dtype=np.int64),
                    users=np.zeros(q, dtype=np.int64), seen_offsets=np.zeros(q + 1, np.int64),
                    seen_items=np.zeros(0, np.int64))


def _draw_candidates(merged: I64, k: int, rng: np.random.Generator) -> I64:
    """(Q, K) merged ids (-1 = none) -> (Q, k) drawn uniformly without replacement among each
    row's candidates (-1 where a row has fewer)."""
    out = np.full((len(merged), k), -1, dtype=np.int64)
    for r, row in enumerate(merged):
        ids = row[row >= 0]
        out[r, :min(k, len(ids))] = rng.choice(ids, size=min(k, len(ids)), replace=False)
    return out


def distillation_rows(samples: SampleSet, split: str, generator: CandidateGenerator,
                      teacher: nn.Module, n: int, k: int, seed: int) -> TensorSplit:
    """``teacher_rows`` of ``n`` samples of ``split`` (drawn with ``seed``), each with ``k`` of
    its merged candidates drawn uniformly: the candidates a pre-ranker scores in serving."""
    rng = np.random.default_rng(seed)
    frame = samples.splits[split]
    rows = np.sort(rng.choice(frame.height, size=min(n, frame.height), replace=False))
    data = TensorSplit.from_frame(frame[rows], samples.spec)
    merged, _ = generator.generate(_as_queries(data))
    return teacher_rows(teacher, data, generator.catalog, _draw_candidates(merged.ids, k, rng))


def distill_prerank(samples_dir: str | Path, teacher: str | Path, retriever_dir: str | Path,
                    out_dir: str | Path, *, prerank: dict[str, Any] | None = None,
                    distill: dict[str, Any] | None = None, candidates: CandidateConfig | None
                    = None, n_samples: int = 8000, k: int = 15) -> DistillResult:
    """Train a pre-ranker on ``teacher``'s logits (a ranker run or checkpoint: its best/) over
    the candidates merged under ``candidates`` by the two-tower of ``retriever_dir`` (a
    two-tower run or a ``bstrec train retriever`` folder, as ``bundle build --retriever``
    takes it), item-CF and popularity for ``n_samples`` train samples (a quarter as many valid ones choose the
    epoch), and save it in ``out_dir`` for ``bundle build --prerank``. ``prerank`` and
    ``distill``: PreRankConfig and DistillConfig overrides (unknown keys are errors)."""
    from bstrec.retrieval.artifacts import build_item_index, fit_counting_sources
    from bstrec.retrieval.index import IndexConfig
    from bstrec.retrieval.train import load_retriever
    from bstrec.training.checkpoint import load_checkpoint, save_checkpoint

    if n_samples < 4 or k < 1:
        raise ValueError(f"n_samples must be >= 4 and k >= 1, got {n_samples} and {k}")
    pre_cfg = from_dict(PreRankConfig, dict(prerank or {}), where="prerank")
    cfg = from_dict(DistillConfig, dict(distill or {}), where="distill")
    samples = SampleSet.load(samples_dir, splits=("train", "valid"))
    path = Path(teacher)
    ck = load_checkpoint(path / "best" if (path / "best").is_dir() else path)
    two_tower, catalog = load_retriever(retriever_dir)
    if ck.spec != samples.spec or catalog.spec != samples.spec:
        raise ValueError(f"the teacher {teacher} and the retriever {retriever_dir} must be "
                         f"trained on the samples {samples_dir} (feature specs differ)")
    # the sources as a bundle built from these samples serves them (serving/bundle.py)
    popular, item_cf = fit_counting_sources(samples, catalog)
    gen = CandidateGenerator(catalog, model=two_tower, item_cf=item_cf, popular=popular,
                             index=build_item_index(two_tower, catalog, IndexConfig("exact")),
                             config=candidates)
    teacher_model = ck.model.eval()
    train = distillation_rows(samples, "train", gen, teacher_model, n_samples, k, cfg.seed)
    valid = distillation_rows(samples, "valid", gen, teacher_model, n_samples // 4, k,
                              cfg.seed + 1)
    torch.manual_seed(cfg.seed)
    student = PreRanker(samples.spec, pre_cfg)
    result = train_prerank(student, train, valid, cfg)
    save_checkpoint(out_dir, student, PRERANK, samples.spec, samples.vocabs,
                    metrics={**result.to_dict(), "train_rows": len(train),
                             "valid_rows": len(valid)},
                    train_config=asdict(cfg),
                    extra={"teacher": str(path.resolve()),
                           "retriever": str(Path(retriever_dir).resolve()),
                           "samples": str(Path(samples_dir).resolve())})
    return result
