"""Time-difference buckets: the integer edges give the log2 formula exactly, the NumPy twin
gives what the models' module gives, and the bucket count bounds the last bucket."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bstrec.features.timebuckets import TimeBuckets, bucket_edges, time_bucket_np


def formula(dt: np.ndarray, n: int) -> np.ndarray:
    """The module doc's definition, in exact integer arithmetic (bit length = floor(log2) + 1)."""
    logs = np.array([int(d + 1).bit_length() - 1 for d in np.maximum(dt, 0)], dtype=np.int64)
    out: np.ndarray = 1 + np.minimum(logs, n - 2)
    return out


@pytest.mark.parametrize("n", [2, 3, 8, 30, 40])
def test_buckets_follow_the_formula_at_and_around_every_power_of_two(n: int) -> None:
    powers = np.array([1 << k for k in range(45)], dtype=np.int64)
    rng = np.random.default_rng(0)
    dt = np.concatenate([powers - 2, powers - 1, powers, rng.integers(-9, 1 << 40, 2000),
                         np.array([0, -1])])
    want = formula(dt, n)
    np.testing.assert_array_equal(time_bucket_np(dt, n), want)
    mask = torch.ones(1, len(dt), dtype=torch.bool)
    got = TimeBuckets(n)(torch.from_numpy(dt)[None], mask)[0].numpy()
    np.testing.assert_array_equal(got, want)
    assert want.min() >= 1 and want.max() == n - 1


def test_padding_is_bucket_zero_and_too_few_buckets_are_refused() -> None:
    out = TimeBuckets(8)(torch.tensor([[5, 10**6]]), torch.tensor([[False, True]]))
    assert out.tolist() == [[0, 7]]
    assert bucket_edges(4) == [1, 3]
    with pytest.raises(ValueError, match="n_buckets >= 2"):
        TimeBuckets(1)
