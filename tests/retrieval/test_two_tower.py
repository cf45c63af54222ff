"""The two-tower: shapes and norms, a short training run that learns, checkpoint round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bstrec.config import ConfigError, from_dict
from bstrec.data.samples import SampleSet
from bstrec.retrieval.catalog import Catalog, QuerySet
from bstrec.retrieval.topk import list_metrics, top_k
from bstrec.retrieval.train import (
    RetrieverTrainConfig,
    item_vectors,
    load_retriever,
    retrieve,
    train_two_tower,
)
from bstrec.retrieval.two_tower import TwoTower, TwoTowerConfig
from bstrec.training.tensors import TensorSplit
from tests.ranking.test_models import make_batch, make_spec

FAST = RetrieverTrainConfig(batch_size=64, max_epochs=6, patience=0, lr=5e-3, temperature=0.1,
                            eval_k=5, num_threads=1)


@pytest.mark.parametrize("encoder", ["mean", "transformer"])
def test_towers_give_unit_vectors_even_without_history(tiny_samples: SampleSet,
                                                       encoder: str) -> None:
    spec = tiny_samples.spec
    model = TwoTower(spec, TwoTowerConfig(dim=8, token_dim=8, heads=2, encoder=encoder))  # type: ignore[arg-type]
    data = TensorSplit.from_frame(tiny_samples.splits["train"].head(16), spec)
    b = data.batch(torch.arange(16))
    b["hist_mask"][0] = False  # an empty history
    b["hist_item"][0] = 0
    u = model.encode_users(b)
    cat = Catalog.from_samples(tiny_samples)
    v = model.encode_items(cat.batch(torch.arange(cat.size)))
    assert u.shape == (16, 8) and v.shape == (cat.size, 8)
    assert torch.allclose(u.norm(dim=-1), torch.ones(16), atol=1e-5)
    assert torch.isfinite(u).all() and torch.isfinite(v).all()
    # the user tower never reads the target's columns
    b2 = {k: t.clone() for k, t in b.items()}
    b2["item"] = torch.zeros_like(b2["item"])
    b2["category"] = torch.zeros_like(b2["category"])
    model.eval()
    assert torch.equal(model.encode_users(b), model.encode_users(b2))


def test_unknown_config_keys_are_errors() -> None:
    with pytest.raises(ConfigError, match="unknown keys"):
        from_dict(TwoTowerConfig, {"encoderr": "mean"})
    with pytest.raises(ConfigError):
        from_dict(RetrieverTrainConfig, {"negatives": "sometimes"})


@pytest.mark.parametrize("negatives", ["none", "hard"])
def test_training_learns_next_items(tiny_samples: SampleSet, negatives: str,
                                    tmp_path: Path) -> None:
    cfg = RetrieverTrainConfig(**{**FAST.__dict__, "negatives": negatives, "n_negatives": 4,
                                  "hard_pool": 8, "hard_from_epoch": 2})
    model, result = train_two_tower(tiny_samples, cfg, TwoTowerConfig(dim=16, token_dim=16,
                                                                      encoder="mean"),
                                    out_dir=tmp_path / "tt", progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]
    q = QuerySet.from_samples(tiny_samples, "test")
    cat = Catalog.from_samples(tiny_samples)
    _, ids = retrieve(model, cat, q, 5)
    got = list_metrics(ids, q.targets, (5,))["recall@5"]
    # 32 items: a random list of 5 finds the next item ~16% of the time
    assert got > 0.5
    # the saved checkpoint gives the same vectors
    back, cat2 = load_retriever(tmp_path / "tt")
    assert torch.allclose(item_vectors(back, cat2), item_vectors(model, cat), atol=1e-6)


def test_retrieve_excludes_seen_items(tiny_samples: SampleSet) -> None:
    torch.manual_seed(0)
    model = TwoTower(tiny_samples.spec, TwoTowerConfig(dim=8, token_dim=8, encoder="mean"))
    q = QuerySet.from_samples(tiny_samples, "test")
    cat = Catalog.from_samples(tiny_samples)
    _, ids = retrieve(model, cat, q, cat.size)
    for j in range(len(q)):
        seen = set(q.seen_items[q.seen_offsets[j]:q.seen_offsets[j + 1]].tolist())
        row = [i for i in ids[j].tolist() if i >= 0]
        assert not seen & set(row)
        assert len(row) == len(cat.candidates) - len(seen)  # everything else, once
    s, i = top_k(np.array([[9.0, 9.0, 1.0, 3.0]]), 3, np.array([[False, False, False, True]]))
    assert i.tolist() == [[2, -1, -1]] and np.isneginf(s[0, 1:]).all()


@pytest.mark.parametrize("encoder", ["mean", "transformer"])
def test_time_buckets_is_the_bucketing_the_user_tower_computes(encoder: str) -> None:
    """63 s and 1024 s share the last of 8 buckets but not buckets of 30: a user's vector
    changes with them only when the tower has 30; use_time off ignores time altogether."""
    spec = make_spec()
    b = make_batch(spec, 8, min_len=spec.max_len)

    def vectors(dt: int, **overrides: object) -> torch.Tensor:
        torch.manual_seed(0)
        model = TwoTower(spec, TwoTowerConfig(**{"dim": 8, "token_dim": 8, "heads": 2,  # type: ignore[arg-type]
                                                 "encoder": encoder, "init_std": 1.0,
                                                 **overrides})).eval()
        with torch.no_grad():
            return model.encode_users({**b, "hist_dt": torch.full_like(b["hist_dt"], dt)})

    assert torch.equal(vectors(63, time_buckets=8), vectors(1024, time_buckets=8))
    assert not torch.allclose(vectors(63, time_buckets=30), vectors(1024, time_buckets=30),
                              atol=1e-4)
    assert torch.equal(vectors(5, use_time=False), vectors(10**7, use_time=False))
    with pytest.raises(ValueError, match="time_buckets"):
        TwoTowerConfig(time_buckets=1)
    model = TwoTower(spec, TwoTowerConfig(time_buckets=8))
    assert model.buckets is not None and model.buckets.n_buckets == 8
    assert model.time_emb is not None and model.time_emb.num_embeddings == 8
