"""Time-difference buckets: BST's position of a behaviour is the time between it and the request.

Buckets are log2-spaced in seconds, so that "a minute ago" and "two minutes ago" differ as much
as "a month ago" and "two months ago":

    bucket(dt) = 1 + min(floor(log2(1 + dt)), N_TIME_BUCKETS - 2)     for dt >= 0 seconds

bucket 0 is padding, bucket 1 is dt = 0 (the target itself, or a behaviour in the same second),
and the last bucket holds everything from 2^(N-2) - 1 seconds (about 8.5 years for N = 30) on.
"""

from __future__ import annotations

import numpy as np
import torch

N_TIME_BUCKETS = 30


def time_bucket(dt: torch.Tensor, n_buckets: int = N_TIME_BUCKETS) -> torch.Tensor:
    """(…) seconds >= 0 -> (…) long buckets in [1, n_buckets - 1]; callers mask padding to 0."""
    b = torch.floor(torch.log2(dt.clamp(min=0).double() + 1.0)).long()
    return 1 + b.clamp(max=n_buckets - 2)


def time_bucket_np(dt: np.ndarray, n_buckets: int = N_TIME_BUCKETS) -> np.ndarray:
    """NumPy twin of :func:`time_bucket` for the pre-built tensors and the serving path."""
    b = np.floor(np.log2(np.maximum(dt, 0).astype(np.float64) + 1.0)).astype(np.int64)
    out: np.ndarray = 1 + np.minimum(b, n_buckets - 2)
    return out
