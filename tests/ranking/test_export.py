"""Exported rankers (ONNX Runtime) score like the eager model, at any batch size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bstrec.ranking.export import export_ranker, load_runtime, model_inputs
from tests.ranking.test_models import BST_ABLATIONS, briefly_trained, make_batch, make_spec

pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed")
pytest.importorskip("onnxscript", reason="onnxscript (torch.onnx.export's dynamo exporter)")

CASES = [("bst", {}), ("din", {}), ("wdl", {}), ("wdl_seq", {}),
         ("bst", BST_ABLATIONS[2]), ("bst", {"output": "target", "blocks": 2}),
         ("bst", {"output": "target", "mlp_norm": "batch"}),
         ("bst", {"output": "target", "mlp_norm": "batch", "wide": True})]


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
