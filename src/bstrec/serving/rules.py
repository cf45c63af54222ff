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
    (0 = no cap); the order among kept items is the ranked order."""
    fresh = [r for r in ranked if item_of(r) not in seen]
    if max_per_category <= 0:
        return fresh[:k]
    counts: dict[str | None, int] = {}
    kept: list[int] = []
    for i, r in enumerate(fresh):
        cat = category_of(r)
        # items without a category are not capped: nothing says they are alike
        if cat is not None and counts.get(cat, 0) >= max_per_category:
            continue
        counts[cat] = counts.get(cat, 0) + 1
        kept.append(i)
        if len(kept) == k:
            break
    if len(kept) < k:
        taken = set(kept)
        kept = sorted(kept + [i for i in range(len(fresh)) if i not in taken][:k - len(kept)])
    return [fresh[i] for i in kept]
