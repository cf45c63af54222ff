"""A serving bundle: every artifact a request needs, in one directory, versioned and verified.

Layout (written in one atomic rename; nothing in it is ever unpickled)::

    manifest.json        format version, bundle version, sources, id types, pipeline config,
                         sha256 of every other file
    ranker.onnx          the BST ranker (ranking/export.py), spec in its metadata; a
                         multi-task ranker's (ESMM) gives one logit column per head
    ranker_request.onnx  the same ranker, request-shaped (one user, N candidates); bundles
                         built before it existed, and multi-task ones, lack it and are served
                         through ranker.onnx
    ranker_items.onnx    with a request graph that reads precomputed item parts (BST with the
                         target output and one block): the graph computing them, run once per
                         catalogue item (serving/pipeline.py)
    prerank.onnx         optional: the distilled pre-ranker (ranking/prerank.py), batch graph,
    prerank_request.onnx request graph over the item vectors of prerank_items.onnx (cached per
    prerank_items.onnx   catalogue item); what ``funnel.prerank="distilled"`` scores with
    light.onnx           optional: the light ranker of a three-layer funnel (e.g. DIN), batch
    light_request.onnx   graph and request-shaped; what ``funnel.light_n`` > 0 scores with
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
    item2vec/            optional: item2vec session vectors and their index (the same index
                         kind), the candidate source ``item2vec`` (retrieval/item2vec.py)
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
from bstrec.retrieval.item2vec import Item2Vec
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
# the funnel's optional layers (serving/config.py FunnelConfig): batch and request graphs
PRERANK = "prerank.onnx"
PRERANK_REQUEST = "prerank_request.onnx"
PRERANK_ITEMS = "prerank_items.onnx"
LIGHT = "light.onnx"
LIGHT_REQUEST = "light_request.onnx"
LIGHT_ITEMS = "light_items.onnx"
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
ITEM2VEC = "item2vec"

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
    prerank: RankerRuntime | None = None  # the distilled pre-ranker, where the bundle has one
    light: RankerRuntime | None = None  # the funnel's light ranker, where the bundle has one
    item2vec: Item2Vec | None = None  # the item2vec source, where the bundle has one

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
    prerank_checkpoint: str | Path | None = None,
    light_checkpoint: str | Path | None = None,
    item2vec_dir: str | Path | None = None,
) -> Path:
    """Write a bundle at ``out`` (atomically; an existing one is replaced) and return its path.

    ``samples_dir``: output of ``bstrec data build`` (vocabularies, spec, train split, dataset
    tables); ``ranker_checkpoint``: a ranker checkpoint or training run (its ``best/``);
    ``retriever_dir``: optional output of ``train_two_tower(out_dir=...)``. Popularity and
    item-CF are fitted here on the train split (seconds, even on ML-1M).
    ``prerank_checkpoint`` (a distilled pre-ranker, training/distill.py) and
    ``light_checkpoint`` (a ranker checkpoint or run) add the funnel's optional layers.
    ``item2vec_dir``: optional item2vec folder (``bstrec train retriever --item2vec`` writes
    RETRIEVER/item2vec), re-indexed with ``index_config``; merged where the pipeline's quotas
    name ``item2vec``.
    """
    from bstrec.ranking.export import (
        export_heads,
        export_ranker,
        export_request_parts,
        export_request_ranker,
        splits_items,
    )
    from bstrec.ranking.multitask import is_multitask
    from bstrec.retrieval.artifacts import fit_counting_sources
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
    popular, item_cf = fit_counting_sources(samples, catalog, popular_config, item_cf_config)
    two_tower: TwoTower | None = None
    if retriever_dir is not None:
        two_tower, tt_catalog = load_retriever(retriever_dir)
        if tt_catalog.size != catalog.size:
            raise BundleError(f"the retriever {retriever_dir} has a catalog of {tt_catalog.size} "
                              f"items, the samples {catalog.size}")
    item2vec: Item2Vec | None = None
    if item2vec_dir is not None:
        item2vec = Item2Vec.load(item2vec_dir)
        if item2vec.size != catalog.size:
            raise BundleError(f"the item2vec {item2vec_dir} covers {item2vec.size} item ids, "
                              f"the samples {catalog.size}")
        item2vec.index = item2vec.build_index(index_config)  # the bundle's ANN kind
    config = pipeline_config or PipelineConfig()
    layers = _funnel_models(samples, prerank_checkpoint, light_checkpoint)
    _check_funnel(config, has_prerank="prerank" in layers, has_light="light" in layers,
                  where=str(out))
    objective = config.objective
    if config.ranking == "model" and objective.needs_cvr \
            and not is_multitask(ranker.model):
        raise BundleError(f"objective {objective.kind!r} needs a conversion head: "
                          f"{ckpt_path} is a click-only {ranker.model_name} (train --model esmm)")
    if objective.needs_price and "price" not in dataset.items.columns:
        raise BundleError(f"objective {objective.kind!r} needs item prices: the items of "
                          f"{samples_dir} have no price column")
    valid_path = Path(samples_dir) / "samples" / "valid.parquet"
    # predictions on rows the ranker did not fit: a served request is one it never saw
    reference = build_reference(
        samples, ranker.model, config, has_retriever=two_tower is not None,
        valid=pl.read_parquet(valid_path) if valid_path.exists() else None)
    created = datetime.now(UTC)
    target = Path(out)
    with atomic_dir(target) as tmp:
        with _quiet("onnxscript", "onnx_ir"):  # the exporter's optimizer logs at INFO
            for model, (batch_file, request_file, items_file) in (
                    (ranker.model, (RANKER, RANKER_REQUEST, RANKER_ITEMS)),
                    *((ck.model, _LAYER_FILES[name]) for name, (_, ck) in layers.items())):
                if is_multitask(model):
                    # a multi-task ranker (ESMM): its heads' logits, served through the batch
                    # graph (no request-shaped one: the objective combines the heads)
                    export_heads(model, spec, tmp / batch_file)
                    continue
                export_ranker(model, spec, tmp / batch_file)
                if splits_items(model):
                    export_request_parts(model, spec, tmp / request_file, tmp / items_file)
                else:
                    export_request_ranker(model, spec, tmp / request_file)
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
        if item2vec is not None:
            item2vec.save(tmp / ITEM2VEC)
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
            "item2vec": None if item2vec is None else {
                "path": str(Path(item2vec_dir or "").resolve()),
                "config": dataclasses.asdict(item2vec.config)},
            "id_types": {"user_id": _id_type(dataset.users.schema["user_id"]),
                         "item_id": _id_type(dataset.items.schema["item_id"])},
            "pipeline": json.loads(json.dumps(dataclasses.asdict(config))),
            **{name: {"model_name": ck.model_name, "checkpoint": str(path.resolve()),
                      "metrics": ck.metrics} for name, (path, ck) in layers.items()},
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
    _load_funnel(bundle, root, ort_threads)
    if f"{ITEM2VEC}/item2vec.json" in manifest["files"]:  # bundles built before it: none
        try:
            bundle.item2vec = Item2Vec.load(root / ITEM2VEC)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BundleError(f"{root}: cannot read item2vec: {exc}") from None
        if bundle.item2vec.size != n_items:
            raise BundleError(f"{root}: item2vec covers {bundle.item2vec.size} item ids, the "
                              f"spec {n_items}")
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


# --- the funnel's optional layers -----------------------------------------------------------

# batch, request and (where the model splits its item parts off) item-parts graphs
_LAYER_FILES = {"prerank": (PRERANK, PRERANK_REQUEST, PRERANK_ITEMS),
                "light": (LIGHT, LIGHT_REQUEST, LIGHT_ITEMS)}


def _funnel_models(samples: SampleSet, prerank: str | Path | None, light: str | Path | None
                   ) -> dict[str, tuple[Path, Any]]:
    """name -> (checkpoint path, loaded checkpoint) of the layers given, checked against the
    samples the bundle is built from."""
    from bstrec.training.checkpoint import load_checkpoint
    from bstrec.training.distill import build_prerank

    out: dict[str, tuple[Path, Any]] = {}
    for name, given in (("prerank", prerank), ("light", light)):
        if given is None:
            continue
        path = Path(given)
        if (path / "best").is_dir():
            path = path / "best"
        ck = load_checkpoint(path, builder=build_prerank if name == "prerank" else None)
        if ck.spec != samples.spec or not _same_vocabs(ck.vocabs, samples.vocabs):
            raise BundleError(f"the {name} model {path} was trained on other samples than the "
                              "bundle's (feature spec or vocabularies differ)")
        out[name] = (path, ck)
    return out


def _check_funnel(config: PipelineConfig, *, has_prerank: bool, has_light: bool,
                  where: str) -> None:
    if config.funnel.prerank == "distilled" and not has_prerank:
        raise BundleError(f"{where}: funnel.prerank is distilled but the bundle has no "
                          f"pre-ranker ({PRERANK})")
    if config.funnel.light_n and not has_light:
        raise BundleError(f"{where}: funnel.light_n is {config.funnel.light_n} but the bundle "
                          f"has no light ranker ({LIGHT})")


def _load_funnel(bundle: Bundle, root: Path, ort_threads: int) -> None:
    files = bundle.manifest["files"]
    for name, (batch_file, request_file, items_file) in _LAYER_FILES.items():
        if batch_file not in files:
            continue
        try:
            runtime = RankerRuntime(
                root / batch_file, threads=ort_threads,
                request_path=root / request_file if request_file in files else None,
                items_path=root / items_file if items_file in files else None)
            runtime.check()
            if runtime.spec != bundle.spec:
                raise ValueError(f"it was exported for another feature spec than {SPEC}")
        except Exception as exc:  # ONNX Runtime raises its own types on a bad graph
            raise BundleError(f"{root / batch_file} does not load or run: {exc}") from None
        setattr(bundle, name, runtime)
    _check_funnel(bundle.config, has_prerank=bundle.prerank is not None,
                  has_light=bundle.light is not None, where=str(root))
