"""Vector indexes behind one interface: ``search(queries, k) -> (scores, ids)`` by inner product.

Notation: N indexed vectors, Q queries, D width, k results per query.

- ``ExactIndex``: NumPy matrix product and a partial sort; exact, no dependency beyond NumPy.
- ``FaissIndex``: FAISS ``flat`` (IndexFlatIP, exact), ``hnsw`` (IndexHNSWFlat, graph) or ``ivf``
  (inverted lists over a k-means coarse quantizer), all by inner product. IVF lists hold either
  the vectors (``ivf_codes="flat"``: IndexIVFFlat) or 4-bit product-quantised codes scanned with
  SIMD lookup tables (``"pq4"``: IndexIVFPQFastScan), whose ``refine * k`` best are re-scored
  exactly against the stored vectors (IndexRefineFlat). Scanning float vectors one query at a
  time cannot keep up with exact search done as one matrix product over a batch of queries;
  scanning 16-byte codes can, and the exact re-scoring gives back the recall the codes lose.
  ``refine=0`` keeps the codes only: no stored vectors, a fraction of the memory, codes' recall
  (both measured by ``benchmarks/bench_ann.py --capacity``).
- Sharding (``shards > 1``, FAISS kinds): item at insertion position p lives in shard
  ``p % shards`` (round-robin, so the split stays balanced however items arrive), each shard an
  index of the configured kind under an ``IndexIDMap`` that keeps the global positions, searched
  together by ``faiss.IndexShards`` (one thread per shard), which merges the shards' top k.
  An IVF index trains its coarse quantizer once and copies it into every shard, so that a
  shard's lists mean the same as the unsharded index's. Exact (flat) search is identical to the
  unsharded index's (ids and scores; items of equal score may come in another order): each
  shard's top k holds every global top-k item that it stores.

Every index maps its internal positions to caller ids (int64) itself, so that ``add`` works the
same for all kinds (FAISS' HNSW has no ``add_with_ids``) and new items are searchable without a
rebuild: flat and HNSW append to their storage / graph, IVF assigns new vectors to the lists of
the centroids it already has. Missing results (fewer than k vectors, or an IVF probe that finds
too few) come back as id -1 with score -inf.

On disk an index is a folder: ``index.json`` (kind, parameters, dim, count), ``ids.npy`` and
either ``vectors.npy`` (exact), ``index.faiss`` (FAISS' own format; nothing is unpickled) or,
sharded, one ``shard_000.faiss``... per shard (FAISS cannot write an ``IndexShards``, and a file
per shard is what a process serving one shard loads).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt

from bstrec.data.io import atomic_dir
from bstrec.retrieval.topk import best_k

Kind = Literal["exact", "flat", "hnsw", "ivf"]
IvfCodes = Literal["flat", "pq4"]
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
META = "index.json"


@dataclass(frozen=True)
class IndexConfig:
    """Which index and its knobs (``bstrec.config.from_dict`` fills it; unknown keys are errors)."""

    kind: Kind = "exact"
    # HNSW: graph degree, build-time and search-time beam widths
    hnsw_m: int = 32
    ef_construction: int = 100
    ef_search: int = 128
    # IVF: number of inverted lists (clamped to the training set / 39), lists probed per query,
    # and how many vectors train the coarse k-means (the rest are only assigned)
    nlist: int = 1024
    nprobe: int = 32
    train_size: int = 100_000
    # IVF list contents (see the module docstring); pq4: sub-quantizers (must divide the
    # width; 4 bits each) and how many times k candidates are re-scored exactly (0: none,
    # and no vectors stored for it)
    ivf_codes: IvfCodes = "flat"
    pq_m: int = 32
    refine: int = 4
    seed: int = 0
    # FAISS kinds: split the items over this many sub-indexes searched together (see above)
    shards: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("exact", "flat", "hnsw", "ivf"):
            raise ValueError(f"kind must be exact|flat|hnsw|ivf, got {self.kind!r}")
        if self.ivf_codes not in ("flat", "pq4"):
            raise ValueError(f"ivf_codes must be flat|pq4, got {self.ivf_codes!r}")
        for name in ("hnsw_m", "ef_construction", "ef_search", "nlist", "nprobe", "train_size",
                     "pq_m", "shards"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.refine < 0:
            raise ValueError(f"refine must be >= 0, got {self.refine}")
        if self.kind == "exact" and self.shards > 1:
            raise ValueError("shards > 1 needs a FAISS kind (flat|hnsw|ivf), not 'exact'")


def _as_f32(x: npt.ArrayLike, dim: int | None = None) -> F32:
    a = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or (dim is not None and a.shape[1] != dim):
        raise ValueError(f"expected vectors of shape (n, {dim or 'D'}), got {a.shape}")
    return a


class VectorIndex(ABC):
    """Inner-product search over vectors with caller ids."""

    config: IndexConfig
    dim: int
    ids: I64

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @abstractmethod
    def _add_vectors(self, vectors: F32) -> None: ...

    @abstractmethod
    def _search_positions(self, queries: F32, k: int) -> tuple[F32, I64]:
        """(Q, D), k -> scores (Q, k), positions (Q, k), -1 where missing."""

    @abstractmethod
    def _save_vectors(self, folder: Path) -> None: ...

    def add(self, ids: npt.ArrayLike, vectors: npt.ArrayLike) -> None:
        """Append ``vectors`` (n, D) under ``ids`` (n,); no rebuild of what is there."""
        v = _as_f32(vectors, self.dim)
        new = np.asarray(ids, dtype=np.int64).ravel()
        if new.shape[0] != v.shape[0]:
            raise ValueError(f"{new.shape[0]} ids for {v.shape[0]} vectors")
        if np.intersect1d(new, self.ids).size or np.unique(new).size != new.size:
            raise ValueError("ids must be unique and not already in the index")
        self._add_vectors(v)
        self.ids = np.concatenate([self.ids, new])

    def search(self, queries: npt.ArrayLike, k: int) -> tuple[F32, I64]:
        """(Q, D) queries -> scores (Q, k) descending and ids (Q, k); -1 / -inf where missing."""
        q = _as_f32(queries, self.dim)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        scores, pos = self._search_positions(q, k)
        ok = pos >= 0
        out_ids = np.where(ok, self.ids[np.where(ok, pos, 0)] if len(self) else -1, -1)
        return np.where(ok, scores, -np.inf).astype(np.float32), out_ids.astype(np.int64)

    def save(self, folder: str | Path) -> Path:
        with atomic_dir(folder) as tmp:
            np.save(tmp / "ids.npy", self.ids)
            self._save_vectors(tmp)
            meta = {"config": asdict(self.config), "dim": self.dim, "count": len(self)}
            (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        return Path(folder)


class ExactIndex(VectorIndex):
    """Exact inner product with NumPy: (Q, N) scores in blocks of queries, top k by argpartition."""

    def __init__(self, dim: int, config: IndexConfig | None = None, block: int = 1024) -> None:
        self.config = config or IndexConfig(kind="exact")
        self.dim = dim
        self.ids = np.zeros(0, dtype=np.int64)
        self.vectors: F32 = np.zeros((0, dim), dtype=np.float32)
        self.block = block

    def _add_vectors(self, vectors: F32) -> None:
        self.vectors = np.concatenate([self.vectors, vectors])

    def _search_positions(self, queries: F32, k: int) -> tuple[F32, I64]:
        n = len(self.vectors)
        kk = min(k, n)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        pos = np.full((len(queries), k), -1, dtype=np.int64)
        if kk == 0:
            return scores, pos
        for lo in range(0, len(queries), self.block):
            s, p = best_k(queries[lo:lo + self.block] @ self.vectors.T, kk)  # (q, N) -> (q, kk)
            scores[lo:lo + self.block, :kk], pos[lo:lo + self.block, :kk] = s, p
        return scores, pos

    def _save_vectors(self, folder: Path) -> None:
        np.save(folder / "vectors.npy", self.vectors)


class FaissIndex(VectorIndex):
    """FAISS flat / HNSW / IVF by inner product (see the module docstring)."""

    index: Any  # the FAISS object (its typing stubs do not know each kind's fields)

    def __init__(self, dim: int, config: IndexConfig, index: Any | None = None) -> None:
        import faiss

        if config.kind == "exact":
            raise ValueError("FaissIndex serves kinds flat|hnsw|ivf; use ExactIndex for 'exact'")
        self.config = config
        self.dim = dim
        self.ids = np.zeros(0, dtype=np.int64)
        if index is None:
            if config.kind == "ivf" and config.ivf_codes == "pq4" and dim % config.pq_m:
                raise ValueError(f"pq_m={config.pq_m} does not divide the width {dim}")
            parts = [self._make(config.nlist) for _ in range(config.shards)]
            index = parts[0] if config.shards == 1 else _shard_set(
                dim, [faiss.IndexIDMap(p) for p in parts])
        elif config.shards > 1 and not (isinstance(index, faiss.IndexShards)
                                        and cast(Any, index).count() == config.shards):
            raise ValueError(f"the config says {config.shards} shards: expected a "
                             f"faiss.IndexShards of as many, got {type(index).__name__}")
        self.index = index
        self.set_search_params(ef_search=config.ef_search, nprobe=config.nprobe)

    def _make(self, nlist: int) -> Any:
        """One empty index of the configured kind (a shard, or the whole index)."""
        import faiss

        if self.config.kind == "flat":
            return faiss.IndexFlatIP(self.dim)
        if self.config.kind == "hnsw":
            made = faiss.IndexHNSWFlat(self.dim, self.config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            made.hnsw.efConstruction = self.config.ef_construction
            return made
        return self._make_ivf(nlist)

    def _make_ivf(self, nlist: int) -> Any:
        import faiss

        codes = "Flat" if self.config.ivf_codes == "flat" else f"PQ{self.config.pq_m}x4fs" + (
            ",RFlat" if self.config.refine else "")
        made = faiss.index_factory(self.dim, f"IVF{nlist},{codes}", faiss.METRIC_INNER_PRODUCT)
        if self.config.ivf_codes == "pq4":
            # FAISS codes the vectors themselves under inner product; q.x = q.c + q.(x - c)
            # holds all the same, and the residual x - c is small, so 16 levels code it far more
            # finely and a shorter shortlist keeps the recall (benchmarks/bench_ann.py).
            faiss.extract_index_ivf(made).by_residual = True
        return made

    def parts(self) -> list[Any]:
        """The indexes of the configured kind: the index itself, or one per shard (unwrapped
        from ``IndexShards`` and ``IndexIDMap``)."""
        import faiss

        if self.config.shards == 1:
            return [self.index]
        members: list[Any] = [faiss.downcast_index(self.index.at(i))
                              for i in range(self.index.count())]
        return [faiss.downcast_index(m.index) for m in members]

    def set_search_params(self, *, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """Change the speed/recall trade-off of an HNSW (``ef_search``) or IVF (``nprobe``) index."""
        import faiss

        for part in self.parts():
            if self.config.kind == "hnsw" and ef_search is not None:
                part.hnsw.efSearch = ef_search
            if self.config.kind == "ivf" and nprobe is not None:
                faiss.extract_index_ivf(part).nprobe = nprobe
            if self.config.kind == "ivf" and self.config.ivf_codes == "pq4" and self.config.refine:
                part.k_factor = float(self.config.refine)

    def _train(self, vectors: F32) -> None:
        """IVF: fit the coarse quantizer on a seeded subsample; other kinds need no training."""
        import faiss

        if self.index.is_trained:
            return
        rng = np.random.default_rng(self.config.seed)
        n = len(vectors)
        sample = vectors[rng.choice(n, min(n, self.config.train_size), replace=False)]
        # k-means wants at least ~39 points per centroid; fewer lists than asked on small data
        nlist = max(1, min(self.config.nlist, len(sample) // 39))
        # a fresh index when sharded: a shard's part is a view that dies with the old shards
        trained = self.index
        if self.config.shards > 1 or nlist != faiss.extract_index_ivf(trained).nlist:
            trained = self._make_ivf(nlist)
        faiss.extract_index_ivf(trained).cp.seed = self.config.seed
        trained.train(sample)
        if self.config.shards == 1:
            self.index = trained
        else:  # one k-means for all shards: copies of the trained, still empty, index
            copies = [faiss.deserialize_index(faiss.serialize_index(trained))
                      for _ in range(self.config.shards - 1)]
            self.index = _shard_set(self.dim, [faiss.IndexIDMap(p) for p in [trained, *copies]])
        self.set_search_params(nprobe=self.config.nprobe)

    def _add_vectors(self, vectors: F32) -> None:
        import faiss

        self._train(vectors)
        if self.config.shards == 1:
            self.index.add(vectors)
            return
        pos = np.arange(len(self), len(self) + len(vectors), dtype=np.int64)
        for i in range(self.config.shards):
            mine = pos % self.config.shards == i
            if mine.any():
                shard = faiss.downcast_index(self.index.at(i))
                shard.add_with_ids(np.ascontiguousarray(vectors[mine]), pos[mine])
        self.index.syncWithSubIndexes()  # IndexShards' ntotal, stale after adds to its members

    def _search_positions(self, queries: F32, k: int) -> tuple[F32, I64]:
        if self.index.ntotal == 0:
            return (np.full((len(queries), k), -np.inf, dtype=np.float32),
                    np.full((len(queries), k), -1, dtype=np.int64))
        scores, pos = self.index.search(queries, k)
        return scores.astype(np.float32), pos.astype(np.int64)

    def _save_vectors(self, folder: Path) -> None:
        import faiss

        if self.config.shards == 1:
            faiss.write_index(self.index, str(folder / "index.faiss"))
            return
        for i in range(self.index.count()):
            faiss.write_index(self.index.at(i), str(folder / _shard_file(i)))


def _shard_file(i: int) -> str:
    return f"shard_{i:03d}.faiss"


def _shard_set(dim: int, members: list[Any]) -> Any:
    """``faiss.IndexShards`` over ``members`` (each an ``IndexIDMap`` whose ids are global
    positions, so no id offsets); threaded: the shards are searched in parallel."""
    import faiss

    shards = faiss.IndexShards(dim, True)  # threaded
    shards.successive_ids = False  # the members' ids are global already
    for member in members:
        shards.add_shard(member)
    return shards


def build_index(ids: npt.ArrayLike, vectors: npt.ArrayLike,
                config: IndexConfig | None = None) -> VectorIndex:
    """An index of ``config.kind`` holding ``vectors`` (N, D) under ``ids`` (N,)."""
    cfg = config or IndexConfig()
    v = _as_f32(vectors)
    index: VectorIndex = ExactIndex(v.shape[1], cfg) if cfg.kind == "exact" \
        else FaissIndex(v.shape[1], cfg)
    index.add(ids, v)
    return index


def load_index(folder: str | Path) -> VectorIndex:
    """The index saved in ``folder`` by ``VectorIndex.save``."""
    root = Path(folder)
    if not (root / META).exists():
        raise FileNotFoundError(f"{root / META} not found: is {root} a saved index?")
    meta = json.loads((root / META).read_text())
    cfg = IndexConfig(**meta["config"])
    dim = int(meta["dim"])
    index: VectorIndex
    if cfg.kind == "exact":
        exact = ExactIndex(dim, cfg)
        exact.vectors = np.load(root / "vectors.npy", allow_pickle=False).astype(np.float32)
        index = exact
    else:
        import faiss

        if cfg.shards == 1:
            made = faiss.read_index(str(root / "index.faiss"))
        else:
            files = [root / _shard_file(i) for i in range(cfg.shards)]
            if missing := [f.name for f in files if not f.exists()]:
                raise FileNotFoundError(f"{root}: shard files {missing} missing")
            made = _shard_set(dim, [faiss.read_index(str(f)) for f in files])
        index = FaissIndex(dim, cfg, made)
    index.ids = np.load(root / "ids.npy", allow_pickle=False).astype(np.int64)
    if len(index) != int(meta["count"]):
        raise ValueError(f"{root}: {len(index)} ids but index.json says {meta['count']}")
    return index
