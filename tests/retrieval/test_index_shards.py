"""Sharded FAISS indexes: exact search identical to one index, the split, save/load, bad configs.

Test vectors are continuous Gaussian draws, so no two inner products tie (checked below): the
top k is then one list, whatever order the shards are merged in.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import pytest

from bstrec.config import from_dict
from bstrec.retrieval.index import FaissIndex, IndexConfig, build_index, load_index

D = 16
N = 1003  # a prime times a prime: no shard count below divides it


@pytest.fixture(autouse=True)
def _one_faiss_thread() -> Iterator[None]:
    """Tiny indexes: an OpenMP team only spins waiting for cores that other jobs hold."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _data(n: int = N, q: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, D)).astype(np.float32)
    queries = rng.standard_normal((q, D)).astype(np.float32)
    ids = np.arange(5000, 5000 + n, dtype=np.int64)[rng.permutation(n)]  # caller ids, shuffled
    return ids, x, queries


def _recall(got: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1]
                          for a, b in zip(got, truth, strict=True)]))


def test_test_vectors_have_no_tied_scores() -> None:
    _, x, q = _data()
    s = np.sort(q @ x.T, axis=1)
    assert (np.diff(s, axis=1) > 0).all()


@pytest.mark.parametrize("shards", [2, 3, 4, 7])
def test_sharded_flat_search_is_identical_to_one_index(shards: int) -> None:
    ids, x, q = _data()
    one = build_index(ids, x, IndexConfig(kind="flat"))
    many = build_index(ids, x, IndexConfig(kind="flat", shards=shards))
    assert isinstance(many, FaissIndex) and isinstance(many.index, faiss.IndexShards)
    shard_size = -(-N // shards)
    # k below, above a shard's size and above the catalogue; one query (FAISS' direct loop)
    # and batches below and above its BLAS threshold (20 queries)
    for k in (1, 10, shard_size + 5, N + 20):
        for queries in (q[:1], q[:7], q):
            s1, i1 = one.search(queries, k)
            sn, i_n = many.search(queries, k)
            np.testing.assert_array_equal(i_n, i1)
            np.testing.assert_array_equal(sn, s1)
    _, top = many.search(q, N + 20)
    assert (top[:, N:] == -1).all() and set(top[0, :N]) == set(ids)


def test_items_go_round_robin_whatever_the_batches() -> None:
    ids, x, q = _data()
    index = build_index(ids[:10], x[:10], IndexConfig(kind="flat", shards=3))
    assert isinstance(index, FaissIndex)
    for lo in range(10, 40):  # one item at a time: a contiguous split would fill one shard
        index.add(ids[lo:lo + 1], x[lo:lo + 1])
    index.add(ids[40:], x[40:])
    sizes = [p.ntotal for p in index.parts()]
    assert sum(sizes) == N == index.index.ntotal and max(sizes) - min(sizes) <= 1
    for i in range(3):  # shard i holds exactly the positions i, i + 3, ...
        member = faiss.downcast_index(index.index.at(i))
        np.testing.assert_array_equal(faiss.vector_to_array(member.id_map), np.arange(i, N, 3))
    full = build_index(ids, x, IndexConfig(kind="flat"))
    np.testing.assert_array_equal(index.search(q, 50)[1], full.search(q, 50)[1])


SHARDED = [IndexConfig(kind="flat", shards=3),
           IndexConfig(kind="hnsw", hnsw_m=16, ef_search=200, shards=3),
           IndexConfig(kind="ivf", nlist=8, nprobe=8, shards=3),
           IndexConfig(kind="ivf", nlist=8, nprobe=8, ivf_codes="pq4", pq_m=8, refine=8,
                       shards=3)]
SHARDED_NAMES = ["flat", "hnsw", "ivf", "ivf_pq4"]


@pytest.mark.parametrize("cfg", SHARDED, ids=SHARDED_NAMES)
def test_sharded_save_load_round_trip(cfg: IndexConfig, tmp_path: Path) -> None:
    ids, x, q = _data()
    index = build_index(ids, x, cfg)
    scores, got = index.search(q, 20)
    truth = build_index(ids, x, IndexConfig(kind="flat")).search(q, 20)[1]
    assert _recall(got, truth) >= 0.95
    index.save(tmp_path / "idx")
    assert sorted(f.name for f in (tmp_path / "idx").glob("*.faiss")) == [
        "shard_000.faiss", "shard_001.faiss", "shard_002.faiss"]
    loaded = load_index(tmp_path / "idx")
    assert isinstance(loaded, FaissIndex) and loaded.config == cfg and len(loaded) == N
    assert loaded.index.count() == 3
    s2, got2 = loaded.search(q, 20)
    np.testing.assert_array_equal(got2, got)
    np.testing.assert_array_equal(s2, scores)
    # the loaded index still grows, into the shard each new position belongs to
    rng = np.random.default_rng(1)
    new = rng.standard_normal((5, D)).astype(np.float32) * 10  # far out: their own top 1
    loaded.add(np.arange(5), new)
    assert [p.ntotal for p in loaded.parts()] == [336, 336, 336]
    np.testing.assert_array_equal(loaded.search(new, 1)[1][:, 0], np.arange(5))


def test_missing_shard_file_is_an_error(tmp_path: Path) -> None:
    ids, x, _ = _data(100)
    build_index(ids, x, IndexConfig(kind="flat", shards=2)).save(tmp_path / "idx")
    (tmp_path / "idx" / "shard_001.faiss").unlink()
    with pytest.raises(FileNotFoundError, match="shard_001"):
        load_index(tmp_path / "idx")


def test_ivf_shards_share_one_quantizer_and_take_the_search_knobs() -> None:
    ids, x, q = _data()
    index = build_index(ids, x, IndexConfig(kind="ivf", nlist=16, nprobe=1, shards=3))
    assert isinstance(index, FaissIndex)
    ivfs = [faiss.extract_index_ivf(p) for p in index.parts()]
    centroids = [i.quantizer.reconstruct_n(0, i.nlist) for i in ivfs]
    assert centroids[0].shape == (16, D)
    for c in centroids[1:]:
        np.testing.assert_array_equal(c, centroids[0])
    truth = build_index(ids, x, IndexConfig(kind="flat")).search(q, 10)[1]
    low = _recall(index.search(q, 10)[1], truth)
    index.set_search_params(nprobe=16)
    assert all(i.nprobe == 16 for i in ivfs)
    assert _recall(index.search(q, 10)[1], truth) == 1.0 > low


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_more_shards_than_items_leaves_some_empty(kind: str) -> None:
    ids, x, q = _data(3)
    index = build_index(ids, x, from_dict(IndexConfig, {"kind": kind, "shards": 5}))
    scores, got = index.search(q[:2], 5)
    assert (got[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    assert set(got[0, :3]) == set(ids)


def test_bad_shard_configs_are_errors() -> None:
    with pytest.raises(ValueError, match="shards must be >= 1"):
        IndexConfig(kind="flat", shards=0)
    with pytest.raises(ValueError, match="FAISS kind"):
        IndexConfig(kind="exact", shards=2)
    with pytest.raises(ValueError, match="shards"):
        FaissIndex(D, IndexConfig(kind="flat", shards=3), faiss.IndexFlatIP(D))
