"""Item-to-item co-occurrence: the window, the time decay, normalisation, similar items."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from bstrec.retrieval.item_cf import ItemCF, ItemCFConfig

DAY = 86_400
N = 10  # ids 2..9


def _frame(rows: list[tuple[int, int, int]]) -> pl.DataFrame:
    u, i, t = zip(*rows, strict=True)
    return pl.DataFrame({"user_id": list(u), "item_id": list(i), "item": list(i),
                         "timestamp": list(t), "label": [1.0] * len(rows)})


def _sim(cf: ItemCF, a: int, b: int) -> float:
    row = cf.ids[a].tolist()
    return float(cf.sims[a][row.index(b)]) if b in row else 0.0


def test_pairs_inside_the_window_only() -> None:
    # user 1: 2 3 4 5 in a row; window 1 links neighbours only
    f = _frame([(1, 2, 0), (1, 3, 10), (1, 4, 20), (1, 5, 30)])
    cf = ItemCF.fit(f, N, ItemCFConfig(window=1, pair_tau_days=0, half_life_days=0, smoothing=0))
    assert _sim(cf, 2, 3) > 0 and _sim(cf, 3, 4) > 0
    assert _sim(cf, 2, 4) == 0 and _sim(cf, 2, 5) == 0
    # cosine normalisation: c_ij / sqrt(n_i n_j) with each item seen once
    assert _sim(cf, 2, 3) == pytest.approx(1.0)
    assert _sim(cf, 3, 2) == pytest.approx(_sim(cf, 2, 3))  # symmetric


def test_time_gap_limit_and_users_do_not_mix() -> None:
    f = _frame([(1, 2, 0), (1, 3, 40 * DAY), (2, 4, 0), (3, 5, 1)])
    cf = ItemCF.fit(f, N, ItemCFConfig(window=5, max_gap_days=30))
    assert _sim(cf, 2, 3) == 0  # 40 days apart
    assert _sim(cf, 4, 5) == 0  # different users
    assert (cf.ids[cf.ids > 0]).size == 0


def test_time_decay_weighs_close_and_recent_pairs_more() -> None:
    # pair (2, 3) close in time, pair (2, 4) a week apart: the close one is more similar
    f = _frame([(1, 2, 0), (1, 3, 60), (2, 2, 0), (2, 4, 7 * DAY)])
    cf = ItemCF.fit(f, N, ItemCFConfig(pair_tau_days=1.0, half_life_days=0, smoothing=0))
    assert _sim(cf, 2, 3) > _sim(cf, 2, 4) > 0
    # pair (5, 6) long ago, pair (5, 7) recently: recency decay favours the recent one
    g = _frame([(1, 5, 0), (1, 6, 60), (2, 5, 400 * DAY), (2, 7, 400 * DAY + 60),
                (3, 8, 400 * DAY)])
    cf = ItemCF.fit(g, N, ItemCFConfig(pair_tau_days=0, half_life_days=30, alpha=1.0,
                                       smoothing=0))
    assert _sim(cf, 5, 7) > _sim(cf, 5, 6) > 0
    flat = ItemCF.fit(g, N, ItemCFConfig(pair_tau_days=0, half_life_days=0, alpha=1.0,
                                         smoothing=0))
    assert _sim(flat, 5, 7) == pytest.approx(_sim(flat, 5, 6))


def test_similar_items_and_user_scores() -> None:
    rows = []
    for u in range(20):  # 2 and 3 always together; 2 and 4 sometimes
        rows += [(u, 2, 0), (u, 3, 10)]
        if u < 5:
            rows.append((u, 4, 20))
    cf = ItemCF.fit(_frame(rows), N, ItemCFConfig(window=1, smoothing=0))
    sims, ids = cf.similar([2, 9, 99], 3)
    assert ids[0, 0] == 3 and sims[0, 0] >= sims[0, 1]
    assert (ids[1] == -1).all() and (ids[2] == -1).all()  # no neighbours / unknown id
    hist = np.array([[0, 0, 2]])
    s = cf.scores(hist, hist > 0)
    assert s.shape == (1, N)
    assert int(s[0].argmax()) == 3 and s[0, :2].sum() == 0


def test_save_load(tmp_path: object) -> None:
    from pathlib import Path

    f = _frame([(1, 2, 0), (1, 3, 10), (1, 4, 20)])
    cf = ItemCF.fit(f, N)
    cf.save(Path(str(tmp_path)))
    back = ItemCF.load(Path(str(tmp_path)))
    np.testing.assert_array_equal(back.ids, cf.ids)
    np.testing.assert_array_equal(back.sims, cf.sims)
    assert back.config == cf.config
