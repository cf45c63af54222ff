"""Rules after ranking: seen filter, per-category cap, backfill."""

from __future__ import annotations

from bstrec.serving.rules import apply_rules

# (item, category), best first
RANKED = [(1, "a"), (2, "a"), (3, "a"), (4, "b"), (5, None), (6, None), (7, "a"), (8, "b")]


def rules(k: int, seen: set[int] = frozenset(), cap: int = 2) -> list[int]:  # type: ignore[assignment]
    out = apply_rules(RANKED, k, item_of=lambda r: r[0], category_of=lambda r: r[1], seen=seen,
                      max_per_category=cap)
    return [i for i, _ in out]


def test_cap_keeps_ranked_order_and_skips_over_capped_categories() -> None:
    assert rules(4) == [1, 2, 4, 5]
    assert rules(6) == [1, 2, 4, 5, 6, 8]  # items without a category are never capped


def test_seen_items_are_dropped_before_the_cap() -> None:
    assert rules(4, seen={1, 4}) == [2, 3, 5, 6]


def test_capped_items_backfill_a_short_list_in_ranked_order() -> None:
    assert rules(8, cap=1) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert rules(5, cap=1) == [1, 2, 4, 5, 6]


def test_no_cap() -> None:
    assert rules(3, cap=0) == [1, 2, 3]
    assert rules(20, seen={2}, cap=0) == [1, 3, 4, 5, 6, 7, 8]
