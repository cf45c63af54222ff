"""A serving bundle: every artifact a request needs, in one directory, versioned and verified.

Layout (written in one atomic rename; nothing in it is ever unpickled)::

    manifest.json        format version, bundle version, sources, id types, pipeline config,
                         sha256 of every other file
    ranker.onnx          the BST ranker (ranking/export.py), spec in its metadata
    ranker_request.onnx  the same ranker, request-shaped (one user, N candidates); bundles
                         built before it existed lack it and are served through ranker.onnx
    ranker_items.onnx    with a request graph that reads precomputed item parts (BST with the
                         target output and one block): the graph computing them, run once per
                         catalogue item (serving/pipeline.py)
    feature_spec.json    the feature specification shared by every model of the bundle
    vocab.json           the vocabularies that encode requests (features/online.py)
    catalog.parquet      encoded item features by item index (retrieval/catalog.py)
    items.parquet        the raw item table: seeds the feature store, and answers when it is down
    popular/             time-decayed popularity (the fallback and cold-start source)
    item_cf/             item-to-item neighbours (a source, and "similar items")
    two_tower/           optional: the two-tower checkpoint (user tower for the index query)
    user_tower.onnx      with two_tower/: its user tower exported (retrieval/export.py), what
                         computes a request's user vector; bundles built before it existed
                         lack it and compute the vector in eager torch
    item_vectors.npy     optional: (N, D) item vectors by item index (pre-rank dot products)
    index/               optional: the vector index of the catalog's item vectors
    reference.json       the training reference that monitoring compares served traffic with
                         (monitoring/reference.py); bundles built before it lack it

A bundle is refused (:class:`BundleError`) when a file is missing or does not match its hash,
when its models disagree on the feature spec, when the ranker does not run on a valid batch, or
when the exported user tower does not give the two-tower's vectors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import polars as pl

import bstrec
from bstrec.config import ConfigError, from_dict
from bstrec.data.io import atomic_dir, read_described_dir, sha256_file
from bstrec.data.samples import SampleSet
from bstrec.data.schema import Dataset
from bstrec.features.spec import FeatureSpec
from bstrec.features.store import Features, ItemId
from bstrec.features.vocab import Vocabularies
from bstrec.monitoring.reference import REFERENCE, Reference, build_reference, expected_sources
from bstrec.retrieval.catalog import Catalog
from bstrec.retrieval.index import IndexConfig, VectorIndex, build_index, load_index
from bstrec.retrieval.item_cf import ItemCF, ItemCFConfig
from bstrec.retrieval.popular import PopularConfig, Popularity
from bstrec.retrieval.two_tower import TwoTower
from bstrec.serving.config import PipelineConfig
from bstrec.serving.runtime import RankerRuntime, UserTowerRuntime

# 2: the ranker and user-tower graphs read hist_dt (seconds) and bucket it with their model's
# time_buckets; version 1 graphs read hist_pos, buckets no request computes any more
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
RANKER = "ranker.onnx"
RANKER_REQUEST = "ranker_request.onnx"
RANKER_ITEMS = "ranker_items.onnx"
SPEC = "feature_spec.json"
VOCAB = "vocab.json"
CATALOG = "catalog.parquet"
ITEMS = "items.parquet"
POPULAR = "popular"
ITEM_CF = "item_cf"
TWO_TOWER = "two_tower"
USER_TOWER = "user_tower.onnx"
ITEM_VECTORS = "item_vectors.npy"
INDEX = "index"

IdType = Literal["int", "str"]
F32 = npt.NDArray[np.float32]


class BundleError(ValueError):
    """A bundle directory is missing, incomplete, corrupted or inconsistent."""


@dataclass
class Bundle:
    """A loaded bundle: the artifacts in memory, ready to serve."""

    path: Path
    manifest: dict[str, Any]
    spec: FeatureSpec
    vocabs: Vocabularies
    ranker: RankerRuntime
    catalog: Catalog
    items: dict[ItemId, Features]  # raw item features by raw item id
    popular: Popularity
    item_cf: ItemCF
    config: PipelineConfig
    two_tower: TwoTower | None = None
    item_vectors: F32 | None = None
    index: VectorIndex | None = None
    user_tower: UserTowerRuntime | None = None  # None: user vectors by the eager two_tower
    reference: Reference | None = None  # None: a bundle built before references

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def user_id_type(self) -> IdType:
        t: IdType = self.manifest["id_types"]["user_id"]
        return t

    @property
    def item_id_type(self) -> IdType:
        t: IdType = self.manifest["id_types"]["item_id"]
        return t


# --- building -------------------------------------------------------------------------------

def _default_segment(spec: FeatureSpec) -> tuple[str, ...]:
    """Popularity segments: the default (gender x age) where the data has those features, else
    up to two small user features (a segment is the product of their vocabularies)."""
    have = {f.name: f for f in spec.features if f.group == "user" and f.name != "user"}
    default = tuple(n for n in PopularConfig().segment if n in have)
    if default:
        return default
    return tuple(n for n, f in have.items() if f.vocab_size <= 64)[:2]


def _id_type(dtype: pl.DataType) -> IdType:
    return "str" if dtype == pl.String else "int"


def _same_vocabs(a: Vocabularies, b: Vocabularies) -> bool:
    return a.keys() == b.keys() and all(a[k].values == b[k].values for k in a)


def build_bundle(
    samples_dir: str | Path,
    ranker_checkpoint: str | Path,
    out: str | Path,
    *,
    retriever_dir: str | Path | None = None,
    index_config: IndexConfig | None = None,
    item_cf_config: ItemCFConfig | None = None,
    popular_config: PopularConfig | None = None,
    pipeline_config: PipelineConfig | None = None,
    version: str | None = None,
) -> Path:
    """Write a bundle at ``out`` (atomically; an existing one is replaced) and return its path.

    ``samples_dir``: output of ``bstrec data build`` (vocabularies, spec, train split, dataset
    tables); ``ranker_checkpoint``: a ranker checkpoint or training run (its ``best/``);
    ``retriever_dir``: optional output of ``train_two_tower(out_dir=...)``. Popularity and
    item-CF are fitted here on the train split (seconds, even on ML-1M).
    """
    from bstrec.ranking.bst import BST
    from bstrec.ranking.export import export_ranker, export_request_parts, export_request_ranker
    from bstrec.retrieval.export import export_user_tower
    from bstrec.retrieval.train import item_vectors, load_retriever
    from bstrec.training.checkpoint import load_checkpoint

    samples = SampleSet.load(samples_dir, splits=("train",))
    if samples.dataset is None:
        raise BundleError(f"{samples_dir} has no dataset/ tables: rebuild it with `bstrec data build`")
    dataset: Dataset = samples.dataset
    ckpt_path = Path(ranker_checkpoint)
    if (ckpt_path / "best").is_dir():
        ckpt_path = ckpt_path / "best"
    ranker = load_checkpoint(ckpt_path)
    if ranker.spec != samples.spec or not _same_vocabs(ranker.vocabs, samples.vocabs):
        raise BundleError(f"the ranker {ckpt_path} was trained on other samples than {samples_dir} "
                          "(feature spec or vocabularies differ)")
    spec = samples.spec
    catalog = Catalog.from_samples(samples)
    train = samples.splits["train"]
    pop_cfg = popular_config or PopularConfig(segment=_default_segment(spec))
    sizes = {f.name: f.vocab_size for f in spec.features if f.group == "user"}
    popular = Popularity.fit(train, catalog.features["category"].numpy(),
                             spec.vocab_size("category"), sizes, pop_cfg)
    item_cf = ItemCF.fit(train, catalog.size, item_cf_config)
    two_tower: TwoTower | None = None
    if retriever_dir is not None:
        two_tower, tt_catalog = load_retriever(retriever_dir)
        if tt_catalog.size != catalog.size:
            raise BundleError(f"the retriever {retriever_dir} has a catalog of {tt_catalog.size} "
                              f"items, the samples {catalog.size}")
    config = pipeline_config or PipelineConfig()
    valid_path = Path(samples_dir) / "samples" / "valid.parquet"
    # predictions on rows the ranker did not fit: a served request is one it never saw
    reference = build_reference(
        samples, ranker.model, config, has_retriever=two_tower is not None,
        valid=pl.read_parquet(valid_path) if valid_path.exists() else None)
    created = datetime.now(UTC)
    target = Path(out)
    with atomic_dir(target) as tmp:
        with _quiet("onnxscript", "onnx_ir"):  # the exporter's optimizer logs at INFO
            export_ranker(ranker.model, spec, tmp / RANKER)
            if isinstance(ranker.model, BST) and ranker.model.request_shaped:
                export_request_parts(ranker.model, spec, tmp / RANKER_REQUEST, tmp / RANKER_ITEMS)
            else:
                export_request_ranker(ranker.model, spec, tmp / RANKER_REQUEST)
            if two_tower is not None:
                export_user_tower(two_tower, spec, tmp / USER_TOWER)
        spec.save(tmp / SPEC)
        samples.vocabs.save(tmp / VOCAB)
        catalog.save(tmp / CATALOG)
        dataset.items.write_parquet(tmp / ITEMS)
        popular.save(tmp / POPULAR)
        item_cf.save(tmp / ITEM_CF)
        reference.save(tmp)
        if two_tower is not None and retriever_dir is not None:
            shutil.copytree(Path(retriever_dir) / "best", tmp / TWO_TOWER)
            vectors = item_vectors(two_tower, catalog).numpy().astype(np.float32)
            np.save(tmp / ITEM_VECTORS, vectors)
            ids = catalog.candidates
            build_index(ids, vectors[ids], index_config).save(tmp / INDEX)
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*"))
                 if p.is_file()}
        digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:10]
        manifest = {
            "format_version": FORMAT_VERSION,
            "version": version or f"{ranker.model_name}-{created:%Y%m%dT%H%M%SZ}-{digest}",
            "created": created.isoformat(timespec="seconds"),
            "bstrec_version": bstrec.__version__,
            "dataset": dataset.name,
            "samples": {"path": str(Path(samples_dir).resolve()),
                        "config_hash": samples.manifest.get("config_hash"),
                        "protocol": samples.manifest.get("protocol")},
            "ranker": {"model_name": ranker.model_name, "checkpoint": str(ckpt_path.resolve()),
                       "metrics": ranker.metrics},
            "retriever": None if retriever_dir is None else {
                "path": str(Path(retriever_dir).resolve()),
                "index": dataclasses.asdict(index_config or IndexConfig())},
            "id_types": {"user_id": _id_type(dataset.users.schema["user_id"]),
                         "item_id": _id_type(dataset.items.schema["item_id"])},
            "pipeline": json.loads(json.dumps(dataclasses.asdict(config))),
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return target


def copy_bundle(src: str | Path, dst: str | Path, *, version: str,
                pipeline: dict[str, Any] | None = None) -> Path:
    """A copy of bundle ``src`` at ``dst`` served as ``version``, its pipeline settings updated
    with ``pipeline`` (top-level keys of PipelineConfig): an A/B variant, a popularity-only or
    stochastic-policy bundle, without rebuilding the models. The manifest's pipeline is read at
    load and not among the hashed files; settings the config refuses are refused here."""
    src, dst = Path(src), Path(dst)
    manifest = read_manifest(src)
    merged = {**manifest["pipeline"], **(pipeline or {})}
    try:
        from_dict(PipelineConfig, merged, where="pipeline")
    except (ValueError, TypeError, ConfigError) as exc:
        raise BundleError(f"pipeline settings {pipeline}: {exc}") from None
    if dst.exists():
        raise BundleError(f"{dst} exists: copy a bundle into a new folder")
    shutil.copytree(src, dst)
    manifest.update(version=version, pipeline=merged)
    (dst / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return dst


# --- loading --------------------------------------------------------------------------------

def read_manifest(path: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """The manifest of the bundle at ``path``, after checking its format and file hashes."""
    root = Path(path)
    manifest = read_described_dir(root, MANIFEST, what="bundle", format_version=FORMAT_VERSION,
                                  required=("version", "files", "id_types", "pipeline"),
                                  hashes_key="files", verify=verify, error=BundleError)
    for name in (RANKER, SPEC, VOCAB, CATALOG, ITEMS):
        if name not in manifest["files"]:
            raise BundleError(f"{root} is incomplete: {MANIFEST} lists no {name}")
    return manifest


def load_bundle(path: str | Path, *, verify: bool = True, ort_threads: int = 1) -> Bundle:
    """Load and check the bundle at ``path``; raises BundleError saying what is wrong."""
    root = Path(path)
    manifest = read_manifest(root, verify=verify)
    try:
        config = from_dict(PipelineConfig, manifest["pipeline"], where=f"{root}/{MANIFEST}:pipeline")
        spec = FeatureSpec.load(root / SPEC)
        vocabs = Vocabularies.load(root / VOCAB)
        catalog = Catalog.load(root / CATALOG, spec)
        items_frame = pl.read_parquet(root / ITEMS)
        popular = Popularity.load(root / POPULAR)
        item_cf = ItemCF.load(root / ITEM_CF)
        reference = _reference(root, manifest, config)
    except (OSError, ValueError, KeyError, TypeError, AssertionError, ConfigError,
            pl.exceptions.PolarsError) as exc:
        raise BundleError(f"{root}: cannot read an artifact: {exc}") from None
    # bundles built before the request-shaped graph: served through ranker.onnx (runtime.py)
    request, items = (root / n if n in manifest["files"] else None
                      for n in (RANKER_REQUEST, RANKER_ITEMS))
    try:
        ranker = RankerRuntime(root / RANKER, threads=ort_threads, request_path=request,
                               items_path=items)
        ranker.check()
    except Exception as exc:  # ONNX Runtime raises its own types on a bad graph
        both = f" (with {RANKER_REQUEST})" if request is not None else ""
        raise BundleError(f"{root / RANKER} does not load or run{both}: {exc}") from None
    if ranker.spec != spec:
        raise BundleError(f"{root}: the ranker was exported for another feature spec than {SPEC}")
    n_items = spec.vocab_size("item_id")
    for what, size in (("catalog", catalog.size), ("popularity", popular.size),
                       ("item-CF", item_cf.size)):
        if size != n_items:
            raise BundleError(f"{root}: the {what} covers {size} item ids, the spec {n_items}")
    bundle = Bundle(path=root, manifest=manifest, spec=spec, vocabs=vocabs, ranker=ranker,
                    catalog=catalog, items=_item_table(items_frame), popular=popular,
                    item_cf=item_cf, config=config, reference=reference)
    if (root / TWO_TOWER).is_dir():
        _load_retriever(bundle, root, ort_threads)
    return bundle


def _reference(root: Path, manifest: dict[str, Any], config: PipelineConfig) -> Reference | None:
    if REFERENCE not in manifest["files"]:
        return None
    reference = Reference.load(root / REFERENCE)
    # the manifest's pipeline may have changed since the build (a copy served with other
    # sources): the sources to expect are the ones this config merges
    return dataclasses.replace(reference, expected_sources=expected_sources(
        config, has_retriever=(root / TWO_TOWER).is_dir()))


def read_reference(path: str | Path) -> tuple[str, Reference | None]:
    """The version and training reference of the bundle at ``path``, without loading its
    models (what the offline report needs)."""
    root = Path(path)
    manifest = read_manifest(root)
    try:
        config = from_dict(PipelineConfig, manifest["pipeline"], where=f"{root}/{MANIFEST}:pipeline")
        return str(manifest["version"]), _reference(root, manifest, config)
    except (OSError, ValueError, KeyError, TypeError, ConfigError) as exc:
        raise BundleError(f"{root}: cannot read its reference: {exc}") from None


def _load_retriever(bundle: Bundle, root: Path, ort_threads: int) -> None:
    from bstrec.retrieval.train import build_two_tower
    from bstrec.training.checkpoint import CheckpointError, load_checkpoint

    try:
        ckpt = load_checkpoint(root / TWO_TOWER, builder=build_two_tower)
        vectors = np.load(root / ITEM_VECTORS, allow_pickle=False).astype(np.float32)
        index = load_index(root / INDEX)
    except (OSError, ValueError, CheckpointError) as exc:
        raise BundleError(f"{root}: cannot read the retriever: {exc}") from None
    if ckpt.spec != bundle.spec:
        raise BundleError(f"{root}: the two-tower was trained for another feature spec")
    if vectors.shape[0] != bundle.catalog.size or index.dim != vectors.shape[1]:
        raise BundleError(f"{root}: item vectors {vectors.shape} do not fit the catalog "
                          f"({bundle.catalog.size}) or the index (dim {index.dim})")
    assert isinstance(ckpt.model, TwoTower)
    bundle.two_tower, bundle.item_vectors, bundle.index = ckpt.model, vectors, index
    if USER_TOWER in bundle.manifest["files"]:  # bundles built before it: eager torch
        try:
            tower = UserTowerRuntime(root / USER_TOWER, threads=ort_threads)
            if tower.spec != bundle.spec:
                raise ValueError(f"it was exported for another feature spec than {SPEC}")
            tower.check(ckpt.model)
        except Exception as exc:  # ONNX Runtime raises its own types on a bad graph
            raise BundleError(f"{root / USER_TOWER} does not load or agree with the two-tower: "
                              f"{exc}") from None
        bundle.user_tower = tower


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    saved = [(log, log.level) for log in map(logging.getLogger, loggers)]
    for log, _ in saved:
        log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for log, level in saved:
            log.setLevel(level)


def _item_table(frame: pl.DataFrame) -> dict[ItemId, Features]:
    """Raw item rows as {item id: features} with the feature store's JSON values."""
    cols = [c for c in frame.columns if c != "item_id"]
    return {row["item_id"]: {c: row[c] for c in cols} for row in frame.iter_rows(named=True)}
