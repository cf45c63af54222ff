"""Time-difference buckets: BST's position of a behaviour is the time between it and the request.

Buckets are log2-spaced in seconds, so that "a minute ago" and "two minutes ago" differ as much
as "a month ago" and "two months ago":

    bucket(dt) = 1 + min(floor(log2(1 + dt)), n_buckets - 2)     for dt >= 0 seconds

bucket 0 is padding, bucket 1 is dt = 0 (the target itself, or a behaviour in the same second),
and the last bucket holds everything from 2^(n_buckets-2) - 1 seconds on.

The models bucket the raw seconds themselves (:class:`TimeBuckets`, with their config's
``time_buckets``), so that the number of buckets is part of what a model computes, travels with
its config in checkpoints and exported graphs, and cannot disagree with its table's size.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

N_TIME_BUCKETS = 30


def bucket_edges(n_buckets: int) -> list[int]:
    """The n_buckets - 2 lower edges 2^k - 1 (k = 1 .. n_buckets - 2) of buckets 2 .. n - 1:
    the bucket of dt is 1 + the number of edges <= dt, which is the formula above in integers
    (no float log2 that rounds at the powers of two, and plain comparisons in an ONNX graph)."""
    if n_buckets < 2:
        raise ValueError(f"time buckets need n_buckets >= 2 (padding and dt = 0), got {n_buckets}")
    return [(1 << k) - 1 for k in range(1, n_buckets - 1)]


def time_bucket_np(dt: np.ndarray, n_buckets: int = N_TIME_BUCKETS) -> np.ndarray:
    """(…) seconds -> (…) buckets in [1, n_buckets - 1], as :class:`TimeBuckets` gives them
    (analyses of a sample set's time differences)."""
    edges = np.asarray(bucket_edges(n_buckets), dtype=np.int64)
    out: np.ndarray = 1 + np.searchsorted(edges, np.asarray(dt, dtype=np.int64), side="right")
    return out


class TimeBuckets(nn.Module):
    """``forward(dt (B, L) seconds, mask (B, L) bool) -> (B, L) long``: each present behaviour's
    bucket among ``n_buckets`` (padding 0), what a model's ``time_buckets`` embeds."""

    edges: Tensor

    def __init__(self, n_buckets: int) -> None:
        super().__init__()
        self.n_buckets = n_buckets
        self.register_buffer("edges", torch.tensor(bucket_edges(n_buckets), dtype=torch.long),
                             persistent=False)

    def forward(self, dt: Tensor, mask: Tensor) -> Tensor:
        b = 1 + (dt.unsqueeze(-1) >= self.edges).sum(-1)  # (B, L)
        return torch.where(mask, b, 0)
