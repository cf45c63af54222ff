"""Export a ranker to ONNX and score with ONNX Runtime, without torch on the serving path.

Notation: B batch (candidates), L history length, M multi-hot width.

The exported graph takes the batch contract (training/tensors.py) as named inputs, in the order
:func:`model_inputs` gives: every feature of the spec ((B,) int64, or (B, M) int64 for multi-hot),
then ``hist_item``, ``hist_cat``, ``hist_dt`` (B, L) int64 (``hist_dt`` in seconds: the graph
buckets it with the model's own ``time_buckets``) and ``hist_mask`` (B, L) bool; it
returns ``logits`` (B,) float32. B and M are dynamic; L is the spec's ``max_len``. The feature spec
travels in the file's metadata (``bstrec.spec``). Inputs a model ignores (Wide&Deep's history)
stay declared, so that every exported ranker is fed the same way.

The request-shaped graph (:func:`export_request_ranker`, ranking/request.py) scores the N
candidates of one request: the user, context and history inputs with batch 1, then the item
inputs with batch N, in the order :func:`request_inputs` gives -> ``logits`` (N,). Its metadata
says ``bstrec.graph = request`` (the batch graph's says ``batch``, or nothing in files written
before the request graph existed) and whether it shares work across candidates
(``bstrec.shares_work``).

A ranker that splits off what depends on the item alone (BST with ``request_shaped``, the
distilled pre-ranker: ``item_parts`` / ``forward_parts``) is exported as two graphs instead
(:func:`export_request_parts`): ``item_parts`` (the item inputs, N -> ``parts`` (N, P) float32),
run once per catalogue item, and ``request_parts`` (the shared inputs with batch 1, then
``item_parts`` (N, P) and the item inputs it still reads, ``bstrec.part_item_inputs``).

A multi-task ranker (ESMM, ranking/multitask.py) is exported by :func:`export_heads` as a batch
graph whose ``logits`` are (B, H), one column per head (``bstrec.heads``, e.g. ``["ctr",
"cvr"]``): the served objective (evaluation/objective.py) combines them. Single-head graphs say
nothing, read as ``["ctr"]``.

:func:`export_graph` and :class:`OnnxGraph` are the machinery under both, shared with the
two-tower's user tower (retrieval/export.py), whose graph says ``bstrec.graph = user_tower``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from bstrec.features.spec import FeatureSpec
from bstrec.ranking.bst import BST
from bstrec.ranking.multitask import is_multitask
from bstrec.ranking.prerank import PreRanker
from bstrec.ranking.request import SEQUENCE_INPUTS, forward_request, item_names, shared_names

OPSET = 20
# the rankers with ``item_parts`` / ``forward_parts`` (module docstring)
SplitRanker = BST | PreRanker
PARTS = "item_parts"  # the request_parts graph's input of precomputed item parts (N, P)


def model_inputs(spec: FeatureSpec) -> tuple[str, ...]:
    """Names of the exported graph's inputs, in order."""
    return (*(f.name for f in spec.features), *SEQUENCE_INPUTS)


def request_inputs(spec: FeatureSpec) -> tuple[str, ...]:
    """Names of the request-shaped graph's inputs, in order: shared (batch 1), then items (N)."""
    return (*shared_names(spec), *item_names(spec))


class _Positional(nn.Module):
    """Positional tensors -> the wrapped ranker's batch dict (ONNX graphs take named tensors)."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *xs: Tensor) -> Tensor:
        out: Tensor = self.model(dict(zip(self.names, xs, strict=True)))
        return out


class _RequestPositional(nn.Module):
    """Positional tensors (shared, then item inputs) -> the ranker's request-shaped logits."""

    def __init__(self, model: nn.Module, shared: tuple[str, ...], items: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.shared = shared
        self.items = items

    def forward(self, *xs: Tensor) -> Tensor:
        n = len(self.shared)
        return forward_request(self.model, dict(zip(self.shared, xs[:n], strict=True)),
                               dict(zip(self.items, xs[n:], strict=True)))


class _Heads(_Positional):
    """Positional tensors -> a multi-task ranker's head logits stacked (B, H)."""

    def forward(self, *xs: Tensor) -> Tensor:
        # nn.Module's attribute typing knows no methods of a subclass
        heads_of = cast(Callable[[dict[str, Tensor]], tuple[Tensor, ...]], self.model.heads)
        return torch.stack(list(heads_of(dict(zip(self.names, xs, strict=True)))), 1)


def example_batch(spec: FeatureSpec, batch: int = 3, multi_width: int = 2) -> dict[str, Tensor]:
    """A small valid batch (ids 2, the first value seen in train) to trace the graph with."""
    L = spec.max_len
    b: dict[str, Tensor] = {}
    for f in spec.features:
        shape = (batch,) if f.kind == "categorical" else (batch, multi_width)
        b[f.name] = torch.full(shape, min(2, f.vocab_size - 1), dtype=torch.long)
    mask = torch.zeros(batch, L, dtype=torch.bool)
    mask[:, L // 2:] = True
    for name in ("hist_item", "hist_cat"):
        b[name] = torch.where(mask, 2, 0)
    b["hist_dt"] = torch.where(mask, 3600, 0)
    b["hist_mask"] = mask
    return b


def export_ranker(model: nn.Module, spec: FeatureSpec, path: str | Path) -> Path:
    """Write ``model`` (in eval mode) as an ONNX graph with a dynamic batch size; returns path."""
    names = model_inputs(spec)
    example = example_batch(spec)
    return export_graph(model, _Positional(model, names), spec, path, names=names,
                        args=tuple(example[n] for n in names), batched=set(names),
                        meta={"bstrec.graph": "batch"})


def export_heads(model: nn.Module, spec: FeatureSpec, path: str | Path,
                 heads: tuple[str, ...] = ("ctr", "cvr")) -> Path:
    """Write a multi-task ranker (``model.heads(batch)`` -> one (B,) logit per head, e.g.
    ESMM's CTR and CVR) as a batch graph with ``logits`` (B, len(heads)); returns path."""
    if not is_multitask(model):
        raise ValueError(f"{type(model).__name__} has no heads(batch): not a multi-task ranker")
    names = model_inputs(spec)
    example = example_batch(spec)
    return export_graph(model, _Heads(model, names), spec, path, names=names,
                        args=tuple(example[n] for n in names), batched=set(names),
                        meta={"bstrec.graph": "batch", "bstrec.heads": json.dumps(list(heads))})


def splits_items(model: nn.Module) -> bool:
    """Whether ``model`` is exported as ``export_request_parts``' two graphs."""
    return isinstance(model, SplitRanker) and model.request_shaped


def export_request_ranker(model: nn.Module, spec: FeatureSpec, path: str | Path) -> Path:
    """Write ``model`` (in eval mode) as the request-shaped ONNX graph (module docstring):
    shared inputs with batch 1, item inputs with a dynamic batch N; returns path."""
    shared, items = shared_names(spec), item_names(spec)
    example = example_batch(spec)
    args = (*(example[n][:1] for n in shared), *(example[n] for n in items))
    shares = bool(getattr(model, "request_shaped", False))
    return export_graph(model, _RequestPositional(model, shared, items), spec, path,
                        names=(*shared, *items), args=args, batched=set(items),
                        meta={"bstrec.graph": "request", "bstrec.shares_work": json.dumps(shares)})


class _ItemParts(nn.Module):
    """Positional item inputs -> the ranker's ``item_parts`` (N, P)."""

    def __init__(self, model: SplitRanker, items: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.items = items

    def forward(self, *xs: Tensor) -> Tensor:
        out: Tensor = self.model.item_parts(dict(zip(self.items, xs, strict=True)))
        return out


class _RequestParts(nn.Module):
    """Positional tensors (shared inputs, item parts, the item inputs still read) -> logits."""

    def __init__(self, model: SplitRanker, shared: tuple[str, ...], items: tuple[str, ...]
                 ) -> None:
        super().__init__()
        self.model = model
        self.shared = shared
        self.items = items

    def forward(self, *xs: Tensor) -> Tensor:
        n = len(self.shared)
        out: Tensor = self.model.forward_parts(dict(zip(self.shared, xs[:n], strict=True)), xs[n],
                                               dict(zip(self.items, xs[n + 1:], strict=True)))
        return out


def export_request_parts(model: SplitRanker, spec: FeatureSpec, request_path: str | Path,
                         items_path: str | Path) -> tuple[Path, Path]:
    """Write a ranker with ``item_parts`` / ``forward_parts`` (in eval mode) as the two graphs
    of the module docstring; returns (request graph, item-parts graph)."""
    items, shared = item_names(spec), shared_names(spec)
    still = model.mixed_item_inputs
    example = example_batch(spec)
    export_graph(model, _ItemParts(model, items), spec, items_path, names=items,
                 args=tuple(example[n] for n in items), batched=set(items),
                 meta={"bstrec.graph": "item_parts"}, output="parts")
    # only its shape matters to the trace: the request graph takes any item_parts rows
    parts = torch.zeros(len(example[items[0]]), sum(model.part_sizes))
    names = (*shared, PARTS, *still)
    args = (*(example[n][:1] for n in shared), parts, *(example[n] for n in still))
    export_graph(model, _RequestParts(model, shared, still), spec, request_path, names=names,
                 args=args, batched={PARTS, *still},
                 meta={"bstrec.graph": "request_parts", "bstrec.shares_work": "true",
                       "bstrec.part_item_inputs": json.dumps(list(still))})
    return Path(request_path), Path(items_path)


def export_graph(model: nn.Module, wrapper: nn.Module, spec: FeatureSpec, path: str | Path, *,
                 names: tuple[str, ...], args: tuple[Tensor, ...], batched: set[str],
                 meta: dict[str, str], output: str = "logits") -> Path:
    """Export ``wrapper`` (positional inputs ``args`` called ``names``, one output called
    ``output``) with a dynamic first dimension on the ``batched`` inputs and a dynamic width on
    multi-hot ones; the spec, input names and ``model``'s config join the file's metadata, and
    ``meta`` too. ``model`` is the module ``wrapper`` calls: its train/eval mode is restored."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    wrapper.eval()
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    multi = {f.name for f in spec.features if f.kind == "multi"}
    dims: list[dict[int, Any]] = []
    for n in names:
        d: dict[int, Any] = {0: batch} if n in batched else {}
        if n in multi:
            d[1] = torch.export.Dim(f"{n}_width", min=1, max=1 << 12)
        dims.append(d)
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    try:
        onnx_log.setLevel(logging.ERROR)  # the exporter's chatter about torchvision etc.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper, args, input_names=list(names), output_names=[output],
                dynamic_shapes=(tuple(dims),), opset_version=OPSET, dynamo=True,
                verbose=False)
    finally:
        onnx_log.setLevel(level)
        model.train(was_training)
    assert program is not None
    props = program.model.metadata_props
    props["bstrec.spec"] = json.dumps(spec.to_dict())
    props["bstrec.inputs"] = json.dumps(list(names))
    config = getattr(model, "config", None)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        props["bstrec.config"] = json.dumps(dataclasses.asdict(config))
    props["bstrec.model"] = type(model).__name__
    props.update(meta)
    program.save(str(path))
    return path


_ORT_TYPES: dict[str, type] = {"tensor(int64)": np.int64, "tensor(bool)": np.bool_,
                               "tensor(float)": np.float32}


class OnnxGraph:
    """A graph written by :func:`export_graph`, in ONNX Runtime: its spec, input names and
    metadata (``meta``); ``run(batch)`` -> its one output."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort  # type: ignore[import-untyped]  # only serving needs it

        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
        self.meta: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.spec = FeatureSpec.from_dict(json.loads(self.meta["bstrec.spec"]))
        self.input_names: tuple[str, ...] = tuple(i.name for i in self.session.get_inputs())
        self.input_types: dict[str, type] = {i.name: _ORT_TYPES[i.type]
                                             for i in self.session.get_inputs()}
        self.output_name: str = self.session.get_outputs()[0].name

    def run(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        """The graph's inputs as NumPy arrays (extra keys ignored) -> its output."""
        feed: dict[str, np.ndarray] = {n: np.ascontiguousarray(batch[n], dtype=t)
                                       for n, t in self.input_types.items()}
        out: np.ndarray = self.session.run([self.output_name], feed)[0]
        return out


class OnnxRanker(OnnxGraph):
    """An exported ranker in ONNX Runtime: ``predict(batch) -> logits (B,)`` float32."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__(path, threads)
        self.graph: str = self.meta.get("bstrec.graph", "batch")  # files of before the request graph
        self.shares_work: bool = json.loads(self.meta.get("bstrec.shares_work", "false"))
        # the columns of a multi-task graph's (B, H) logits; a single-head graph's (B,) is CTR
        self.heads: tuple[str, ...] = tuple(json.loads(self.meta.get("bstrec.heads",
                                                                     '["ctr"]')))

    def predict(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        """The graph's inputs as NumPy arrays (extra keys ignored) -> (B,) float32 logits: the
        batch contract, or for a request graph the shared (1, ...) and item (N, ...) inputs."""
        return np.asarray(self.run(batch), dtype=np.float32)


def load_runtime(path: str | Path, threads: int | None = None) -> OnnxRanker:
    """The runtime for an exported ranker file (see :func:`export_ranker`)."""
    return OnnxRanker(path, threads=threads)
