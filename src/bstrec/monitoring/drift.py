"""Population stability index (PSI) of served values against a training reference.

``PSI = sum_b (a_b - e_b) * ln(a_b / e_b)`` over bins b, with e the reference's share of a bin and
a the served share. Convention (credit scoring, where PSI comes from): below ``MODERATE`` (0.1)
the population is stable, from ``MODERATE`` to ``MAJOR`` (0.25) it moved and deserves a look,
above ``MAJOR`` it changed enough that the model's inputs or outputs no longer look like what it
was trained on.

Bins:

- numeric values: the reference's deciles (``N_BINS`` quantile edges, duplicates merged, so a
  discrete feature such as a capped history length gets fewer, wider bins), open at both ends,
  plus a bin of its own for missing values (a user without behaviours has no freshness);
- categorical values: the reference's ``TOP_VALUES`` most frequent values, the rest pooled in
  ``OTHER``, missing values as ``MISSING``.

A bin empty on one side would make the logarithm infinite: shares are floored at ``EPSILON``
before the sum, so that one empty bin adds a bounded, still large, term. PSI also grows
with sampling noise on small samples (its expectation under no drift is about
``(bins - 1) * (1/n_served + 1/n_reference)``), which is why alerts wait for ``min_requests``.

Why not Evidently, the field's drift tool: its tests compare two full datasets, so a bundle would
have to ship raw reference rows rather than a few edges and shares in ``reference.json``; it
brings pandas, SciPy, Plotly and more into a service that has none of them; and it builds a report
object per run, while the alerts recompute PSI on the last few thousand impressions at every
Prometheus scrape, where a ``searchsorted`` and a ``bincount`` per feature cost microseconds. Its
PSI is the same formula on the same quantile bins; nothing here needs its other statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import polars as pl

MODERATE = 0.1
MAJOR = 0.25
N_BINS = 10
TOP_VALUES = 20
EPSILON = 1e-4
OTHER = "<other>"
MISSING = "<missing>"

F64 = npt.NDArray[np.float64]
Categories = pl.Series | Sequence[Any] | npt.NDArray[Any]


def psi(expected: npt.ArrayLike, actual: npt.ArrayLike, epsilon: float = EPSILON) -> float:
    """PSI of two share vectors over the same bins (each summing to 1; floored at ``epsilon``)."""
    e = np.maximum(np.asarray(expected, dtype=np.float64), epsilon)
    a = np.maximum(np.asarray(actual, dtype=np.float64), epsilon)
    if e.shape != a.shape:
        raise ValueError(f"share vectors differ in shape: {e.shape} vs {a.shape}")
    return float(np.sum((a - e) * np.log(a / e)))


def _shares(counts: F64) -> F64:
    total = counts.sum()
    out: F64 = counts / total if total > 0 else np.zeros_like(counts)
    return out


@dataclass(frozen=True)
class NumericDistribution:
    """Reference shares of ``len(edges) + 1`` bins ``(-inf, e0], (e0, e1], ..., (e_last, inf)``
    and of missing values. (``bstrec.config.from_dict`` fills it; unknown keys are errors.)"""

    edges: tuple[float, ...]
    shares: tuple[float, ...]
    missing: float = 0.0
    kind: Literal["numeric"] = "numeric"

    def __post_init__(self) -> None:
        if len(self.shares) != len(self.edges) + 1:
            raise ValueError(f"{len(self.edges)} edges need {len(self.edges) + 1} shares, got "
                             f"{len(self.shares)}")
        if list(self.edges) != sorted(set(self.edges)):
            raise ValueError("edges must be strictly increasing")

    @classmethod
    def fit(cls, values: pl.Series | npt.ArrayLike, n_bins: int = N_BINS,
            weights: npt.ArrayLike | None = None) -> NumericDistribution:
        """The reference distribution of ``values`` (nulls and NaNs are missing values);
        ``weights``: each value's (default 1), for the shares, not the edges."""
        x, ok = _numeric(values)
        if not ok.any():
            return cls(edges=(), shares=(0.0,), missing=1.0 if x.size else 0.0)
        edges = np.unique(np.quantile(x[ok], np.arange(1, n_bins) / n_bins))
        shares = cls(edges=tuple(edges.tolist()), shares=(0.0,) * (len(edges) + 1)
                     ).observed(values, weights)
        return cls(edges=tuple(edges.tolist()), shares=tuple(shares[:-1].tolist()),
                   missing=float(shares[-1]))

    def observed(self, values: pl.Series | npt.ArrayLike,
                 weights: npt.ArrayLike | None = None) -> F64:
        """Shares of ``values`` (weighted by ``weights``, default 1 each) in this
        distribution's bins, the missing bin last."""
        x, ok = _numeric(values)
        w = _weights(weights, x.size)
        bins = np.searchsorted(np.asarray(self.edges, dtype=np.float64), x[ok], side="left")
        counts = np.bincount(bins, weights=w[ok], minlength=len(self.shares))
        return _shares(np.append(counts, w[~ok].sum()))

    def expected(self) -> F64:
        return np.array([*self.shares, self.missing], dtype=np.float64)

    def psi(self, values: pl.Series | npt.ArrayLike, weights: npt.ArrayLike | None = None
            ) -> float:
        return psi(self.expected(), self.observed(values, weights))


@dataclass(frozen=True)
class CategoricalDistribution:
    """Reference shares of its most frequent ``values`` and of everything else (``other``).
    (``bstrec.config.from_dict`` fills it; unknown keys are errors.)"""

    values: tuple[str, ...]
    shares: tuple[float, ...]
    other: float = 0.0
    kind: Literal["categorical"] = "categorical"

    def __post_init__(self) -> None:
        if len(self.values) != len(self.shares):
            raise ValueError(f"{len(self.values)} values but {len(self.shares)} shares")

    @classmethod
    def fit(cls, values: Categories, top: int = TOP_VALUES,
            weights: npt.ArrayLike | None = None) -> CategoricalDistribution:
        """The reference distribution of ``values`` (compared as strings; nulls are MISSING;
        ``weights``: each value's, default 1)."""
        s = _categorical(values)
        if s.is_empty():
            return cls(values=(), shares=(), other=0.0)
        w = _weights(weights, len(s))
        # counted by NumPy in sorted-value order, not by a parallel group_by whose summation
        # order varies between runs: the same data must give bit-identical shares
        uniq, codes = np.unique(s.to_numpy(), return_inverse=True)
        counts = np.bincount(codes.ravel(), weights=w, minlength=len(uniq))
        # stable, so that ties keep value order and the same data keeps the same top values
        order = np.argsort(-counts, kind="stable")
        head, n = order[:top], float(w.sum())
        return cls(values=tuple(str(v) for v in uniq[head]),
                   shares=tuple((counts[head] / n).tolist()),
                   other=float(counts[order[top:]].sum()) / n)

    def observed(self, values: Categories, weights: npt.ArrayLike | None = None) -> F64:
        """Shares of ``values`` (weighted by ``weights``, default 1 each) over this
        distribution's values, ``other`` last."""
        s = _categorical(values)
        if s.is_empty():
            return np.zeros(len(self.values) + 1)
        index = pl.Series(range(len(self.values)), dtype=pl.Int64)
        codes = s.replace_strict(pl.Series(self.values, dtype=pl.String), index,
                                 default=len(self.values), return_dtype=pl.Int64).to_numpy()
        counts = np.bincount(codes, weights=_weights(weights, len(s)),
                             minlength=len(self.values) + 1)
        return _shares(counts.astype(np.float64))

    def expected(self) -> F64:
        return np.array([*self.shares, self.other], dtype=np.float64)

    def psi(self, values: Categories, weights: npt.ArrayLike | None = None) -> float:
        return psi(self.expected(), self.observed(values, weights))


Distribution = NumericDistribution | CategoricalDistribution


def distribution_from_dict(data: dict[str, Any], *, where: str = "distribution") -> Distribution:
    """A distribution from its ``dataclasses.asdict`` form (``kind`` says which)."""
    from bstrec.config import ConfigError, from_dict

    kind = data.get("kind")
    if kind == "numeric":
        return from_dict(NumericDistribution, data, where=where)
    if kind == "categorical":
        return from_dict(CategoricalDistribution, data, where=where)
    raise ConfigError(f"{where}: kind must be 'numeric' or 'categorical', got {kind!r}")


def _numeric(values: pl.Series | npt.ArrayLike) -> tuple[F64, npt.NDArray[np.bool_]]:
    """The values as float64, and which are present (not null or NaN)."""
    if isinstance(values, pl.Series):
        x = values.cast(pl.Float64).to_numpy()  # nulls become NaN
    else:
        x = np.asarray(values, dtype=np.float64).ravel()
    return x, np.isfinite(x)


def _weights(weights: npt.ArrayLike | None, n: int) -> F64:
    if weights is None:
        return np.ones(n)
    w = np.asarray(weights, dtype=np.float64).ravel()
    if w.shape != (n,):
        raise ValueError(f"{w.size} weights for {n} values")
    return w


def _categorical(values: Categories) -> pl.Series:
    if isinstance(values, pl.Series):
        s = values
    else:
        s = pl.Series("value", values if isinstance(values, np.ndarray) else list(values))
    return s.cast(pl.String).fill_null(MISSING).rename("value")
