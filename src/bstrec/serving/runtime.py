"""The exported models at serving time: every candidate of a request scored in one ONNX Runtime
call, no torch on this path.

Notation: B candidates of a batch, N candidates of one request.

A bundle holds the batch graph (the batch contract, any rows) and, since the request-shaped
graph exists, that graph too (ranking/export.py): the user, context and history inputs once,
the candidates' item inputs N times, so that work shared by the candidates is done once per
request. Bundles without it are served by broadcasting the shared inputs into the batch graph.

The two-tower's user tower (retrieval/export.py), when the bundle has it, gives a request's user
vector in one ONNX Runtime call too (:class:`UserTowerRuntime`, D its width) rather than eager
torch, whose per-op overhead dominates a batch of one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from bstrec.features.spec import FeatureSpec
from bstrec.ranking.export import PARTS, OnnxGraph, OnnxRanker, example_batch
from bstrec.ranking.request import SEQUENCE_INPUTS, item_names, shared_names
from bstrec.retrieval.export import GRAPH as USER_TOWER_GRAPH
from bstrec.retrieval.export import user_tower_inputs
from bstrec.retrieval.two_tower import TwoTower

F32 = npt.NDArray[np.float32]
Inputs = Mapping[str, torch.Tensor | np.ndarray]


def _array(v: torch.Tensor | np.ndarray) -> np.ndarray:
    return v.numpy() if isinstance(v, torch.Tensor) else v


def _numpy(batch: Inputs, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    return {n: _array(v) for n, v in batch.items() if n in names}


def sigmoid(z: F32) -> F32:
    out: F32 = (1.0 / (1.0 + np.exp(-z.astype(np.float64)))).astype(np.float32)
    return out


class RankerRuntime:
    """``score(batch) -> (B,)`` and ``score_request(shared, items) -> (N,)`` click
    probabilities (a multi-task ranker's: (B, H) and (N, H), columns ``heads``) from exported
    ranker files (``request_path``: the request-shaped graph, or the
    ``request_parts`` graph with ``items_path``, its ``item_parts`` graph: ranking/export.py)."""

    def __init__(self, path: str | Path, threads: int = 1,
                 request_path: str | Path | None = None,
                 items_path: str | Path | None = None) -> None:
        # One intra-op thread by default: requests run in parallel threads already, and a
        # thread pool per session per request would oversubscribe the cores.
        self.ranker = OnnxRanker(path, threads=threads)
        self.spec: FeatureSpec = self.ranker.spec
        self.request: OnnxRanker | None = None
        self.items: OnnxGraph | None = None
        if request_path is not None:
            self.request = OnnxRanker(request_path, threads=threads)
            if self.request.graph not in ("request", "request_parts"):
                raise ValueError(f"{request_path} is not a request-shaped ranker graph")
            if self.request.spec != self.spec:
                raise ValueError(f"{request_path} was exported for another feature spec than {path}")
            if self.request.graph == "request_parts":
                if items_path is None:
                    raise ValueError(f"{request_path} reads item parts: it needs its item graph")
                self.items = OnnxGraph(items_path, threads=threads)
                if self.items.meta.get("bstrec.graph") != "item_parts" \
                        or self.items.spec != self.spec:
                    raise ValueError(f"{items_path} is not the item-parts graph of {request_path}")
        self.shared_names = shared_names(self.spec)
        self.item_names = item_names(self.spec)
        # what the columns of the logits are: ("ctr",) for (B,) logits, else one per head
        self.heads: tuple[str, ...] = self.ranker.heads

    def logits(self, batch: Inputs) -> F32:
        """Batch contract (torch or NumPy; extra keys ignored) -> (B,) logits."""
        return self.ranker.predict(_numpy(batch, self.ranker.input_names))

    def score(self, batch: Inputs) -> F32:
        """Batch contract -> (B,) probabilities sigmoid(logit)."""
        return sigmoid(self.logits(batch))

    def item_parts(self, items: Inputs) -> F32 | None:
        """(N,) item inputs -> (N, P) what the request graph reads of each candidate once
        computed (cache it per catalogue item and pass rows of it to ``logits_request``);
        None when the request graph reads the item inputs themselves."""
        if self.items is None:
            return None
        out: F32 = self.items.run(_numpy(items, self.item_names))
        return out

    def logits_request(self, shared: Inputs, items: Inputs, parts: F32 | None = None) -> F32:
        """One request: ``shared`` user/context/history inputs (batch 1) and ``items`` the N
        candidates' item inputs -> (N,) logits, equal to ``logits`` on the broadcast batch.
        ``parts``: the candidates' rows of ``item_parts`` (computed here when not given)."""
        s, i = _numpy(shared, self.shared_names), _numpy(items, self.item_names)
        if self.request is not None and self.items is not None:
            got = self.items.run(i) if parts is None else parts
            return self.request.predict(s | i | {PARTS: got})
        if self.request is not None:
            return self.request.predict(s | i)
        n = len(next(iter(i.values())))
        return self.ranker.predict({k: np.broadcast_to(v, (n, *v.shape[1:])) for k, v in s.items()}
                                   | i)

    def score_request(self, shared: Inputs, items: Inputs, parts: F32 | None = None) -> F32:
        """One request -> (N,) probabilities sigmoid(logit)."""
        return sigmoid(self.logits_request(shared, items, parts))

    def check(self) -> None:
        """Score a tiny valid batch (and request); raise ValueError when a graph does not run,
        gives non-finite scores, or when the two graphs disagree (a bundle is refused before
        it serves)."""
        batch = example_batch(self.spec, batch=2)
        out = self.logits(batch)
        # a multi-task graph gives one column per head (ranking/export.py export_heads)
        shape = (2,) if len(self.heads) == 1 else (2, len(self.heads))
        if out.shape != shape or not np.isfinite(out).all():
            raise ValueError(f"the ranker returned {out!r} on a valid batch")
        if self.request is not None:
            got = self.logits_request({n: batch[n][:1] for n in self.shared_names}, batch)
            # int8 graphs quantise activations per call, from each graph's own tensors: the two
            # then agree to about 1e-2 in logit (fp32 ones to 1e-6); another model would not
            if got.shape != shape or not np.allclose(got, out, rtol=0.0, atol=0.05):
                raise ValueError(f"the request-shaped ranker returned {got!r} where the batch "
                                 f"graph returned {out!r}")


class UserTowerRuntime:
    """``encode(batch) -> (B, D)`` float32 two-tower user vectors from an exported user tower
    (retrieval/export.py): a request's one row gives (1, D), as eager ``encode_users`` would."""

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        # one intra-op thread, as the ranker's: the requests are the parallelism
        self.graph = OnnxGraph(path, threads=threads)
        if self.graph.meta.get("bstrec.graph") != USER_TOWER_GRAPH:
            raise ValueError(f"{path} is not a user-tower graph")
        self.spec: FeatureSpec = self.graph.spec
        self.input_names = self.graph.input_names

    def encode(self, batch: Inputs) -> F32:
        """User-side batch contract (torch or NumPy; extra keys ignored) -> (B, D) vectors."""
        # only the graph's inputs converted: a request's row carries the item columns too
        out: F32 = self.graph.run({n: _array(batch[n]) for n in self.input_names})
        return out

    def check(self, model: TwoTower, atol: float = 1e-5) -> None:
        """Raise ValueError when the graph reads other inputs than ``model`` or its vectors
        differ from eager ``model.encode_users`` (by more than ``atol``) on a small valid batch:
        one row with a history, one without (a bundle is refused before it serves)."""
        want_names = user_tower_inputs(model)
        if self.input_names != want_names:
            raise ValueError(f"the user tower reads {list(self.input_names)}, the two-tower "
                             f"{list(want_names)}")
        batch = example_batch(self.spec, batch=2)
        for name in SEQUENCE_INPUTS:
            batch[name][1] = 0  # an empty history: the path of cold users
        model.eval()
        with torch.inference_mode():
            want = model.encode_users(batch).numpy()
        got = self.encode(batch)
        if got.shape != want.shape:
            raise ValueError(f"the user tower returned {got.shape} vectors, the two-tower "
                             f"{want.shape}")
        gap = float(np.abs(got - want).max())
        if not gap <= atol:  # NaN fails too
            raise ValueError(f"its vectors differ from the two-tower's by up to {gap:.3g} "
                             f"(more than {atol:g})")
