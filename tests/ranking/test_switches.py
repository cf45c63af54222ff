"""Every BST switch changes what it says, tested for its effect and not only for shapes:
``time_buckets`` is the bucketing the model computes, ``position`` decides what the time
differences and the order of the history can change, ``output`` what reaches the MLP, and
``blocks``, ``mlp_norm``, ``wide`` the computation they name."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from bstrec.features.timebuckets import TimeBuckets
from bstrec.ranking import build_ranker
from bstrec.ranking.bst import BST
from tests.ranking.test_models import Batch, make_batch, make_spec

# 2^6 - 1 s and 2^10 s: both in the last of 8 buckets (which starts at 2^(8-2) - 1 s), in
# buckets 7 and 11 of 30
SHORT_LAST, LONG_LAST = 63, 1024


def bst(**overrides: object) -> BST:
    """A small BST in eval mode, with unit-scale tokens so that a changed input shows."""
    torch.manual_seed(0)
    model = build_ranker("bst", make_spec(), {"mlp": [32, 16], "dropout": 0.0,
                                              "token_init_std": 1.0, **overrides})
    assert isinstance(model, BST)
    return model.eval()


def full_batch(n: int = 8, seed: int = 0) -> Batch:
    """Histories of full length: every position holds a behaviour."""
    spec = make_spec()
    return make_batch(spec, n, seed=seed, min_len=spec.max_len)


def with_dt(b: Batch, dt: Tensor | int) -> Batch:
    return {**b, "hist_dt": torch.where(b["hist_mask"], torch.as_tensor(dt), 0)}


def logits(model: nn.Module, b: Batch) -> Tensor:
    with torch.no_grad():
        out: Tensor = model(b)
    return out


# --- time_buckets ---------------------------------------------------------------------------

def test_time_buckets_is_the_bucketing_the_model_computes() -> None:
    dt = torch.tensor([[0, 1, 2, 62, SHORT_LAST, LONG_LAST, 10**9]])
    mask = torch.tensor([[False, True, True, True, True, True, True]])
    assert TimeBuckets(8)(dt, mask).tolist() == [[0, 2, 2, 6, 7, 7, 7]]
    assert TimeBuckets(30)(dt, mask).tolist() == [[0, 2, 2, 6, 7, 11, 29]]
    for n in (8, 30):
        model = bst(time_buckets=n)
        assert model.buckets is not None and model.buckets.n_buckets == n
        assert model.pos is not None and model.pos.num_embeddings == n


@pytest.mark.parametrize("output", ["concat", "target"])
def test_time_buckets_merges_old_behaviours_for_few_buckets_only(output: str) -> None:
    b = full_batch()
    short, long = with_dt(b, SHORT_LAST), with_dt(b, LONG_LAST)
    few, many = bst(time_buckets=8, output=output), bst(time_buckets=30, output=output)
    assert torch.equal(logits(few, short), logits(few, long))
    assert not torch.allclose(logits(many, short), logits(many, long), atol=1e-4)


def test_time_buckets_survives_the_stored_config() -> None:
    """A checkpoint stores the config as JSON: the rebuilt model buckets the same way."""
    model = bst(time_buckets=8)
    stored = json.loads(json.dumps(dataclasses.asdict(model.config)))
    rebuilt = build_ranker("bst", make_spec(), stored)
    assert isinstance(rebuilt, BST) and rebuilt.buckets is not None
    assert rebuilt.buckets.n_buckets == 8
    rebuilt.load_state_dict(model.state_dict())
    b = full_batch()
    assert torch.equal(logits(rebuilt.eval(), b), logits(model, b))
    assert torch.equal(logits(rebuilt, with_dt(b, SHORT_LAST)), logits(rebuilt, with_dt(b, 10**8)))


def test_time_buckets_below_two_is_refused() -> None:
    with pytest.raises(ValueError, match="time_buckets"):
        build_ranker("bst", make_spec(), {"time_buckets": 1})


# --- position -------------------------------------------------------------------------------

@pytest.mark.parametrize("position", ["none", "slot", "sinusoidal"])
def test_positions_other_than_time_ignore_the_time_differences(position: str) -> None:
    model, b = bst(position=position), full_batch()
    assert torch.equal(logits(model, with_dt(b, 5)), logits(model, with_dt(b, 10**7)))
    assert torch.equal(logits(model, b), logits(model, with_dt(b, b["hist_dt"] * 3 + 1)))


def test_time_position_reads_the_bucket_of_each_time_difference() -> None:
    model, b = bst(position="time"), full_batch()
    # 1000 and 1010 s share bucket 10 (from 2^9 - 1 s): the same computation
    assert torch.equal(logits(model, with_dt(b, 1000)), logits(model, with_dt(b, 1010)))
    assert not torch.allclose(logits(model, with_dt(b, 1000)), logits(model, with_dt(b, 5000)),
                              atol=1e-4)


def permuted(b: Batch) -> Batch:
    """The same behaviours, each with its own time difference, in another order."""
    perm = torch.roll(torch.arange(b["hist_item"].shape[1]), 1)
    return {**b, **{k: b[k][:, perm] for k in ("hist_item", "hist_cat", "hist_dt")}}


@pytest.mark.parametrize(("position", "order_matters"), [
    ("none", False), ("time", False), ("slot", True), ("sinusoidal", True)])
def test_what_the_order_of_the_history_changes(position: str, order_matters: bool) -> None:
    """With the target's output only, the history reaches the logit through attention alone,
    which no order reaches unless positions say it: ``none`` sees a set of behaviours,
    ``time`` a set of (behaviour, time difference) pairs, ``slot`` and ``sinusoidal`` the
    sequence's order."""
    model, b = bst(position=position, output="target"), full_batch()
    assert b["hist_dt"].unique(dim=1).shape[1] > 1 and b["hist_item"].unique(dim=1).shape[1] > 1
    same = torch.allclose(logits(model, b), logits(model, permuted(b)), atol=1e-5)
    assert same is not order_matters


# --- output, blocks -------------------------------------------------------------------------

def zero_history_outputs(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
    """Forward hook: the block's outputs at every position but the target's (the last) zeroed."""
    return torch.cat([torch.zeros_like(out[:, :-1]), out[:, -1:]], 1)


@pytest.mark.parametrize(("output", "blocks"), [("target", 1), ("target", 2), ("concat", 1),
                                                ("concat", 2)])
def test_target_output_passes_only_the_target_position_to_the_mlp(output: str,
                                                                  blocks: int) -> None:
    """Zeroing the last block's outputs at the history's positions leaves a target-output
    logit as it was (only the target's output is read), and changes the paper's concat."""
    model, b = bst(output=output, blocks=blocks), full_batch()
    want = logits(model, b)
    handle = model.blocks[-1].register_forward_hook(zero_history_outputs)
    try:
        got = logits(model, b)
    finally:
        handle.remove()
    if output == "target":
        assert torch.equal(got, want)
    else:
        assert not torch.allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_blocks_stacks_that_many_transformer_blocks_each_run_once(blocks: int) -> None:
    model = bst(blocks=blocks)
    assert len(model.blocks) == blocks
    calls: list[int] = []
    hooks = [blk.register_forward_hook(
        lambda m, a, o, k=k: calls.append(k)) for k, blk in enumerate(model.blocks)]
    b = full_batch()
    want = logits(model, b)
    for h in hooks:
        h.remove()
    assert calls == list(range(blocks))
    with torch.no_grad():  # the last block's weights reach the logit
        model.blocks[-1].ln2.weight.mul_(2.0)  # type: ignore[union-attr, operator]
    assert not torch.allclose(logits(model, b), want, atol=1e-4)


# --- mlp_norm, wide -------------------------------------------------------------------------

def scale_first_layer(model: BST, factor: float) -> None:
    first = model.mlp[0]
    assert isinstance(first, nn.Linear)
    with torch.no_grad():
        first.weight.mul_(factor)
        first.bias.mul_(factor)


@pytest.mark.parametrize(("norm", "scale_free"), [("none", False), ("layer", True)])
def test_layer_norm_makes_the_mlp_blind_to_the_scale_of_its_first_layer(
        norm: str, scale_free: bool) -> None:
    model, b = bst(mlp_norm=norm), full_batch()
    want = logits(model, b)
    scale_first_layer(model, 3.0)
    assert torch.allclose(logits(model, b), want, atol=1e-4) is scale_free


@pytest.mark.parametrize(("norm", "rows_interact"), [("none", False), ("layer", False),
                                                     ("batch", True)])
def test_batch_norm_makes_a_training_row_depend_on_the_batch(norm: str,
                                                             rows_interact: bool) -> None:
    model, b = bst(mlp_norm=norm), full_batch(16)
    other = full_batch(16, seed=5)
    mixed = {k: torch.cat([v[:1], other[k][1:]]) for k, v in b.items()}
    model.train()  # dropout and history dropout are 0: only batch statistics can mix rows
    with torch.no_grad():
        first, again = model(b)[0], model(mixed)[0]
    assert (not torch.allclose(first, again, atol=1e-5)) is rows_interact
    assert any(isinstance(m, nn.BatchNorm1d) for m in model.mlp) is (norm == "batch")
    assert any(isinstance(m, nn.LayerNorm) for m in model.mlp) is (norm == "layer")


@pytest.mark.parametrize("wide", [False, True])
def test_wide_adds_a_linear_term_to_the_logit(wide: bool) -> None:
    model, b = bst(wide=wide), full_batch()
    assert (model.wide is not None) is wide
    if model.wide is None:
        return
    want = logits(model, b)
    with torch.no_grad():
        model.wide.bias.add_(1.0)
    assert torch.allclose(logits(model, b), want + 1.0, atol=1e-5)
    with torch.no_grad():
        model.wide.weight.zero_()
        model.wide.bias.zero_()
    plain = bst(wide=False)
    plain.load_state_dict({k: v for k, v in model.state_dict().items()
                           if not k.startswith("wide.")})
    assert torch.allclose(logits(model, b), logits(plain, b), atol=1e-6)



# --- crosses, dropout -----------------------------------------------------------------------

@pytest.mark.parametrize("crosses", [None, []], ids=["default", "none"])
def test_a_cross_reads_the_pair_of_values_jointly(crosses: list[list[str]] | None) -> None:
    """The default gender x category cross has a row per pair: changing the row of one pair
    moves the logits of exactly the rows with that pair; without crosses no such row exists."""
    model, b = bst(crosses=crosses), full_batch(64)
    emb = model.embed
    if crosses == []:
        assert emb.cross_specs == ()
        return
    (a, c, size_c, offset), = emb.cross_specs
    assert (a, c) == ("user_gender", "category")
    g, k = int(b[a][0]), int(b[c][0])
    pair = (b[a] == g) & (b[c] == k)
    assert 0 < int(pair.sum()) < len(pair)
    want = logits(model, b)
    with torch.no_grad():
        emb.table.weight[g * size_c + k + offset] += 1.0
    moved = logits(model, b) != want
    assert torch.equal(moved, pair)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_dropout_acts_in_training_only(dropout: float) -> None:
    model, b = bst(dropout=dropout), full_batch()
    model.train()
    torch.manual_seed(1)
    first = logits(model, b)
    torch.manual_seed(2)
    second = logits(model, b)
    assert torch.equal(first, second) is (dropout == 0.0)
    model.eval()
    assert torch.equal(logits(model, b), logits(model, b))


# --- concat_scale -------------------------------------------------------------------------------

@pytest.mark.parametrize(("how", "by"), [("sqrt", lambda n: n ** 0.5), ("length", lambda n: n)])
def test_concat_scale_divides_the_sequence_part_of_the_mlp_input(
        how: str, by: Callable[[int], float]) -> None:
    plain, scaled = bst(), bst(concat_scale=how)
    scaled.load_state_dict(plain.state_dict())  # same weights: only the switch differs
    seen: list[Tensor] = []
    for model in (plain, scaled):
        model.mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        logits(model, full_batch())
    n_seq = (plain.max_len + 1) * plain.config.token_dim
    torch.testing.assert_close(seen[1][:, :n_seq], seen[0][:, :n_seq] / by(plain.max_len + 1))
    torch.testing.assert_close(seen[1][:, n_seq:], seen[0][:, n_seq:])  # the other features
