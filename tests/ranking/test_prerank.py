"""The distilled pre-ranker (ranking/prerank.py) and its distillation task (training/distill.py):
shapes, pooling (history order and padding do not matter), request scoring equal to the batch
forward, the loss against hand-computed values, and a short distillation that learns BST's
order on retrieved candidates."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bstrec.config import ConfigError, from_dict
from bstrec.features.vocab import Vocabularies, Vocabulary
from bstrec.ranking import build_ranker
from bstrec.ranking.prerank import PreRankConfig, PreRanker
from bstrec.ranking.request import broadcast, item_names, shared_names
from bstrec.retrieval.catalog import Catalog
from bstrec.training.checkpoint import load_checkpoint, save_checkpoint
from bstrec.training.distill import (
    HAS_LABEL,
    PRERANK,
    TEACHER,
    DistillConfig,
    build_prerank,
    distill_loss,
    teacher_rows,
    train_prerank,
)
from bstrec.training.loop import predict_logits
from bstrec.training.tensors import TensorSplit
from tests.ranking.test_models import (
    N_ITEMS,
    history_task,
    item_category,
    make_batch,
    make_spec,
    perturb_padding,
)

torch.set_num_threads(1)


def model(**overrides: object) -> PreRanker:
    torch.manual_seed(0)
    return PreRanker(make_spec(), from_dict(PreRankConfig, dict(overrides)))


def catalog() -> Catalog:
    spec = make_spec()
    g = torch.Generator().manual_seed(5)
    item = torch.arange(N_ITEMS + 2)
    genres = torch.randint(0, 7, (N_ITEMS + 2, 3), generator=g)
    return Catalog(spec, {"item": item, "category": item_category(item), "item_genres": genres})


def test_logits_shape_and_empty_history() -> None:
    m = model().eval()
    b = make_batch(make_spec(), 17, seed=0)
    b["hist_mask"][:3] = False
    out = m(b)
    assert out.shape == (17,)
    assert torch.isfinite(out).all()


def test_history_is_pooled_order_and_padding_do_not_matter() -> None:
    m = model().eval()
    spec = make_spec()
    b = make_batch(spec, 32, seed=1, min_len=spec.max_len)  # full histories: any permutation
    perm = torch.randperm(spec.max_len, generator=torch.Generator().manual_seed(0))
    shuffled = {**b, **{k: b[k][:, perm] for k in ("hist_item", "hist_cat", "hist_dt")}}
    with torch.no_grad():
        torch.testing.assert_close(m(shuffled), m(b))
        short = make_batch(spec, 32, seed=2)
        torch.testing.assert_close(m(perturb_padding(short)), m(short))


def test_no_attention_and_far_fewer_parameters_than_bst() -> None:
    spec = make_spec()
    m = model()
    names = {type(x).__name__ for x in m.modules()}
    assert not names & {"TransformerBlock", "MultiheadAttention", "LocalActivationUnit"}
    bst = build_ranker("bst", spec, {})
    assert sum(p.numel() for p in m.parameters()) * 10 < sum(p.numel() for p in bst.parameters())


@pytest.mark.parametrize("n", [1, 7, 40])
def test_forward_request_equals_forward_on_the_broadcast_batch(n: int) -> None:
    m = model().eval()
    spec = make_spec()
    b = make_batch(spec, n, seed=n)
    items = {k: b[k] for k in item_names(spec)}
    with torch.no_grad():
        for r in range(min(n, 3)):
            shared = {k: b[k][r:r + 1] for k in shared_names(spec)}
            torch.testing.assert_close(m.forward_request(shared, items),
                                       m(broadcast(shared, items)))


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="hidden"):
        PreRankConfig(hidden=0)
    with pytest.raises(ValueError, match="mlp"):
        PreRankConfig(mlp=(0,))
    with pytest.raises(ConfigError):
        from_dict(PreRankConfig, {"hiden": 8})
    with pytest.raises(ValueError, match="alpha"):
        DistillConfig(alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        DistillConfig(temperature=0.0)


def test_config_changes_the_computation() -> None:
    a, b = model(hidden=8), model(hidden=16)
    assert a.user.out_features == 8 and b.user.out_features == 16
    assert model(mlp=(4, 4)).mlp[0].out_features == 4  # type: ignore[union-attr]


def test_distill_loss_against_hand_computed_values() -> None:
    s = torch.tensor([0.5, -1.0, 2.0])
    t = torch.tensor([1.0, -2.0, 0.0])
    y = torch.tensor([1.0, 0.0, 0.0])
    has = torch.tensor([1.0, 1.0, 0.0])

    def bce(z: float, p: float) -> float:  # -[p log sigmoid(z) + (1-p) log(1 - sigmoid(z))]
        return -(p * math.log(1 / (1 + math.exp(-z))) + (1 - p) * math.log(1 / (1 + math.exp(z))))

    T, alpha = 2.0, 0.3
    kd = T * T * np.mean([bce(si / T, 1 / (1 + math.exp(-ti / T)))
                          for si, ti in zip(s.tolist(), t.tolist(), strict=True)])
    hard = (bce(0.5, 1.0) + bce(-1.0, 0.0)) / 2  # the labelled rows only
    got = float(distill_loss(s, t, y, has, alpha, T))
    assert got == pytest.approx(alpha * kd + (1 - alpha) * hard, rel=1e-5)
    # no labelled row: the teacher term alone
    got0 = float(distill_loss(s, t, y, torch.zeros(3), alpha, T))
    assert got0 == pytest.approx(alpha * kd, rel=1e-5)


def test_distill_loss_teacher_term_is_minimal_at_the_teachers_logits() -> None:
    t = torch.tensor([1.5, -0.5, 3.0])
    s = t.clone().requires_grad_(True)
    distill_loss(s, t, torch.zeros(3), torch.zeros(3), 1.0, 2.0).backward()  # type: ignore[no-untyped-call]
    assert s.grad is not None
    torch.testing.assert_close(s.grad, torch.zeros(3), atol=1e-7, rtol=0.0)


def test_teacher_rows_layout() -> None:
    spec = make_spec()
    teacher = build_ranker("bst", spec, {"mlp": [16]}).eval()
    data = TensorSplit(make_batch(spec, 5, seed=3))
    cands = np.array([[2, 3, -1], [4, -1, -1], [5, 6, 7], [-1, -1, -1], [8, 9, 10]])
    rows = teacher_rows(teacher, data, catalog(), cands)
    t = rows.tensors
    assert len(rows) == 5 + 9
    torch.testing.assert_close(t[HAS_LABEL], torch.tensor([1.0] * 5 + [0.0] * 9))
    torch.testing.assert_close(t["label"][:5], data.tensors["label"])
    # candidates are the targets, with their own item features; the user side is the sample's
    assert t["item"][5:].tolist() == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    torch.testing.assert_close(t["category"][5:], item_category(t["item"][5:]))
    assert t["user"][5:].tolist() == data.tensors["user"][[0, 0, 1, 2, 2, 2, 4, 4, 4]].tolist()
    torch.testing.assert_close(t[TEACHER], torch.from_numpy(predict_logits(teacher, rows)))
    with pytest.raises(ValueError, match="candidates"):
        teacher_rows(teacher, data, catalog(), cands[:2])


def test_distillation_learns_the_teachers_order(tmp_path: Path) -> None:
    """A BST trained on the history task teaches the pre-ranker on random 'retrieved'
    candidates: its valid loss falls and it orders held-out pairs much as the teacher does."""
    spec = make_spec()
    torch.manual_seed(0)
    teacher = build_ranker("bst", spec, {"mlp": [32], "output": "target"})
    opt = torch.optim.Adam(teacher.parameters(), lr=3e-3)
    for step in range(150):
        b = history_task(spec, 128, seed=100 + step)
        loss = F.binary_cross_entropy_with_logits(teacher(b), b["label"])
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    teacher.eval()
    rng = np.random.default_rng(0)
    cat = catalog()

    def rows(n: int, seed: int) -> TensorSplit:
        data = TensorSplit(history_task(spec, n, seed=seed))
        return teacher_rows(teacher, data, cat, rng.integers(2, N_ITEMS + 2, (n, 7)))

    train, valid = rows(600, 1), rows(200, 2)
    student = model(hidden=32, mlp=(32,))
    with torch.no_grad():
        before = distill_loss(student.eval()(valid.tensors), valid.tensors[TEACHER],
                              valid.tensors["label"], valid.tensors[HAS_LABEL], 0.5, 2.0)
    res = train_prerank(student, train, valid, DistillConfig(max_epochs=8, batch_size=256,
                                                             lr=1e-2))
    assert res.best_valid_loss < 0.8 * float(before), (float(before), res.history)
    assert res.history[res.best_epoch - 1]["valid_spearman"] > 0.6, res.history
    # a self-describing checkpoint rebuilds it
    vocabs = Vocabularies({"item_id": Vocabulary(list(range(N_ITEMS)))})
    save_checkpoint(tmp_path / "pre", student, PRERANK, spec, vocabs)
    back = load_checkpoint(tmp_path / "pre", builder=build_prerank).model
    with torch.no_grad():
        torch.testing.assert_close(back(valid.tensors), student(valid.tensors))
