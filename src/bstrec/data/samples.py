"""Point-in-time training samples (protocol P1/P3 in ../shared/PROTOCOL.md).

One sample per event (explicit feedback: label = value >= threshold) or per positive event plus
sampled negatives (implicit feedback). The history of a sample is the same user's at most
``max_len`` earlier events in (timestamp, item id) order, oldest first, each with its item,
category and the time difference ``sample time - event time`` (seconds, >= 0). Nothing in a sample
comes from a later time than the sample. Splits cut the samples' timestamps at global quantiles;
vocabularies are fitted on the train split only.

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
PROTOCOLS = {"ml-1m": "ml1m-ctr", "ml-100k": "ml100k-ctr", "synthetic-order": "synthetic-order"}
SECONDS_PER_DAY = 86_400
EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday; Monday = 0


@dataclass(frozen=True)
class SampleConfig:
    """How samples are built (``bstrec.config.from_dict`` fills it; unknown keys are errors)."""

    max_len: int = 20
    # explicit feedback: label = value >= label_threshold (P1: rating >= 4)
    label_threshold: float = 4.0
    # implicit feedback: which actions are positives (None = every action)
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


def _sample_negatives(events: pl.DataFrame, pos: pl.DataFrame, cfg: SampleConfig,
                      rng: np.random.Generator) -> pl.DataFrame:
    """``cfg.negatives`` items per positive, none of which the user touched up to that time."""
    counts = events.group_by("item_id").len().sort("item_id")
    catalog = counts["item_id"]
    if cfg.negative_sampling == "popularity":
        # Counted over the first 80% of the log so the distribution never peeks at the test period.
        cut = float(np.quantile(events["timestamp"].to_numpy(), cfg.split_quantiles[0]))
        early = events.filter(pl.col("timestamp") < cut).group_by("item_id").len()
        weights = counts.join(early, on="item_id", how="left", suffix="_e")["len_e"].fill_null(0)
        p = weights.to_numpy().astype(np.float64) + 1.0  # +1: every item can be drawn
        p /= p.sum()
    else:
        p = None
    first_seen = (events.group_by("user_id", "item_id")
                  .agg(pl.col("timestamp").min().alias("_first")))
    todo = pos.select("_event", "user_id", "timestamp").join(
        pl.DataFrame({"_k": np.arange(cfg.negatives, dtype=np.int32)}), how="cross")
    done: list[pl.DataFrame] = []
    for _ in range(50):
        if todo.height == 0:
            break
        draw = rng.choice(len(catalog), size=todo.height, p=p)
        cand = todo.with_columns(catalog.gather(draw).alias("item_id"))
        cand = cand.join(first_seen, on=["user_id", "item_id"], how="left")
        ok = pl.col("_first").is_null() | (pl.col("_first") > pl.col("timestamp"))
        done.append(cand.filter(ok).drop("_first"))
        todo = cand.filter(~ok).drop("_first", "item_id")
    if todo.height:
        log.warning("dropped %d negatives: no item left that the user had not touched", todo.height)
    return pl.concat(done).select("_event", "item_id").with_columns(pl.lit(0.0).alias("label"))


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
    events = sort_events(dataset.events).with_row_index("_event")
    events = events.join(items.select("item_id", "category"), on="item_id", how="left")
    user_codes = events["user_id"].rank("dense").to_numpy()
    first, lengths = history_slices(user_codes, cfg.max_len)

    stage("choosing targets and labels")
    # 1. which events are samples, with which target and label
    if dataset.feedback == "explicit":
        label = (pl.col("value") >= cfg.label_threshold).cast(pl.Float32).alias("label")
        samples = events.select("_event", "item_id", label)
    else:
        pos_mask = (pl.lit(True) if cfg.positive_actions is None
                    else pl.col("action").is_in(list(cfg.positive_actions)))
        pos = events.filter(pos_mask)
        positives = pos.select("_event", "item_id", pl.lit(1.0).alias("label"))
        parts = [positives]
        if cfg.negatives:
            parts.append(_sample_negatives(events, pos, cfg, rng))
        samples = pl.concat(parts).with_columns(pl.col("label").cast(pl.Float32))
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
    # 3. vocabularies from train samples only
    train = samples.filter(pl.col("_split") == 0)
    train_items = items.join(train.select("item_id").unique(), on="item_id", how="semi")
    train_users = dataset.users.join(train.select("user_id").unique(), on="user_id", how="semi")
    vocabs = Vocabularies({
        "user_id": Vocabulary.fit(train["user_id"]),
        "item_id": Vocabulary.fit(train["item_id"]),
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
    cols = ["user_id", "item_id", "timestamp", "label", *feature_cols,
            "hist_item", "hist_cat", "hist_dt", *(["hist_item_id"] if raw_history else [])]
    splits = {name: out.filter(pl.col("_split") == i).select(cols) for i, name in enumerate(SPLITS)}
    manifest = make_manifest(dataset, cfg, splits, vocabs, t80, t90)
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
