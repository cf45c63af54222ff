"""Multi-layer perceptrons for the rankers' output towers and DIN's activation unit.

Notation: B batch, L sequence length, D width. An MLP maps (..., D_in) -> (..., D_out); Dice keeps
its statistics per output unit over every leading dimension.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Activation = Literal["leaky_relu", "prelu", "dice", "relu", "sigmoid"]
Norm = Literal["none", "batch", "layer"]


class Dice(nn.Module):
    """Data-adaptive activation of DIN (Zhou et al. 2018, eq. 9).

    ``p = sigmoid((x - E[x]) / sqrt(Var[x] + eps))``, ``f(x) = p * x + (1 - p) * alpha * x``, with
    E and Var the batch statistics in training (running averages for a batch of one row) and
    their running averages in eval.
    """

    def __init__(self, dim: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, eps=eps, affine=False)
        self.alpha = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., D)."""
        flat = x.reshape(-1, x.shape[-1])  # (N, D)
        bn = self.bn
        z = F.batch_norm(flat, bn.running_mean, bn.running_var, training=self.training
                         and flat.shape[0] > 1, momentum=bn.momentum or 0.1, eps=bn.eps)
        p = torch.sigmoid(z.reshape(x.shape))
        return x * (p + (1.0 - p) * self.alpha)


class PReLU(nn.Module):
    """PReLU with one slope per unit of the LAST dimension (torch's uses dimension 1)."""

    def __init__(self, dim: int, init: float = 0.25) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., D)."""
        return x.clamp(min=0) + self.alpha * x.clamp(max=0)


def activation(name: Activation, dim: int) -> nn.Module:
    """The activation module ``name`` for a layer of width ``dim``."""
    if name == "leaky_relu":
        return nn.LeakyReLU(0.01)
    if name == "prelu":
        return PReLU(dim)
    if name == "dice":
        return Dice(dim)
    if name == "relu":
        return nn.ReLU()
    if name == "sigmoid":
        return nn.Sigmoid()
    raise ValueError(f"unknown activation {name!r}")


def normalisation(name: Norm, dim: int) -> list[nn.Module]:
    """The normalisation after a hidden layer of width ``dim``: none, BatchNorm (what
    torch-rechub's towers put between every linear layer and its activation; in eval mode an
    affine map, which ONNX Runtime fuses into the linear layer before it) or LayerNorm."""
    if name == "none":
        return []
    if name == "batch":
        return [nn.BatchNorm1d(dim)]
    if name == "layer":
        return [nn.LayerNorm(dim)]
    raise ValueError(f"unknown normalisation {name!r}")


class MLP(nn.Sequential):
    """Linear -> [norm] -> activation -> dropout per hidden layer, then an optional linear
    output layer.

    (B, in_dim) -> (B, hidden[-1]) or (B, out_dim) when ``out_dim`` is given; without ``norm``
    (BatchNorm1d reads dimension 1 as the features) any leading dimensions (..., in_dim).
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], *, act: Activation = "leaky_relu",
                 dropout: float = 0.0, out_dim: int | None = None, norm: Norm = "none") -> None:
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers += [nn.Linear(d, h), *normalisation(norm, h), activation(act, h)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = h
        if out_dim is not None:
            layers.append(nn.Linear(d, out_dim))
            d = out_dim
        super().__init__(*layers)
        self.out_dim = d
