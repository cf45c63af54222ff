"""The served objective (issue 25): the default is today's engagement ranking and the response
says so; other objectives need a conversion head and combine the heads with item prices; a
multi-task ranker goes from a Taobao-format log to a revenue-ranked answer."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bstrec.cli import app as cli
from bstrec.config import ConfigError, from_dict
from bstrec.data.build import build
from bstrec.data.schema import Dataset
from bstrec.evaluation.objective import ObjectiveConfig
from bstrec.features.online import ItemTable
from bstrec.features.spec import N_RESERVED
from bstrec.features.store import FeatureStore, StoreConfig, open_store
from bstrec.serving.bundle import Bundle, load_bundle
from bstrec.serving.config import PipelineConfig
from bstrec.serving.guard import StoreGuard
from bstrec.serving.pipeline import Pipeline
from bstrec.training.checkpoint import load_checkpoint
from tests.serving.fixtures import Artifacts


def test_default_is_engagement_and_the_response_says_so(pipeline: Pipeline) -> None:
    assert pipeline.bundle.config.objective == ObjectiveConfig("engagement")
    rec = pipeline.recommend("3", k=5)
    assert rec.objective == "engagement"
    # engagement on a single-head ranker is the click probability, untouched
    probs = np.array([0.3, 0.7], dtype=np.float32)
    assert pipeline._objective(probs, np.array([N_RESERVED, N_RESERVED + 1]), pipeline.table) \
        is probs


def test_objective_in_config() -> None:
    cfg = from_dict(PipelineConfig, {"objective": {"kind": "revenue"}})
    assert cfg.objective.kind == "revenue" and cfg.objective.needs_price
    with pytest.raises(ConfigError):
        from_dict(PipelineConfig, {"objective": {"kind": "profit"}})
    with pytest.raises(ConfigError, match="ranking popular"):
        from_dict(PipelineConfig, {"ranking": "popular", "objective": {"kind": "conversion"}})


def test_revenue_needs_a_conversion_head_and_reads_prices(bundle: Bundle,
                                                          store: FeatureStore) -> None:
    guard = StoreGuard(store, "embedded")
    idx = np.arange(N_RESERVED, N_RESERVED + 3)
    raw = [bundle.vocabs["item_id"].values[i - N_RESERVED] for i in idx]
    items = dict(bundle.items)
    items[raw[0]] = {**items.get(raw[0], {}), "price": 10.0}
    items[raw[1]] = {**items.get(raw[1], {}), "price": 2.0}
    assert "price" not in items.get(raw[2], {})
    revenue = dataclasses.replace(
        bundle, items=items,
        config=dataclasses.replace(bundle.config, objective=ObjectiveConfig("revenue")))
    with pytest.raises(ValueError, match="needs a conversion head"):
        Pipeline(revenue, guard)  # the fixture's ranker is click-only
    # as a multi-task graph (ranking/export.py export_heads) would declare its heads
    p = Pipeline(bundle, guard)
    p.bundle, p.heads = revenue, ("ctr", "cvr")
    probs = np.array([[0.5, 0.1], [0.2, 0.5], [0.9, 0.9]], dtype=np.float32)
    # pCTR x pCVR x price; an item without a price earns nothing
    table = ItemTable.build(p.features, items)
    assert np.allclose(p._objective(probs, idx, table), [0.5, 0.2, 0.0])


# --- a multi-task ranker end to end: data build, train, bundle, serve ------------------------

@pytest.fixture(scope="module")
def esmm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic Taobao-format log's samples (views, with prices), an ESMM trained on them
    through the command line (click and buy derived from the log) and a revenue bundle."""
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("esmm")
    build("synthetic-taobao", root / "samples", sample_overrides={"max_len": 8},
          dataset_options={"n_users": 150, "views_per_user": [10, 30], "n_items": 400,
                           "n_categories": 20})
    runner = CliRunner()
    res = runner.invoke(cli, [
        "train", "ranker", "--model", "esmm", "--samples", str(root / "samples"),
        "--out", str(root / "esmm"), *[a for kv in ("mlp=[16]", "item_dim=8", "cat_dim=4",
                                                    "pos_dim=4", "heads=2", "embed_dim=4")
                                       for a in ("--set", kv)],
        "--train", "max_epochs=1", "--train", "batch_size=256", "--train", "num_threads=1"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, [
        "bundle", "build", "--samples", str(root / "samples"), "--ranker", str(root / "esmm"),
        "--out", str(root / "bundle"), "--version", "R", "--set", "max_per_category=0",
        "--set", "objective={kind: revenue}"])
    assert res.exit_code == 0, res.output
    torch.set_num_threads(threads)
    return root


def test_a_multitask_bundle_serves_expected_revenue(esmm: Path, tmp_path: Path) -> None:
    bundle = load_bundle(esmm / "bundle")
    assert bundle.ranker.heads == ("ctr", "cvr") and bundle.config.objective.kind == "revenue"
    dataset = Dataset.load(esmm / "samples" / "dataset")
    store = open_store(StoreConfig(path=str(tmp_path / "store.sqlite")))
    store.load_dataset(dataset)
    now = int(dataset.events["timestamp"].max()) + 3600  # type: ignore[arg-type]
    user = int(dataset.events["user_id"][0])
    pipe = Pipeline(bundle, StoreGuard(store, "embedded"), clock=lambda: now)
    rec = pipe.recommend(user, k=10, now=now)
    assert rec.objective == "revenue" and len(rec.items) == 10
    # each score is the eager model's pCTR x pCVR x the item's price, best first
    model = load_checkpoint(esmm / "esmm" / "best").model.eval()
    items = [i.item_id for i in rec.items]
    p = model.probabilities(pipe.features.batch_from_store(store, user, items, now))
    price = np.array([bundle.items[i]["price"] for i in items])
    np.testing.assert_allclose([i.score for i in rec.items],
                               (p["ctr"] * p["cvr"]).numpy() * price, rtol=1e-3)
    assert [i.score for i in rec.items] == sorted((i.score for i in rec.items), reverse=True)
    # a price put through the store is served on the next request, without a new bundle
    top = rec.items[0].item_id
    store.put_items({top: {**store.items([top])[top], "price": 0.0}})
    again = pipe.recommend(user, k=10, now=now)
    assert top not in {i.item_id for i in again.items}
    assert pipe.table.prices[pipe.table.indices([top])].tolist() == [0.0]
    store.close()


def test_bundle_build_refuses_an_objective_its_data_cannot_serve(artifacts: Artifacts,
                                                                 tmp_path: Path) -> None:
    runner = CliRunner()
    # a click-only ranker has no conversion head
    res = runner.invoke(cli, ["bundle", "build", "--samples", str(artifacts.samples),
                              "--ranker", str(artifacts.ranker), "--out", str(tmp_path / "a"),
                              "--set", "objective={kind: conversion}"])
    assert res.exit_code != 0 and "needs a conversion head" in res.output
    # a log without prices (synthetic-order) cannot rank by revenue
    res = runner.invoke(cli, ["bundle", "build", "--samples", str(artifacts.samples),
                              "--ranker", str(artifacts.ranker), "--out", str(tmp_path / "b"),
                              "--set", "objective={kind: blend, cvr_weight: 0}"])
    assert res.exit_code != 0 and "needs item prices" in res.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
