"""The serving ranker runtime: one request's candidates through the request-shaped graph equal
the batch graph on the full rows; bundles without that graph still serve, wrong graphs are
refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bstrec.data.io import sha256_file
from bstrec.features.store import FeatureStore
from bstrec.ranking import build_ranker
from bstrec.ranking.export import export_ranker, export_request_ranker
from bstrec.serving.bundle import MANIFEST, RANKER, RANKER_REQUEST, Bundle, BundleError, load_bundle
from bstrec.serving.guard import StoreGuard
from bstrec.serving.pipeline import Pipeline
from tests.serving.conftest import Artifacts

NOW = 1_800_000_000


def rehash(bundle: Path) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"] = {n: sha256_file(bundle / n) for n in manifest["files"] if (bundle / n).exists()}
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def request_scores_match_rows(pipeline: Pipeline, store: FeatureStore, user: int) -> None:
    rec = pipeline.recommend(user, k=8, now=NOW)
    items = [i.item_id for i in rec.items]
    expected = pipeline.bundle.ranker.score(pipeline.features.batch_from_store(store, user, items,
                                                                               NOW))
    np.testing.assert_allclose([i.score for i in rec.items], expected, rtol=1e-5, atol=1e-6)


def test_bundle_serves_through_the_request_graph(bundle: Bundle, pipeline: Pipeline,
                                                 store: FeatureStore) -> None:
    assert bundle.ranker.request is not None and bundle.ranker.request.graph == "request"
    assert RANKER_REQUEST in bundle.manifest["files"]
    for user in (3, 7, 10_000_000):  # known users and a cold one (empty history)
        request_scores_match_rows(pipeline, store, user)


def test_a_target_output_bst_shares_work_and_serves_the_same_scores(
        artifacts: Artifacts, bundle: Bundle, store: FeatureStore, tmp_path: Path) -> None:
    """The fixture's BST concatenates every output (no sharing): swap in a BST whose request
    graph does share work, and the pipeline's scores still equal the batch graph on the rows."""
    torch.manual_seed(0)
    model = build_ranker("bst", bundle.spec, {"output": "target", "mlp": [32, 16], "item_dim": 8,
                                              "cat_dim": 4, "pos_dim": 4, "heads": 2}).eval()
    copy = tmp_path / "target"
    shutil.copytree(artifacts.bundle, copy)
    export_ranker(model, bundle.spec, copy / RANKER)
    export_request_ranker(model, bundle.spec, copy / RANKER_REQUEST)
    rehash(copy)
    target = load_bundle(copy)
    assert target.ranker.request is not None and target.ranker.request.shares_work
    pipe = Pipeline(target, StoreGuard(store, "embedded"), clock=lambda: NOW)
    for user in (3, 11, 10_000_000):
        request_scores_match_rows(pipe, store, user)


def test_a_bundle_without_the_request_graph_serves_through_the_batch_graph(
        artifacts: Artifacts, store: FeatureStore, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(artifacts.bundle, old)
    (old / RANKER_REQUEST).unlink()
    rehash(old)
    loaded = load_bundle(old)
    assert loaded.ranker.request is None
    request_scores_match_rows(Pipeline(loaded, StoreGuard(store, "embedded"), clock=lambda: NOW),
                              store, 3)


def test_a_batch_graph_in_place_of_the_request_graph_is_refused(artifacts: Artifacts,
                                                                tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(artifacts.bundle, bad)
    shutil.copy(bad / RANKER, bad / RANKER_REQUEST)
    rehash(bad)
    with pytest.raises(BundleError, match="not a request-shaped ranker graph"):
        load_bundle(bad)


def test_an_int8_bundle_serves_through_its_request_graph(artifacts: Artifacts, store: FeatureStore,
                                                          tmp_path: Path) -> None:
    """Both graphs dynamically quantised (benchmarks/bench_serving.py's int8 variant): they
    agree closely, not exactly, and the bundle loads and serves."""
    quantization = pytest.importorskip("onnxruntime.quantization")
    q = tmp_path / "int8"
    shutil.copytree(artifacts.bundle, q)
    for name in (RANKER, RANKER_REQUEST):
        quantization.quantize_dynamic(str(artifacts.bundle / name), str(q / name),
                                      weight_type=quantization.QuantType.QInt8)
    rehash(q)
    loaded = load_bundle(q)
    assert loaded.ranker.request is not None
    rec = Pipeline(loaded, StoreGuard(store, "embedded"), clock=lambda: NOW).recommend(3, k=5)
    assert len(rec.items) == 5 and all(0 < i.score < 1 for i in rec.items)
