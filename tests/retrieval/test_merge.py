"""Merging sources: quotas, deduplication with attribution, seen items removed, backfill."""

from __future__ import annotations

import numpy as np

from bstrec.retrieval.merge import merge

NAMES = ("a", "b", "c")


def test_quotas_interleave_in_proportion() -> None:
    lists = {"a": np.array([[10, 11, 12, 13, 14, 15]]), "b": np.array([[20, 21, 22, 23]])}
    c = merge(lists, {"a": 4, "b": 2}, names=NAMES)
    assert c.ids.tolist() == [[10, 20, 11, 12, 21, 13]]
    assert [c.source_names(0, j) for j in range(6)] == [["a"], ["b"], ["a"], ["a"], ["b"], ["a"]]
    assert c.from_source("a").sum() == 4 and c.from_source("b").sum() == 2


def test_duplicates_take_one_slot_keep_every_source_and_are_backfilled() -> None:
    lists = {"a": np.array([[10, 11, 12, 13]]), "b": np.array([[11, 20, 21, 22]])}
    c = merge(lists, {"a": 2, "b": 2}, names=NAMES)
    # 11 is offered by both: one slot, both names; the lost slot goes to the next item in line
    assert c.ids.tolist() == [[11, 10, 20, 12]] or c.ids.tolist() == [[10, 11, 20, 12]]
    row = c.ids[0].tolist()
    assert len(set(row)) == 4
    assert c.source_names(0, row.index(11)) == ["a", "b"]
    assert c.source_names(0, row.index(20)) == ["b"]


def test_seen_and_invalid_items_are_removed() -> None:
    lists = {"a": np.array([[10, 11, 12, 13], [30, -1, 31, 1]]),
             "b": np.array([[20, 21, 22, 23], [40, 41, 0, 42]])}
    seen_offsets = np.array([0, 2, 3])
    seen_items = np.array([11, 20, 41])  # row 0 saw 11 and 20, row 1 saw 41
    c = merge(lists, {"a": 2, "b": 2}, seen_offsets=seen_offsets, seen_items=seen_items,
              names=NAMES)
    assert 11 not in c.ids[0] and 20 not in c.ids[0]
    assert c.ids[0].tolist() == [10, 21, 12, 22]
    assert set(c.ids[1].tolist()) == {30, 40, 31, 42}
    assert (c.ids >= 2).all()


def test_short_sources_leave_padding_and_unused_sources_are_ignored() -> None:
    lists = {"a": np.array([[10, -1, -1]]), "b": np.array([[20, 21, -1]]),
             "c": np.array([[30, 31, 32]])}
    c = merge(lists, {"a": 2, "b": 2}, names=NAMES)  # c has no quota
    assert sorted(c.ids[0][c.ids[0] >= 0].tolist()) == [10, 20, 21]
    assert c.ids[0].tolist().count(-1) == 1
    assert not c.from_source("c").any()
