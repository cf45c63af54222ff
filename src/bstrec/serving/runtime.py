"""The exported ranker at serving time: every candidate of a request scored in one ONNX Runtime
call, no torch on this path.

Notation: B candidates of one request.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from bstrec.features.spec import FeatureSpec
from bstrec.ranking.export import OnnxRanker, example_batch

F32 = npt.NDArray[np.float32]


class RankerRuntime:
    """``score(batch) -> (B,)`` click probabilities from an exported ranker file."""

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        # One intra-op thread by default: requests run in parallel threads already, and a
        # thread pool per session per request would oversubscribe the cores.
        self.ranker = OnnxRanker(path, threads=threads)
        self.spec: FeatureSpec = self.ranker.spec

    def logits(self, batch: Mapping[str, torch.Tensor | np.ndarray]) -> F32:
        """Batch contract (torch or NumPy; extra keys ignored) -> (B,) logits."""
        arrays = {n: v.numpy() if isinstance(v, torch.Tensor) else v for n, v in batch.items()
                  if n in self.ranker.input_names}
        return self.ranker.predict(arrays)

    def score(self, batch: Mapping[str, torch.Tensor | np.ndarray]) -> F32:
        """Batch contract -> (B,) probabilities sigmoid(logit)."""
        z = self.logits(batch).astype(np.float64)
        out: F32 = (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
        return out

    def check(self) -> None:
        """Score a tiny valid batch; raise ValueError when the graph does not run or gives
        non-finite scores (a bundle is refused before it serves)."""
        out = self.logits(example_batch(self.spec, batch=2))
        if out.shape != (2,) or not np.isfinite(out).all():
            raise ValueError(f"the ranker returned {out!r} on a valid batch")
