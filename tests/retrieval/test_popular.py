"""Popularity with time decay: global, per category, per context segment."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from bstrec.retrieval.popular import PopularConfig, Popularity, decay_weights
from bstrec.retrieval.topk import top_k

DAY = 86_400
N = 7  # ids 2..6
CATS = np.array([0, 0, 2, 2, 3, 3, 3])  # item -> category
SIZES = {"user_gender": 4}


def _frame() -> pl.DataFrame:
    # item 2: 5 old events (100 days before the end); item 3: 3 recent ones; item 4: 1 recent
    item = [2] * 5 + [3] * 3 + [4] + [5, 5]
    ts = [0] * 5 + [100 * DAY] * 3 + [100 * DAY] + [100 * DAY] * 2
    gender = [2] * 9 + [3, 3]  # item 5 is popular among gender code 3 only
    return pl.DataFrame({"item": item, "timestamp": ts, "label": [1.0] * len(item),
                         "user_gender": gender})


def test_decay_weights() -> None:
    w = decay_weights(np.array([0.0, 30 * DAY, 60 * DAY]), 60 * DAY, 30)
    np.testing.assert_allclose(w, [0.25, 0.5, 1.0])
    assert (decay_weights(np.array([0.0, 1.0]), 5.0, 0) == 1).all()


def test_time_decay_changes_the_global_order() -> None:
    plain = Popularity.fit(_frame(), CATS, 4, SIZES, PopularConfig(half_life_days=0))
    decayed = Popularity.fit(_frame(), CATS, 4, SIZES, PopularConfig(half_life_days=10))
    assert int(np.argmax(plain.global_scores())) == 2  # most events
    assert int(np.argmax(decayed.global_scores())) == 3  # most recent weight
    assert decayed.global_scores()[:2].sum() == 0


def test_per_category_scores_hold_only_that_category() -> None:
    pop = Popularity.fit(_frame(), CATS, 4, SIZES, PopularConfig(half_life_days=0))
    s = pop.category_scores([2, 3])
    assert s.shape == (2, N)
    assert set(np.flatnonzero(s[0])) == {2, 3} and int(np.argmax(s[0])) == 2
    assert set(np.flatnonzero(s[1])) == {4, 5}


def test_context_segments_shrink_towards_global() -> None:
    cfg = PopularConfig(half_life_days=0, segment=("user_gender",), segment_prior=1.0)
    pop = Popularity.fit(_frame(), CATS, 4, SIZES, cfg)
    s = pop.context_scores([2, 3])
    assert int(np.argmax(s[1])) == 5  # gender 3's favourite
    assert int(np.argmax(s[0])) == 2
    np.testing.assert_allclose(s.sum(1), 1.0)
    strong = Popularity.fit(_frame(), CATS, 4, SIZES,
                            PopularConfig(half_life_days=0, segment=("user_gender",),
                                          segment_prior=1e6))
    assert int(np.argmax(strong.context_scores([3])[0])) == 2  # the prior dominates
    # each segment's ranking: its items with evidence, by share, as top_k orders that row
    for seg in (2, 3):
        want = top_k(np.where(s[seg - 2] > 0, s[seg - 2], -np.inf)[None], N)[1][0]
        assert pop.context_ranking(seg).tolist() == [i for i in want.tolist() if i >= 0]


def test_save_load(tmp_path: Path) -> None:
    pop = Popularity.fit(_frame(), CATS, 4, SIZES, PopularConfig(segment=("user_gender",)))
    pop.save(tmp_path)
    back = Popularity.load(tmp_path)
    np.testing.assert_array_equal(back.global_scores(), pop.global_scores())
    np.testing.assert_array_equal(back.context_scores([3]), pop.context_scores([3]))
    assert back.segment_names == ("user_gender",) and back.config == pop.config
    with pytest.raises(ValueError):
        PopularConfig(half_life_days=-1)
