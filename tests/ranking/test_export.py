"""Exported rankers (ONNX Runtime) score like the eager model, at any batch size."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# required dependencies (pyproject): without them this module must fail, not skip
import onnxruntime  # noqa: F401
import onnxscript  # noqa: F401
import pytest
import torch

from bstrec.ranking.export import export_ranker, load_runtime, model_inputs
from tests.ranking.test_models import BST_ABLATIONS, briefly_trained, make_batch, make_spec

CASES = [("bst", {}), ("din", {}), ("wdl", {}), ("wdl_seq", {}),
         ("bst", BST_ABLATIONS[2]), ("bst", {"output": "target", "blocks": 2}),
         ("bst", {"output": "target", "mlp_norm": "batch"}),
         ("bst", {"output": "target", "mlp_norm": "batch", "wide": True}),
         ("bst", {"time_buckets": 8})]


@pytest.mark.parametrize(("name", "overrides"), CASES, ids=lambda c: str(c))
def test_export_parity(name: str, overrides: dict[str, object], tmp_path: Path) -> None:
    spec = make_spec()
    model = briefly_trained(name, overrides)
    path = export_ranker(model, spec, tmp_path / f"{name}.onnx")
    assert model.training  # export leaves the model's mode as it found it
    model.eval()
    runtime = load_runtime(path, threads=1)
    assert runtime.input_names == model_inputs(spec)
    assert runtime.spec == spec
    for n, width in ((1, 1), (7, 3), (200, 5)):
        b = make_batch(spec, n, seed=10 + n, multi_width=width)
        with torch.no_grad():
            want = model(b).numpy()
        got = runtime.predict({k: v.numpy() for k, v in b.items()})
        assert got.shape == (n,) and got.dtype == np.float32
        assert np.abs(got - want).max() < 1e-4


def test_the_exported_graph_buckets_with_the_models_time_buckets(tmp_path: Path) -> None:
    """The graph takes seconds and buckets them as the model's config says: with 8 buckets,
    63 s and 1024 s (both in the last bucket) score alike, as they do eagerly."""
    spec = make_spec()
    model = briefly_trained("bst", {"time_buckets": 8, "token_init_std": 1.0}).eval()
    runtime = load_runtime(export_ranker(model, spec, tmp_path / "bst8.onnx"), threads=1)
    b = make_batch(spec, 16, seed=3, min_len=spec.max_len)
    feeds = [{**b, "hist_dt": torch.full_like(b["hist_dt"], dt)} for dt in (63, 1024, 3)]
    with torch.no_grad():
        want = [model(f).numpy() for f in feeds]
    got = [runtime.predict({k: v.numpy() for k, v in f.items()}) for f in feeds]
    for g, w in zip(got, want, strict=True):
        assert np.abs(g - w).max() < 1e-4
    np.testing.assert_array_equal(got[0], got[1])
    assert np.abs(got[0] - got[2]).max() > 1e-3
