"""Request-shaped scoring: one request's shared inputs (batch 1) and its N candidates' item
inputs score exactly like the model's forward on the expanded batch, eager and exported, for
every ranker; BST with the target output and one block does so with far fewer FLOPs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bstrec.ranking import build_ranker
from bstrec.ranking.bst import BST
from bstrec.ranking.export import (
    PARTS,
    OnnxGraph,
    export_request_parts,
    export_request_ranker,
    load_runtime,
    request_inputs,
)
from bstrec.ranking.request import broadcast, forward_request, item_names, shared_names
from tests.ranking.test_models import Batch, briefly_trained, make_batch, make_spec

TARGET = {"output": "target"}
CASES = [("bst", TARGET), ("bst", {**TARGET, "position": "slot"}),
         ("bst", {**TARGET, "position": "sinusoidal"}), ("bst", {**TARGET, "position": "none"}),
         ("bst", {**TARGET, "crosses": [["user_gender", "category"], ["user", "hour"]]}),
         ("bst", {**TARGET, "mlp": []}), ("bst", {**TARGET, "mlp_norm": "batch"}),
         ("bst", {**TARGET, "wide": True}),
         ("bst", {}), ("bst", {**TARGET, "blocks": 2}),
         ("din", {}), ("wdl", {}), ("wdl_seq", {})]


def trained(name: str, overrides: dict[str, object]) -> torch.nn.Module:
    """A ranker after a few steps (Dice's running statistics moved), in eval mode."""
    return briefly_trained(name, overrides).eval()


def requests(n: int, seed: int, multi_width: int = 3) -> list[tuple[Batch, Batch]]:
    """Requests of n candidates: each row of a random batch as the shared part (full, short and
    empty histories), the batch's item columns as the candidates (multi-hot with padding)."""
    spec = make_spec()
    b = make_batch(spec, n, seed=seed, multi_width=multi_width)
    b["hist_mask"][0] = False  # an empty history
    for col in ("hist_item", "hist_cat", "hist_dt"):
        b[col][0] = 0
    items = {k: b[k] for k in item_names(spec)}
    return [({k: b[k][r:r + 1] for k in shared_names(spec)}, items) for r in range(min(n, 4))]


@pytest.mark.parametrize(("name", "overrides"), CASES, ids=lambda c: str(c))
def test_forward_request_equals_forward_on_the_expanded_batch(
        name: str, overrides: dict[str, object]) -> None:
    model = trained(name, overrides)
    with torch.no_grad():
        for n, seed in ((1, 0), (9, 1), (64, 2)):
            for shared, items in requests(n, seed):
                want = model(broadcast(shared, items))
                got = forward_request(model, shared, items)
                assert got.shape == (n,)
                assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


def test_request_path_is_exact_in_eval_and_keeps_dropout_in_training() -> None:
    model = trained("bst", {**TARGET, "dropout": 0.5, "mlp_dropout": 0.5})
    assert isinstance(model, BST) and model.request_shaped
    shared, items = requests(16, 3)[1]
    with torch.no_grad():
        a, b = forward_request(model, shared, items), forward_request(model, shared, items)
        assert torch.equal(a, b)  # no dropout in eval
        assert torch.allclose(a, model(broadcast(shared, items)), atol=1e-5)
        model.train()
        assert not torch.equal(forward_request(model, shared, items), a)


def test_only_target_output_with_one_block_shares_work() -> None:
    spec = make_spec()
    flags = {json.dumps(o): build_ranker("bst", spec, o).request_shaped  # type: ignore[union-attr]
             for o in ({}, TARGET, {**TARGET, "blocks": 2})}
    assert list(flags.values()) == [False, True, False]


def test_shared_work_cuts_the_flops_per_request() -> None:
    model = trained("bst", {**TARGET, "mlp": [256, 128, 64]})
    shared, items = requests(200, 4)[1]
    flops = []
    for fn in (lambda: model(broadcast(shared, items)), lambda: forward_request(model, shared, items)):
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            fn()
        flops.append(fc.get_total_flops())
    assert flops[1] < 0.5 * flops[0], flops


@pytest.mark.parametrize(("name", "overrides"), [
    ("bst", TARGET), CASES[4], ("bst", {**TARGET, "mlp_norm": "batch"}), ("bst", {}), ("din", {})],
    ids=lambda c: str(c))
def test_exported_request_graph_equals_forward(name: str, overrides: dict[str, object],
                                               tmp_path: Path) -> None:
    model = trained(name, overrides)
    spec = make_spec()
    path = export_request_ranker(model, spec, tmp_path / "request.onnx")
    runtime = load_runtime(path, threads=1)
    assert runtime.input_names == request_inputs(spec) and runtime.spec == spec
    assert runtime.graph == "request"
    assert runtime.shares_work == (name == "bst" and overrides.get("output") == "target")
    for n, width in ((1, 1), (7, 3), (200, 5)):
        for shared, items in requests(n, 10 + n, multi_width=width):
            with torch.no_grad():
                want = model(broadcast(shared, items)).numpy()
            got = runtime.predict({k: v.numpy() for k, v in {**shared, **items}.items()})
            assert got.shape == (n,) and got.dtype == np.float32
            assert np.abs(got - want).max() < 1e-5


@pytest.mark.parametrize("overrides", [
    TARGET, {**TARGET, "mlp_norm": "batch"}, {**TARGET, "position": "slot"},
    {**TARGET, "time_buckets": 8},
    {**TARGET, "crosses": [["user_gender", "category"], ["user", "hour"]]}], ids=str)
def test_exported_item_parts_and_request_parts_graphs_equal_forward(
        overrides: dict[str, object], tmp_path: Path) -> None:
    """The two graphs a target-output BST serves through: item parts computed once per item
    (here for a catalogue, rows gathered per request), then the request from them."""
    model = trained("bst", overrides)
    assert isinstance(model, BST)
    spec = make_spec()
    request, items_path = export_request_parts(model, spec, tmp_path / "r.onnx",
                                               tmp_path / "i.onnx")
    runtime, item_graph = load_runtime(request, threads=1), OnnxGraph(items_path, threads=1)
    assert runtime.graph == "request_parts" and runtime.shares_work
    assert runtime.input_names == (*shared_names(spec), PARTS, *model.mixed_item_inputs)
    for n, width in ((1, 1), (7, 3), (200, 5)):
        for shared, items in requests(n, 20 + n, multi_width=width):
            with torch.no_grad():
                want = model(broadcast(shared, items)).numpy()
            catalogue = item_graph.run({k: v.numpy() for k, v in items.items()})  # (n, P)
            picked = np.arange(n)[::-1].copy()  # candidates in another order than the table's
            feed = {k: v.numpy() for k, v in shared.items()} | {
                k: v.numpy()[picked] for k, v in items.items()} | {PARTS: catalogue[picked]}
            got = runtime.predict(feed)
            assert np.abs(got - want[picked]).max() < 1e-5
