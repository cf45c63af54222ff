"""The two count-based references of protocol rule P1.8 (../shared/PROTOCOL.md).

Neither learns an embedding, so a results table that carries them shows what a learned model
adds over counting:

- ``item_rate``: the target item's positive rate in train (unseen item: the global train rate);
- ``rate_lr``: a logistic regression on the logits of the user's and the item's positive rates
  in train, each smoothed with 20 pseudo-samples at the global train rate (unseen: the global
  rate), its three coefficients (two weights and a bias) fitted on valid by Newton's method.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import polars as pl

FloatArray = npt.NDArray[np.float64]

PSEUDO_SAMPLES = 20.0
# Keeps the logits finite when a rate is exactly 0 or 1 (only possible without smoothing).
RATE_EPS = 1e-6


def _rates(train_keys: npt.ArrayLike, train_labels: npt.ArrayLike, keys: npt.ArrayLike,
           pseudo: float) -> FloatArray:
    """(positives + pseudo x global) / (count + pseudo) of each key in train; unseen -> global."""
    y = np.asarray(train_labels, dtype=np.float64).ravel()
    k = pl.Series("key", np.asarray(train_keys).ravel())
    if k.len() != y.size:
        raise ValueError(f"{k.len()} train keys but {y.size} train labels")
    if y.size == 0:
        raise ValueError("no train samples: the rates are undefined")
    glob = float(y.mean())
    stats = (pl.DataFrame([k, pl.Series("y", y)]).group_by("key")
             .agg(pl.col("y").sum().alias("pos"), pl.len().cast(pl.Float64).alias("n")))
    query = pl.DataFrame([pl.Series("key", np.asarray(keys).ravel()).cast(k.dtype)])
    joined = query.join(stats, on="key", how="left", maintain_order="left")
    pos = joined["pos"].fill_null(0.0).to_numpy()
    n = joined["n"].fill_null(0.0).to_numpy()
    if pseudo == 0:
        return np.where(n > 0, pos / np.maximum(n, 1.0), glob)
    out: FloatArray = (pos + pseudo * glob) / (n + pseudo)
    return out


def item_rate_reference(train_item_ids: npt.ArrayLike, train_labels: npt.ArrayLike,
                        item_ids: npt.ArrayLike) -> FloatArray:
    """(N,) train positive rate of each item in ``item_ids``; unseen items get the global rate."""
    return _rates(train_item_ids, train_labels, item_ids, pseudo=0.0)


def smoothed_rates(train_keys: npt.ArrayLike, train_labels: npt.ArrayLike, keys: npt.ArrayLike,
                   pseudo: float = PSEUDO_SAMPLES) -> FloatArray:
    """(N,) positive rate of each key in train smoothed with ``pseudo`` samples at the global
    train rate: (positives + pseudo x global) / (count + pseudo). Unseen keys get the global rate.
    """
    return _rates(train_keys, train_labels, keys, pseudo=pseudo)


def logit(p: npt.ArrayLike) -> FloatArray:
    q = np.clip(np.asarray(p, dtype=np.float64), RATE_EPS, 1.0 - RATE_EPS)
    out: FloatArray = np.log(q) - np.log1p(-q)
    return out


def sigmoid(z: npt.ArrayLike) -> FloatArray:
    x = np.asarray(z, dtype=np.float64)
    # tanh form: exact at both tails, no overflow warning
    out: FloatArray = 0.5 * (1.0 + np.tanh(0.5 * x))
    return out


def fit_logistic(x: npt.ArrayLike, y: npt.ArrayLike, *, l2: float = 1e-8, max_iter: int = 100,
                 tol: float = 1e-10) -> FloatArray:
    """Logistic regression by Newton's method (IRLS) on features ``x`` (N, D), labels (N,).

    Returns (D + 1,) coefficients: the D weights, then the bias. ``l2`` (on the weights only) is a
    tiny ridge that keeps the Hessian invertible when the data are separable or collinear.
    """
    xs = np.asarray(x, dtype=np.float64)
    if xs.ndim != 2:
        raise ValueError(f"x must be (N, D), got shape {xs.shape}")
    ys = np.asarray(y, dtype=np.float64).ravel()
    if ys.size != xs.shape[0]:
        raise ValueError(f"{xs.shape[0]} rows but {ys.size} labels")
    a = np.hstack([xs, np.ones((xs.shape[0], 1))])
    d = a.shape[1]
    ridge = np.full(d, l2 * max(ys.size, 1))
    ridge[-1] = 0.0
    beta = np.zeros(d)
    for _ in range(max_iter):
        p = sigmoid(a @ beta)
        grad = a.T @ (p - ys) + ridge * beta
        hess = (a * (p * (1.0 - p))[:, None]).T @ a + np.diag(ridge)
        step = np.linalg.solve(hess + 1e-12 * np.eye(d), grad)
        beta -= step
        if float(np.max(np.abs(step))) < tol:
            break
    return beta


def predict_logistic(coef: npt.ArrayLike, x: npt.ArrayLike) -> FloatArray:
    """(N,) probabilities of ``fit_logistic`` coefficients (weights then bias) on ``x`` (N, D)."""
    c = np.asarray(coef, dtype=np.float64)
    return sigmoid(np.asarray(x, dtype=np.float64) @ c[:-1] + c[-1])


def rate_features(train: pl.DataFrame, frame: pl.DataFrame,
                  pseudo: float = PSEUDO_SAMPLES) -> FloatArray:
    """(N, 2) logits of the user's and the item's smoothed train positive rates for ``frame``'s
    rows (raw ``user_id``, ``item_id``; ``train`` also needs ``label``)."""
    y = train["label"].to_numpy()
    user = smoothed_rates(train["user_id"].to_numpy(), y, frame["user_id"].to_numpy(), pseudo)
    item = smoothed_rates(train["item_id"].to_numpy(), y, frame["item_id"].to_numpy(), pseudo)
    return np.stack([logit(user), logit(item)], axis=1)


def rate_lr_fit(train: pl.DataFrame, valid: pl.DataFrame) -> FloatArray:
    """The rate LR's coefficients [w_user, w_item, bias]: rates counted on train, fit on valid."""
    return fit_logistic(rate_features(train, valid), valid["label"].to_numpy())


def rate_lr_reference(train: pl.DataFrame, valid: pl.DataFrame,
                      frame: pl.DataFrame) -> FloatArray:
    """(N,) probabilities of the rate LR (fitted on ``valid``) for the rows of ``frame``."""
    return predict_logistic(rate_lr_fit(train, valid), rate_features(train, frame))


def reference_scores(splits: dict[str, pl.DataFrame], split: str = "test") -> dict[str, FloatArray]:
    """Both references' scores on ``splits[split]`` from the ``train`` and ``valid`` splits.

    Frames need raw ``user_id``, ``item_id`` and ``label`` columns (as in ``SampleSet.splits``).
    Returns {"item_rate": (N,), "rate_lr": (N,)}.
    """
    train, valid, target = splits["train"], splits["valid"], splits[split]
    return {
        "item_rate": item_rate_reference(train["item_id"].to_numpy(), train["label"].to_numpy(),
                                         target["item_id"].to_numpy()),
        "rate_lr": rate_lr_reference(train, valid, target),
    }
