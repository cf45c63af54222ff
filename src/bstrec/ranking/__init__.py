"""Rankers: BST and its baselines (DIN, Wide&Deep, WDL(+Seq)), and ESMM (a multi-task BST),
built by name from a config dict.

Every ranker is a plain ``nn.Module`` with ``forward(batch) -> logits (B,)`` (batch contract in
training/tensors.py; a multi-task one (B, H), one column per label of its entry's ``labels``) and a
frozen dataclass ``.config``; a checkpoint stores the ranker's name and
``dataclasses.asdict(model.config)`` and rebuilds it with :func:`build_ranker`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from bstrec.config import ConfigError, from_dict
from bstrec.features.spec import FeatureSpec
from bstrec.ranking.bst import BST, BSTConfig
from bstrec.ranking.din import DIN, DINConfig
from bstrec.ranking.multitask import ESMM, ESMMConfig
from bstrec.ranking.wdl import WDL, WDLConfig


@dataclass(frozen=True)
class RankerEntry:
    config: type[Any]  # the model's frozen dataclass config
    build: Callable[[FeatureSpec, Any], nn.Module]
    fixed: tuple[tuple[str, Any], ...] = ()  # config values implied by the name
    # the sample columns it is trained on: ``label``, or ESMM's click and conversion
    # (data/samples.py with_conversion_labels, derived from the log when the samples lack them)
    labels: tuple[str, ...] = ("label",)


RANKERS: dict[str, RankerEntry] = {
    "bst": RankerEntry(BSTConfig, BST),
    "din": RankerEntry(DINConfig, DIN),
    "wdl": RankerEntry(WDLConfig, WDL, (("use_seq", False),)),
    "wdl_seq": RankerEntry(WDLConfig, WDL, (("use_seq", True),)),
    "esmm": RankerEntry(ESMMConfig, ESMM, labels=("click", "buy")),
}


def build_ranker(name: str, spec: FeatureSpec, overrides: dict[str, Any] | None = None
                 ) -> nn.Module:
    """The ranker ``name`` for ``spec``, its config defaults replaced by ``overrides``.

    Unknown names and unknown config keys raise ConfigError.
    """
    if name not in RANKERS:
        raise ConfigError(f"unknown ranker {name!r}; known: {sorted(RANKERS)}")
    entry = RANKERS[name]
    data = dict(overrides or {})
    for key, value in entry.fixed:
        if data.setdefault(key, value) != value:
            raise ConfigError(f"ranker {name!r} implies {key}={value!r}, got {data[key]!r}")
    config = from_dict(entry.config, data, where=f"ranker.{name}")
    return entry.build(spec, config)


__all__ = ["BST", "DIN", "ESMM", "RANKERS", "WDL", "BSTConfig", "DINConfig", "ESMMConfig",
           "RankerEntry", "WDLConfig", "build_ranker"]
