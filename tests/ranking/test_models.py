"""Rankers: output shapes, every BST ablation, the registry, and a short run whose loss falls.

The helpers here (a small FeatureSpec, random batches, a task that needs the history) are shared
with tests/nn and tests/ranking/test_export.py.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import Tensor, nn

from bstrec.config import ConfigError
from bstrec.features.spec import Feature, FeatureSpec
from bstrec.ranking import RANKERS, build_ranker
from bstrec.ranking.bst import BST, BSTConfig

Batch = dict[str, Tensor]
N_CATS = 6  # categories 2..7
N_ITEMS = 36  # items 2..37; item i has category 2 + i % N_CATS


def make_spec(max_len: int = 6) -> FeatureSpec:
    """A small spec with every kind of feature: user profile, target item, multi-hot, context."""
    return FeatureSpec(features=(
        Feature("user", "categorical", "user", 30, "user_id"),
        Feature("user_gender", "categorical", "user", 4, "user_gender"),
        Feature("item", "categorical", "item", N_ITEMS + 2, "item_id"),
        Feature("category", "categorical", "item", N_CATS + 2, "category"),
        Feature("item_genres", "multi", "item", 7, "item_genres"),
        Feature("hour", "categorical", "context", 26, "hour"),
    ), max_len=max_len)


def item_category(item: Tensor) -> Tensor:
    return 2 + item % N_CATS


def make_batch(spec: FeatureSpec, n: int, *, seed: int = 0, multi_width: int = 3,
               min_len: int = 0) -> Batch:
    """Random rows of the batch contract: right-aligned histories of random length >= min_len."""
    g = torch.Generator().manual_seed(seed)
    L = spec.max_len
    b: Batch = {}
    for f in spec.features:
        shape = (n,) if f.kind == "categorical" else (n, multi_width)
        b[f.name] = torch.randint(2, f.vocab_size, shape, generator=g)
    b["category"] = item_category(b["item"])
    genres = b["item_genres"]
    b["item_genres"] = torch.where(torch.rand(genres.shape, generator=g) < 0.3, 0, genres)
    lengths = torch.randint(min_len, L + 1, (n,), generator=g)
    mask = torch.arange(L)[None, :] >= (L - lengths)[:, None]  # (n, L) right-aligned
    items = torch.randint(2, N_ITEMS + 2, (n, L), generator=g)
    b["hist_item"] = torch.where(mask, items, 0)
    b["hist_cat"] = torch.where(mask, item_category(items), 0)
    # log-uniform seconds up to ~12 days: every bucket of a few tens is hit, the small ones too
    dt = (2.0 ** (20 * torch.rand(n, L, generator=g))).long() - 1
    b["hist_dt"] = torch.where(mask, dt, 0)
    b["hist_mask"] = mask
    b["label"] = torch.randint(0, 2, (n,), generator=g).float()
    return b


def briefly_trained(name: str, overrides: dict[str, object]) -> torch.nn.Module:
    """Ranker ``name`` (MLP 64-32 unless overridden) after three Adam steps on random batches,
    so that learned statistics (DIN's Dice) are not their defaults; left in training mode."""
    torch.manual_seed(0)
    spec = make_spec()
    model = build_ranker(name, spec, {"mlp": [64, 32], **overrides})
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for seed in range(3):
        b = make_batch(spec, 32, seed=seed)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(b), b["label"])
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    return model


def history_task(spec: FeatureSpec, n: int, seed: int) -> Batch:
    """Label = target's category is in the history, OR user_gender == 2.

    The gender part lets Wide&Deep (which cannot see the history) learn something; the rest
    needs the history: a history-free model's best loss is about ln(2)/2.
    """
    b = make_batch(spec, n, seed=seed)
    in_hist = ((b["hist_cat"] == b["category"][:, None]) & b["hist_mask"]).any(1)
    b["label"] = (in_hist | (b["user_gender"] == 2)).float()
    return b


def perturb_padding(b: Batch, seed: int = 1) -> Batch:
    """The same batch with random ids at every padded history position."""
    g = torch.Generator().manual_seed(seed)
    pad = ~b["hist_mask"]
    out = dict(b)
    for name, hi in (("hist_item", N_ITEMS + 2), ("hist_cat", N_CATS + 2), ("hist_dt", 10**9)):
        noise = torch.randint(1, hi, b[name].shape, generator=g)
        out[name] = torch.where(pad, noise, b[name])
    return out


NAMES = ("bst", "din", "wdl", "wdl_seq")
BST_ABLATIONS = [{"position": p} for p in ("time", "slot", "sinusoidal", "none")] + [
    {"blocks": 2}, {"blocks": 3}, {"output": "target"}, {"output": "concat", "blocks": 2},
    {"output": "target", "mlp_norm": "batch"}, {"mlp_norm": "layer"},
    {"output": "target", "mlp_norm": "batch", "wide": True}]


@pytest.mark.parametrize("name", NAMES)
def test_logits_shape(name: str) -> None:
    spec = make_spec()
    model = build_ranker(name, spec)
    for n in (1, 5):
        out = model(make_batch(spec, n))
        assert out.shape == (n,) and out.dtype == torch.float32
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("overrides", BST_ABLATIONS, ids=lambda d: json.dumps(d))
def test_bst_ablations(overrides: dict[str, object]) -> None:
    spec = make_spec()
    model = build_ranker("bst", spec, overrides)
    b = make_batch(spec, 8)
    out = model(b)
    assert out.shape == (8,) and torch.isfinite(out).all()
    out.sum().backward()  # every switch is trainable end to end
    model.eval()
    assert torch.equal(model(b), model(perturb_padding(b)))


@pytest.mark.parametrize("name", NAMES)
def test_padding_never_matters(name: str) -> None:
    spec = make_spec()
    model = build_ranker(name, spec).eval()
    b = make_batch(spec, 16)
    assert torch.allclose(model(b), model(perturb_padding(b)), atol=1e-6)


def test_empty_history_is_finite() -> None:
    spec = make_spec()
    b = make_batch(spec, 4)
    for k in ("hist_item", "hist_cat", "hist_dt"):
        b[k] = torch.zeros_like(b[k])
    b["hist_mask"] = torch.zeros_like(b["hist_mask"])
    for name in NAMES:
        assert torch.isfinite(build_ranker(name, spec).eval()(b)).all()


def test_bst_attention_maps() -> None:
    spec = make_spec()
    model = build_ranker("bst", spec).eval()
    assert isinstance(model, BST)
    b = make_batch(spec, 4)
    maps = model.attention_maps(b)
    L = spec.max_len
    assert maps.shape == (4, 8, L + 1, L + 1)
    assert torch.allclose(maps.sum(-1), torch.ones(4, 8, L + 1))
    keep = torch.cat([b["hist_mask"], torch.ones(4, 1, dtype=torch.bool)], 1)
    assert (maps.masked_select(~keep[:, None, None, :].expand_as(maps)) == 0).all()


def test_bst_defaults_follow_the_paper() -> None:
    c = BSTConfig()
    assert (c.token_dim, c.heads, c.blocks, c.dropout) == (64, 8, 1, 0.2)
    assert c.mlp == (1024, 512, 256) and c.mlp_act == "leaky_relu"
    assert (c.position, c.output) == ("time", "concat")


def test_registry_rejects_unknown_names_and_keys() -> None:
    # the single-label rankers, and ESMM (multi-task: tests/ranking/test_multitask.py)
    assert set(RANKERS) == {*NAMES, "esmm"} and RANKERS["esmm"].labels == ("click", "buy")
    spec = make_spec()
    with pytest.raises(ConfigError, match="unknown ranker"):
        build_ranker("bts", spec)
    with pytest.raises(ConfigError, match="unknown keys"):
        build_ranker("bst", spec, {"head": 4})
    with pytest.raises(ConfigError):
        build_ranker("bst", spec, {"position": "absolute"})
    with pytest.raises(ConfigError):
        build_ranker("wdl", spec, {"use_seq": True})
    with pytest.raises(ConfigError, match="divisible"):
        build_ranker("bst", spec, {"heads": 5})
    with pytest.raises(ValueError, match="not a categorical feature"):
        build_ranker("din", spec, {"crosses": [["user_gender", "colour"]]})


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip(name: str) -> None:
    """A checkpoint stores asdict(model.config) as JSON; the rebuilt model has the same weights."""
    spec = make_spec()
    model = build_ranker(name, spec, {"mlp": [32, 16]})
    stored = json.loads(json.dumps(dataclasses.asdict(model.config)))  # type: ignore[call-overload]
    rebuilt = build_ranker(name, spec, stored)
    assert rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict())
    b = make_batch(spec, 4)
    assert torch.equal(model.eval()(b), rebuilt.eval()(b))


def test_cross_feature_defaults() -> None:
    spec = make_spec()
    model, no_cross = build_ranker("bst", spec), build_ranker("bst", spec, {"crosses": []})
    assert isinstance(model, BST) and isinstance(no_cross, BST)
    assert "user_gender_x_category" in model.embed.field_names
    assert "user_gender_x_category" not in no_cross.embed.field_names


def _train(model: nn.Module, spec: FeatureSpec, test: Batch, steps: int = 300
           ) -> tuple[float, float]:
    """Adam on fresh batches of the history task; (held-out loss before, after)."""
    lossf = nn.BCEWithLogitsLoss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def held_out() -> float:
        model.eval()
        with torch.no_grad():
            loss = float(lossf(model(test), test["label"]))
        model.train()
        return loss

    before = held_out()
    for step in range(steps):
        b = history_task(spec, 128, seed=1000 + step)
        loss = lossf(model(b), b["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, held_out()


@pytest.mark.parametrize("name", NAMES)
def test_loss_falls(name: str) -> None:
    torch.manual_seed(0)
    spec = make_spec()
    model = build_ranker(name, spec, {"mlp": [64, 32]})
    before, after = _train(model, spec, history_task(spec, 1024, seed=2))
    assert after < 0.8 * before, (before, after)
    if name != "wdl":
        # ~0.35 is the best a model blind to the history can do on this task
        assert after < 0.3, (before, after)


def test_bst_attention_learns_target_behaviour_matches() -> None:
    """With unit-scale tokens BST learns the match itself, not just the history's length."""
    torch.manual_seed(0)
    spec = make_spec()
    model = build_ranker("bst", spec, {"mlp": [64, 32], "token_init_std": 1.0})
    before, after = _train(model, spec, history_task(spec, 1024, seed=2))
    assert after < 0.1, (before, after)


def test_bst_init_scales_follow_the_config() -> None:
    """token_init_std sets the token tables, embed_init_std the other features' table."""
    spec = make_spec()
    model = build_ranker("bst", spec, {"mlp": [8], "token_init_std": 0.5, "embed_init_std": 1e-4})
    assert isinstance(model, BST)
    other = model.embed.table.weight.detach()[1:]  # row 0: padding, zero
    assert 0.5e-4 < float(other.std()) < 2e-4
    for table in (*model.embed.seq_tables.values(), model.pos):
        assert table is not None
        assert 0.4 < float(table.weight.detach()[1:].std()) < 0.6


def test_bst_history_dropout_drops_behaviours_in_training_only() -> None:
    """Each behaviour left out with probability history_dropout while training, as if it were
    padding; evaluation sees the whole history."""
    spec = make_spec()
    over = {"mlp": [16], "dropout": 0.0, "history_dropout": 1 - 1e-9}
    model = build_ranker("bst", spec, over)
    plain = build_ranker("bst", spec, {**over, "history_dropout": 0.0})
    plain.load_state_dict(model.state_dict())
    b = make_batch(spec, 8, min_len=2)
    empty = {**b, "hist_mask": torch.zeros_like(b["hist_mask"])}
    torch.manual_seed(0)
    assert torch.allclose(model.train()(b), plain.train()(empty), atol=1e-6)
    assert not torch.allclose(plain(b), plain(empty), atol=1e-3)
    assert torch.equal(model.eval()(b), plain.eval()(b))
    with pytest.raises(ConfigError, match="history_dropout"):
        build_ranker("bst", spec, {"history_dropout": 1.0})
