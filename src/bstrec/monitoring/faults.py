"""Faults to inject, to check that monitoring sees what breaks in production (the
fault-injection tests, benchmarks/bench_feedback.py, and an operator's game day): bundle copies
broken the way deployed bundles break, their files re-hashed so that they load and serve.

The issue's two other faults need no bundle: a feature frozen upstream is the replay's
``freeze_item`` (every event with one item), and a store down is a stopped store server.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from bstrec.data.io import sha256_file
from bstrec.monitoring.reference import REFERENCE, Reference
from bstrec.retrieval.item_cf import ItemCF
from bstrec.serving.bundle import ITEM_CF, MANIFEST, copy_bundle, read_manifest


def _version(bundle: Path) -> str:
    return str(read_manifest(bundle, verify=False)["version"])


def _seal(dst: Path) -> Path:
    """The manifest with every file's hash recomputed: the bundle loads with verification on."""
    manifest = read_manifest(dst, verify=False)
    manifest["files"] = {name: sha256_file(dst / name) for name in manifest["files"]}
    (dst / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return dst


def stale_bundle(src: str | Path, dst: str | Path, data_end: float,
                 version: str | None = None) -> Path:
    """A copy of bundle ``src`` whose data ends at ``data_end`` (unix seconds), as a bundle
    built then and never retrained would: ``bundle_age`` measures requests against it."""
    src, dst = Path(src), Path(dst)
    copy_bundle(src, dst, version=version or f"{_version(src)}-stale")
    reference = Reference.load(dst / REFERENCE)
    dataclasses.replace(reference, data_end=float(data_end)).save(dst)
    return _seal(dst)


def empty_source_bundle(src: str | Path, dst: str | Path, source: str = "item_cf",
                        version: str | None = None) -> Path:
    """A copy of bundle ``src`` whose ``source`` proposes no candidate, as after a failed
    nightly job that wrote an empty table: for item-CF, neighbour lists without neighbours."""
    if source != "item_cf":
        raise ValueError(f"only the item_cf source can be emptied, got {source!r}")
    src, dst = Path(src), Path(dst)
    copy_bundle(src, dst, version=version or f"{_version(src)}-no-{source}")
    item_cf = ItemCF.load(dst / ITEM_CF)
    ItemCF(item_cf.config, np.zeros_like(item_cf.ids), np.zeros_like(item_cf.sims)).save(
        dst / ITEM_CF)
    return _seal(dst)
