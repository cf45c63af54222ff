"""Indexes: exact results, ANN recall, save/load round trip and incremental add."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bstrec.retrieval.index import (
    ExactIndex,
    FaissIndex,
    IndexConfig,
    VectorIndex,
    build_index,
    load_index,
)

D = 16


def _data(n: int = 2000, q: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # unit vectors: each is its own top 1
    queries = rng.standard_normal((q, D)).astype(np.float32)
    ids = np.arange(1000, 1000 + n, dtype=np.int64)  # caller ids, not positions
    return ids, x, queries


def _truth(x: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    s = queries @ x.T
    return ids[np.argsort(-s, axis=1, kind="stable")[:, :k]]


CONFIGS = [IndexConfig(kind="exact"), IndexConfig(kind="flat"),
           IndexConfig(kind="hnsw", hnsw_m=16, ef_construction=100, ef_search=200),
           IndexConfig(kind="ivf", nlist=16, nprobe=16),
           IndexConfig(kind="ivf", nlist=16, nprobe=16, ivf_codes="pq4", pq_m=8, refine=8)]
NAMES = ["exact", "flat", "hnsw", "ivf", "ivf_pq4"]


@pytest.mark.parametrize("cfg", CONFIGS, ids=NAMES)
def test_search_finds_the_inner_product_top_k(cfg: IndexConfig) -> None:
    ids, x, q = _data()
    index = build_index(ids, x, cfg)
    scores, got = index.search(q, 10)
    truth = _truth(x, ids, q, 10)
    assert got.shape == scores.shape == (len(q), 10)
    assert (np.diff(scores, axis=1) <= 1e-5).all()  # best first
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth, strict=True)])
    if cfg.kind in ("exact", "flat") or (cfg.kind == "ivf" and cfg.ivf_codes == "flat"
                                         and cfg.nprobe >= cfg.nlist):
        assert (got == truth).all()
        np.testing.assert_allclose(scores, np.sort(q @ x.T, axis=1)[:, ::-1][:, :10], rtol=1e-4)
    else:
        assert recall >= 0.95


@pytest.mark.parametrize("cfg", CONFIGS, ids=NAMES)
def test_save_load_round_trip(cfg: IndexConfig, tmp_path: Path) -> None:
    ids, x, q = _data()
    index = build_index(ids, x, cfg)
    before = index.search(q, 20)
    index.save(tmp_path / "idx")
    loaded = load_index(tmp_path / "idx")
    assert type(loaded) is type(index) and len(loaded) == len(index)
    assert loaded.config == index.config
    after = loaded.search(q, 20)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_allclose(before[0], after[0], rtol=1e-6)


@pytest.mark.parametrize("cfg", CONFIGS, ids=NAMES)
def test_incremental_add_without_rebuild(cfg: IndexConfig, tmp_path: Path) -> None:
    ids, x, q = _data()
    index = build_index(ids[:1500], x[:1500], cfg)
    inner = index.index if isinstance(index, FaissIndex) else None
    index.add(ids[1500:], x[1500:])
    assert len(index) == 2000
    if inner is not None:
        assert index.index is inner  # the same FAISS structure, grown in place
        assert inner.ntotal == 2000
    # a new item is found by its own vector, under its own id
    _, got = index.search(x[1500:1600], 1)
    assert (got[:, 0] == ids[1500:1600]).mean() >= 0.95
    if cfg.kind in ("exact", "flat"):
        full = build_index(ids, x, cfg)
        np.testing.assert_array_equal(index.search(q, 10)[1], full.search(q, 10)[1])
    # and it survives a save/load
    index.save(tmp_path / "grown")
    np.testing.assert_array_equal(load_index(tmp_path / "grown").search(q, 5)[1],
                                  index.search(q, 5)[1])


def test_add_rejects_duplicate_ids_and_bad_shapes() -> None:
    ids, x, _ = _data(100)
    index: VectorIndex = ExactIndex(D)
    index.add(ids, x)
    with pytest.raises(ValueError, match="unique"):
        index.add(ids[:1], x[:1])
    with pytest.raises(ValueError, match="ids for"):
        index.add(np.array([1, 2]), x[:3])
    with pytest.raises(ValueError, match="shape"):
        index.search(np.zeros((2, D + 1)), 3)


def test_more_results_than_vectors_are_padded() -> None:
    ids, x, q = _data(5, 3)
    for cfg in (IndexConfig(kind="exact"), IndexConfig(kind="flat")):
        scores, got = build_index(ids, x, cfg).search(q, 8)
        assert (got[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()
        assert set(got[0, :5]) == set(ids)


def test_hnsw_and_ivf_knobs_change_the_search() -> None:
    ids, x, q = _data()
    ivf = build_index(ids, x, IndexConfig(kind="ivf", nlist=32, nprobe=1))
    assert isinstance(ivf, FaissIndex)
    truth = _truth(x, ids, q, 10)
    low = np.mean([len(set(a) & set(b)) for a, b in zip(ivf.search(q, 10)[1], truth, strict=True)])
    ivf.set_search_params(nprobe=32)
    high = np.mean([len(set(a) & set(b)) for a, b in zip(ivf.search(q, 10)[1], truth, strict=True)])
    assert high == 10 and low < high
    with pytest.raises(ValueError, match="ExactIndex"):
        FaissIndex(D, IndexConfig(kind="exact"))


def test_pq4_codes_are_rescored_exactly() -> None:
    """The 4-bit codes only shortlist: returned scores are exact inner products, and a wider
    exact re-scoring (``refine``) finds at least as much of the true top k."""
    ids, x, q = _data()
    truth = _truth(x, ids, q, 10)
    found = []
    for refine in (1, 10):
        cfg = IndexConfig(kind="ivf", nlist=16, nprobe=16, ivf_codes="pq4", pq_m=8, refine=refine)
        index = build_index(ids, x, cfg)
        scores, got = index.search(q, 10)
        exact = np.take_along_axis(q @ x.T, got - 1000, axis=1)
        np.testing.assert_allclose(scores, exact, rtol=1e-4, atol=1e-5)
        found.append(np.mean([len(set(a) & set(b)) for a, b in zip(got, truth, strict=True)]))
    assert found[1] > found[0] and found[1] >= 9.5
    with pytest.raises(ValueError, match="divide"):
        FaissIndex(D, IndexConfig(kind="ivf", ivf_codes="pq4", pq_m=5))
    with pytest.raises(ValueError, match="ivf_codes"):
        IndexConfig(kind="ivf", ivf_codes="sq8")  # type: ignore[arg-type]


def test_pq4_without_refine_keeps_codes_only() -> None:
    """refine=0: no stored vectors (far fewer bytes), scores from the codes: the top k of the
    codes, which refine=1 only reorders, and which a wider re-scoring (refine=4) improves."""
    import faiss

    ids, x, q = _data()
    truth = _truth(x, ids, q, 10)
    built = {}
    for refine in (0, 1, 4):
        cfg = IndexConfig(kind="ivf", nlist=16, nprobe=16, ivf_codes="pq4", pq_m=8, refine=refine)
        index = build_index(ids, x, cfg)
        assert isinstance(index, FaissIndex)
        scores, got = index.search(q, 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth, strict=True)])
        built[refine] = (index, scores, got, recall)
    codes, scores, got, recall = built[0]
    assert isinstance(codes.index, faiss.IndexIVFPQFastScan)  # no IndexRefineFlat around it
    assert faiss.serialize_index(codes.index).size * 3 < faiss.serialize_index(
        built[4][0].index).size
    exact = np.take_along_axis(q @ x.T, got - 1000, axis=1)
    assert not np.allclose(scores, exact, rtol=1e-4, atol=1e-5)  # code scores, not re-scored
    assert [set(row) for row in got] == [set(row) for row in built[1][2]]
    assert recall == built[1][3] < built[4][3]
    with pytest.raises(ValueError, match="refine"):
        IndexConfig(kind="ivf", ivf_codes="pq4", refine=-1)
