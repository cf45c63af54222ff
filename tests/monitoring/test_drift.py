"""PSI: the formula against hand-computed values, quantile and categorical bins, missing values,
the epsilon floor, and the serialised form."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import polars as pl
import pytest

from bstrec.config import ConfigError
from bstrec.monitoring.drift import (
    EPSILON,
    MAJOR,
    MISSING,
    MODERATE,
    OTHER,
    CategoricalDistribution,
    NumericDistribution,
    distribution_from_dict,
    psi,
)


def test_psi_matches_the_formula() -> None:
    expected, actual = [0.5, 0.5], [0.25, 0.75]
    by_hand = (0.25 - 0.5) * math.log(0.25 / 0.5) + (0.75 - 0.5) * math.log(0.75 / 0.5)
    assert psi(expected, actual) == pytest.approx(by_hand)
    assert psi(expected, expected) == 0.0
    # an empty bin is floored at EPSILON rather than making the sum infinite
    floored = (EPSILON - 0.5) * math.log(EPSILON / 0.5) + 0.5 * math.log(1.0 / 0.5)
    assert psi([0.5, 0.5], [0.0, 1.0]) == pytest.approx(floored)
    with pytest.raises(ValueError, match="shape"):
        psi([1.0], [0.5, 0.5])


def test_numeric_bins_are_reference_deciles() -> None:
    ref = NumericDistribution.fit(np.arange(1, 101, dtype=np.float64))
    assert len(ref.edges) == 9 and ref.shares == pytest.approx([0.1] * 10) and ref.missing == 0
    assert ref.psi(np.arange(1, 101)) == pytest.approx(0.0)
    # a shift of half the range leaves half the reference bins empty: major drift
    assert ref.psi(np.arange(51, 151)) > MAJOR
    # a small shift stays below the moderate threshold
    assert ref.psi(np.arange(2, 102)) < MODERATE


def test_numeric_discrete_values_and_missing() -> None:
    # a capped history length: most values at the cap, quantile edges collapse to fewer bins
    values = pl.Series([20.0] * 70 + [1.0] * 10 + [5.0] * 10 + [None] * 10)
    ref = NumericDistribution.fit(values)
    assert list(ref.edges) == sorted(set(ref.edges)) and len(ref.edges) < 9
    assert ref.missing == pytest.approx(0.1)
    assert sum(ref.shares) + ref.missing == pytest.approx(1.0)
    assert ref.psi(values) == pytest.approx(0.0)
    # every request of a user without behaviours: the missing bin takes everything
    assert ref.psi(pl.Series([None] * 50, dtype=pl.Float64)) > MAJOR
    # NaN counts as missing, as a null does
    assert ref.observed(np.array([np.nan, 20.0]))[-1] == pytest.approx(0.5)


def test_categorical_top_values_and_other() -> None:
    values = ["a"] * 50 + ["b"] * 30 + ["c"] * 15 + ["d"] * 5
    ref = CategoricalDistribution.fit(values, top=2)
    assert ref.values == ("a", "b") and ref.shares == pytest.approx([0.5, 0.3])
    assert ref.other == pytest.approx(0.2)
    assert ref.psi(values) == pytest.approx(0.0)
    # c and d are both "other": swapping them is no drift
    assert ref.psi(["a"] * 50 + ["b"] * 30 + ["d"] * 15 + ["c"] * 5) == pytest.approx(0.0)
    shifted = ["b"] * 60 + ["a"] * 20 + ["e"] * 20
    expected = np.array([0.5, 0.3, 0.2])
    actual = np.array([0.2, 0.6, 0.2])
    assert ref.psi(shifted) == pytest.approx(float(np.sum((actual - expected)
                                                          * np.log(actual / expected))))
    # numbers are compared as strings, nulls as MISSING
    refs = CategoricalDistribution.fit(pl.Series([1, 1, None, 2]))
    assert set(refs.values) == {"1", "2", MISSING}
    assert refs.observed(["1", "1", None, "2"]) == pytest.approx([0.5, 0.25, 0.25, 0.0])
    assert OTHER not in refs.values


def test_weights_count_as_repeated_values() -> None:
    # a weight of 2 is the value twice; the edges stay the unweighted values' deciles
    values = pl.Series([1.0, 2.0, 3.0, None])
    weighted = NumericDistribution.fit(values, n_bins=3, weights=[2.0, 1.0, 1.0, 2.0])
    repeated = NumericDistribution.fit(pl.Series([1.0, 1.0, 2.0, 3.0, None, None]), n_bins=3)
    assert weighted.shares == pytest.approx(repeated.shares)
    assert weighted.missing == pytest.approx(1 / 3)
    assert weighted.observed([1.0, 3.0], [3.0, 1.0]) == pytest.approx(
        weighted.observed([1.0, 1.0, 1.0, 3.0]))
    cats = CategoricalDistribution.fit(["a", "b", "b"], weights=[4.0, 1.0, 1.0])
    assert cats.values == ("a", "b") and cats.shares == pytest.approx([2 / 3, 1 / 3])
    assert cats.psi(["b", "a"], [1.0, 2.0]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="2 weights for 3 values"):
        cats.observed(["a", "b", "c"], [1.0, 1.0])


def test_empty_inputs() -> None:
    ref = NumericDistribution.fit([1.0, 2.0, 3.0])
    assert ref.observed([]).sum() == 0.0  # no rows: all shares zero, PSI still finite
    assert math.isfinite(ref.psi([]))
    assert CategoricalDistribution.fit([]).values == ()


def test_round_trip_and_unknown_keys() -> None:
    for dist in (NumericDistribution.fit(np.arange(30.0)),
                 CategoricalDistribution.fit(["x", "y", "y"])):
        data = dataclasses.asdict(dist)
        # through JSON lists, as reference.json stores them
        data = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
        assert distribution_from_dict(data) == dist
    with pytest.raises(ConfigError, match="unknown keys"):
        distribution_from_dict({"kind": "numeric", "edges": [], "shares": [1.0], "bins": 3})
    with pytest.raises(ConfigError, match="kind"):
        distribution_from_dict({"edges": [], "shares": [1.0]})
    with pytest.raises(ConfigError, match="shares"):
        distribution_from_dict({"kind": "numeric", "edges": [1.0], "shares": [1.0]})
