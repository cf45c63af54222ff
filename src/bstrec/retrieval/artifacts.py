"""The match stage's artifacts in one folder, trained and loaded together.

Layout of ``out`` (``bstrec train retriever``)::

    best/              two-tower checkpoint (training/checkpoint.py format, model ``two_tower``)
    catalog.parquet    encoded item features by item id (what the item tower reads)
    item_cf/           neighbour lists (item_cf.npz, item_cf.json)
    popular/           decayed popularity: global, per category, per segment
    index/             the item-vector index (``bstrec index build``; exact unless rebuilt)
    item2vec/          optional: session item vectors and their index (item2vec.py;
                       ``bstrec train retriever --item2vec``)
    retriever.json     configs, the two-tower's valid history, samples manifest hash
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from bstrec.config import from_dict
from bstrec.data.samples import SampleSet
from bstrec.features.spec import FeatureSpec
from bstrec.features.vocab import Vocabularies
from bstrec.retrieval.catalog import Catalog
from bstrec.retrieval.index import IndexConfig, VectorIndex, build_index, load_index
from bstrec.retrieval.item2vec import Item2Vec, Item2VecConfig
from bstrec.retrieval.item_cf import ItemCF, ItemCFConfig
from bstrec.retrieval.popular import PopularConfig, Popularity
from bstrec.retrieval.train import (
    RetrieverResult,
    RetrieverTrainConfig,
    item_vectors,
    load_retriever,
    train_two_tower,
)
from bstrec.retrieval.two_tower import TwoTower, TwoTowerConfig

META = "retriever.json"
ITEM2VEC = "item2vec"


@dataclass
class Retriever:
    """A loaded retriever folder: the two-tower, its catalog, item-CF, popularity, the index."""

    path: Path
    model: TwoTower
    catalog: Catalog
    item_cf: ItemCF
    popular: Popularity
    vocabs: Vocabularies
    index: VectorIndex | None
    item2vec: Item2Vec | None = None

    def raw_id(self, item: int) -> Any:
        """Encoded item id -> the dataset's id."""
        return self.vocabs["item_id"].values[item - 2]

    def encode_id(self, raw: Any) -> int:
        vocab = self.vocabs["item_id"]
        for v in (raw, _as_int(raw)):
            if v in vocab.index:
                return vocab.index[v]
        raise KeyError(f"item {raw!r} is not in the retriever's catalog")


def _as_int(x: Any) -> Any:
    try:
        return int(x)
    except (TypeError, ValueError):
        return x


def train_retriever(samples_dir: str | Path, out_dir: str | Path, *,
                    model_overrides: Mapping[str, Any] | None = None,
                    train_overrides: Mapping[str, Any] | None = None,
                    popular_overrides: Mapping[str, Any] | None = None,
                    item_cf_overrides: Mapping[str, Any] | None = None,
                    progress: bool = True, console: Console | None = None) -> RetrieverResult:
    """Train the two-tower, fit item-CF and popularity on the train split, build an exact index;
    write everything to ``out_dir`` (see the module docstring). Unknown config keys are errors."""
    model_cfg = from_dict(TwoTowerConfig, dict(model_overrides or {}), where="model")
    train_cfg = from_dict(RetrieverTrainConfig, dict(train_overrides or {}), where="train")
    pop_cfg = from_dict(PopularConfig, dict(popular_overrides or {}), where="popular")
    cf_cfg = from_dict(ItemCFConfig, dict(item_cf_overrides or {}), where="item_cf")
    samples = SampleSet.load(samples_dir)
    out = Path(out_dir)
    model, result = train_two_tower(samples, train_cfg, model_cfg, out_dir=out,
                                    progress=progress, console=console)
    catalog = Catalog.from_samples(samples)
    train = samples.splits["train"]
    sizes = {f.name: f.vocab_size for f in samples.spec.features}
    Popularity.fit(train, catalog.features["category"].numpy(),
                   samples.spec.vocab_size("category"), sizes, pop_cfg).save(out / "popular")
    ItemCF.fit(train, catalog.size, cf_cfg).save(out / "item_cf")
    build_item_index(model, catalog, IndexConfig(kind="exact")).save(out / "index")
    (out / META).write_text(json.dumps({
        "model": dataclasses.asdict(model_cfg), "train": dataclasses.asdict(train_cfg),
        "popular": dataclasses.asdict(pop_cfg), "item_cf": dataclasses.asdict(cf_cfg),
        "result": result.to_dict(), "samples": str(samples_dir),
        "samples_config_hash": samples.manifest.get("config_hash")}, indent=2) + "\n")
    return result


def default_segment(spec: FeatureSpec) -> tuple[str, ...]:
    """Popularity segments: the default (gender x age) where the data has those features, else
    up to two small user features (a segment is the product of their vocabularies)."""
    have = {f.name: f for f in spec.features if f.group == "user" and f.name != "user"}
    default = tuple(n for n in PopularConfig().segment if n in have)
    if default:
        return default
    return tuple(n for n, f in have.items() if f.vocab_size <= 64)[:2]


def fit_counting_sources(samples: SampleSet, catalog: Catalog,
                         popular_config: PopularConfig | None = None,
                         item_cf_config: ItemCFConfig | None = None) -> tuple[Popularity, ItemCF]:
    """Popularity (segments: ``default_segment`` unless the config names them) and item-CF
    fitted on the train split, as a bundle serves them."""
    spec, train = samples.spec, samples.splits["train"]
    pop_cfg = popular_config or PopularConfig(segment=default_segment(spec))
    sizes = {f.name: f.vocab_size for f in spec.features if f.group == "user"}
    popular = Popularity.fit(train, catalog.features["category"].numpy(),
                             spec.vocab_size("category"), sizes, pop_cfg)
    return popular, ItemCF.fit(train, catalog.size, item_cf_config)


def build_item_index(model: TwoTower, catalog: Catalog, config: IndexConfig) -> VectorIndex:
    """An index of every catalog item's vector under its item id."""
    vecs = item_vectors(model, catalog).numpy()
    return build_index(catalog.candidates, vecs[catalog.candidates], config)


def load_artifacts(path: str | Path) -> Retriever:
    """The retriever folder written by ``train_retriever``."""
    root = Path(path)
    if not (root / META).exists():
        raise FileNotFoundError(f"{root / META} not found: is {root} the output of "
                                "`bstrec train retriever`?")
    model, catalog = load_retriever(root)
    index = load_index(root / "index") if (root / "index").exists() else None
    i2v = Item2Vec.load(root / ITEM2VEC) if (root / ITEM2VEC).exists() else None
    return Retriever(root, model, catalog, ItemCF.load(root / "item_cf"),
                     Popularity.load(root / "popular"), Vocabularies.load(root / "best" /
                                                                         "vocab.json"), index,
                     i2v)


def train_item2vec(samples_dir: str | Path, out_dir: str | Path,
                   overrides: Mapping[str, Any] | None = None) -> Item2Vec:
    """Fit item2vec on the train split of ``samples_dir`` and save it in ``out_dir/item2vec``
    (where ``load_artifacts`` finds it). Unknown config keys are errors."""
    cfg = from_dict(Item2VecConfig, dict(overrides or {}), where="item2vec")
    samples = SampleSet.load(samples_dir, splits=("train",))
    model = Item2Vec.fit(samples.splits["train"], samples.spec.vocab_size("item_id"), cfg)
    model.save(Path(out_dir) / ITEM2VEC)
    return model
