"""Top-k over dense scores: order, ties, exclusions and padding, against hand-computed lists."""

from __future__ import annotations

import numpy as np

from bstrec.retrieval.topk import best_k, drop_excluded, first_k_without, top_k


def test_best_k_orders_by_score_then_by_the_smaller_position() -> None:
    s = np.array([[0.5, 2.0, 0.5, 2.0, -np.inf, 1.0],
                  [3.0, 3.0, 3.0, 3.0, 3.0, 3.0]], dtype=np.float32)
    vals, pos = best_k(s, 4)
    assert pos.tolist() == [[1, 3, 5, 0], [0, 1, 2, 3]]
    assert vals.tolist() == [[2.0, 2.0, 1.0, 0.5], [3.0] * 4]
    # the whole row, then padding; -inf entries come back as position -1
    vals, pos = best_k(s[:1], 8)
    assert pos.tolist() == [[1, 3, 5, 0, 2, -1, -1, -1]]
    assert np.isneginf(vals[0, 5:]).all()



def test_best_k_ties_at_the_cut_go_to_the_smaller_positions() -> None:
    # few distinct values over long rows: the k-th score is tied far beyond k, the case where
    # argpartition alone keeps an arbitrary subset of the tied positions
    rng = np.random.default_rng(0)
    s = rng.integers(0, 4, size=(50, 3000)).astype(np.float32)
    s[rng.random(s.shape) < 0.2] = -np.inf
    for k in (1, 7, 100, 2999):
        vals, pos = best_k(s, k)
        for q in range(len(s)):
            order = np.lexsort((np.arange(s.shape[1]), -s[q]))[:k]  # brute force
            want = np.where(np.isneginf(s[q, order]), -1, order)
            assert pos[q].tolist() == want.tolist(), (k, q)
            assert vals[q].tolist() == s[q, order].tolist()

def test_top_k_drops_reserved_and_excluded_ids() -> None:
    # ids 0 and 1 are reserved (padding, out of vocabulary) and never come back
    s = np.array([[9.0, 9.0, 4.0, 4.0, 7.0, 1.0]])
    exclude = np.array([[False, False, False, False, True, False]])
    vals, ids = top_k(s, 4, exclude)
    assert ids.tolist() == [[2, 3, 5, -1]] and vals[0, :3].tolist() == [4.0, 4.0, 1.0]
    assert s[0, 4] == 7.0  # the caller's scores are not written to


def test_drop_excluded_keeps_the_index_order() -> None:
    ids = np.array([[5, 0, 3, 4, -1, 2]])
    scores = np.array([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]], dtype=np.float32)
    exclude = np.zeros((1, 6), dtype=bool)
    exclude[0, 3] = True
    s, out = drop_excluded(ids, scores, exclude, 4)
    assert out.tolist() == [[5, 4, 2, -1]] and s[0, :3].tolist() == [6.0, 3.0, 1.0]


def test_first_k_without_takes_each_rows_first_unexcluded_ids_of_one_ranking() -> None:
    order = np.array([5, 2, 7, 3])
    exclude = np.zeros((3, 8), dtype=bool)
    exclude[1, [5, 7]] = True
    exclude[2, [5, 2, 7, 3]] = True
    assert first_k_without(order, exclude, 3).tolist() == [[5, 2, 7], [2, 3, -1], [-1, -1, -1]]
    for r in range(3):  # one row (a request) takes a shortcut to the same lists
        assert first_k_without(order, exclude[r:r + 1], 3).tolist() == \
            first_k_without(order, exclude, 3)[r:r + 1].tolist()
