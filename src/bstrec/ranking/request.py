"""Request-shaped scoring: the N candidates of one request through any ranker in one call.

Notation: N candidates of one request.

Within a request every user, context and history input of the batch contract is the same for
all candidates; only the target item's columns (features of group ``item``) differ. A request is
therefore ``shared`` (those inputs with batch 1) and ``items`` (the item inputs with batch N).
A ranker that can share work across candidates defines ``forward_request(shared, items)``
(BST: ranking/bst.py); any other is fed the broadcast batch, so that every ranker serves
through the same interface and the same exported graph signature.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from bstrec.features.spec import FeatureSpec

Batch = dict[str, Tensor]
SEQUENCE_INPUTS = ("hist_item", "hist_cat", "hist_dt", "hist_mask")


def item_names(spec: FeatureSpec) -> tuple[str, ...]:
    """The batch inputs that vary across a request's candidates (the target item's)."""
    return tuple(f.name for f in spec.features if f.group == "item")


def shared_names(spec: FeatureSpec) -> tuple[str, ...]:
    """The batch inputs every candidate of a request shares: user, context, history."""
    return (*(f.name for f in spec.features if f.group != "item"), *SEQUENCE_INPUTS)


def broadcast(shared: Mapping[str, Tensor], items: Mapping[str, Tensor]) -> Batch:
    """(1, ...) shared and (N, ...) item inputs -> the batch contract with batch N (views)."""
    n = next(iter(items.values())).shape[0]
    return {**{k: v.expand(n, *v.shape[1:]) for k, v in shared.items()}, **items}


def forward_request(model: nn.Module, shared: Mapping[str, Tensor],
                    items: Mapping[str, Tensor]) -> Tensor:
    """``model``'s logits (N,) for one request: its ``forward_request`` when it has one, else
    its ``forward`` on the broadcast batch."""
    own = getattr(model, "forward_request", None)
    out: Tensor = own(dict(shared), dict(items)) if own is not None \
        else model(broadcast(shared, items))
    return out
