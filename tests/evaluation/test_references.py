from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from bstrec.evaluation.references import (
    fit_logistic,
    item_rate_reference,
    logit,
    predict_logistic,
    rate_features,
    rate_lr_fit,
    reference_scores,
    sigmoid,
    smoothed_rates,
)


def test_item_rate_hand_case() -> None:
    # item 1: 2 of 3 positive; item 2: 0 of 1; global 2/4; item 3 unseen
    got = item_rate_reference([1, 1, 1, 2], [1, 1, 0, 0], [1, 2, 3, 1])
    np.testing.assert_allclose(got, [2 / 3, 0.0, 0.5, 2 / 3])


def test_smoothed_rates_hand_case() -> None:
    # global rate 3/4: 20 pseudo-samples add 15 positives
    keys, labels = [1, 1, 2, 2], [1, 1, 1, 0]
    got = smoothed_rates(keys, labels, [1, 2, 9])
    np.testing.assert_allclose(got, [(2 + 15) / 22, (1 + 15) / 22, 0.75])
    np.testing.assert_allclose(smoothed_rates(keys, labels, [1], pseudo=2.0), [(2 + 1.5) / 4])


def test_rate_features_are_logits_of_user_and_item_rates() -> None:
    train = pl.DataFrame({"user_id": [1, 1, 2], "item_id": [7, 8, 7], "label": [1.0, 0.0, 1.0]})
    frame = pl.DataFrame({"user_id": [1, 3], "item_id": [7, 9]})
    g = 2 / 3
    user = [(1 + 20 * g) / 22, g]
    item = [(2 + 20 * g) / 22, g]
    np.testing.assert_allclose(rate_features(train, frame), np.stack([logit(user), logit(item)], 1))


def test_fit_logistic_recovers_coefficients() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40_000, 2))
    true = np.array([1.5, -0.7, 0.3])
    y = (rng.random(40_000) < sigmoid(x @ true[:2] + true[2])).astype(np.float64)
    coef = fit_logistic(x, y)
    np.testing.assert_allclose(coef, true, atol=0.06)
    np.testing.assert_allclose(predict_logistic(coef, x[:3]), sigmoid(x[:3] @ coef[:2] + coef[2]))


def synthetic_splits(seed: int = 0) -> tuple[dict[str, pl.DataFrame], np.ndarray]:
    """Train with varied user/item rates; valid labels drawn from a known LR on rate logits."""
    rng = np.random.default_rng(seed)
    n_users, n_items = 300, 200
    u_rate, i_rate = rng.beta(2, 2, n_users), rng.beta(2, 2, n_items)

    def frame(n: int) -> pl.DataFrame:
        u, i = rng.integers(0, n_users, n), rng.integers(0, n_items, n)
        y = (rng.random(n) < (u_rate[u] + i_rate[i]) / 2).astype(np.float32)
        return pl.DataFrame({"user_id": u, "item_id": i, "label": y})

    train = frame(30_000)
    valid = frame(40_000)
    true = np.array([0.8, 1.2, -0.2])
    f = rate_features(train, valid)
    y = (rng.random(valid.height) < sigmoid(f @ true[:2] + true[2])).astype(np.float32)
    valid = valid.with_columns(pl.Series("label", y))
    test = frame(5_000).vstack(pl.DataFrame(  # an unseen user and an unseen item
        {"user_id": [10_000], "item_id": [10_000], "label": [1.0]},
        schema={"user_id": pl.Int64, "item_id": pl.Int64, "label": pl.Float32}))
    return {"train": train, "valid": valid, "test": test}, true


def test_rate_lr_fit_on_valid_recovers_known_coefficients() -> None:
    splits, true = synthetic_splits()
    coef = rate_lr_fit(splits["train"], splits["valid"])
    np.testing.assert_allclose(coef, true, atol=0.08)


def test_reference_scores_on_test() -> None:
    splits, _ = synthetic_splits(1)
    out = reference_scores(splits)
    assert set(out) == {"item_rate", "rate_lr"}
    n = splits["test"].height
    assert all(v.shape == (n,) for v in out.values())
    train = splits["train"]
    glob = float(train["label"].mean())  # type: ignore[arg-type]
    assert out["item_rate"][-1] == pytest.approx(glob)
    coef = rate_lr_fit(train, splits["valid"])
    unseen = sigmoid(coef[0] * logit(glob) + coef[1] * logit(glob) + coef[2])
    assert out["rate_lr"][-1] == pytest.approx(float(unseen))
    assert ((out["rate_lr"] > 0) & (out["rate_lr"] < 1)).all()
