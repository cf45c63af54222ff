"""Training samples from what the service served: its impression log (monitoring/impressions.py).

The BST paper's own setting: the targets are the items a user was shown, labelled 1 when the
user clicked them and 0 when not, rather than logged behaviours with sampled negatives. One
sample per shown impression row (``shown`` True; a shadow ranking's rows were never seen):

- label (``label_impressions``, by monitoring/join.py's rule): 1 iff the log holds an event of
  the same user on the same item with ``ts <= event time < ts + window_s``; an event that
  carries a ``request_id`` counts for that request alone (the client said which answer it
  followed), one without counts for every request of the user that showed the item within the
  window.
- history: the user's events strictly before the request time, from the base samples' event
  log and the logged events it lacks (same user, item and second), in the sample builder's
  behaviour order, encoded by the builder's own functions (data/samples.py). The service's
  history held what the store had when it answered, which may include events of the same
  second; strictly before is the point-in-time rule that no log order can break.
- vocabularies and feature spec: the base samples', unchanged, so that a ranker trained here
  bundles with the base's catalogue (ids unknown to the base encode as OOV, as in the builder).
- splits: the samples' request times cut at the base config's quantiles, as the builder does.

The output is a samples folder like ``bstrec data build``'s, with ``dataset/`` holding the base
tables and the merged events (a logged event has action ``logged`` and no value), so that
``bstrec bundle build`` and ``bstrec serve --seed-events`` read it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from bstrec.config import from_dict
from bstrec.data.samples import (
    SPLITS,
    SampleConfig,
    SampleSet,
    assemble_rows,
    encode_items,
    encode_users,
    history_columns,
    make_manifest,
    prepare_events_of,
    split_stats,
    split_times,
    with_codes,
)
from bstrec.data.schema import Dataset, normalize_events
from bstrec.monitoring.impressions import read_log
from bstrec.monitoring.join import join_clicks

# One sitting: a click on an item shown an hour ago is still that answer's doing, while one a
# day later is more likely the user's own return. The replay uses the same default.
DEFAULT_WINDOW_S = 3_600
LOGGED_ACTION = "logged"
PROTOCOL = "impressions"


def label_impressions(impressions: pl.DataFrame, events: pl.DataFrame,
                      window_s: float) -> pl.DataFrame:
    """The shown rows of ``impressions`` (IMPRESSION_SCHEMA) with ``label`` (Float32): 1 where
    a logged event clicks them (``monitoring.join.join_clicks``: same user and item, in
    ``[ts, ts + window_s)``, no request id or this row's), else 0. Rows keep their order."""
    return (join_clicks(impressions, events, window_s)
            .with_columns(pl.col("clicked").cast(pl.Float32).alias("label")).drop("clicked"))


def _as_id(col: str, dtype: pl.DataType) -> pl.Expr:
    """The log's string ids back in the base dataset's id type."""
    return pl.col(col).cast(dtype, strict=False)


def _logged(frame: pl.DataFrame, base: Dataset, what: str) -> pl.DataFrame:
    """Log rows with ids in the base's types and integer seconds; refuses ids of another kind."""
    out = frame.with_columns(_as_id("user_id", base.events.schema["user_id"]),
                             _as_id("item_id", base.events.schema["item_id"]),
                             pl.col("ts").floor().cast(pl.Int64).alias("timestamp"))
    for col in ("user_id", "item_id"):
        bad = frame.filter(out[col].is_null())[col]
        if len(bad):
            raise ValueError(f"{what}: {len(bad)} rows have a {col} that is not of the base's "
                             f"id type {base.events.schema[col]}, e.g. {bad[0]!r}")
    return out


def merged_events(base: Dataset, logged: pl.DataFrame) -> pl.DataFrame:
    """The base's events and the logged events (``user_id``, ``item_id``, ``timestamp``,
    ``event_id`` in the base's types) that it lacks: a replay posts the base's own events, and
    counting them twice would double every history."""
    keys = ["user_id", "item_id", "timestamp"]
    new = (logged.select(*keys, "event_id").unique(subset=keys, maintain_order=True)
           .join(base.events.select(keys), on=keys, how="anti")
           .with_columns(pl.lit(LOGGED_ACTION).alias("action")))
    return pl.concat([base.events, normalize_events(new)], how="vertical_relaxed")


def history_bounds(events: pl.DataFrame, users: pl.Series, times: np.ndarray,
                   max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """For user-sorted ``events`` (by user id, then time), the first index and length of each
    sample's history: the user's last ``max_len`` events with timestamp < ``times[j]``."""
    ids = pl.concat([events["user_id"], users]).unique().sort()
    ev_u = with_codes(events.select("user_id"), ids, "user_id", "u")["u"].to_numpy()
    s_u = with_codes(users.to_frame("user_id"), ids, "user_id", "u")["u"].to_numpy()
    ev_t = events["timestamp"].to_numpy()
    n_ev = len(ev_u)
    # one lexicographic sort of events and samples together, a sample before the events of its
    # own second: the events ahead of a sample are then all of earlier users' and its user's
    # strictly earlier ones, so their count is the end of its history in ``events``
    is_event = np.concatenate([np.ones(n_ev, np.int64), np.zeros(len(s_u), np.int64)])
    order = np.lexsort((is_event, np.concatenate([ev_t, times]), np.concatenate([ev_u, s_u])))
    before = np.cumsum(is_event[order])
    end = np.empty(len(s_u), dtype=np.int64)
    sample_pos = np.flatnonzero(is_event[order] == 0)
    end[order[sample_pos] - n_ev] = before[sample_pos]
    start = np.searchsorted(ev_u, s_u, side="left")
    lengths = np.minimum(end - start, max_len)
    return end - lengths, lengths


def impression_samples(base: SampleSet, impressions: pl.DataFrame, events: pl.DataFrame,
                       window_s: float, *, raw_history: bool = False) -> SampleSet:
    """Samples of the shown ``impressions`` (rows of ``read_log(dir)``) labelled from the
    logged ``events`` (``read_log(dir, "events")``), over ``base``'s vocabularies, spec and
    dataset. ``raw_history`` adds ``hist_item_id`` (the history's raw item ids)."""
    if base.dataset is None:
        raise ValueError("the base samples have no dataset/ tables: rebuild them with "
                         "`bstrec data build`")
    dataset = base.dataset
    cfg = from_dict(SampleConfig, dict(base.manifest.get("config", {})), where="base config")
    labelled = label_impressions(impressions, events, window_s).unique(
        subset=["request_id", "item_id"], keep="first", maintain_order=True)
    if labelled.height == 0:
        raise ValueError("the impression log holds no shown impression")
    samples = (_logged(labelled, dataset, "impressions")
               .select("user_id", "item_id", "timestamp", "label", "request_id",
                       pl.col("position").cast(pl.Int32))
               .sort("timestamp", "request_id", "position"))
    implicit = dataset.feedback != "explicit"
    logged = _logged(events, dataset, "events")
    merged = Dataset(dataset.name, merged_events(dataset, logged), dataset.items, dataset.users,
                     dataset.feedback, dataset.user_features, dataset.item_features,
                     dataset.item_multi_features, dataset.meta)
    # the builder's behaviour order, and its category join that keeps the rows in place
    ev = (prepare_events_of(merged.events, implicit)
          .join(dataset.items.select("item_id", "category"), on="item_id", how="left",
                maintain_order="left"))
    ts = samples["timestamp"].to_numpy()
    first, lengths = history_bounds(ev, samples["user_id"], ts, cfg.max_len)
    vocabs, spec = base.vocabs, base.spec
    item_enc = encode_items(dataset.items, dataset, vocabs)
    user_enc = encode_users(dataset.users, dataset, vocabs)
    hist = history_columns(ev, item_enc, vocabs, first, lengths, ts, raw_history=raw_history)
    t80, t90 = split_times(samples["timestamp"], cfg)
    split = np.where(ts < t80, 0, np.where(ts < t90, 1, 2)).astype(np.int8)
    rows = assemble_rows(samples.with_columns(*hist, pl.Series("_split", split)), user_enc,
                         item_enc, vocabs, spec)
    if implicit:
        rows = rows.with_columns(pl.lit(None, dtype=pl.String).alias("action"))
    cols = ["user_id", "item_id", "timestamp", "label", *(["action"] if implicit else []),
            *[f.name for f in spec.features], "hist_item", "hist_cat", "hist_dt",
            *(["hist_item_id"] if raw_history else []), "request_id", "position"]
    splits = {name: rows.filter(pl.col("_split") == i).select(cols)
              for i, name in enumerate(SPLITS)}
    manifest = make_manifest(merged, cfg, split_stats(splits), vocabs, t80, t90,
                             n_events=merged.events.height)
    info: dict[str, Any] = {
        "base_protocol": base.manifest.get("protocol"),
        "base_config_hash": base.manifest.get("config_hash"),
        "window_s": window_s,
        "requests": samples["request_id"].n_unique(),
        "shown": samples.height,
        "clicked": int(samples["label"].sum()),
        "logged_events": events.height,
        "logged_events_added": merged.events.height - dataset.events.height,
    }
    manifest.update(protocol=PROTOCOL, impressions=info)
    return SampleSet(splits=splits, vocabs=vocabs, spec=spec, manifest=manifest, dataset=merged)


def build_impression_samples(log_dir: str | Path, base_dir: str | Path, out: str | Path, *,
                             window_s: float = DEFAULT_WINDOW_S) -> Path:
    """Read the impression log in ``log_dir``, build ``impression_samples`` over the samples
    in ``base_dir`` (``bstrec data build``'s output) and write them to ``out`` (atomically)."""
    log = Path(log_dir)
    if not log.is_dir():
        raise FileNotFoundError(f"{log}: no such impression log directory")
    base = SampleSet.load(base_dir)
    impressions = read_log(log, "impressions")
    events = read_log(log, "events")
    samples = impression_samples(base, impressions, events, window_s)
    samples.manifest["impressions"]["log"] = str(log.resolve())
    samples.manifest["impressions"]["base"] = str(Path(base_dir).resolve())
    return samples.save(out)
