"""The training loop: the loss falls, early stopping keeps the best weights, and a run killed
mid-epoch and resumed from its checkpoint ends bit-identical to one never interrupted."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from bstrec.config import from_dict
from bstrec.data.samples import SampleSet
from bstrec.evaluation.metrics import auc
from bstrec.features.spec import Feature, FeatureSpec
from bstrec.features.vocab import Vocabularies, Vocabulary
from bstrec.training import loop
from bstrec.training.checkpoint import CheckpointError
from bstrec.training.loop import (
    ModelInfo,
    TrainConfig,
    TrainResult,
    binary_logloss,
    predict,
    seed_model_init,
    train,
)
from bstrec.training.task import evaluate_checkpoint, train_ranker
from bstrec.training.tensors import Batch, TensorSplit

N_USERS, N_ITEMS, N_CATS, L = 30, 40, 6, 4


# -- a tiny ranker on the batch contract, and data it can learn ------------------------------
@dataclass(frozen=True)
class TinyConfig:
    dim: int = 8
    dropout: float = 0.3


class TinyRanker(nn.Module):
    """Embeddings of user, item, category and the mean of the history's items (same item
    table), then an MLP with dropout (so that resuming must restore the RNG)."""

    def __init__(self, spec: FeatureSpec, config: TinyConfig | None = None) -> None:
        super().__init__()
        self.config = config or TinyConfig()
        d = self.config.dim
        self.user = nn.Embedding(spec.feature("user").vocab_size, d, padding_idx=0)
        self.item = nn.Embedding(spec.feature("item").vocab_size, d, padding_idx=0)
        self.category = nn.Embedding(spec.feature("category").vocab_size, d, padding_idx=0)
        self.mlp = nn.Sequential(nn.Linear(4 * d, 16), nn.ReLU(), nn.Dropout(self.config.dropout),
                                 nn.Linear(16, 1))

    def forward(self, batch: Batch) -> torch.Tensor:
        mask = batch["hist_mask"].unsqueeze(-1).float()  # (B, L, 1)
        hist = (self.item(batch["hist_item"]) * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, D)
        x = torch.cat([self.user(batch["user"]), self.item(batch["item"]),
                       self.category(batch["category"]), hist], dim=-1)  # (B, 4D)
        out: torch.Tensor = self.mlp(x).squeeze(-1)  # (B,)
        return out


def tiny_spec() -> FeatureSpec:
    return FeatureSpec(features=(
        Feature("user", "categorical", "user", N_USERS + 2, "user_id"),
        Feature("item", "categorical", "item", N_ITEMS + 2, "item_id"),
        Feature("category", "categorical", "item", N_CATS + 2, "category"),
    ), max_len=L)


def tiny_vocabs() -> Vocabularies:
    return Vocabularies({"user_id": Vocabulary(list(range(N_USERS))),
                         "item_id": Vocabulary([f"i{i}" for i in range(N_ITEMS)]),
                         "category": Vocabulary([f"c{i}" for i in range(N_CATS)])})


def tiny_builder(name: str, spec: FeatureSpec, config: dict[str, Any]) -> nn.Module:
    if name != "tiny":
        raise KeyError(f"unknown ranker {name!r}")
    return TinyRanker(spec, from_dict(TinyConfig, config, where="model"))


def make_split(n: int, seed: int, *, flip: bool = False) -> TensorSplit:
    """Label = 1 for the first half of the items (noisy); ``flip`` inverts the rule."""
    g = torch.Generator().manual_seed(seed)
    item = torch.randint(2, N_ITEMS + 2, (n,), generator=g)
    lengths = torch.randint(0, L + 1, (n,), generator=g)
    mask = torch.arange(L)[None, :] >= (L - lengths)[:, None]
    hist_item = torch.where(mask, torch.randint(2, N_ITEMS + 2, (n, L), generator=g), 0)
    rule = (item < 2 + N_ITEMS // 2).float()
    noise = (torch.rand(n, generator=g) < 0.1).float()
    label = (rule + noise) % 2
    return TensorSplit({
        "user": torch.randint(2, N_USERS + 2, (n,), generator=g),
        "item": item,
        "category": (item % N_CATS) + 2,
        "hist_item": hist_item,
        "hist_cat": torch.where(mask, hist_item % N_CATS + 2, 0),
        "hist_dt": torch.where(mask, 3600, 0),
        "hist_mask": mask,
        "label": 1 - label if flip else label,
    })


INFO = ModelInfo("tiny", tiny_spec(), tiny_vocabs(), extra={"samples": "synthetic"})


def new_model(seed: int = 0, **overrides: Any) -> TinyRanker:
    seed_model_init(seed)
    return TinyRanker(tiny_spec(), TinyConfig(**overrides))


def config(**overrides: Any) -> TrainConfig:
    base: dict[str, Any] = {"lr": 0.02, "batch_size": 64, "max_epochs": 3, "patience": 0,
                            "num_threads": 1, "eval_batch_size": 256}
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def data() -> tuple[TensorSplit, TensorSplit]:
    return make_split(1200, seed=1), make_split(400, seed=2)


class Killed(Exception):
    pass


def kill_at(step: int) -> Any:
    def on_step(s: int, loss: torch.Tensor) -> None:
        if s == step:
            raise Killed(f"killed at step {s}")
    return on_step


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def deterministic(result: TrainResult) -> list[tuple[Any, ...]]:
    """The history without its timings."""
    return [(h.epoch, h.steps, h.train_loss, h.valid_auc, h.valid_logloss) for h in result.history]


# -- tests ------------------------------------------------------------------------------------
def test_loss_falls_and_valid_auc_rises(data: tuple[TensorSplit, TensorSplit]) -> None:
    tr, va = data
    result = train(new_model(), tr, va, config(max_epochs=4), out_dir=None, progress=False)
    losses = [h.train_loss for h in result.history]
    assert len(result.history) == 4 and result.stop_reason == "max_epochs"
    assert losses[-1] < losses[0] < math.log(2) + 0.05
    assert result.best_valid_auc > 0.8
    assert result.steps == 4 * math.ceil(1200 / 64)
    assert all(h.samples_per_s > 0 for h in result.history)


def test_adagrad_trains(data: tuple[TensorSplit, TensorSplit]) -> None:
    tr, va = data
    result = train(new_model(), tr, va, config(optimizer="adagrad", lr=0.1, max_epochs=2),
                   progress=False)
    assert result.history[-1].train_loss < result.history[0].train_loss


def test_early_stopping_restores_best_weights(data: tuple[TensorSplit, TensorSplit],
                                              tmp_path: Path) -> None:
    tr, _ = data
    # valid labels follow the opposite rule: the more the model learns, the worse its valid AUC
    va = make_split(400, seed=2, flip=True)
    model = new_model()
    result = train(model, tr, va, config(max_epochs=10, patience=2), out_dir=tmp_path,
                   info=INFO, progress=False)
    assert result.stop_reason == "early_stopping"
    assert result.best_epoch == 1 and len(result.history) == 3
    assert result.best_valid_auc == result.history[0].valid_auc > result.history[-1].valid_auc
    # the returned model is the epoch-1 model: same weights as a run stopped after one epoch
    one_epoch = new_model()
    train(one_epoch, tr, va, config(max_epochs=1), progress=False)
    assert_same_weights(model.state_dict(), one_epoch.state_dict())
    assert not model.training
    labels = va.tensors["label"].numpy()
    assert auc(labels, predict(model, va, 128)) == pytest.approx(result.best_valid_auc, abs=1e-12)
    # and best/ holds those weights, last/ the weights of the last epoch
    assert_same_weights(weights(tmp_path / "best"), model.state_dict())
    assert not torch.equal(weights(tmp_path / "last")["item.weight"], model.item.weight)


@pytest.mark.parametrize(("kills", "resumes_at"), [([26], 25), ([19], 19), ([5, 26, 40], 40)],
                         ids=["mid-epoch", "last-batch", "three-kills"])
def test_resume_after_kill_is_bit_identical(data: tuple[TensorSplit, TensorSplit],
                                            tmp_path: Path, kills: list[int],
                                            resumes_at: int) -> None:
    """19 batches an epoch, a checkpoint every 3 steps and at each epoch end; a kill at step k
    loses the steps after the last checkpoint, which the resumed run must redo exactly: same
    permutation (seeded by (seed, epoch)), same dropout masks (global RNG restored), same Adam
    moments and step counts."""
    tr, va = data
    cfg = config(checkpoint_every=3)
    reference = new_model()
    ref = train(reference, tr, va, cfg, out_dir=tmp_path / "ref", info=INFO, progress=False)

    run = tmp_path / "run"
    for i, step in enumerate(kills):
        # the first attempt is the reference's twin; later ones are new processes building a
        # model whose init differs (as a resumed job's would), the checkpoint replacing it
        with pytest.raises(Killed):
            train(new_model(seed=100 * i), tr, va, cfg, out_dir=run, info=INFO,
                  resume=i > 0, progress=False, on_step=kill_at(step))
    resumed = new_model(seed=999)
    steps_seen: list[int] = []
    res = train(resumed, tr, va, cfg, out_dir=run, info=INFO, resume=True, progress=False,
                on_step=lambda s, loss: steps_seen.append(s))

    # the work after the last checkpoint is lost and redone (epoch 3 starts at step 39)
    assert steps_seen[0] == resumes_at and steps_seen[-1] == 3 * 19
    assert_same_weights(resumed.state_dict(), reference.state_dict())
    assert_same_weights(weights(run / "last"), weights(tmp_path / "ref" / "last"))
    assert_same_weights(weights(run / "best"), weights(tmp_path / "ref" / "best"))
    opt_run = load_file(str(run / "last" / "optimizer.safetensors"))
    opt_ref = load_file(str(tmp_path / "ref" / "last" / "optimizer.safetensors"))
    assert_same_weights(opt_run, opt_ref)
    assert deterministic(res) == deterministic(ref)
    assert (res.steps, res.best_epoch, res.best_valid_auc) == (ref.steps, ref.best_epoch,
                                                               ref.best_valid_auc)


def test_resume_without_rng_restore_diverges(data: tuple[TensorSplit, TensorSplit],
                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    """The resume test has teeth: skipping the RNG restore changes the dropout masks."""
    tr, va = data
    cfg = config(checkpoint_every=3, max_epochs=2)
    reference = new_model()
    train(reference, tr, va, cfg, progress=False)
    with pytest.raises(Killed):
        train(new_model(), tr, va, cfg, out_dir=tmp_path, info=INFO, progress=False,
              on_step=kill_at(26))
    monkeypatch.setattr(loop, "restore_rng_state", lambda path: None)
    torch.manual_seed(12345)
    resumed = new_model()
    train(resumed, tr, va, cfg, out_dir=tmp_path, info=INFO, resume=True, progress=False)
    assert not torch.equal(resumed.item.weight, reference.item.weight)


def test_resume_finished_run_trains_no_more(data: tuple[TensorSplit, TensorSplit],
                                            tmp_path: Path) -> None:
    tr, va = data
    model = new_model()
    first = train(model, tr, va, config(max_epochs=2), out_dir=tmp_path, info=INFO,
                  progress=False)
    again = new_model(seed=5)
    steps: list[int] = []
    second = train(again, tr, va, config(max_epochs=2), out_dir=tmp_path, info=INFO,
                   resume=True, progress=False, on_step=lambda s, loss: steps.append(s))
    assert steps == [] and second.to_dict() == first.to_dict()
    assert_same_weights(again.state_dict(), model.state_dict())
    # more epochs: it goes on where it stopped, as if it had been asked for 3 from the start
    third = train(new_model(seed=6), tr, va, config(max_epochs=3), out_dir=tmp_path, info=INFO,
                  resume=True, progress=False)
    straight = train(new_model(), tr, va, config(max_epochs=3), progress=False)
    assert deterministic(third) == deterministic(straight)


def test_resume_refuses_another_config(data: tuple[TensorSplit, TensorSplit],
                                       tmp_path: Path) -> None:
    tr, va = data
    train(new_model(), tr, va, config(max_epochs=1), out_dir=tmp_path, info=INFO,
          progress=False)
    with pytest.raises(CheckpointError, match=r"differs in \['lr'\]"):
        train(new_model(), tr, va, config(lr=0.5), out_dir=tmp_path, info=INFO, resume=True,
              progress=False)
    with pytest.raises(FileExistsError, match="already holds a training run"):
        train(new_model(), tr, va, config(), out_dir=tmp_path, info=INFO, progress=False)
    with pytest.raises(ValueError, match="ModelInfo"):
        train(new_model(), tr, va, config(), out_dir=tmp_path / "other", progress=False)


def test_max_steps_stops_and_evaluates(data: tuple[TensorSplit, TensorSplit]) -> None:
    tr, va = data
    result = train(new_model(), tr, va, config(max_steps=7), progress=False)
    assert result.steps == 7 and result.stop_reason == "max_steps"
    assert len(result.history) == 1 and result.history[0].steps == 7


def test_seed_changes_the_run(data: tuple[TensorSplit, TensorSplit]) -> None:
    tr, va = data
    a = train(new_model(), tr, va, config(max_epochs=1), progress=False)
    b = train(new_model(), tr, va, config(max_epochs=1), progress=False)
    c = train(new_model(), tr, va, config(max_epochs=1, seed=1), progress=False)
    assert deterministic(a) == deterministic(b) != deterministic(c)


def test_wrong_logits_shape_is_a_clear_error(data: tuple[TensorSplit, TensorSplit]) -> None:
    class Bad(TinyRanker):
        def forward(self, batch: Batch) -> torch.Tensor:
            return super().forward(batch).unsqueeze(-1)  # (B, 1)

    tr, va = data
    seed_model_init(0)
    with pytest.raises(ValueError, match=r"logits of shape \(64, 1\), expected \(64,\)"):
        train(Bad(tiny_spec()), tr, va, config(), progress=False)


def test_predict_gives_probabilities_in_row_order(data: tuple[TensorSplit, TensorSplit]) -> None:
    _, va = data
    model = new_model()
    model.train()
    probs = predict(model, va, batch_size=70)
    assert probs.shape == (400,) and probs.dtype == np.float32
    model.eval()
    with torch.no_grad():
        expected = torch.sigmoid(model(va.tensors)).numpy()
    np.testing.assert_allclose(probs, expected, rtol=1e-6)


def test_predict_restores_train_mode(data: tuple[TensorSplit, TensorSplit]) -> None:
    _, va = data
    model = new_model()
    model.train()
    predict(model, va)
    assert model.training


def test_binary_logloss_by_hand() -> None:
    y = np.array([1.0, 0.0, 1.0])
    z = np.array([0.0, 2.0, -1.0])
    p = 1 / (1 + np.exp(-z))
    expected = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert binary_logloss(y, z) == pytest.approx(expected, rel=1e-12)
    assert binary_logloss(np.array([1.0]), np.array([1000.0])) == pytest.approx(0.0)


def test_train_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="lr must be > 0"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="sgd")  # type: ignore[arg-type]
    cfg = from_dict(TrainConfig, {"batch_size": "128", "optimizer": "adagrad"})
    assert dataclasses.asdict(cfg)["batch_size"] == 128


# -- the task: samples on disk -> run folder --------------------------------------------------
def write_samples(root: Path) -> Path:
    """A sample set on disk in the format of `bstrec data build`, from make_split's tensors."""
    frames = {}
    for name, (n, seed) in {"train": (1200, 1), "valid": (400, 2), "test": (400, 5)}.items():
        t = make_split(n, seed).tensors
        mask = t["hist_mask"].numpy()

        def lists(col: str, t: dict[str, torch.Tensor] = t, mask: np.ndarray = mask
                  ) -> list[list[int]]:
            return [row[m].tolist() for row, m in zip(t[col].numpy(), mask, strict=True)]

        frames[name] = pl.DataFrame({
            "user_id": t["user"].numpy() - 2, "item_id": t["item"].numpy() - 2,
            "timestamp": np.arange(n, dtype=np.int64), "label": t["label"].numpy(),
            "user": t["user"].numpy().astype(np.int32), "item": t["item"].numpy().astype(np.int32),
            "category": t["category"].numpy().astype(np.int32),
            "hist_item": pl.Series(lists("hist_item"), dtype=pl.List(pl.Int32)),
            "hist_cat": pl.Series(lists("hist_cat"), dtype=pl.List(pl.Int32)),
            "hist_dt": pl.Series(lists("hist_dt"), dtype=pl.List(pl.Int64)),
        })
    manifest = {"protocol": "tiny-ctr", "dataset": "tiny", "config_hash": "0" * 16,
                "splits": {k: v.height for k, v in frames.items()}}
    SampleSet(frames, tiny_vocabs(), tiny_spec(), manifest).save(root, with_dataset=False)
    return root


def test_train_ranker_task_and_evaluate_checkpoint(tmp_path: Path) -> None:
    samples = write_samples(tmp_path / "samples")
    run = tmp_path / "run"
    overrides = {"max_epochs": 2, "num_threads": 1, "batch_size": 64, "lr": 0.02, "patience": 0}
    result = train_ranker("tiny", samples, run, model_overrides={"dim": 6},
                          train_overrides=overrides, progress=False, builder=tiny_builder)
    report = json.loads((run / "train_result.json").read_text())
    assert report["model"] == "tiny" and report["model_config"] == {"dim": 6, "dropout": 0.3}
    assert report["train_config"]["batch_size"] == 64
    assert report["data"]["protocol"] == "tiny-ctr"
    assert report["result"]["best_valid_auc"] == result.best_valid_auc
    assert [h["valid_auc"] for h in report["result"]["history"]] == [
        h.valid_auc for h in result.history]

    ev = evaluate_checkpoint(run / "best", samples, "test", builder=tiny_builder)
    assert ev["n"] == 400 and ev["predictions"].shape == (400,) and ev["auc"] > 0.8
    assert ev["auc"] == pytest.approx(auc(ev["labels"], ev["predictions"]), abs=1e-9)
    valid = evaluate_checkpoint(run / "best", samples, "valid", builder=tiny_builder)
    assert valid["auc"] == pytest.approx(result.best_valid_auc, abs=1e-12)

    # resume: the saved configs are the defaults, only the change is given
    more = train_ranker("tiny", samples, run, train_overrides={"max_epochs": 3}, resume=True,
                        progress=False, builder=tiny_builder)
    assert len(more.history) == 3 and more.history[:2] == result.history
    with pytest.raises(CheckpointError, match="model config"):
        train_ranker("tiny", samples, run, model_overrides={"dropout": 0.5}, resume=True,
                     progress=False, builder=tiny_builder)

    # samples encoded with other vocabularies are refused
    other = Vocabularies(tiny_vocabs())
    other["item_id"] = Vocabulary([f"j{i}" for i in range(N_ITEMS)])
    other.save(samples / "vocab.json")
    with pytest.raises(ValueError, match=r"other vocabularies .*\['item_id'\]"):
        evaluate_checkpoint(run / "best", samples, builder=tiny_builder)
