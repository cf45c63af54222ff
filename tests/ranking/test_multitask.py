"""ESMM on a shared BST body (issue 25): shapes, pCTCVR = pCTR x pCVR, and a short run through
the one training loop on a synthetic Taobao-format log whose loss falls and whose heads learn."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bstrec.config import ConfigError
from bstrec.data.samples import SampleConfig, build_samples, with_conversion_labels
from bstrec.data.synthetic import TaobaoConfig, generate_taobao
from bstrec.evaluation.metrics import auc
from bstrec.ranking.multitask import ESMMConfig, build_esmm, product_logit
from bstrec.training.loop import TrainConfig, evaluate, predict_logits, seed_model_init, train
from bstrec.training.tensors import TensorSplit

SMALL_BODY = {"item_dim": 16, "cat_dim": 8, "pos_dim": 8, "embed_dim": 8, "heads": 4,
              "mlp": (64, 32), "dropout": 0.1}


@pytest.fixture(scope="module")
def splits() -> dict[str, TensorSplit]:
    ds = generate_taobao(TaobaoConfig(seed=1, n_users=400, views_per_user=(20, 50),
                                      n_items=800, n_categories=30))
    samples = build_samples(ds, SampleConfig(positive_actions=("pv",), max_len=10))
    out = {}
    for name, frame in samples.splits.items():
        frame = with_conversion_labels(frame, ds.events)
        out[name] = TensorSplit.from_frame(frame, samples.spec, labels=("click", "buy"))
    out["spec"] = samples.spec  # type: ignore[assignment]
    out["valid_frame"] = with_conversion_labels(samples.splits["valid"],  # type: ignore[assignment]
                                                ds.events)
    return out


def test_product_logit_is_the_product_of_probabilities() -> None:
    a = torch.tensor([-30.0, -3.0, 0.0, 2.0, 25.0, 40.0])
    b = torch.tensor([5.0, -1.0, 0.0, 3.0, 30.0, 40.0])
    z = product_logit(a, b)
    assert torch.isfinite(z).all()
    want = torch.sigmoid(a.double()) * torch.sigmoid(b.double())
    assert torch.allclose(torch.sigmoid(z.double()), want, rtol=1e-4, atol=1e-6)


def test_shapes_and_ctcvr_is_ctr_times_cvr(splits: dict[str, TensorSplit]) -> None:
    seed_model_init(0)
    model = build_esmm(splits["spec"], SMALL_BODY)  # type: ignore[arg-type]
    model.eval()
    batch = splits["valid"].batch(torch.arange(7))
    logits = model(batch)
    assert logits.shape == (7, 2)
    ctr, cvr = model.heads(batch)
    assert ctr.shape == cvr.shape == (7,)
    p = model.probabilities(batch)
    assert torch.allclose(p["ctcvr"], p["ctr"] * p["cvr"])
    assert torch.allclose(torch.sigmoid(logits[:, 0]), p["ctr"], atol=1e-6)
    assert torch.allclose(torch.sigmoid(logits[:, 1]), p["ctcvr"], rtol=1e-4, atol=1e-6)
    assert splits["valid"].tensors["label"].shape[1] == 2


def test_config_is_checked(splits: dict[str, TensorSplit]) -> None:
    with pytest.raises(ConfigError, match="unknown keys"):
        build_esmm(splits["spec"], {"cvr_head": (8,)})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="wide"):
        ESMMConfig(wide=True)
    model = build_esmm(splits["spec"], {**SMALL_BODY, "cvr_mlp": (16,)})  # type: ignore[arg-type]
    assert model.cvr[0].out_features == 16
    assert model.body.mlp[0].out_features == 64


def test_trains_through_the_loop(splits: dict[str, TensorSplit]) -> None:
    seed_model_init(0)
    model = build_esmm(splits["spec"], SMALL_BODY)  # type: ignore[arg-type]
    cfg = TrainConfig(lr=2e-3, batch_size=256, max_epochs=3, patience=0, num_threads=1)
    before = evaluate(model, splits["valid"])
    result = train(model, splits["train"], splits["valid"], cfg, progress=False)
    losses = [h.train_loss for h in result.history]
    assert losses[-1] < losses[0]
    assert not math.isnan(before["logloss"])
    assert result.best_valid_auc > before["auc"] + 0.1
    logits = predict_logits(model, splits["test"])
    labels = splits["test"].tensors["label"].numpy()
    assert logits.shape == labels.shape
    # the CTR head ranks clicks; the CVR head (conversion given a click) ranks the clicked
    # samples' buys, though it is never fitted on clicks alone
    assert auc(labels[:, 0], logits[:, 0]) > 0.65
    clicked = labels[:, 0] > 0
    with torch.no_grad():
        _, cvr = model.heads(splits["test"].batch(torch.from_numpy(np.flatnonzero(clicked))))
    assert auc(labels[clicked, 1], cvr.numpy()) > 0.6


def test_single_label_contract_unchanged(splits: dict[str, TensorSplit]) -> None:
    frame = splits["valid_frame"]
    spec = splits["spec"]
    one = TensorSplit.from_frame(frame, spec)  # type: ignore[arg-type]
    assert one.tensors["label"].shape == (frame.height,)  # type: ignore[attr-defined]
    two = splits["valid"].tensors["label"]
    assert torch.equal(one.tensors["label"], two[:, 0])  # click is P5's label
    assert torch.equal(TensorSplit.from_frame(frame, spec,  # type: ignore[arg-type]
                                              labels=("buy",)).tensors["label"], two[:, 1])


def test_exported_heads_match_eager(splits: dict[str, TensorSplit], tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from bstrec.ranking.export import OnnxRanker, export_heads

    seed_model_init(0)
    model = build_esmm(splits["spec"], SMALL_BODY)  # type: ignore[arg-type]
    model.eval()
    path = export_heads(model, splits["spec"], tmp_path / "esmm.onnx")  # type: ignore[arg-type]
    graph = OnnxRanker(path)
    assert graph.heads == ("ctr", "cvr")
    batch = splits["valid"].batch(torch.arange(5))
    got = graph.predict({k: v.numpy() for k, v in batch.items()})
    with torch.no_grad():
        ctr, cvr = model.heads(batch)
    assert got.shape == (5, 2)
    assert np.allclose(got, torch.stack([ctr, cvr], 1).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="not a multi-task ranker"):
        export_heads(model.body, splits["spec"], tmp_path / "bst.onnx")  # type: ignore[arg-type]
