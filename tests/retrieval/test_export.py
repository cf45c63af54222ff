"""The exported user tower (ONNX Runtime) gives eager ``encode_users``'s vectors, at any batch
size and multi-hot width, for both encoders and with or without profile and context inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bstrec.features.spec import Feature, FeatureSpec
from bstrec.ranking.export import OnnxGraph
from bstrec.retrieval.export import GRAPH, OUTPUT, export_user_tower, user_tower_inputs
from bstrec.retrieval.two_tower import TwoTower, TwoTowerConfig
from tests.ranking.test_models import make_batch, make_spec

SMALL = {"dim": 8, "token_dim": 8, "feat_dim": 4, "heads": 2, "user_hidden": (16,),
         "item_hidden": (16,)}
CASES = [
    {"encoder": "mean", "user_id": True, "context": True},
    {"encoder": "transformer", "blocks": 2, "user_id": True, "context": True},
    {"encoder": "mean", "use_time": False},  # hist_dt declared, unused
    {"encoder": "transformer", "profile": False},  # the history alone: no feature inputs
]


def spec_with_user_multi_hot() -> FeatureSpec:
    """The ranking tests' spec plus a multi-hot user feature (the real specs have none)."""
    base = make_spec()
    return FeatureSpec(features=(*base.features, Feature("user_tags", "multi", "user", 9,
                                                         "user_tags")), max_len=base.max_len)


def batch(spec: FeatureSpec, n: int, seed: int, width: int) -> dict[str, torch.Tensor]:
    b = make_batch(spec, n, seed=seed, multi_width=width)  # random lengths, some empty
    g = torch.Generator().manual_seed(seed)
    tags = b["user_tags"]
    b["user_tags"] = torch.where(torch.rand(tags.shape, generator=g) < 0.3, 0, tags)
    b["user_tags"][0] = 0  # no tags at all
    for name in ("hist_item", "hist_cat", "hist_dt", "hist_mask"):
        b[name][0] = 0  # an empty history
    return b


@pytest.mark.parametrize("overrides", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_user_tower_parity(overrides: dict[str, object], tmp_path: Path) -> None:
    spec = spec_with_user_multi_hot()
    torch.manual_seed(0)
    model = TwoTower(spec, TwoTowerConfig(**{**SMALL, **overrides}))  # type: ignore[arg-type]
    path = export_user_tower(model, spec, tmp_path / "user_tower.onnx")
    assert model.training  # export leaves the model's mode as it found it
    model.eval()
    graph = OnnxGraph(path, threads=1)
    assert graph.input_names == user_tower_inputs(model)
    assert graph.output_name == OUTPUT and graph.meta["bstrec.graph"] == GRAPH
    assert graph.spec == spec
    if overrides.get("user_id"):
        assert "user_tags" in graph.input_names and "hour" in graph.input_names
    for n, width in ((1, 1), (7, 3), (64, 5)):
        b = batch(spec, n, seed=20 + n, width=width)
        with torch.inference_mode():
            want = model.encode_users(b).numpy()
        got = graph.run({k: v.numpy() for k, v in b.items()})
        assert got.shape == (n, 8) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0.0, atol=1e-5)
