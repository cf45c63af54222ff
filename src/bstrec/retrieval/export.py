"""Export the two-tower's user tower to ONNX: at serving time a request's user vector is then one
ONNX Runtime call (serving/runtime.py) instead of eager torch, whose per-op overhead dominates a
batch of one.

Notation: B batch, L history length (``spec.max_len``), M multi-hot width, D output width.

The graph takes the user-side columns of the batch contract that ``TwoTower.encode_users``
reads, in the order :func:`user_tower_inputs` gives: the model's ``user_features`` ((B,) int64,
or (B, M) int64 for multi-hot), then ``hist_item``, ``hist_cat``, ``hist_dt`` (B, L) int64 (seconds; the
graph buckets them with the model's ``time_buckets``) and ``hist_mask`` (B, L) bool; it returns
``user_vectors`` (B, D) float32. B and M are dynamic; L is the spec's ``max_len``. ``hist_dt``
stays declared when the model ignores it (``use_time`` off), so that every user tower is fed the
same way. The metadata (ranking/export.py's
``export_graph``) holds the feature spec, the model's config and ``bstrec.graph = user_tower``.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from bstrec.features.spec import FeatureSpec
from bstrec.ranking.export import example_batch, export_graph
from bstrec.ranking.request import SEQUENCE_INPUTS
from bstrec.retrieval.two_tower import TwoTower

GRAPH = "user_tower"  # the graph kind in the file's metadata (``bstrec.graph``)
OUTPUT = "user_vectors"


def user_tower_inputs(model: TwoTower) -> tuple[str, ...]:
    """Names of the exported user tower's inputs, in order."""
    return (*model.user_features, *SEQUENCE_INPUTS)


class _UserTower(nn.Module):
    """Positional tensors -> ``model.encode_users`` of the batch dict they make."""

    def __init__(self, model: TwoTower, names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *xs: Tensor) -> Tensor:
        return self.model.encode_users(dict(zip(self.names, xs, strict=True)))  # (B, D)


def export_user_tower(model: TwoTower, spec: FeatureSpec, path: str | Path) -> Path:
    """Write ``model.encode_users`` (in eval mode) as an ONNX graph with a dynamic batch size
    (module docstring); ``spec``: the spec the model was built for. Returns path."""
    names = user_tower_inputs(model)
    example = example_batch(spec)
    return export_graph(model, _UserTower(model, names), spec, path, names=names,
                        args=tuple(example[n] for n in names), batched=set(names),
                        meta={"bstrec.graph": GRAPH}, output=OUTPUT)
