"""Padding of variable-length lists into the batch contract's fixed-width columns."""

from __future__ import annotations

import numpy as np
import pytest

from bstrec.training.tensors import pad_flat


def test_pad_flat_keeps_the_last_entries_right_or_left_aligned() -> None:
    lengths = np.array([3, 0, 1])
    flat = np.array([1, 2, 3, 9])
    assert pad_flat(lengths, flat, 2, right_align=True).tolist() == [[2, 3], [0, 0], [0, 9]]
    assert pad_flat(lengths, flat, 2, right_align=False).tolist() == [[2, 3], [0, 0], [9, 0]]


@pytest.mark.parametrize("right_align", [True, False])
def test_one_row_takes_the_same_values_as_the_general_path(right_align: bool) -> None:
    # one row (a request) is sliced, several rows are gathered: the rows must agree
    rng = np.random.default_rng(0)
    for _ in range(300):
        n, width = int(rng.integers(0, 30)), int(rng.integers(1, 25))
        flat = rng.integers(1, 100, n)
        one = pad_flat(np.array([n]), flat, width, right_align=right_align)
        two = pad_flat(np.array([n, 1]), np.append(flat, 7), width, right_align=right_align)
        assert np.array_equal(one, two[:1])
