"""The serving runtimes. The ranker: one request's candidates through the request-shaped graph
equal the batch graph on the full rows; bundles without that graph still serve, wrong graphs are
refused. The user tower: the exported graph gives eager ``encode_users``'s vectors on online rows;
bundles without it serve through eager torch, one that does not fit the two-tower is refused."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from onnxruntime import quantization

from bstrec.data.io import sha256_file
from bstrec.features.spec import FeatureSpec
from bstrec.features.store import FeatureStore, UserSnapshot
from bstrec.ranking.export import example_batch
from bstrec.ranking.request import forward_request, shared_names
from bstrec.retrieval.export import export_user_tower
from bstrec.retrieval.two_tower import TwoTower
from bstrec.serving.bundle import (
    MANIFEST,
    RANKER,
    RANKER_ITEMS,
    RANKER_REQUEST,
    USER_TOWER,
    Bundle,
    BundleError,
    build_bundle,
    load_bundle,
)
from bstrec.serving.guard import StoreGuard
from bstrec.serving.pipeline import Pipeline
from bstrec.serving.runtime import UserTowerRuntime
from bstrec.training.checkpoint import load_checkpoint
from bstrec.training.task import train_ranker
from bstrec.training.tensors import Batch
from tests.serving.fixtures import Artifacts

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


def test_a_target_output_bst_serves_from_precomputed_item_parts(
        artifacts: Artifacts, store: FeatureStore, tmp_path: Path) -> None:
    """The fixture's BST concatenates every output (no sharing). A BST with the target output
    and one block is bundled as the request-parts graph and its item-parts graph: the pipeline
    computes every catalogue item's parts once, and its scores still equal the batch graph on
    the full rows, with the cached parts and without them (computed per request), and the
    eager checkpoint's, with a bucket count other than the default."""
    threads = torch.get_num_threads()
    run = tmp_path / "target_bst"
    train_ranker("bst", artifacts.samples, run, model_overrides={
        "output": "target", "mlp": [32, 16], "mlp_norm": "batch", "item_dim": 8, "cat_dim": 4,
        "pos_dim": 4, "heads": 2, "time_buckets": 12},
        train_overrides={"max_steps": 3, "num_threads": 1},
        progress=False)
    torch.set_num_threads(threads)
    target = load_bundle(build_bundle(artifacts.samples, run / "best", tmp_path / "bundle",
                                      retriever_dir=artifacts.retriever))
    assert {RANKER_REQUEST, RANKER_ITEMS} <= set(target.manifest["files"])
    assert target.ranker.request is not None and target.ranker.request.graph == "request_parts"
    pipe = Pipeline(target, StoreGuard(store, "embedded"), clock=lambda: NOW)
    pipe.warmup()
    parts = pipe._item_parts(pipe.table)
    assert parts is not None and parts.shape[0] == len(pipe.table.present)
    for user in (3, 11, 10_000_000):
        request_scores_match_rows(pipe, store, user)
    snap = store.snapshot(3)
    row = pipe.features.query_row(snap, pipe.table, pipe.probe_item, NOW)
    idx = np.arange(2, 40)
    cands = pipe.table.inputs(idx)
    served = target.ranker.score_request(row, cands, parts[idx])
    np.testing.assert_allclose(served, target.ranker.score_request(row, cands), rtol=1e-6,
                               atol=1e-7)
    model = load_checkpoint(run / "best").model.eval()
    assert model.config.time_buckets == 12  # type: ignore[union-attr]
    with torch.no_grad():
        eager = torch.sigmoid(forward_request(
            model, {n: row[n] for n in shared_names(target.spec)}, cands)).numpy()
    np.testing.assert_allclose(served, eager, rtol=0.0, atol=1e-5)


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


# --- the exported user tower ----------------------------------------------------------------

def query_rows(pipeline: Pipeline, store: FeatureStore) -> list[Batch]:
    """Online query rows: two known users (padded histories), one behaviour, no history."""
    f = pipeline.features
    few = UserSnapshot(30_000_000, store.snapshot(3).behaviours[:1], None)
    rows = []
    for snap in (store.snapshot(3), store.snapshot(11), few, UserSnapshot(-5, (), None)):
        items = store.items(f.item_ids_needed(snap, [pipeline.probe_item]))
        rows.append(f.query_row(snap, items, pipeline.probe_item, NOW))
    assert not rows[-1]["hist_mask"].any() and not rows[2]["hist_mask"].all()
    return rows


def eager(model: TwoTower, batch: Batch) -> np.ndarray:
    model.eval()
    with torch.inference_mode():
        out: np.ndarray = model.encode_users(batch).numpy()
    return out


def test_bundle_computes_user_vectors_through_the_exported_user_tower(
        bundle: Bundle, pipeline: Pipeline, store: FeatureStore) -> None:
    tower, model = bundle.user_tower, bundle.two_tower
    assert tower is not None and model is not None and USER_TOWER in bundle.manifest["files"]
    example = example_batch(bundle.spec, batch=3)
    np.testing.assert_allclose(tower.encode(example), eager(model, example), rtol=0.0, atol=1e-5)
    for row in query_rows(pipeline, store):
        got = tower.encode(row)
        assert got.shape == (1, model.config.dim) and got.dtype == np.float32
        np.testing.assert_allclose(got, eager(model, row), rtol=0.0, atol=1e-5)
        np.testing.assert_array_equal(pipeline.matcher.user_vector(row), got)  # what match uses
        matched = pipeline.matcher.match(row, np.zeros(0, dtype=np.int64))
        assert matched.user_vector is not None
        np.testing.assert_array_equal(matched.user_vector, got[0])


@pytest.mark.parametrize("encoder", ["mean", "transformer"])
def test_user_tower_parity_on_online_rows(encoder: str, bundle: Bundle, pipeline: Pipeline,
                                          store: FeatureStore, tmp_path: Path) -> None:
    """Both encoders, with the user-id and context inputs too and another bucket count than
    the default, on the online feature path's rows (the fixture's two-tower is a mean one
    without them)."""
    assert bundle.two_tower is not None
    torch.manual_seed(0)
    model = TwoTower(bundle.spec, dataclasses.replace(
        bundle.two_tower.config, encoder=encoder, user_id=True, context=True,  # type: ignore[arg-type]
        time_buckets=12))
    tower = UserTowerRuntime(export_user_tower(model, bundle.spec, tmp_path / USER_TOWER))
    assert {"user", "hour", "dow"} <= set(tower.input_names)
    tower.check(model)
    for row in query_rows(pipeline, store):
        np.testing.assert_allclose(tower.encode(row), eager(model, row), rtol=0.0, atol=1e-5)


def test_a_bundle_without_the_user_tower_serves_through_eager_torch(
        artifacts: Artifacts, bundle: Bundle, pipeline: Pipeline, store: FeatureStore,
        tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(artifacts.bundle, old)
    (old / USER_TOWER).unlink()
    rehash(old)
    loaded = load_bundle(old)
    assert loaded.user_tower is None and loaded.two_tower is not None
    pipe = Pipeline(loaded, StoreGuard(store, "embedded"), clock=lambda: NOW)
    assert bundle.user_tower is not None
    for row in query_rows(pipe, store):
        u = pipe.matcher.user_vector(row)
        assert u is not None
        np.testing.assert_allclose(u, bundle.user_tower.encode(row), rtol=0.0, atol=1e-5)
    request_scores_match_rows(pipe, store, 3)


def _another_spec(spec: FeatureSpec) -> FeatureSpec:
    return dataclasses.replace(spec, max_len=spec.max_len + 1)


@pytest.mark.parametrize("case, message", [
    ("weights", "differ from the two-tower's"),  # same spec and config, other weights
    ("spec", "another feature spec"),
    ("config", "the user tower reads"),  # context inputs the bundle's two-tower does not read
    ("ranker", "not a user-tower graph"),
])
def test_a_user_tower_that_does_not_fit_the_two_tower_is_refused(
        case: str, message: str, artifacts: Artifacts, bundle: Bundle, tmp_path: Path) -> None:
    assert bundle.two_tower is not None
    config, spec = bundle.two_tower.config, bundle.spec
    bad = tmp_path / "bad"
    shutil.copytree(artifacts.bundle, bad)
    torch.manual_seed(1)
    if case == "ranker":
        shutil.copy(bad / RANKER, bad / USER_TOWER)
    else:
        if case == "spec":
            spec = _another_spec(spec)
        if case == "config":
            config = dataclasses.replace(config, context=True)
        export_user_tower(TwoTower(spec, config), spec, bad / USER_TOWER)
    rehash(bad)
    with pytest.raises(BundleError, match=rf"user_tower\.onnx does not load .*{message}"):
        load_bundle(bad)
