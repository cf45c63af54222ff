"""Shared layers of the rankers: embeddings, MLPs, the Transformer block, DIN's attention unit."""

from bstrec.nn.attention import LocalActivationUnit
from bstrec.nn.embeddings import (
    DEFAULT_CROSSES,
    Embedded,
    FeatureEmbeddings,
    masked_mean,
    resolve_crosses,
)
from bstrec.nn.mlp import MLP, Activation, Dice, PReLU
from bstrec.nn.transformer import TransformerBlock

__all__ = [
    "DEFAULT_CROSSES",
    "MLP",
    "Activation",
    "Dice",
    "Embedded",
    "FeatureEmbeddings",
    "LocalActivationUnit",
    "PReLU",
    "TransformerBlock",
    "masked_mean",
    "resolve_crosses",
]
