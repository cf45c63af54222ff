"""Rules applied after ranking: what a model score alone must not decide.

- seen filter: an item the user already interacted with is never recommended again (the match
  stage drops them too; events that arrive between match and rules are caught here);
- per-category cap: at most ``max_per_category`` items of one category, so that one strong
  category does not fill the whole list. When the cap leaves fewer than ``k`` items, the
  capped ones come back in score order: a short list helps no one.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import TypeVar

T = TypeVar("T")


def apply_rules(ranked: Sequence[T], k: int, *, item_of: Callable[[T], object],
                category_of: Callable[[T], str | None], seen: Collection[object],
                max_per_category: int) -> list[T]:
    """``ranked`` best first -> at most ``k`` of them, seen items dropped, categories capped
    (0 = no cap); the order among kept items is the ranked order. One pass that stops at the
    k-th kept item: a request reads the ids and categories of the few it walks, not of all."""
    kept: list[tuple[int, T]] = []  # (position among the unseen items, item)
    capped: list[tuple[int, T]] = []
    counts: dict[str | None, int] = {}
    fresh = 0
    for r in ranked:
        if item_of(r) in seen:
            continue
        fresh += 1
        if max_per_category > 0:
            cat = category_of(r)
            # items without a category are not capped: nothing says they are alike
            if cat is not None and counts.get(cat, 0) >= max_per_category:
                capped.append((fresh, r))
                continue
            counts[cat] = counts.get(cat, 0) + 1
        kept.append((fresh, r))
        if len(kept) == k:
            break
    # a short list: the capped items fill it, in ranked order among the kept ones
    return [r for _, r in sorted(kept + capped[:k - len(kept)], key=lambda e: e[0])]
