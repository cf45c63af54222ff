"""The three-layer funnel in the service (issue 25): a bundle with a distilled pre-ranker and a
light ranker, its layers applied in order with one timing each, and the default config keeping
today's two-tower pre-rank."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bstrec.cli import app as cli
from bstrec.features.online import ItemTable
from bstrec.features.spec import N_RESERVED
from bstrec.features.store import FeatureStore
from bstrec.serving.bundle import (
    LIGHT,
    PRERANK,
    PRERANK_ITEMS,
    Bundle,
    BundleError,
    load_bundle,
    read_manifest,
)
from bstrec.serving.config import FunnelConfig, PipelineConfig
from bstrec.serving.guard import StoreGuard
from bstrec.serving.match import Matched
from bstrec.serving.pipeline import STAGES, Pipeline
from bstrec.training.distill import PRERANK as PRERANK_NAME
from bstrec.training.task import train_ranker
from bstrec.training.tensors import Batch
from tests.serving.fixtures import Artifacts, copy_bundle

NOW = 1_800_000_000
LIGHT_N, RANK_N = 30, 10


@pytest.fixture(scope="module")
def funnel_bundle(artifacts: Artifacts, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's samples, BST and two-tower, plus a pre-ranker distilled from that BST and a
    tiny DIN, as a three-layer bundle."""
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("funnel")
    # distilled through the command line on the retriever's merged candidates
    res = CliRunner().invoke(cli, [
        "train", "prerank", "--samples", str(artifacts.samples), "--teacher",
        str(artifacts.ranker), "--retriever", str(artifacts.retriever), "--out",
        str(root / "prerank"), "--set", "hidden=8", "--set", "mlp=[8]", "--train", "max_epochs=1",
        "--train", "batch_size=256", "--train", "num_threads=1", "--n-samples", "400", "-k", "4"])
    assert res.exit_code == 0, res.output
    assert "valid Spearman with the teacher" in res.output
    train_ranker("din", artifacts.samples, root / "din",
                 model_overrides={"mlp": [8], "attention": [8], "item_dim": 4, "cat_dim": 4,
                                  "embed_dim": 4},
                 train_overrides={"max_epochs": 1, "batch_size": 256, "num_threads": 1},
                 progress=False)
    torch.set_num_threads(threads)
    # through the command line, so that its --prerank and --light are covered too
    res = CliRunner().invoke(cli, [
        "bundle", "build", "--samples", str(artifacts.samples), "--ranker", str(artifacts.ranker),
        "--retriever", str(artifacts.retriever), "--out", str(root / "bundle"), "--version", "F",
        "--prerank", str(root / "prerank"), "--light", str(root / "din"),
        "--set", f"rank_n={RANK_N}", "--set", "max_per_category=0",
        "--set", f"funnel={{prerank: distilled, light_n: {LIGHT_N}}}"])
    assert res.exit_code == 0, res.output
    return root / "bundle"


def test_default_keeps_the_two_tower_pre_rank_and_bst() -> None:
    assert PipelineConfig().funnel == FunnelConfig(prerank="two_tower", light_n=0)


def test_config_refuses_a_light_layer_narrower_than_rank_n() -> None:
    with pytest.raises(ValueError, match="light_n"):
        PipelineConfig(rank_n=50, funnel=FunnelConfig(light_n=20))
    with pytest.raises(ValueError, match="prerank"):
        FunnelConfig(prerank="dot")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="light_n"):
        FunnelConfig(light_n=-1)


def test_a_bundle_without_the_layers_refuses_a_funnel_that_needs_them(
        artifacts: Artifacts, tmp_path: Path) -> None:
    for name, pipeline in (("pre", {"funnel": {"prerank": "distilled"}}),
                           ("light", {"funnel": {"light_n": 100}})):
        copy = copy_bundle(artifacts.bundle, tmp_path / name, name, **pipeline)
        with pytest.raises(BundleError, match="pre-ranker" if name == "pre" else "light"):
            load_bundle(copy)


def test_bundle_stores_the_layers_self_described(funnel_bundle: Path) -> None:
    manifest = read_manifest(funnel_bundle)
    # the pre-ranker's item vectors are a graph of their own, cached per catalogue item
    assert {PRERANK, PRERANK_ITEMS, LIGHT} <= set(manifest["files"])
    assert manifest["prerank"]["model_name"] == PRERANK_NAME
    assert manifest["light"]["model_name"] == "din"
    b = load_bundle(funnel_bundle)
    assert b.prerank is not None and b.light is not None
    assert b.prerank.ranker.meta["bstrec.model"] == "PreRanker" and b.prerank.items is not None
    assert b.config.funnel == FunnelConfig(prerank="distilled", light_n=LIGHT_N)


def _match(pipe: Pipeline, user: int) -> tuple[Batch, ItemTable, Matched]:
    """The pipeline's own query row, item table and merged candidates for ``user`` at NOW."""
    reasons: list[str] = []
    snapshot = pipe._snapshot(user, reasons, True)
    table = pipe._item_table(snapshot, reasons, True)
    row = pipe.features.query_row(snapshot, table, pipe.probe_item, NOW)
    seen = np.array([i for i in pipe.item_vocab.encode_values({b.item_id for b in
                                                               snapshot.behaviours})
                     if i >= N_RESERVED], dtype=np.int64)
    return row, table, pipe.matcher.match(row, seen)


def _expected_top(pipe: Pipeline, bundle: Bundle, user: int) -> set[int]:
    """The candidates BST should see: the light ranker's best RANK_N of the pre-ranker's best
    LIGHT_N merged candidates, recomputed from the pipeline's own match."""
    row, table, matched = _match(pipe, user)
    assert bundle.prerank is not None and bundle.light is not None
    pre = bundle.prerank.logits_request(row, table.inputs(matched.ids))
    top = np.argsort(-pre, kind="stable")[:LIGHT_N]
    light = bundle.light.logits_request(row, table.inputs(matched.ids[top]))
    best = top[np.argsort(-light, kind="stable")][:RANK_N]
    return {int(i) for i in matched.ids[best]}


def test_three_layers_in_order_with_a_timing_each(funnel_bundle: Path,
                                                  store: FeatureStore) -> None:
    bundle = load_bundle(funnel_bundle)
    pipe = Pipeline(bundle, StoreGuard(store, "embedded"), clock=lambda: NOW)
    rec = pipe.recommend(3, k=RANK_N, now=NOW)
    assert set(rec.timings_ms) == set(STAGES) and {"prerank", "light", "rank"} <= set(STAGES)
    assert rec.timings_ms["light"] > 0 and rec.timings_ms["prerank"] > 0
    got = {pipe.item_vocab.index[i.item_id] for i in rec.items}
    assert got == _expected_top(pipe, bundle, 3)
    # BST orders them, and prerank_score is the distilled pre-ranker's logit of each item
    scores = [i.score for i in rec.items]
    assert scores == sorted(scores, reverse=True)
    batch = pipe.features.batch_from_store(store, 3, [i.item_id for i in rec.items], NOW)
    assert bundle.prerank is not None
    np.testing.assert_allclose([i.prerank_score for i in rec.items],
                               bundle.prerank.logits(batch), rtol=1e-4, atol=1e-5)


def test_light_n_changes_what_bst_sees(funnel_bundle: Path, store: FeatureStore,
                                       tmp_path: Path) -> None:
    """Without the light layer, BST takes the pre-ranker's best rank_n directly."""
    two = load_bundle(copy_bundle(funnel_bundle, tmp_path / "two", "two",
                                  funnel={"prerank": "distilled", "light_n": 0}))
    pipe = Pipeline(two, StoreGuard(store, "embedded"), clock=lambda: NOW)
    rec = pipe.recommend(3, k=RANK_N, now=NOW)
    assert rec.timings_ms["light"] < 0.5  # the stage runs no model
    batch = pipe.features.batch_from_store(store, 3, [i.item_id for i in rec.items], NOW)
    assert two.prerank is not None
    pre = two.prerank.logits(batch)
    np.testing.assert_allclose([i.prerank_score for i in rec.items], pre, rtol=1e-4, atol=1e-5)
    # the rank_n BST saw are the pre-ranker's best: no merged candidate outside them scores more
    row, table, matched = _match(pipe, 3)
    all_pre = two.prerank.logits_request(row, table.inputs(matched.ids))
    assert np.min(pre) >= np.sort(all_pre)[-RANK_N] - 1e-5
