"""P2 queries and the catalog: seen items follow the P1 order, targets, item features."""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

from bstrec.data.samples import SampleConfig, SampleSet, build_samples
from bstrec.data.schema import Dataset, normalize_events
from bstrec.features.spec import OOV
from bstrec.retrieval.catalog import Catalog, QuerySet, encode_new_items


def test_catalog_rows_are_the_train_items(tiny_samples: SampleSet) -> None:
    cat = Catalog.from_samples(tiny_samples)
    n = tiny_samples.spec.vocab_size("item_id")
    assert cat.size == n and cat.candidates.tolist() == list(range(2, n))
    train = tiny_samples.splits["train"]
    row = train.row(0, named=True)
    assert int(cat.features["category"][row["item"]]) == row["category"]
    assert sorted(cat.features["item_genres"][row["item"]].tolist()) == \
        sorted(row["item_genres"] + [0] * (cat.features["item_genres"].shape[1] -
                                           len(row["item_genres"])))
    b = cat.batch(torch.tensor([row["item"], OOV]))
    assert b["item"].tolist() == [row["item"], OOV]


def test_seen_items_are_everything_rated_before_in_p1_order() -> None:
    # user 1 rates 10, 11 and 12 at the same second then 13: ties are ordered by item id
    ev = normalize_events(pl.DataFrame({
        "user_id": [1, 1, 1, 1, 2, 2, 2, 2, 2, 2], "item_id": [12, 10, 11, 13, 10, 11, 12, 13, 14, 15],
        "timestamp": [100, 100, 100, 200, 1, 2, 3, 4, 5, 6],
        "value": [5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0], "action": ["r"] * 10}))
    items = pl.DataFrame({"item_id": [10, 11, 12, 13, 14, 15], "category": ["a"] * 6})
    users = pl.DataFrame({"user_id": [1, 2]})
    s = build_samples(Dataset("t", ev, items, users), SampleConfig(split_quantiles=(0.5, 0.6)))
    q = QuerySet.from_samples(s, "test")
    enc = {v: i + 2 for i, v in enumerate(s.vocabs["item_id"].values)}
    test = s.splits["test"].filter(pl.col("label") == 1)
    assert len(q) == test.height
    for j, (u, item) in enumerate(zip(test["user_id"], test["item_id"], strict=True)):
        seen = set(q.seen_items[q.seen_offsets[j]:q.seen_offsets[j + 1]].tolist())
        ts = dict(zip(ev.filter(pl.col("user_id") == u)["item_id"],
                      ev.filter(pl.col("user_id") == u)["timestamp"], strict=True))
        before = {i for i in ts if (ts[i], i) < (ts[item], item)}
        assert seen == {enc[i] for i in before if i in enc}
        mask = q.seen_mask(np.array([j]), len(s.vocabs["item_id"]))
        assert set(np.flatnonzero(mask[0]).tolist()) == seen
    sub = q.subset(np.array([len(q) - 1]))
    assert len(sub) == 1 and sub.seen_count()[0] == q.seen_count()[-1]


def test_new_items_are_encoded_by_content(tiny_samples: SampleSet) -> None:
    new = pl.DataFrame({"item_id": [999], "category": ["c1"], "year": ["1991"],
                        "genres": [["g1", "unheard-of"]]})
    b = encode_new_items(new, tiny_samples.spec, tiny_samples.vocabs, 3)
    v = tiny_samples.vocabs
    assert b["item"].tolist() == [OOV]
    assert b["category"].tolist() == v["category"].encode_values(["c1"])
    assert b["item_genres"].tolist() == [[*v["item_genres"].encode_values(["g1"]), OOV, 0]]
