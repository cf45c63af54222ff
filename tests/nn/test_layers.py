"""Shared layers: shapes, and padding that never changes a result."""

from __future__ import annotations

import pytest
import torch

from bstrec.features.spec import Feature, FeatureSpec
from bstrec.nn import (
    MLP,
    Dice,
    FeatureEmbeddings,
    LocalActivationUnit,
    TransformerBlock,
    masked_mean,
    resolve_crosses,
)
from bstrec.nn.mlp import Activation, Norm
from tests.ranking.test_models import make_batch, make_spec


def _mask(B: int, T: int, seed: int = 0) -> torch.Tensor:
    """(B, T) right-aligned presence mask with at least one present entry per row."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    return torch.arange(T)[None, :] >= (T - lengths)[:, None]


@pytest.mark.parametrize("act", ["leaky_relu", "prelu", "dice", "relu", "sigmoid"])
def test_mlp_shapes(act: Activation) -> None:
    mlp = MLP(12, (16, 8), act=act, dropout=0.1, out_dim=1)
    assert mlp(torch.randn(5, 12)).shape == (5, 1)
    assert mlp(torch.randn(5, 7, 12)).shape == (5, 7, 1)
    assert MLP(12, (16, 8), act=act).out_dim == 8


@pytest.mark.parametrize(("norm", "kind"), [("batch", torch.nn.BatchNorm1d),
                                            ("layer", torch.nn.LayerNorm)])
def test_mlp_normalises_every_hidden_layer_before_its_activation(norm: Norm, kind: type) -> None:
    mlp = MLP(12, (16, 8), norm=norm, out_dim=1)
    layers = list(mlp)
    norms = [i for i, m in enumerate(layers) if isinstance(m, kind)]
    assert [type(layers[i - 1]) for i in norms] == [torch.nn.Linear] * 2
    assert [getattr(layers[i], "normalized_shape", getattr(layers[i], "num_features", None))
            for i in norms] in ([16, 8], [(16,), (8,)])
    x = torch.randn(32, 12)
    assert mlp(x).shape == (32, 1)
    mlp.eval()  # BatchNorm on running statistics: rows no longer depend on each other
    assert torch.allclose(mlp(x[:3]), mlp(x)[:3], atol=1e-6)


def test_dice_uses_batch_stats_in_training_and_running_stats_in_eval() -> None:
    dice = Dice(4)
    x = torch.randn(64, 4) * 3 + 2
    y = dice(x)
    assert y.shape == x.shape
    assert dice(x[:1]).shape == (1, 4)  # one row in training: falls back to running stats
    dice.eval()
    assert torch.allclose(dice(x)[:3], dice(x[:3]))  # eval: rows are independent


def test_transformer_block_shapes_and_padding() -> None:
    B, T, D = 6, 7, 32
    block = TransformerBlock(D, heads=4, ffn_dim=64, dropout=0.2).eval()
    x = torch.randn(B, T, D)
    keep = _mask(B, T)
    y = block(x, keep)
    assert y.shape == (B, T, D)
    x2 = torch.where(keep.unsqueeze(-1), x, torch.randn(B, T, D) * 10)
    y2 = block(x2, keep)
    assert torch.allclose(y[keep], y2[keep], atol=1e-5)
    w = block.attention_weights(x, keep)
    assert w.shape == (B, 4, T, T)
    assert torch.allclose(w.sum(-1), torch.ones(B, 4, T))
    assert (w.masked_select(~keep[:, None, None, :].expand_as(w)) == 0).all()
    with pytest.raises(ValueError):
        TransformerBlock(30, heads=4, ffn_dim=8)


def test_transformer_block_matches_explicit_attention() -> None:
    """SDPA in forward and the explicit weights of attention_weights agree."""
    B, T, D, H = 3, 5, 16, 2
    block = TransformerBlock(D, heads=H, ffn_dim=32).eval()
    x, keep = torch.randn(B, T, D), _mask(B, T, seed=3)
    _, _, v = block._qkv(x)
    a = block.attention_weights(x, keep) @ v  # (B, H, T, D/H)
    y = block.ln1(x + block.proj(a.transpose(1, 2).reshape(B, T, D)))
    y = block.ln2(y + block.ffn(y))
    assert torch.allclose(block(x, keep), y, atol=1e-5)


@pytest.mark.parametrize("present", [7, 3, 0], ids=["full", "short", "empty"])
def test_transformer_block_forward_last_equals_forward_with_a_shared_context(present: int) -> None:
    """N last tokens after one context: forward_last == forward on the stacked sequences, at
    the last position, including a context that is all padding."""
    N, T, D = 5, 8, 16
    block = TransformerBlock(D, heads=4, ffn_dim=32, dropout=0.3).eval()
    context, last = torch.randn(1, T - 1, D), torch.randn(N, D)
    keep = torch.arange(T - 1)[None, :] >= T - 1 - present  # (1, T-1) right-aligned
    full = torch.cat([context.expand(N, -1, -1), last[:, None]], 1)  # (N, T, D)
    want = block(full, torch.cat([keep.expand(N, -1), torch.ones(N, 1, dtype=torch.bool)], 1))
    got = block.forward_last(context, keep, last)
    assert got.shape == (N, D)
    assert torch.allclose(got, want[:, -1], atol=1e-5)


def test_local_activation_unit_masks_padding() -> None:
    B, L, D = 5, 6, 8
    unit = LocalActivationUnit(D, (16, 8), act="prelu")
    target, keys, mask = torch.randn(B, D), torch.randn(B, L, D), _mask(B, L)
    out = unit(target, keys, mask)
    assert out.shape == (B, D)
    keys2 = torch.where(mask.unsqueeze(-1), keys, torch.randn(B, L, D) * 10)
    assert torch.allclose(out, unit(target, keys2, mask), atol=1e-6)
    w = unit.weights(target, keys, mask)
    assert w.shape == (B, L) and (w[~mask] == 0).all()
    empty = torch.zeros(B, L, dtype=torch.bool)
    assert torch.equal(unit(target, keys, empty), torch.zeros(B, D))


def test_masked_mean() -> None:
    x, mask = torch.randn(4, 5, 3), _mask(4, 5)
    m = masked_mean(x, mask)
    for i in range(4):
        assert torch.allclose(m[i], x[i][mask[i]].mean(0), atol=1e-6)
    x2 = torch.where(mask.unsqueeze(-1), x, torch.randn(4, 5, 3))
    assert torch.allclose(m, masked_mean(x2, mask))
    assert torch.equal(masked_mean(x, torch.zeros(4, 5, dtype=torch.bool)), torch.zeros(4, 3))


def test_embeddings_fields_sequences_and_crosses() -> None:
    spec = make_spec()
    crosses = resolve_crosses(spec, None)
    assert crosses == (("user_gender", "category"),)
    emb = FeatureEmbeddings(spec, 4, seq_dims={"hist_item": 8, "hist_cat": 6}, crosses=crosses)
    assert emb.field_names == ("user", "user_gender", "hour", "user_gender_x_category",
                               "item_genres")
    b = make_batch(spec, 5)
    e = emb(b)
    L = spec.max_len
    assert e.fields.shape == (5, 5, 4)
    assert e.seq["hist_item"].shape == (5, L + 1, 8) and e.seq["hist_cat"].shape == (5, L + 1, 6)
    item_table = emb.seq_tables["hist_item"]
    assert isinstance(item_table, torch.nn.Embedding)
    assert torch.equal(e.seq["hist_item"][:, L], item_table(b["item"]))  # the target, last
    assert torch.equal(e.seq["hist_item"][:, :L], item_table(b["hist_item"]))
    # cross: row offset + gender * size(category) + category of the fused table
    off = int(emb.offsets[3])
    row = off + b["user_gender"] * spec.feature("category").vocab_size + b["category"]
    assert torch.equal(e.fields[:, 3], emb.table(row))
    no_hist = FeatureEmbeddings(spec, 4, seq_dims={"hist_item": 8}, history=False)
    assert no_hist(b).seq["hist_item"].shape == (5, 1, 8)
    # a cross from its two inputs alone, one side broadcast (a request's user, N candidates)
    assert torch.equal(emb.cross_fields(b, [3]), e.fields[:, 3:4])
    one = {"user_gender": b["user_gender"][:1], "category": b["category"]}
    want = emb.table(off + b["user_gender"][0] * spec.feature("category").vocab_size
                     + b["category"])
    assert torch.equal(emb.cross_fields(one, [3])[:, 0], want)
    with pytest.raises(ValueError, match="not a cross"):
        emb.cross_fields(b, [0])


def test_multi_hot_mean_ignores_padding() -> None:
    spec = make_spec()
    emb = FeatureEmbeddings(spec, 4)
    b = make_batch(spec, 6, multi_width=3)
    b["item_genres"][0] = torch.tensor([0, 0, 0])  # no genre at all: zeros
    pooled = emb(b).fields[:, -1]  # (B, 4)
    off = int(emb.multi_offsets[0])
    for i in range(6):
        ids = b["item_genres"][i]
        ids = ids[ids > 0]
        want = emb.table(ids + off).mean(0) if len(ids) else torch.zeros(4)
        assert torch.allclose(pooled[i], want, atol=1e-6)
    wider = dict(b)
    wider["item_genres"] = torch.cat([b["item_genres"], torch.zeros(6, 4, dtype=torch.long)], 1)
    assert torch.allclose(emb(wider).fields, emb(b).fields)


def test_embeddings_reject_bad_specs() -> None:
    spec = make_spec()
    with pytest.raises(ValueError, match="not a categorical feature"):
        resolve_crosses(spec, [("user", "colour")])
    twice = FeatureSpec(features=(*spec.features,
                                  Feature("last_item", "categorical", "user", 38, "item_id")),
                        max_len=spec.max_len)
    with pytest.raises(ValueError, match="exactly one"):
        FeatureEmbeddings(twice, 4, seq_dims={"hist_item": 8})
