"""A tiny behaviour log with structure a retriever can learn: users walk through the items of
one category in order (item k of a category is followed by item k+1), profile = gender."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from bstrec.data.samples import SampleConfig, SampleSet, build_samples
from bstrec.data.schema import Dataset, normalize_events
from bstrec.retrieval.train import RetrieverTrainConfig, train_two_tower
from bstrec.retrieval.two_tower import TwoTower, TwoTowerConfig

N_CATS, PER_CAT, N_USERS = 4, 8, 160


def tiny_dataset(seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    items = pl.DataFrame({
        "item_id": np.arange(1, N_CATS * PER_CAT + 1, dtype=np.int64),
        "category": [f"c{(i - 1) // PER_CAT}" for i in range(1, N_CATS * PER_CAT + 1)],
        "year": [str(1990 + (i - 1) // PER_CAT) for i in range(1, N_CATS * PER_CAT + 1)],
        "genres": [[f"g{(i - 1) // PER_CAT}", "all"] for i in range(1, N_CATS * PER_CAT + 1)],
    })
    rows: list[tuple[int, int, int, float]] = []
    t0 = 1_000_000_000
    for u in range(1, N_USERS + 1):
        cat = u % N_CATS  # gender (below) follows the category: a context signal
        start = int(rng.integers(0, PER_CAT - 5))
        n = int(rng.integers(3, PER_CAT - start + 1))
        t = t0 + int(rng.integers(0, 86_400 * 30))
        for k in range(n):
            item = cat * PER_CAT + start + k + 1
            rows.append((u, item, t, 5.0 if rng.random() < 0.8 else 2.0))
            t += int(rng.integers(60, 86_400))
    u_, i_, t_, v_ = zip(*rows, strict=True)
    events = normalize_events(pl.DataFrame({
        "user_id": np.array(u_, dtype=np.int64), "item_id": np.array(i_, dtype=np.int64),
        "timestamp": np.array(t_, dtype=np.int64), "value": np.array(v_, dtype=np.float64),
        "action": ["rating"] * len(rows)}))
    users = pl.DataFrame({"user_id": np.arange(1, N_USERS + 1, dtype=np.int64),
                          "gender": ["F" if u % N_CATS < 2 else "M" for u in range(1, N_USERS + 1)]})
    return Dataset("tiny", events, items, users, feedback="explicit", user_features=("gender",),
                   item_features=("year",), item_multi_features=("genres",))


@pytest.fixture(scope="session")
def tiny_samples() -> SampleSet:
    return build_samples(tiny_dataset(), SampleConfig(max_len=5))


@pytest.fixture(scope="session")
def tiny_model(tiny_samples: SampleSet) -> TwoTower:
    """A two-tower trained briefly on the tiny log (id dropout high enough for cold items)."""
    model, _ = train_two_tower(
        tiny_samples, RetrieverTrainConfig(batch_size=64, max_epochs=6, patience=0, lr=5e-3,
                                           temperature=0.1, eval_k=5, num_threads=1),
        TwoTowerConfig(dim=16, token_dim=16, encoder="mean", item_id_dropout=0.3),
        progress=False)
    return model
