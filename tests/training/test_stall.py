"""Stall detection: a run whose valid AUC stays at chance says so (a warning, a flag and the
AUCs in its result), optionally stops; a run that learns is never flagged."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from bstrec.config import ConfigError, from_dict
from bstrec.features.spec import FeatureSpec
from bstrec.training.loop import ChanceCheck, TrainConfig, train
from bstrec.training.task import train_ranker
from bstrec.training.tensors import Batch, TensorSplit
from tests.training.test_loop import (
    config,
    deterministic,
    make_split,
    new_model,
    tiny_builder,
    write_samples,
)

LOOP_LOG = "bstrec.training.loop"


class ConstantRanker(nn.Module):
    """One learnable bias for every row: whatever it learns, its AUC is exactly 0.5."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.bias.expand(batch["label"].shape[0])  # (B,)


def builder(name: str, spec: FeatureSpec, cfg: dict[str, Any]) -> nn.Module:
    return ConstantRanker() if name == "constant" else tiny_builder(name, spec, cfg)


@pytest.fixture(scope="module")
def data() -> tuple[TensorSplit, TensorSplit]:
    return make_split(1200, seed=1), make_split(400, seed=2)


def random_labels(split: TensorSplit, seed: int) -> TensorSplit:
    g = torch.Generator().manual_seed(seed)
    n = len(split)
    return TensorSplit({**split.tensors, "label": torch.randint(0, 2, (n,), generator=g).float()})


def test_run_at_chance_is_flagged_and_warned(data: tuple[TensorSplit, TensorSplit],
                                             caplog: pytest.LogCaptureFixture) -> None:
    tr, va = data
    with caplog.at_level(logging.WARNING, logger=LOOP_LOG):
        result = train(ConstantRanker(), tr, va, config(max_epochs=2), progress=False)
    assert result.stalled and result.stop_reason == "max_epochs"
    assert result.chance_checks == [ChanceCheck(epoch=e, steps=19 * e, valid_auc=0.5)
                                    for e in (1, 2)]
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("within 0.020 of chance" in m for m in messages) == 2
    assert any("run stalled at chance" in m for m in messages)


def test_labels_independent_of_the_features_stall() -> None:
    tr = random_labels(make_split(2000, seed=1), seed=3)
    va = random_labels(make_split(20000, seed=2), seed=4)
    result = train(new_model(), tr, va, config(max_epochs=2, stall_margin=0.03), progress=False)
    assert result.stalled and len(result.chance_checks) == 2


def test_stop_ends_the_run_at_stall_after_mid_epoch(data: tuple[TensorSplit, TensorSplit]
                                                     ) -> None:
    tr, va = data
    cfg = config(stall_after=5, stall_action="stop")
    result = train(ConstantRanker(), tr, va, cfg, progress=False)
    assert result.stop_reason == "stalled" and result.stalled and result.steps == 5
    assert len(result.history) == 1 and result.history[0].steps == 5
    assert result.chance_checks == [ChanceCheck(epoch=1, steps=5, valid_auc=0.5)]


def test_stop_at_an_epoch_end(data: tuple[TensorSplit, TensorSplit]) -> None:
    tr, va = data
    result = train(ConstantRanker(), tr, va, config(stall_action="stop"), progress=False)
    assert result.stop_reason == "stalled" and result.steps == 19 and len(result.history) == 1


def test_no_check_before_stall_after(data: tuple[TensorSplit, TensorSplit]) -> None:
    tr, va = data
    result = train(ConstantRanker(), tr, va, config(max_epochs=1, stall_after=100,
                                                   stall_action="stop"), progress=False)
    assert not result.stalled and result.chance_checks == []
    assert result.stop_reason == "max_epochs"


def test_margin_zero_turns_the_checks_off(data: tuple[TensorSplit, TensorSplit]) -> None:
    tr, va = data
    result = train(ConstantRanker(), tr, va, config(max_epochs=1, stall_margin=0.0,
                                                   stall_action="stop"), progress=False)
    assert not result.stalled and result.chance_checks == []


def test_a_learning_run_is_not_flagged(data: tuple[TensorSplit, TensorSplit],
                                       caplog: pytest.LogCaptureFixture) -> None:
    tr, va = data
    with caplog.at_level(logging.WARNING, logger=LOOP_LOG):
        result = train(new_model(), tr, va, config(stall_after=3, stall_action="stop"),
                       progress=False)
    assert result.best_valid_auc > 0.8
    assert not result.stalled and result.chance_checks == []
    assert result.stop_reason == "max_epochs"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_the_mid_epoch_check_leaves_the_trajectory_alone(
        data: tuple[TensorSplit, TensorSplit]) -> None:
    tr, va = data
    checked, plain = new_model(), new_model()
    a = train(checked, tr, va, config(stall_after=5), progress=False)
    b = train(plain, tr, va, config(stall_margin=0.0), progress=False)
    assert deterministic(a) == deterministic(b)
    for p, q in zip(checked.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q)


def test_stall_fields_are_typed_config() -> None:
    cfg = from_dict(TrainConfig, {"stall_margin": "0.05", "stall_after": "100",
                                  "stall_action": "stop"}, where="train")
    assert (cfg.stall_margin, cfg.stall_after, cfg.stall_action) == (0.05, 100, "stop")
    with pytest.raises(ConfigError, match="unknown keys"):
        from_dict(TrainConfig, {"stall_margins": 0.05}, where="train")
    with pytest.raises(ConfigError, match="not one of"):
        from_dict(TrainConfig, {"stall_action": "halt"}, where="train")
    with pytest.raises(ValueError, match="stall_margin"):
        TrainConfig(stall_margin=0.5)
    with pytest.raises(ValueError, match="stall_after"):
        TrainConfig(stall_after=-1)


def test_result_file_says_stalled(tmp_path: Path) -> None:
    samples = write_samples(tmp_path / "samples")
    overrides = {"max_epochs": 2, "num_threads": 1, "batch_size": 64, "patience": 0}
    train_ranker("constant", samples, tmp_path / "flat", train_overrides=overrides,
                 progress=False, builder=builder)
    report = json.loads((tmp_path / "flat" / "train_result.json").read_text())["result"]
    assert report["stalled"] is True
    assert [c["valid_auc"] for c in report["chance_checks"]] == [0.5, 0.5]
    train_ranker("tiny", samples, tmp_path / "tiny", train_overrides={**overrides, "lr": 0.02},
                 progress=False, builder=builder)
    report = json.loads((tmp_path / "tiny" / "train_result.json").read_text())["result"]
    assert report["stalled"] is False and report["chance_checks"] == []
