"""item2vec: session splitting, SGNS on both backends, the candidate source, save/load."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from bstrec.cli import app
from bstrec.config import ConfigError, from_dict
from bstrec.data.samples import SampleSet
from bstrec.retrieval.artifacts import load_artifacts, train_item2vec
from bstrec.retrieval.candidates import SOURCES, CandidateConfig, CandidateGenerator
from bstrec.retrieval.catalog import Catalog, QuerySet
from bstrec.retrieval.coldstart import REGULAR, route
from bstrec.retrieval.index import FaissIndex
from bstrec.retrieval.item2vec import (
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    Item2Vec,
    Item2VecConfig,
    sessions_from_frame,
    skipgram_pairs,
    split_sessions,
)
from bstrec.retrieval.item_cf import ItemCF
from bstrec.retrieval.merge import merge
from bstrec.retrieval.popular import PopularConfig, Popularity
from bstrec.serving.bundle import load_bundle
from bstrec.serving.match import OnlineMatcher
from tests.serving.fixtures import Artifacts

runner = CliRunner()

N_GROUPS, PER_GROUP = 4, 6
N_ITEMS = 2 + N_GROUPS * PER_GROUP  # ids 0, 1 reserved


def test_split_sessions_at_gap() -> None:
    user = np.array([1, 1, 1, 1, 2, 2, 2])
    ts = np.array([0, 100, 2000, 2050, 2060, 2061, 9000])
    # gap 1000 s: user 1 breaks between 100 and 2000; user 2 starts anew; 2061 -> 9000 breaks
    assert split_sessions(user, ts, 1000).tolist() == [0, 2, 4, 6, 7]
    # a gap exactly at the threshold does not end a session
    assert split_sessions(user, ts, 1900).tolist() == [0, 4, 6, 7]
    assert split_sessions(np.zeros(0), np.zeros(0), 10).tolist() == [0]
    with pytest.raises(ValueError, match="sorted"):
        split_sessions(np.array([1, 1]), np.array([5, 4]), 10)


def group_log(n_users: int = 120, seed: int = 0, gap_s: int = 7200) -> pl.DataFrame:
    """Each user has sessions; one session = items of one group (shuffled), sessions ``gap_s``
    apart, items one minute apart: items of a group co-occur only inside sessions."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        t = 1_000_000 + u
        for _ in range(3):
            g = int(rng.integers(N_GROUPS))
            for it in rng.permutation(PER_GROUP)[:4]:
                rows.append((u, int(2 + g * PER_GROUP + it), t))
                t += 60
            t += gap_s
    u_, i_, t_ = zip(*rows, strict=True)
    return pl.DataFrame({"user_id": list(u_), "item_id": list(i_), "item": list(i_),
                         "timestamp": list(t_), "label": [1] * len(rows)})


def test_sessions_from_frame_follow_the_gap() -> None:
    log = group_log(n_users=3)
    items, offsets = sessions_from_frame(log, Item2VecConfig(session_gap_minutes=30))
    assert len(offsets) - 1 == 9 and (np.diff(offsets) == 4).all()
    groups = (items - 2) // PER_GROUP
    assert all(len(set(groups[lo:hi].tolist())) == 1
               for lo, hi in itertools.pairwise(offsets))
    # a gap longer than the pause between sessions: one session per user
    _, offsets = sessions_from_frame(log, Item2VecConfig(session_gap_minutes=24 * 60))
    assert len(offsets) - 1 == 3


def test_positives_only_drops_the_label_0_behaviours() -> None:
    log = group_log(n_users=3).with_columns(
        label=(pl.int_range(pl.len()) % 2).cast(pl.Int64))  # every other behaviour a negative
    every, _ = sessions_from_frame(log, Item2VecConfig())
    kept, _ = sessions_from_frame(log, Item2VecConfig(positives_only=True))
    assert len(kept) == int(log["label"].sum()) < len(every)


def test_query_is_the_decayed_mean_of_the_latest_query_items() -> None:
    vectors = np.zeros((6, 3), dtype=np.float32)
    vectors[2:5] = np.eye(3)  # items 2, 3, 4: orthogonal unit vectors
    hist = np.array([[2, 3, 4]])
    mask = np.ones_like(hist, dtype=bool)

    def query(**cfg: float) -> np.ndarray:
        model = Item2Vec(Item2VecConfig(**cfg), vectors)  # type: ignore[arg-type]
        return model.query_vectors(hist, mask)[0][0]

    # only the latest query_items behaviours count
    assert np.allclose(query(query_items=1), [0, 0, 1])
    # each step back weighs query_decay times the next: 0.25, 0.5, 1 before normalising
    want = np.array([0.25, 0.5, 1.0])
    assert np.allclose(query(query_items=3, query_decay=0.5), want / np.linalg.norm(want))
    assert np.allclose(query(query_items=3, query_decay=1.0), np.ones(3) / np.sqrt(3))


def test_pairs_stay_inside_sessions_and_window() -> None:
    items = np.arange(2, 12, dtype=np.int64)
    offsets = np.array([0, 4, 10])
    c, o = skipgram_pairs(items, offsets, 2, np.random.default_rng(0))
    sess = lambda x: (x >= 6).astype(int)  # noqa: E731
    assert len(c) and (sess(c) == sess(o)).all()
    assert (np.abs(c - o) <= 2).all() and (c != o).all()


def _within_vs_across(model: Item2Vec) -> tuple[float, float]:
    v = model.vectors[2:]
    sims = v @ v.T
    g = np.arange(N_GROUPS * PER_GROUP) // PER_GROUP
    same = (g[:, None] == g[None, :]) & ~np.eye(len(g), dtype=bool)
    return float(sims[same].mean()), float(sims[g[:, None] != g[None, :]].mean())


@pytest.mark.parametrize("backend", ["torch", "gensim"])
def test_sgns_puts_session_neighbours_closer(backend: str) -> None:
    if backend == "gensim":
        pytest.importorskip("gensim", reason="gensim is the optional item2vec extra")
    cfg = Item2VecConfig(backend=backend, dim=16, window=3, epochs=15,  # type: ignore[arg-type]
                         subsample=0, batch_size=256, session_gap_minutes=30)
    model = Item2Vec.fit(group_log(), N_ITEMS, cfg)
    within, across = _within_vs_across(model)
    assert within > across + 0.3, (within, across)
    # the nearest neighbours of an item are mostly of its own group
    _, ids = model.similar([2], 5)
    assert 2 not in ids[0] and (((ids[0] - 2) // PER_GROUP) == 0).mean() >= 0.8
    if backend == "torch":
        loss = model.info["epoch_loss"]
        assert loss[-1] < loss[0]


def test_one_long_session_mixes_groups() -> None:
    """session_gap_minutes changes what is learnt: with one session per user, items of groups a
    user visited one after another co-occur, and the groups blur."""
    base = dict(dim=16, window=3, epochs=15, subsample=0.0, batch_size=256)
    split = Item2Vec.fit(group_log(), N_ITEMS, Item2VecConfig(session_gap_minutes=30, **base))
    whole = Item2Vec.fit(group_log(), N_ITEMS, Item2VecConfig(session_gap_minutes=1e5, **base))
    gap_split = np.subtract(*_within_vs_across(split))
    gap_whole = np.subtract(*_within_vs_across(whole))
    assert gap_split > gap_whole


def test_search_query_and_seen() -> None:
    model = Item2Vec.fit(group_log(), N_ITEMS,
                         Item2VecConfig(dim=16, window=3, epochs=15, subsample=0,
                                        batch_size=256))
    # user 1 watched group-1 items recently; user 2 nothing
    hist = np.array([[0, 0, 2, 8, 9], [0, 0, 0, 0, 0]])
    mask = hist > 0
    seen = np.zeros((2, N_ITEMS), dtype=bool)
    seen[0, [2, 8, 9]] = True
    ids = model.search(hist, mask, seen, 4)
    assert ids.shape == (2, 4)
    assert not np.isin(ids[0], [2, 8, 9]).any() and (ids[0] >= 2).all()
    assert (((ids[0] - 2) // PER_GROUP) == 1).mean() >= 0.75  # the latest behaviours' group
    assert (ids[1] == -1).all()  # no history: no query vector
    q, ok = model.query_vectors(hist, mask)
    assert ok.tolist() == [True, False] and np.isclose(np.linalg.norm(q[0]), 1.0)


def test_min_count_and_config_errors() -> None:
    log = group_log()
    rare = pl.DataFrame({"user_id": [999, 999], "item_id": [N_ITEMS, N_ITEMS + 1],
                         "item": [N_ITEMS, N_ITEMS + 1], "timestamp": [5, 6], "label": [1, 1]})
    model = Item2Vec.fit(pl.concat([log, rare]), N_ITEMS + 2,
                         Item2VecConfig(dim=8, epochs=1, min_count=2))
    assert not model.has_vector[[0, 1, N_ITEMS, N_ITEMS + 1]].any()
    assert N_ITEMS not in model.index.ids and len(model.index) == N_ITEMS - 2
    with pytest.raises(ConfigError, match="unknown keys"):
        from_dict(Item2VecConfig, {"windw": 3})
    with pytest.raises(ValueError, match="backend"):
        Item2VecConfig(backend="fasttext")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_items"):
        Item2Vec.fit(log, 5, Item2VecConfig(epochs=1))
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        Item2VecConfig(epochs=0)


def test_learning_rate_and_epochs_default_per_backend() -> None:
    # each backend's own defaults (gensim's alpha is not an Adam step size); given ones win
    for backend in ("torch", "gensim"):
        cfg = Item2VecConfig(backend=backend)  # type: ignore[arg-type]
        assert (cfg.start_lr, cfg.n_epochs) == (DEFAULT_LR[backend], DEFAULT_EPOCHS[backend])
        cfg = Item2VecConfig(backend=backend, lr=0.5, epochs=3)  # type: ignore[arg-type]
        assert (cfg.start_lr, cfg.n_epochs) == (0.5, 3)
    # a fitted model records the values it trained with, not "the default"
    model = Item2Vec.fit(group_log(n_users=5), N_ITEMS, Item2VecConfig(dim=4))
    assert (model.config.lr, model.config.epochs) == (DEFAULT_LR["torch"], DEFAULT_EPOCHS["torch"])


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = Item2Vec.fit(group_log(n_users=20), N_ITEMS, Item2VecConfig(dim=8, epochs=2))
    model.save(tmp_path / "i2v")
    back = Item2Vec.load(tmp_path / "i2v")
    assert back.config == model.config and np.array_equal(back.vectors, model.vectors)
    assert np.array_equal(back.similar([3, 4], 3)[1], model.similar([3, 4], 3)[1])
    with pytest.raises(FileNotFoundError, match="item2vec"):
        Item2Vec.load(tmp_path)


# --- the source in the match stage, the CLI and the bundle ----------------------------------

TINY_I2V = {"dim": 8, "epochs": 5, "window": 3, "batch_size": 256, "subsample": 0.0,
            "session_gap_minutes": 60 * 24 * 2}  # the tiny log's users pause up to a day


def test_candidate_source_merged_under_its_quota(tiny_samples: SampleSet) -> None:
    s = tiny_samples
    cat = Catalog.from_samples(s)
    train = s.splits["train"]
    i2v = Item2Vec.fit(train, cat.size, Item2VecConfig(**TINY_I2V))  # type: ignore[arg-type]
    pop = Popularity.fit(train, cat.features["category"].numpy(), s.spec.vocab_size("category"),
                         {f.name: f.vocab_size for f in s.spec.features},
                         PopularConfig(segment=("user_gender",)))
    q = QuerySet.from_samples(s, "test")
    cfg = CandidateConfig(quotas=(("item_cf", 4), ("item2vec", 3), ("popular", 1)), source_k=10)
    gen = CandidateGenerator(cat, item_cf=ItemCF.fit(train, cat.size), popular=pop, config=cfg,
                             item2vec=i2v)
    merged, lists = gen.generate(q, batch=7)
    assert "item2vec" in lists and lists["item2vec"].shape == (len(q), 10)
    regular = route(q.data.tensors["hist_mask"], cfg.cold) == REGULAR
    from_i2v = merged.from_source("item2vec")
    assert from_i2v[regular].any(1).all() and not from_i2v[~regular].any()
    # the regular rows are the merge of the sources' lists under the quotas
    expect = merge({n: v[regular] for n, v in lists.items()}, dict(cfg.quotas), names=SOURCES)
    np.testing.assert_array_equal(merged.ids[regular], expect.ids)
    np.testing.assert_array_equal(merged.sources[regular], expect.sources)
    for j in np.flatnonzero(regular):
        seen = set(q.seen_items[q.seen_offsets[j]:q.seen_offsets[j + 1]].tolist())
        own = lists["item2vec"][j]
        assert not seen & set(own.tolist())
        # item2vec's first 3 (its quota) are all in, whoever else proposed them too
        assert set(own[own >= 0][:3].tolist()) <= set(merged.ids[j].tolist())
    # without a quota the source is computed but never merged: the default merge is unchanged
    plain = CandidateGenerator(cat, item_cf=gen.item_cf, popular=pop,
                               config=CandidateConfig(quotas=cfg.quotas[:1] + cfg.quotas[2:],
                                                      source_k=10))
    with_model = CandidateGenerator(cat, item_cf=gen.item_cf, popular=pop, config=plain.config,
                                    item2vec=i2v)
    np.testing.assert_array_equal(plain.generate(q)[0].ids, with_model.generate(q)[0].ids)


def test_cli_train_retriever_item2vec_and_similar_by_sessions(tiny_samples: SampleSet,
                                                              tmp_path: Path) -> None:
    samples = tiny_samples.save(tmp_path / "samples")
    out = tmp_path / "retriever"
    base = ["train", "retriever", "--samples", str(samples), "--out", str(out),
            "--set", "encoder=mean", "--set", "dim=8", "--set", "token_dim=8",
            "--train", "max_epochs=1", "--train", "batch_size=64", "--train", "num_threads=1"]
    res = runner.invoke(app, base)
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["similar", "--retriever", str(out), "--item", "10", "--by",
                              "sessions"])
    assert res.exit_code == 2 and "--item2vec" in res.output  # none trained yet
    sets = [a for k, v in TINY_I2V.items() for a in ("--item2vec-set", f"{k}={v}")]
    res = runner.invoke(app, [*base, *sets])
    assert res.exit_code == 0, res.output
    assert "item2vec (torch)" in res.output
    r = load_artifacts(out)
    assert r.item2vec is not None and r.item2vec.config.dim == 8
    res = runner.invoke(app, ["similar", "--retriever", str(out), "--item", "10", "--by",
                              "sessions", "-k", "3"])
    assert res.exit_code == 0, res.output
    assert "sessions" in res.output
    # the table lists item2vec's own nearest items, through its index, the item excluded
    _, ids = r.item2vec.similar([r.encode_id(10)], 3)
    for i in ids[0][ids[0] >= 0]:
        assert str(r.raw_id(int(i))) in res.output
    res = runner.invoke(app, [*base, "--item2vec-set", "windw=3"])
    assert res.exit_code == 2 and "unknown keys" in res.output
    res = runner.invoke(app, ["similar", "--retriever", str(out), "--item", "10", "--by", "x"])
    assert res.exit_code == 2 and "sessions" in res.output


def test_bundle_round_trip_and_online_match(artifacts: Artifacts, tmp_path: Path) -> None:
    i2v = train_item2vec(artifacts.samples, tmp_path / "r", TINY_I2V)
    bundle_dir = tmp_path / "bundle"
    quotas = "candidates={quotas: [[two_tower, 20], [item_cf, 10], [item2vec, 10], [popular, 5]]}"
    res = runner.invoke(app, ["bundle", "build", "--samples", str(artifacts.samples), "--ranker",
                              str(artifacts.ranker), "--retriever", str(artifacts.retriever),
                              "--out", str(bundle_dir), "--version", "I", "--index", "hnsw",
                              "--item2vec", str(tmp_path / "r" / "item2vec"), "--set", quotas])
    assert res.exit_code == 0, res.output
    assert "item2vec" in res.output
    bundle = load_bundle(bundle_dir)
    assert bundle.item2vec is not None
    np.testing.assert_array_equal(bundle.item2vec.vectors, i2v.vectors)
    assert isinstance(bundle.item2vec.index, FaissIndex)  # the bundle's index kind
    assert bundle.manifest["item2vec"]["config"]["dim"] == TINY_I2V["dim"]
    # the online matcher merges it: a user with a history gets item2vec candidates
    matcher = OnlineMatcher(bundle)
    assert matcher.generator.item2vec is bundle.item2vec
    s = SampleSet.load(artifacts.samples)
    q = QuerySet.from_samples(s, "test")
    j = int(np.flatnonzero(q.data.tensors["hist_mask"].sum(1).numpy() > 3)[0])
    row = q.data.batch(torch.tensor([j]))
    got = matcher.match(row, q.seen_items[q.seen_offsets[j]:q.seen_offsets[j + 1]])
    assert got.path == "regular" and got.per_source.get("item2vec", 0) > 0
    # a bundle without it has none, and its default quotas never name it
    plain = load_bundle(artifacts.bundle)
    assert plain.item2vec is None and OnlineMatcher(plain).generator.item2vec is None
