"""ESMM (Ma et al. 2018, arXiv 1804.07931) on a shared BST body: click and conversion heads.

Notation: B batch, H = 2 heads (click, click-and-buy).

Why ESMM and not MMoE: on a shop log the two labels are sequential, not parallel. A purchase
is only observed after a click, so a CVR model trained on clicked samples alone sees a biased
sample of the impressions it is served on (sample selection bias) and few labels (sparsity).
ESMM models pCTCVR = pCTR x pCVR over every impression, and trains the two heads through
labels that exist on every sample (click, and click-and-buy); pCVR is never fitted on clicks
alone but is what makes the product right. It also gives pCTCVR directly, which the conversion
and revenue objectives rank by. MMoE shares experts between parallel tasks through gates: it
helps tasks that conflict, but does not address the selection bias and gives no pCTCVR.

1. The body is BST (ranking/bst.py) up to its MLP input: the behaviour sequence with the target
   appended, the Transformer block(s), the other features. Both heads read that one vector, so
   the sparse conversion task learns through the embeddings the click task trains.
2. The CTR head is the BST's own MLP; the CVR head is a second MLP (``cvr_mlp``, default the
   same widths).
3. ``forward(batch) -> (B, 2)`` logits: the CTR logit and the logit of pCTCVR = pCTR x pCVR
   (computed in log space). The training loop's BCE on them against the labels (click,
   click x buy) is ESMM's loss: the CTR loss plus the CTCVR loss, over every sample.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bstrec.features.spec import FeatureSpec
from bstrec.nn.mlp import MLP
from bstrec.ranking.bst import BST, BSTConfig

Batch = dict[str, Tensor]
HEADS = ("ctr", "ctcvr")  # the columns of forward's logits and of the training labels
# log p of pCTCVR is kept below this, so that its logit stays finite when both heads saturate
_MAX_LOG_P = -1e-6


@dataclass(frozen=True)
class ESMMConfig(BSTConfig):
    """The BST body's config (every BSTConfig field) and the CVR head's widths."""

    cvr_mlp: tuple[int, ...] | None = None  # None: the same widths as ``mlp``

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.wide:
            raise ValueError("ESMM: wide=True is not supported (one linear term, two heads)")
        if self.cvr_mlp is not None and any(w < 1 for w in self.cvr_mlp):
            raise ValueError(f"cvr_mlp widths must be >= 1, got {self.cvr_mlp}")

    def body(self) -> BSTConfig:
        """The ``BSTConfig`` of the shared body (and CTR head)."""
        return BSTConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(BSTConfig)})


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - e^x) for x < 0, stable at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)),
                       torch.log1p(-torch.exp(x)))


def product_logit(a: Tensor, b: Tensor) -> Tensor:
    """The logit of sigmoid(a) x sigmoid(b), for logits ``a``, ``b`` of any shape."""
    log_p = (F.logsigmoid(a) + F.logsigmoid(b)).clamp(max=_MAX_LOG_P)
    return log_p - log1mexp(log_p)


class ESMM(nn.Module):
    """``forward(batch) -> logits (B, 2)``: [CTR logit, CTCVR logit]; ``heads(batch)`` gives
    the CTR and CVR logits, ``probabilities(batch)`` pCTR, pCVR and pCTCVR."""

    def __init__(self, spec: FeatureSpec, config: ESMMConfig | None = None) -> None:
        super().__init__()
        c = self.config = config or ESMMConfig()
        self.body = BST(spec, c.body())
        first = self.body.mlp[0]
        assert isinstance(first, nn.Linear)
        self.cvr = MLP(first.in_features, c.cvr_mlp if c.cvr_mlp is not None else c.mlp,
                       act=c.mlp_act, dropout=c.mlp_dropout, out_dim=1, norm=c.mlp_norm)

    def represent(self, batch: Batch) -> Tensor:
        """(B, MLP input) the shared representation: BST.forward before its MLP."""
        b = self.body
        x, keep, other = b._tokens(batch)  # (B, L+1, D), (B, L+1), (B, F')
        for block in b.blocks:
            x = block(x, keep)  # (B, L+1, D)
        if b.config.output == "concat":
            seq = (x * keep.unsqueeze(-1).to(x.dtype)).flatten(1)  # (B, (L+1)*D)
            if b.config.concat_scale == "sqrt":
                seq = seq / math.sqrt(b.max_len + 1)
            elif b.config.concat_scale == "length":
                seq = seq / (b.max_len + 1)
        else:
            seq = x[:, -1]  # (B, D)
        return torch.cat([seq, other], 1)

    def heads(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """-> CTR logits (B,), CVR logits (B,) (conversion given a click)."""
        z = self.represent(batch)
        return self.body.mlp(z).squeeze(-1), self.cvr(z).squeeze(-1)

    def forward(self, batch: Batch) -> Tensor:
        ctr, cvr = self.heads(batch)
        return torch.stack([ctr, product_logit(ctr, cvr)], 1)  # (B, 2)

    @torch.no_grad()
    def probabilities(self, batch: Batch) -> dict[str, Tensor]:
        """pCTR, pCVR and pCTCVR = pCTR x pCVR, each (B,)."""
        ctr, cvr = self.heads(batch)
        p_ctr, p_cvr = torch.sigmoid(ctr), torch.sigmoid(cvr)
        return {"ctr": p_ctr, "cvr": p_cvr, "ctcvr": p_ctr * p_cvr}


def is_multitask(model: nn.Module) -> bool:
    """Whether ``model`` gives one logit per head (``heads(batch)``, ESMM's) rather than one
    click logit: what export, the bundle and its drift reference branch on."""
    return callable(getattr(model, "heads", None))


def build_esmm(spec: FeatureSpec, overrides: dict[str, object] | None = None) -> ESMM:
    """ESMM for ``spec`` from a config mapping (unknown keys are errors)."""
    from bstrec.config import from_dict

    return ESMM(spec, from_dict(ESMMConfig, dict(overrides or {}), where="ranker.esmm"))
