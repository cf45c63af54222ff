"""Bundles: what one holds, and refusal of broken ones with a message that says why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest

from bstrec.monitoring.reference import (
    MAX_ROWS,
    REFERENCE,
    Reference,
    expected_sources,
    request_rows,
)
from bstrec.serving.bundle import (
    ITEMS,
    MANIFEST,
    TWO_TOWER,
    Bundle,
    BundleError,
    load_bundle,
)
from bstrec.serving.config import PipelineConfig
from tests.serving.fixtures import Artifacts


def test_bundle_holds_every_stage(bundle: Bundle, artifacts: Artifacts) -> None:
    assert bundle.version == "A" and bundle.config.rank_n == 60
    assert bundle.user_id_type == bundle.item_id_type == "int"
    assert bundle.two_tower is not None and bundle.index is not None
    assert bundle.item_vectors is not None and bundle.item_vectors.shape[0] == bundle.catalog.size
    assert len(bundle.index) == bundle.catalog.size - 2  # every catalog item, no reserved row
    assert set(bundle.items) == set(artifacts.dataset().items["item_id"].to_list())
    manifest = json.loads((bundle.path / MANIFEST).read_text())
    assert manifest["ranker"]["model_name"] == "bst"
    assert all(len(h) == 64 for h in manifest["files"].values())


def test_corrupted_file_is_refused(artifacts: Artifacts, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"ranker\.onnx is corrupted"):
        load_bundle(artifacts.broken)
    # without hash checks the runtime itself refuses it
    with pytest.raises(BundleError, match=r"ranker\.onnx does not load or run"):
        load_bundle(artifacts.broken, verify=False)


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / MANIFEST).unlink(), "manifest.json is missing"),
    (lambda p: (p / MANIFEST).write_text("{"), "is corrupted"),
    (lambda p: (p / ITEMS).unlink(), "items.parquet is missing"),
    (lambda p: (p / TWO_TOWER / "model.safetensors").unlink(), "model.safetensors is missing"),
])
def test_incomplete_bundle_is_refused(artifacts: Artifacts, tmp_path: Path, damage: object,
                                      message: str) -> None:
    copy = tmp_path / "b"
    shutil.copytree(artifacts.bundle, copy)
    damage(copy)  # type: ignore[operator]
    with pytest.raises(BundleError, match=message):
        load_bundle(copy)
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")


def test_bundle_carries_its_training_reference(bundle: Bundle, artifacts: Artifacts,
                                               tmp_path: Path) -> None:
    ref = bundle.reference
    assert ref is not None
    manifest = json.loads((bundle.path / MANIFEST).read_text())
    assert REFERENCE in manifest["files"]  # hashed like every artifact
    dataset = artifacts.dataset()
    assert ref.data_end == float(dataset.events["timestamp"].max())  # type: ignore[arg-type]
    assert ref.history_cap == bundle.spec.max_len and ref.catalog_size == dataset.items.height
    assert 0 < ref.scored_rows <= MAX_ROWS and 0 < ref.feature_rows <= MAX_ROWS
    edges = ref.predictions.edges
    assert edges and 0.0 <= min(edges) <= max(edges) <= 1.0  # click probabilities
    # inputs only: the shown items' category is compared with served traffic, not training
    assert set(ref.features) == {"history_length", "freshness_s", "last_category",
                                 *(f"user.{n}" for n in dataset.user_features)}
    # fitted on the validation split (the period before serving), each user once
    splits = {k: pl.read_parquet(artifacts.samples / "samples" / f"{k}.parquet")
              for k in ("train", "valid")}
    assert ref.feature_rows == min(request_rows(splits["valid"]).height, MAX_ROWS)
    assert ref.feature_users == min(splits["valid"]["user_id"].n_unique(), MAX_ROWS)
    assert ref.scored_rows == min(splits["valid"].height, MAX_ROWS)
    # the bundle has a retriever: the regular path merges every quota'd source
    sources = dict(bundle.config.candidates.quotas)
    assert ref.expected_sources["regular"] == tuple(n for n, q in sources.items() if q > 0)
    assert ref.expected_sources["cold"] == ("popular",)
    assert Reference.load(bundle.path) == ref
    # bundles built before references load without one
    old = tmp_path / "old"
    shutil.copytree(artifacts.bundle, old)
    (old / REFERENCE).unlink()
    manifest["files"].pop(REFERENCE)
    (old / MANIFEST).write_text(json.dumps(manifest))
    assert load_bundle(old).reference is None


def test_expected_sources_without_a_retriever() -> None:
    config = PipelineConfig()
    sources = expected_sources(config, has_retriever=False)
    assert "two_tower" not in sources["regular"] and "item_cf" in sources["regular"]
    assert set(sources["few"]) == {n for n, _ in config.candidates.cold.few_shares}
