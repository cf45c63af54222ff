"""Bundles: what one holds, and refusal of broken ones with a message that says why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bstrec.serving.bundle import (
    ITEMS,
    MANIFEST,
    TWO_TOWER,
    Bundle,
    BundleError,
    load_bundle,
)
from tests.serving.conftest import Artifacts


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
