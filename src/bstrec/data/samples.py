"""Point-in-time training samples (protocols P1/P3 and P5 in ../shared/PROTOCOL.md).

One sample per event (explicit feedback: label = value >= threshold) or, for implicit logs (P5),
per distinct positive event plus negatives drawn from the catalogue as of its time. The history
of a sample is the same user's at most ``max_len`` earlier events in (timestamp, item id) order,
oldest first, each with its item, category and the time difference ``sample time - event time``
(seconds, >= 0). Nothing in a sample, its negatives or its vocabularies comes from a later time
than the sample. Splits cut the samples' timestamps at global quantiles; vocabularies are fitted
on the train samples and their histories only.

Everything is vectorised: the history of every event is a slice of the user-sorted event arrays,
so the (sample, position) index matrix is built with NumPy, never with a Python loop per user.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import polars as pl
import pyarrow as pa

import bstrec
from bstrec.data.io import atomic_dir
from bstrec.data.schema import Dataset
from bstrec.features.spec import OOV, Feature, FeatureSpec
from bstrec.features.vocab import Vocabularies, Vocabulary

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
# Generated logs name their own protocol; synthetic-implicit takes P5's sample defaults (max_len
# 20, one uniform negative per positive), as taobao-ctr does.
PROTOCOLS = {"ml-1m": "ml1m-ctr", "ml-100k": "ml100k-ctr", "synthetic-order": "synthetic-order",
             "synthetic-implicit": "synthetic-implicit"}
SECONDS_PER_DAY = 86_400
EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday; Monday = 0


@dataclass(frozen=True)
class SampleConfig:
    """How samples are built (``bstrec.config.from_dict`` fills it; unknown keys are errors)."""

    max_len: int = 20
    # explicit feedback: label = value >= label_threshold (P1: rating >= 4)
    label_threshold: float = 4.0
    # implicit feedback: which actions are positives (None = every action); histories keep all
    positive_actions: tuple[str, ...] | None = None
    # implicit feedback: sampled negatives per positive, and from which distribution
    negatives: int = 1
    negative_sampling: Literal["uniform", "popularity"] = "uniform"
    split_quantiles: tuple[float, float] = (0.8, 0.9)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")
        if self.negatives < 0:
            raise ValueError(f"negatives must be >= 0, got {self.negatives}")
        if self.negative_sampling not in ("uniform", "popularity"):
            raise ValueError(f"negative_sampling must be 'uniform' or 'popularity', "
                             f"got {self.negative_sampling!r}")
        lo, hi = self.split_quantiles
        if not 0 < lo < hi < 1:
            raise ValueError(
                f"split_quantiles must satisfy 0 < a < b < 1, got {self.split_quantiles}")

@dataclass
class SampleSet:
    """Encoded samples per split, with what is needed to encode the same way online."""

    splits: dict[str, pl.DataFrame]
    vocabs: Vocabularies
    spec: FeatureSpec
    manifest: dict[str, Any]
    dataset: Dataset | None = field(default=None, repr=False)

    def save(self, out: str | Path, *, with_dataset: bool = True) -> Path:
        """Write ``samples/*.parquet``, ``vocab.json``, ``feature_spec.json``, ``manifest.json``
        (and the canonical ``dataset/`` tables) in one atomic rename."""
        with atomic_dir(out) as tmp:
            (tmp / "samples").mkdir()
            for name, frame in self.splits.items():
                frame.write_parquet(tmp / "samples" / f"{name}.parquet")
            self.vocabs.save(tmp / "vocab.json")
            self.spec.save(tmp / "feature_spec.json")
            if with_dataset and self.dataset is not None:
                self.dataset.save(tmp / "dataset")
            (tmp / "manifest.json").write_text(json.dumps(self.manifest, indent=2) + "\n")
        return Path(out)

    @classmethod
    def load(cls, path: str | Path, splits: tuple[str, ...] = SPLITS) -> SampleSet:
        root = Path(path)
        manifest_path = root / "manifest.json"
        if not manifest_path.exists():
            raise FileNotFoundError(f"{manifest_path} not found: is {root} the output of "
                                    "`bstrec data build`?")
        dataset = Dataset.load(root / "dataset") if (root / "dataset").exists() else None
        return cls(
            splits={s: pl.read_parquet(root / "samples" / f"{s}.parquet") for s in splits},
            vocabs=Vocabularies.load(root / "vocab.json"),
            spec=FeatureSpec.load(root / "feature_spec.json"),
            manifest=json.loads(manifest_path.read_text()),
            dataset=dataset,
        )


def protocol_name(dataset: str) -> str:
    return PROTOCOLS.get(dataset, f"{dataset}-ctr")


def sort_events(events: pl.DataFrame) -> pl.DataFrame:
    """The behaviour order: per user by (timestamp, item id), ties kept in file order."""
    return (events.with_row_index("_row")
            .sort(["user_id", "timestamp", "item_id", "_row"]).drop("_row"))


def behaviour_order(timestamps: list[int], item_ids: list[Any]) -> list[int]:
    """The order ``sort_events`` gives ONE user's events, as positions into them: by
    (timestamp, item id), full ties in input order. For a request's few behaviours, where a
    frame and its sort cost more than the rest of the request's features (features/online.py);
    tests/data/test_samples.py checks it against ``sort_events``."""
    return sorted(range(len(timestamps)), key=lambda j: (timestamps[j], item_ids[j]))


def in_histories(user_codes: np.ndarray, sample_events: np.ndarray, max_len: int) -> np.ndarray:
    """(n,) whether each user-sorted event is in the history of one of ``sample_events``.

    Event i is in the history of the sample at event e iff e is the same user's and
    i < e <= i + max_len: the nearest sample event after i decides, no history is gathered.
    """
    n = len(user_codes)
    targets = np.unique(sample_events)
    if len(targets) == 0:
        return np.zeros(n, dtype=bool)
    idx = np.arange(n, dtype=np.int64)
    nxt = np.searchsorted(targets, idx, side="right")
    has = nxt < len(targets)
    e = targets[np.minimum(nxt, len(targets) - 1)]
    covered: np.ndarray = has & (e - idx <= max_len) & (user_codes[e] == user_codes)
    return covered


def history_slices(user_codes: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """For user-sorted events, the first index and length of each event's history.

    History of event i = events [i - length, i) of the same user, length <= max_len.
    """
    n = len(user_codes)
    idx = np.arange(n, dtype=np.int64)
    is_start = np.ones(n, dtype=bool)
    is_start[1:] = user_codes[1:] != user_codes[:-1]
    run_start = np.maximum.accumulate(np.where(is_start, idx, 0))
    lengths = np.minimum(idx - run_start, max_len)
    return idx - lengths, lengths


def gather_lists(first: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (n+1,) and flat indices of the slices [first[j], first[j] + lengths[j])."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    within = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], lengths)
    return offsets, np.repeat(first, lengths) + within


def list_series(name: str, offsets: np.ndarray, values: np.ndarray) -> pl.Series:
    arr = pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(values))
    return pl.Series(name, arr)


def hour_and_weekday(ts: Any) -> tuple[Any, Any]:
    """Hour of day and day of week (Monday = 0) of unix times, UTC: the arithmetic alone, so
    that one definition serves Polars expressions (offline) and integers (one request)."""
    return (ts % SECONDS_PER_DAY) // 3600, (ts // SECONDS_PER_DAY + EPOCH_WEEKDAY) % 7


def context_columns(ts: pl.Expr) -> list[pl.Expr]:
    """Hour of day and day of week (Monday = 0) of a unix time, UTC."""
    hour, dow = hour_and_weekday(ts)
    return [hour.cast(pl.Int32).alias("hour"), dow.cast(pl.Int32).alias("dow")]


def prepare_events(dataset: Dataset) -> pl.DataFrame:
    """The events samples are built from, in the behaviour order (``sort_events``). Implicit
    logs (P5) drop exact duplicate rows: a logging retry is not a second behaviour."""
    events = dataset.events
    if dataset.feedback != "explicit":
        events = events.unique(maintain_order=True)
    return sort_events(events)


@dataclass(frozen=True)
class NegativePool:
    """The catalogue of every time at once (P5 step 3): the items drawable as of t are
    ``items[:size(t)]``, the entries whose time is strictly before t.

    Uniform: one entry per item at its first event, so the prefix is the set of items seen
    before t. Popularity: one entry per event in time order, so a uniform entry of the prefix is
    an item drawn with its event count before t. Either way one binary search and one uniform
    integer per draw, however long the log.
    """

    items: np.ndarray  # (P,) item codes
    times: np.ndarray  # (P,) non-decreasing timestamps
    item_ids: pl.Series  # item id of each code

    def size(self, t: np.ndarray) -> np.ndarray:
        """(N,) how many entries are drawable at each of the times ``t`` (N,)."""
        # sorted needles: the binary searches walk the pool once instead of missing the cache
        order = np.argsort(t, kind="stable")
        sizes = np.empty(len(t), dtype=np.int64)
        sizes[order] = np.searchsorted(self.times, t[order], side="left")
        return sizes

    def weights(self, t: int) -> dict[Any, int]:
        """Item id -> weight of the distribution ``draw`` samples at time ``t``."""
        codes, counts = np.unique(self.items[: int(self.size(np.array([t]))[0])],
                                  return_counts=True)
        return dict(zip(self.item_ids.gather(codes).to_list(), counts.tolist(), strict=True))

    def draw(self, t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(N,) item codes, one drawn as of each time in ``t`` (N,); every size(t) must be > 0."""
        return self.draw_below(self.size(t), rng)

    def draw_below(self, sizes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``draw`` for times whose ``size`` is already known."""
        return self.items[rng.integers(0, sizes)]


def negative_pool(events: pl.DataFrame, sampling: Literal["uniform", "popularity"]
                  ) -> NegativePool:
    """The pool ``_sample_negatives`` draws from, for the ``prepare_events`` frame ``events``."""
    codes, item_ids = _item_codes(events)
    return _pool(codes, events["timestamp"].to_numpy(), item_ids, sampling)


def _item_codes(events: pl.DataFrame) -> tuple[np.ndarray, pl.Series]:
    """Each event's item as an index into the sorted distinct item ids, and those ids."""
    codes = (events["item_id"].rank("dense").cast(pl.Int64) - 1).to_numpy()
    return codes, events["item_id"].unique().sort()


def _pool(codes: np.ndarray, ts: np.ndarray, item_ids: pl.Series,
          sampling: Literal["uniform", "popularity"]) -> NegativePool:
    entries = pl.DataFrame({"item": codes, "t": ts})
    if sampling == "uniform":
        entries = entries.group_by("item").agg(pl.col("t").min())
    # (time, item code): the pool, and so the seeded draws, do not depend on the file order
    entries = entries.sort("t", "item")
    return NegativePool(entries["item"].to_numpy(), entries["t"].to_numpy(), item_ids)


@dataclass(frozen=True)
class _Touched:
    """When each user first touched each item: (user code, item code) keys, sorted."""

    keys: np.ndarray
    first: np.ndarray
    n_items: int

    @classmethod
    def build(cls, user_codes: np.ndarray, item_codes: np.ndarray, ts: np.ndarray,
              n_items: int) -> _Touched:
        frame = (pl.DataFrame({"k": user_codes.astype(np.int64) * n_items + item_codes,
                               "t": ts})
                 .group_by("k").agg(pl.col("t").min()).sort("k"))
        return cls(frame["k"].to_numpy(), frame["t"].to_numpy(), n_items)

    def at_or_before(self, users: np.ndarray, items: np.ndarray, t: np.ndarray) -> np.ndarray:
        """(N,) whether user ``users[j]`` touched item ``items[j]`` at or before ``t[j]``."""
        keys = users.astype(np.int64) * self.n_items + items
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        hit: np.ndarray = (self.keys[pos] == keys) & (self.first[pos] <= t)
        return hit

    def items_of(self, user: int, t: int) -> np.ndarray:
        """Item codes the user touched at or before ``t``."""
        lo, hi = np.searchsorted(self.keys, [user * self.n_items, (user + 1) * self.n_items])
        return self.keys[lo:hi][self.first[lo:hi] <= t] - user * self.n_items


REJECTION_ROUNDS = 30


def _sample_negatives(events: pl.DataFrame, user_codes: np.ndarray, pos_idx: np.ndarray,
                      cfg: SampleConfig, rng: np.random.Generator
                      ) -> tuple[pl.DataFrame, dict[str, int]]:
    """``cfg.negatives`` items per positive event ``pos_idx`` (P5 step 3) from the catalogue
    as of its time, none of which the user touched at or before that time; and how many could
    not be drawn (``empty_catalogue``: nothing before t; ``all_touched``: the user had touched
    every item of it)."""
    item_codes, item_ids = _item_codes(events)
    ts = events["timestamp"].to_numpy()
    pool = _pool(item_codes, ts, item_ids, cfg.negative_sampling)
    touched = _Touched.build(user_codes, item_codes, ts, len(pool.item_ids))
    # row r = (positive r // negatives, draw r % negatives)
    row_event = np.repeat(pos_idx, cfg.negatives)
    row_user, row_ts = user_codes[row_event], ts[row_event]
    row_size = np.repeat(pool.size(ts[pos_idx]), cfg.negatives)
    drawn = np.full(len(row_event), -1, dtype=np.int64)
    empty = row_size == 0
    todo = np.flatnonzero(~empty)
    for _ in range(REJECTION_ROUNDS):
        if len(todo) == 0:
            break
        cand = pool.draw_below(row_size[todo], rng)
        ok = ~touched.at_or_before(row_user[todo], cand, row_ts[todo])
        drawn[todo[ok]] = cand[ok]
        todo = todo[~ok]
    # The few rows still rejected draw exactly from what the user left untouched (the same
    # distribution as endless redrawing), or have nothing left to draw.
    all_touched = 0
    for r in todo:
        entries = pool.items[: row_size[r]]
        left = np.flatnonzero(~np.isin(entries, touched.items_of(int(row_user[r]),
                                                                 int(row_ts[r]))))
        if len(left) == 0:
            all_touched += 1
        else:
            drawn[r] = entries[left[rng.integers(len(left))]]
    if all_touched:
        log.warning("dropped %d negatives: the user had touched every item of the catalogue "
                    "as of the sample's time", all_touched)
    keep = drawn >= 0
    negatives = pl.DataFrame({
        "_event": pl.Series(row_event[keep]).cast(events.schema["_event"]),
        "item_id": pool.item_ids.gather(drawn[keep]),
        "label": pl.Series(np.zeros(int(keep.sum())), dtype=pl.Float64),
    })
    return negatives, {"empty_catalogue": int(empty.sum()), "all_touched": all_touched}


def build_samples(dataset: Dataset, cfg: SampleConfig | None = None, *,
                  raw_history: bool = False,
                  progress: Callable[[str], None] | None = None) -> SampleSet:
    """Build encoded point-in-time samples of ``dataset`` (see the module docstring).

    ``raw_history`` adds ``hist_item_id``: the history's raw item ids (for inspection and tests).
    ``progress`` is called with the name of each stage as it starts.
    """
    cfg = cfg or SampleConfig()
    stage = progress or (lambda name: None)
    stage("ordering events")
    rng = np.random.default_rng(cfg.seed)
    items = dataset.items
    implicit = dataset.feedback != "explicit"
    events = prepare_events(dataset).with_row_index("_event")
    # history_slices reads runs of one user: the join must keep the user-sorted rows in place
    events = events.join(items.select("item_id", "category"), on="item_id", how="left",
                         maintain_order="left")
    user_codes = events["user_id"].rank("dense").to_numpy()
    first, lengths = history_slices(user_codes, cfg.max_len)

    stage("choosing targets and labels")
    # 1. which events are samples, with which target and label
    missing: dict[str, int] = {}
    if not implicit:
        label = (pl.col("value") >= cfg.label_threshold).cast(pl.Float32).alias("label")
        samples = events.select("_event", "item_id", label)
    else:
        pos_mask = (pl.lit(True) if cfg.positive_actions is None
                    else pl.col("action").is_in(list(cfg.positive_actions)))
        pos = events.filter(pos_mask)
        positives = pos.select("_event", "item_id", pl.lit(1.0).alias("label"), "action")
        parts = [positives]
        if cfg.negatives:
            stage("sampling negatives")
            negatives, missing = _sample_negatives(
                events, user_codes, pos["_event"].to_numpy(), cfg, rng)
            parts.append(negatives.with_columns(pl.lit(None, dtype=pl.String).alias("action")))
        samples = pl.concat(parts).with_columns(pl.col("label").cast(pl.Float32))
    if samples.height == 0:
        raise ValueError(f"dataset {dataset.name!r}: no samples (no event"
                         + (f" of positive_actions {list(cfg.positive_actions)})"
                            if implicit and cfg.positive_actions is not None else ")"))
    samples = samples.sort("_event", "label", descending=[False, True], maintain_order=True)
    ev_idx = samples["_event"].to_numpy()
    ev_cols = events.select("user_id", "timestamp").gather(ev_idx)
    samples = samples.with_columns(ev_cols["user_id"], ev_cols["timestamp"])

    stage("splitting by time")
    # 2. global time split
    ts = samples["timestamp"].to_numpy()
    t80, t90 = (float(x) for x in np.quantile(ts, cfg.split_quantiles))
    split = np.where(ts < t80, 0, np.where(ts < t90, 1, 2)).astype(np.int8)
    samples = samples.with_columns(pl.Series("_split", split))

    stage("fitting vocabularies on train")
    # 3. vocabularies from train samples and their histories only (P5 step 5)
    train = samples.filter(pl.col("_split") == 0)
    seen = events.filter(pl.Series(in_histories(user_codes, ev_idx[split == 0], cfg.max_len)))
    train_item_ids = pl.concat([train["item_id"], seen["item_id"]]).unique()
    train_user_ids = pl.concat([train["user_id"], seen["user_id"]]).unique()
    train_items = items.join(train_item_ids.to_frame(), on="item_id", how="semi")
    train_users = dataset.users.join(train_user_ids.to_frame(), on="user_id", how="semi")
    vocabs = Vocabularies({
        "user_id": Vocabulary.fit(train_user_ids),
        "item_id": Vocabulary.fit(train_item_ids),
        "category": Vocabulary.fit(train_items["category"]),
        "hour": Vocabulary(list(range(24))),
        "dow": Vocabulary(list(range(7))),
    })
    for f in dataset.user_features:
        vocabs[f"user_{f}"] = Vocabulary.fit(train_users[f].cast(pl.String))
    for f in dataset.item_features:
        vocabs[f"item_{f}"] = Vocabulary.fit(train_items[f].cast(pl.String))
    for f in dataset.item_multi_features:
        vocabs[f"item_{f}"] = Vocabulary.fit(train_items[f].explode().cast(pl.String))

    stage("encoding features")
    # 4. encode items and users once, then join to samples
    item_enc = encode_items(items, dataset, vocabs)
    user_enc = encode_users(dataset.users, dataset, vocabs)

    stage("gathering histories")
    # 5. histories: the slice of user-sorted events before each sample's event
    hist = history_columns(events, item_enc, vocabs, first[ev_idx], lengths[ev_idx], ts,
                           raw_history=raw_history)

    spec = make_spec(dataset, vocabs, cfg.max_len)
    out = assemble_rows(samples.with_columns(*hist), user_enc, item_enc, vocabs, spec)
    feature_cols = [f.name for f in spec.features]
    cols = ["user_id", "item_id", "timestamp", "label", *(["action"] if implicit else []),
            *feature_cols, "hist_item", "hist_cat", "hist_dt",
            *(["hist_item_id"] if raw_history else [])]
    splits = {name: out.filter(pl.col("_split") == i).select(cols) for i, name in enumerate(SPLITS)}
    manifest = make_manifest(dataset, cfg, splits, vocabs, t80, t90)
    if implicit:
        manifest["duplicate_events_dropped"] = dataset.events.height - events.height
        manifest["negatives_not_drawn"] = missing
    return SampleSet(splits=splits, vocabs=vocabs, spec=spec, manifest=manifest, dataset=dataset)


class FeatureColumns(Protocol):
    """Which raw user/item columns are features: a Dataset, or online the FeatureSpec's view."""

    @property
    def user_features(self) -> tuple[str, ...]: ...
    @property
    def item_features(self) -> tuple[str, ...]: ...
    @property
    def item_multi_features(self) -> tuple[str, ...]: ...


def history_columns(events: pl.DataFrame, item_enc: pl.DataFrame, vocabs: Vocabularies,
                    first: np.ndarray, lengths: np.ndarray, sample_ts: np.ndarray, *,
                    raw_history: bool = False) -> list[pl.Series]:
    """``hist_item``, ``hist_cat``, ``hist_dt`` (and ``hist_item_id``) list columns.

    ``events``: user-sorted events (``item_id``, ``timestamp``, ``category``); sample j's history
    is ``events[first[j] : first[j] + lengths[j]]`` seen at time ``sample_ts[j]``. Shared by the
    offline builder and the online features (features/online.py), so that both encode alike.
    """
    ev_item = events.select("item_id").join(item_enc.select("item_id", "item", "category"),
                                            on="item_id", how="left", maintain_order="left")
    ev_item_idx = ev_item["item"].fill_null(OOV).to_numpy()
    ev_cat_idx = vocabs["category"].encode(events["category"]).to_numpy()
    offsets, hidx, item_idx, cat_idx, hist_dt = history_arrays(
        ev_item_idx, ev_cat_idx, events["timestamp"].to_numpy(), first, lengths, sample_ts)
    hist = [
        list_series("hist_item", offsets, item_idx.astype(np.int32)),
        list_series("hist_cat", offsets, cat_idx.astype(np.int32)),
        list_series("hist_dt", offsets, hist_dt),
    ]
    if raw_history:
        raw_ids = events["item_id"].to_numpy()[hidx]
        hist.append(list_series("hist_item_id", offsets, raw_ids))
    return hist


def history_arrays(ev_item_idx: np.ndarray, ev_cat_idx: np.ndarray, ev_ts: np.ndarray,
                   first: np.ndarray, lengths: np.ndarray, sample_ts: np.ndarray
                   ) -> tuple[np.ndarray, ...]:
    """``history_columns`` on encoded event arrays: offsets (n+1,), the flat event indices, and
    flat ``hist_item``, ``hist_cat`` codes and ``hist_dt`` (int64 seconds) of every sample's
    history ``[first[j], first[j] + lengths[j])``; one request calls it without frames."""
    offsets, hidx = gather_lists(first, lengths)
    sample_of = np.repeat(np.arange(len(first)), lengths)
    hist_dt = (sample_ts[sample_of] - ev_ts[hidx]).astype(np.int64)
    return offsets, hidx, ev_item_idx[hidx], ev_cat_idx[hidx], hist_dt


def assemble_rows(samples: pl.DataFrame, user_enc: pl.DataFrame, item_enc: pl.DataFrame,
                  vocabs: Vocabularies, spec: FeatureSpec) -> pl.DataFrame:
    """Samples (``user_id``, ``item_id``, ``timestamp``, ...) with every encoded feature column
    joined on: user and target-item columns, context of the timestamp. Shared with serving."""
    out = (samples
           .join(user_enc, on="user_id", how="left", maintain_order="left")
           .join(item_enc, on="item_id", how="left", maintain_order="left")
           .with_columns(context_columns(pl.col("timestamp"))))
    # Users or items absent from their tables join as null: they are out of vocabulary.
    return out.with_columns(
        vocabs["hour"].encode(out["hour"]), vocabs["dow"].encode(out["dow"]),
        *[pl.col(f.name).fill_null(OOV if f.kind == "categorical" else [])
          for f in spec.features if f.group != "context"])


def encode_items(items: pl.DataFrame, dataset: FeatureColumns, vocabs: Vocabularies) -> pl.DataFrame:
    """Item id -> encoded target-item columns (``item``, ``category``, ``item_<feature>``)."""
    cols = [
        vocabs["item_id"].encode(items["item_id"]).alias("item"),
        vocabs["category"].encode(items["category"]).alias("category"),
    ]
    for f in (*dataset.item_features, *dataset.item_multi_features):
        src = items[f]
        src = src.cast(pl.List(pl.String) if isinstance(src.dtype, pl.List) else pl.String)
        cols.append(vocabs[f"item_{f}"].encode(src).alias(f"item_{f}"))
    return pl.DataFrame([items["item_id"], *cols])


def encode_users(users: pl.DataFrame, dataset: FeatureColumns, vocabs: Vocabularies) -> pl.DataFrame:
    """User id -> encoded user columns (``user``, ``user_<feature>``)."""
    cols = [vocabs["user_id"].encode(users["user_id"]).alias("user")]
    for f in dataset.user_features:
        cols.append(vocabs[f"user_{f}"].encode(users[f].cast(pl.String)).alias(f"user_{f}"))
    return pl.DataFrame([users["user_id"], *cols])


def make_spec(dataset: FeatureColumns, vocabs: Vocabularies, max_len: int) -> FeatureSpec:
    feats = [Feature("user", "categorical", "user", len(vocabs["user_id"]), "user_id")]
    feats += [Feature(f"user_{f}", "categorical", "user", len(vocabs[f"user_{f}"]), f"user_{f}")
              for f in dataset.user_features]
    feats += [Feature("item", "categorical", "item", len(vocabs["item_id"]), "item_id"),
              Feature("category", "categorical", "item", len(vocabs["category"]), "category")]
    feats += [Feature(f"item_{f}", "categorical", "item", len(vocabs[f"item_{f}"]), f"item_{f}")
              for f in dataset.item_features]
    feats += [Feature(f"item_{f}", "multi", "item", len(vocabs[f"item_{f}"]), f"item_{f}")
              for f in dataset.item_multi_features]
    feats += [Feature("hour", "categorical", "context", len(vocabs["hour"]), "hour"),
              Feature("dow", "categorical", "context", len(vocabs["dow"]), "dow")]
    return FeatureSpec(features=tuple(feats), max_len=max_len)


def config_hash(dataset: Dataset, cfg: SampleConfig) -> str:
    blob = json.dumps({"dataset": dataset.name, "meta": dataset.meta,
                       "events": dataset.events.height, "config": dataclasses.asdict(cfg)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def make_manifest(dataset: Dataset, cfg: SampleConfig, splits: dict[str, pl.DataFrame],
                  vocabs: Vocabularies, t80: float, t90: float) -> dict[str, Any]:
    manifest = {
        "protocol": protocol_name(dataset.name),
        "dataset": dataset.name,
        "feedback": dataset.feedback,
        "splits": {k: v.height for k, v in splits.items()},
        "positive_rate": {k: round(float(v["label"].cast(pl.Float64).sum()) / max(v.height, 1), 6)
                          for k, v in splits.items()},
        "empty_history": {k: int((v["hist_item"].list.len() == 0).sum())
                          for k, v in splits.items()},
        "t80": t80,
        "t90": t90,
        # train values only, without the padding and OOV slots
        "vocab_sizes": {k: len(v.values) for k, v in vocabs.items()},
        "max_len": cfg.max_len,
        "config": dataclasses.asdict(cfg),
        "config_hash": config_hash(dataset, cfg),
        "source": dataset.meta,
        "events": dataset.events.height,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "bstrec_version": bstrec.__version__,
    }
    # as it will read back from manifest.json (tuples become lists)
    loaded: dict[str, Any] = json.loads(json.dumps(manifest))
    return loaded
