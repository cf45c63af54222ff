"""Checkpoints: a faithful round trip, nothing unpickled, clear errors on damaged directories."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from bstrec.features.spec import FeatureSpec
from bstrec.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_meta,
    restore_optimizer,
    restore_rng_state,
    save_checkpoint,
)
from bstrec.training.loop import seed_model_init
from bstrec.training.tensors import Batch
from tests.training.test_loop import (
    TinyConfig,
    TinyRanker,
    make_split,
    tiny_builder,
    tiny_spec,
    tiny_vocabs,
)


def trained(optimizer: str = "adam") -> tuple[TinyRanker, torch.optim.Optimizer]:
    """A model and its optimizer after a few steps, so that every state tensor is non-trivial."""
    seed_model_init(0)
    model = TinyRanker(tiny_spec(), TinyConfig(dim=4, dropout=0.1))
    params = list(model.parameters())
    opt: torch.optim.Optimizer = (torch.optim.Adam(params, lr=0.01, betas=(0.8, 0.99))
                                  if optimizer == "adam" else torch.optim.Adagrad(params, lr=0.1))
    split = make_split(64, seed=3)
    for rows in (torch.arange(0, 32), torch.arange(32, 64)):
        batch = split.batch(rows)
        loss = nn.functional.binary_cross_entropy_with_logits(model(batch), batch["label"])
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    return model, opt


def save(path: Path, model: nn.Module, opt: torch.optim.Optimizer | None = None,
         **kwargs: Any) -> Path:
    return save_checkpoint(path, model, "tiny", tiny_spec(), tiny_vocabs(), optimizer=opt,
                           **kwargs)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    model, opt = trained()
    return save(tmp_path / "ckpt", model, opt, train_state={"step": 2, "epoch": 0, "batch": 2},
                metrics={"valid_auc": 0.75}, train_config={"lr": 0.01, "optimizer": "adam"},
                extra={"samples": "/somewhere"})


def test_round_trip(tmp_path: Path) -> None:
    model, opt = trained()
    path = save(tmp_path / "ckpt", model, opt, train_state={"step": 2, "epoch": 0, "batch": 2},
                metrics={"valid_auc": 0.75, "nan": float("nan")}, train_config={"lr": 0.01},
                extra={"samples": "/somewhere"})
    assert sorted(p.name for p in path.iterdir()) == [
        "checkpoint.json", "feature_spec.json", "model.safetensors", "optimizer.json",
        "optimizer.safetensors", "vocab.json"]
    loaded = load_checkpoint(path, builder=tiny_builder)
    assert isinstance(loaded.model, TinyRanker) and not loaded.model.training
    assert loaded.model.config == model.config
    assert loaded.model_name == "tiny" and loaded.model_config == {"dim": 4, "dropout": 0.1}
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    assert loaded.spec == tiny_spec()
    assert {k: v.values for k, v in loaded.vocabs.items()} == {
        k: v.values for k, v in tiny_vocabs().items()}
    assert loaded.train_config == {"lr": 0.01}
    assert loaded.train_state == {"step": 2, "epoch": 0, "batch": 2}
    assert loaded.metrics["valid_auc"] == 0.75 and loaded.metrics["nan"] != loaded.metrics["nan"]
    assert loaded.meta["extra"] == {"samples": "/somewhere"} and loaded.resumable
    assert loaded.meta["n_parameters"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", ["adam", "adagrad"])
def test_optimizer_round_trip_continues_identically(tmp_path: Path, kind: str) -> None:
    model, opt = trained(kind)
    path = save(tmp_path / "ckpt", model, opt)
    twin = load_checkpoint(path, builder=tiny_builder).model
    params = list(twin.parameters())
    twin_opt: torch.optim.Optimizer = (torch.optim.Adam(params, lr=0.5) if kind == "adam"
                                       else torch.optim.Adagrad(params, lr=0.5))
    restore_optimizer(twin_opt, path)
    a, b = opt.state_dict(), twin_opt.state_dict()
    assert a["param_groups"] == b["param_groups"]  # lr, betas (a tuple again), ...
    for i, entry in a["state"].items():
        for name, value in entry.items():
            assert torch.equal(value, b["state"][i][name]), (i, name)
    # one more identical step (train mode, same dropout masks) gives identical weights
    batch = make_split(32, seed=4).tensors
    for m, o in ((model, opt), (twin, twin_opt)):
        m.train()
        torch.manual_seed(7)
        loss = nn.functional.binary_cross_entropy_with_logits(m(batch), batch["label"])
        o.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        o.step()
    for (k, v), w in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


def test_rng_state_round_trip(tmp_path: Path) -> None:
    model, opt = trained()
    torch.manual_seed(3)
    path = save(tmp_path / "ckpt", model, opt)
    expected = torch.rand(5)
    torch.manual_seed(4)
    restore_rng_state(path)
    assert torch.equal(torch.rand(5), expected)


def test_loading_never_unpickles(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    loaded = load_checkpoint(ckpt, builder=tiny_builder)
    opt = torch.optim.Adam(loaded.model.parameters())
    restore_optimizer(opt, ckpt)
    restore_rng_state(ckpt)
    for file in ckpt.iterdir():
        head = file.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", f"{file.name} looks like a pickle/zip"


def test_tied_weights_are_saved_once_and_restored(tmp_path: Path) -> None:
    class Tied(nn.Module):
        def __init__(self, spec: FeatureSpec, config: dict[str, Any]) -> None:
            super().__init__()
            self.item = nn.Embedding(spec.feature("item").vocab_size, 3)
            self.hist_item = self.item  # one table for target and history
            self.out = nn.Linear(3, 1)

        def forward(self, batch: Batch) -> torch.Tensor:
            out: torch.Tensor = self.out(self.item(batch["item"])).squeeze(-1)
            return out

    model = Tied(tiny_spec(), {})
    path = save(tmp_path / "ckpt", model)
    loaded = load_checkpoint(path, builder=lambda name, spec, cfg: Tied(spec, cfg)).model
    assert isinstance(loaded, Tied) and loaded.item is loaded.hist_item
    assert torch.equal(loaded.item.weight, model.item.weight)
    assert read_meta(path)["resumable"] is False


def test_missing_directory_or_file(tmp_path: Path, ckpt: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere", builder=tiny_builder)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"incomplete: model\.safetensors is missing"):
        load_checkpoint(ckpt, builder=tiny_builder)
    (ckpt / "checkpoint.json").unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint\.json is missing"):
        load_checkpoint(ckpt, builder=tiny_builder)


def test_not_resumable(tmp_path: Path) -> None:
    model, _ = trained()
    path = save(tmp_path / "ckpt", model)
    with pytest.raises(CheckpointError, match="not resumable"):
        restore_optimizer(torch.optim.Adam(model.parameters()), path)


def test_corrupted_files(ckpt: Path) -> None:
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in a weight
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupted: its sha256"):
        load_checkpoint(ckpt, builder=tiny_builder)
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")  # a broken header
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupted"):
        load_checkpoint(ckpt, builder=tiny_builder, verify=False)
    (ckpt / "optimizer.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors is corrupted"):
        restore_rng_state(ckpt)
    (ckpt / "checkpoint.json").write_text("{truncated")
    with pytest.raises(CheckpointError, match=r"checkpoint\.json is corrupted"):
        load_checkpoint(ckpt, builder=tiny_builder)


def test_unsupported_version_and_wrong_architecture(ckpt: Path) -> None:
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    meta["model_config"] = {"dim": 5, "dropout": 0.1}
    (ckpt / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not fit TinyRanker"):
        load_checkpoint(ckpt, builder=tiny_builder)
    meta["format_version"] = 99
    (ckpt / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format version 99 is not supported"):
        load_checkpoint(ckpt, builder=tiny_builder)


def test_optimizer_over_other_parameters_is_refused(ckpt: Path) -> None:
    other = nn.Linear(2, 1)
    with pytest.raises(CheckpointError, match="covers"):
        restore_optimizer(torch.optim.Adam(other.parameters()), ckpt)


def test_failed_save_leaves_the_previous_checkpoint(ckpt: Path) -> None:
    before = (ckpt / "checkpoint.json").read_text()
    model, opt = trained()
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        save(ckpt, model, opt, metrics={"bad": object()})
    assert (ckpt / "checkpoint.json").read_text() == before
    assert [p.name for p in ckpt.parent.iterdir()] == ["ckpt"]  # no temporary left behind
    read_meta(ckpt)  # still whole


def test_save_replaces_an_existing_checkpoint(ckpt: Path) -> None:
    model, _ = trained("adagrad")
    save(ckpt, model, metrics={"valid_auc": 0.5})
    assert not (ckpt / "optimizer.safetensors").exists()
    assert load_checkpoint(ckpt, builder=tiny_builder).metrics == {"valid_auc": 0.5}
