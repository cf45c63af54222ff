"""Self-describing checkpoints: a directory that rebuilds the model anywhere, without pickle.

Layout (written in one atomic rename, see ``bstrec.data.io.atomic_dir``)::

    checkpoint.json      format version, model name and config, train config, train state
                         (step, epoch, batch position, ...), metrics, created time, bstrec
                         version, sha256 of every other file
    model.safetensors    the weights (tied tensors stored once)
    feature_spec.json    the feature specification the model was built for
    vocab.json           the vocabularies that encode its inputs
    optimizer.safetensors  resumable checkpoints only: every tensor of the optimizer state as
                         ``state.{param_index}.{name}``, and the global torch RNG state as
                         ``rng.torch`` (``rng.cuda`` too when CUDA is in use), uint8; a
                         distributed run adds each other rank's as ``rng.rank{r}.torch``
    optimizer.json       resumable checkpoints only: the optimizer's non-tensor state
                         (param_groups hyperparameters, scalar state entries)

Loading reads only JSON and safetensors: nothing is ever unpickled, so a checkpoint from an
untrusted source cannot run code.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

import bstrec
from bstrec.data.io import atomic_dir, read_described_dir, sha256_file
from bstrec.features.spec import FeatureSpec
from bstrec.features.vocab import Vocabularies

FORMAT_VERSION = 1
META = "checkpoint.json"
WEIGHTS = "model.safetensors"
SPEC = "feature_spec.json"
VOCAB = "vocab.json"
OPTIM_TENSORS = "optimizer.safetensors"
OPTIM_JSON = "optimizer.json"

Builder = Callable[[str, FeatureSpec, dict[str, Any]], nn.Module]


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, corrupted or does not fit the model."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt model (weights loaded, eval mode) and its description."""

    path: Path
    model: nn.Module
    model_name: str
    model_config: dict[str, Any]
    spec: FeatureSpec
    vocabs: Vocabularies
    train_config: dict[str, Any] | None
    train_state: dict[str, Any] | None
    metrics: dict[str, Any]
    meta: dict[str, Any]  # the whole checkpoint.json

    @property
    def resumable(self) -> bool:
        return bool(self.meta.get("resumable"))


def model_config_dict(model: nn.Module) -> dict[str, Any]:
    """The model's ``.config`` dataclass as a JSON-ready dict ({} when it has none)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"{type(model).__name__}.config must be a dataclass instance")
    out: dict[str, Any] = json.loads(json.dumps(dataclasses.asdict(cfg)))
    return out


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    model_name: str,
    spec: FeatureSpec,
    vocabs: Vocabularies,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    train_state: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    train_config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    rank_rng: Sequence[Mapping[str, torch.Tensor]] | None = None,
) -> Path:
    """Write a checkpoint directory at ``path`` atomically (an existing one is replaced).

    With ``optimizer`` the checkpoint is resumable: it also holds the optimizer state and the
    global torch RNG state as they are now, or, with ``rank_rng``, every rank's ``rng_state()``
    of a distributed run in rank order. ``train_state``, ``metrics``, ``train_config`` and
    ``extra`` (e.g. which samples it was trained on) must be JSON-serialisable.
    """
    target = Path(path)
    with atomic_dir(target) as tmp:
        save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt"})
        spec.save(tmp / SPEC)
        vocabs.save(tmp / VOCAB)
        files = [WEIGHTS, SPEC, VOCAB]
        if optimizer is not None:
            tensors, plain = _flatten_optimizer(optimizer)
            ranks = rank_rng if rank_rng is not None else [rng_state()]
            for rank, states in enumerate(ranks):
                tensors.update({_rng_key(name, rank): t.cpu() for name, t in states.items()})
            save_file(tensors, str(tmp / OPTIM_TENSORS))
            (tmp / OPTIM_JSON).write_text(json.dumps(plain, indent=1) + "\n")
            files += [OPTIM_TENSORS, OPTIM_JSON]
        meta = {
            "format_version": FORMAT_VERSION,
            "model_name": model_name,
            "model_config": model_config_dict(model),
            "train_config": dict(train_config) if train_config is not None else None,
            "train_state": dict(train_state) if train_state is not None else None,
            "metrics": dict(metrics or {}),
            "extra": dict(extra or {}),
            "resumable": optimizer is not None,
            "n_parameters": sum(p.numel() for p in model.parameters()),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "bstrec_version": bstrec.__version__,
            "sha256": {name: sha256_file(tmp / name) for name in files},
        }
        try:
            text = json.dumps(meta, indent=2, allow_nan=True)
        except TypeError as exc:
            raise TypeError(f"checkpoint metadata is not JSON-serialisable: {exc}") from None
        (tmp / META).write_text(text + "\n")
    return target


def read_meta(path: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """checkpoint.json of the checkpoint at ``path``, after checking format and file hashes."""
    return read_described_dir(Path(path), META, what="checkpoint", format_version=FORMAT_VERSION,
                              required=("model_name", "model_config", "sha256"),
                              hashes_key="sha256", verify=verify, error=CheckpointError)


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load the checkpoint's weights into ``model`` (same architecture; strict)."""
    root = Path(path)
    weights = root / WEIGHTS
    if not weights.exists():
        raise CheckpointError(f"{root} is incomplete: {WEIGHTS} is missing")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        load_model(model, str(weights), strict=True, device=str(device))
    except RuntimeError as exc:
        raise CheckpointError(f"{weights} does not fit {type(model).__name__}: {exc}") from None
    except Exception as exc:  # safetensors raises its own error type on a bad header
        raise CheckpointError(f"{weights} is corrupted: {exc}") from None


def load_checkpoint(path: str | Path, *, builder: Builder | None = None,
                    verify: bool = True) -> Checkpoint:
    """Rebuild the model of the checkpoint at ``path`` and load its weights (eval mode).

    ``builder(name, spec, model_config)`` makes the model; by default the rankers' registry
    ``bstrec.ranking.build_ranker``. ``verify`` checks every file against its recorded sha256.
    """
    root = Path(path)
    meta = read_meta(root, verify=verify)
    try:
        spec = FeatureSpec.load(root / SPEC)
        vocabs = Vocabularies.load(root / VOCAB)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{root} is incomplete: {exc}") from None
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        raise CheckpointError(f"{root}: feature spec or vocabulary is corrupted: {exc}") from None
    if builder is None:
        from bstrec.ranking import build_ranker

        builder = build_ranker
    model = builder(meta["model_name"], spec, dict(meta["model_config"]))
    load_weights(model, root)
    model.eval()
    return Checkpoint(
        path=root, model=model, model_name=meta["model_name"],
        model_config=dict(meta["model_config"]), spec=spec, vocabs=vocabs,
        train_config=meta.get("train_config"), train_state=meta.get("train_state"),
        metrics=dict(meta.get("metrics") or {}), meta=meta)


def restore_optimizer(optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Load the optimizer state of a resumable checkpoint into ``optimizer``.

    ``optimizer`` must be built like the saved one, over the same model's parameters.
    """
    root = Path(path)
    tensors = _read_optimizer_tensors(root)
    try:
        plain = json.loads((root / OPTIM_JSON).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{root} is not resumable: {OPTIM_JSON} is missing") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{root / OPTIM_JSON} is corrupted: {exc}") from None
    current = optimizer.state_dict()
    saved_groups = plain.get("param_groups")
    if not isinstance(saved_groups, list) or len(saved_groups) != len(current["param_groups"]):
        raise CheckpointError(f"{root}: the saved optimizer has other parameter groups")
    groups = []
    for saved, now in zip(saved_groups, current["param_groups"], strict=True):
        if len(saved["params"]) != len(now["params"]):
            raise CheckpointError(f"{root}: the saved optimizer covers {len(saved['params'])} "
                                  f"parameters, this one {len(now['params'])}")
        # JSON has no tuples: give back the type the optimizer uses (e.g. Adam's betas).
        groups.append({k: tuple(v) if isinstance(now.get(k), tuple) else v
                       for k, v in saved.items()})
    state: dict[int, dict[str, Any]] = {}
    for key, value in plain.get("state", {}).items():
        state.setdefault(int(key), {}).update(value)
    for key, tensor in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = tensor
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{root}: optimizer state does not fit: {exc}") from None


def restore_rng_state(path: str | Path, rank: int = 0) -> None:
    """Set the global torch RNG (CPU, and CUDA when saved and available) to the state saved
    for ``rank`` (0: the only one of a one-process run)."""
    tensors = _read_optimizer_tensors(Path(path))
    key = _rng_key("torch", rank)
    if key not in tensors:
        raise CheckpointError(f"{path}: no RNG state for rank {rank} in {OPTIM_TENSORS}")
    torch.set_rng_state(tensors[key])
    if _rng_key("cuda", rank) in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[_rng_key("cuda", rank)])


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor],
                                                                   dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain_state: dict[str, dict[str, Any]] = {}
    for index, entry in sd["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous().clone()
            else:
                plain_state.setdefault(str(index), {})[name] = value
    plain = {"type": type(optimizer).__name__, "state": plain_state,
             "param_groups": sd["param_groups"]}
    try:
        json.dumps(plain)
    except TypeError as exc:
        raise TypeError(f"optimizer state is not JSON-serialisable: {exc}") from None
    return tensors, plain


def rng_state() -> dict[str, torch.Tensor]:
    """This process's global RNG states: ``torch`` (CPU), and ``cuda`` once CUDA is in use."""
    out = {"torch": torch.get_rng_state()}
    cuda_ready: Callable[[], bool] = torch.cuda.is_initialized  # never initialise CUDA here
    if torch.cuda.is_available() and cuda_ready():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _rng_key(name: str, rank: int) -> str:
    # rank 0 keeps the key of one-process checkpoints, which stay readable as they were
    return f"rng.{name}" if rank == 0 else f"rng.rank{rank}.{name}"


def _read_optimizer_tensors(root: Path) -> dict[str, torch.Tensor]:
    file = root / OPTIM_TENSORS
    if not file.exists():
        raise CheckpointError(f"{root} is not resumable: {OPTIM_TENSORS} is missing")
    try:
        tensors: dict[str, torch.Tensor] = load_file(str(file))
    except Exception as exc:  # safetensors raises its own error type on a bad header
        raise CheckpointError(f"{file} is corrupted: {exc}") from None
    return tensors


