"""Clicks joined onto impressions: which shown items the user then interacted with.

An impression is clicked when an event of the same user on the same item has a timestamp in
``[impression ts, impression ts + window_s)``. An event that names the ``request_id`` of the
answer it follows counts for that request only, so that two answers showing the same item to the
same user within the window do not both claim its click; an event without one counts for every
impression it falls after. Shadow rows (``shown`` False) were never seen by the user and are
dropped.
"""

from __future__ import annotations

import polars as pl

_EVENT_COLUMNS = ("request_id", "user_id", "item_id", "ts")


def join_clicks(impressions: pl.DataFrame, events: pl.DataFrame, window_s: float
                ) -> pl.DataFrame:
    """The shown rows of ``impressions`` (IMPRESSION_SCHEMA, any order kept) with a Boolean
    ``clicked`` column. ``events``: EVENT_SCHEMA rows (an empty frame, even without columns,
    means no clicks). Several events matching one impression click it once."""
    if not window_s > 0:
        raise ValueError(f"window_s must be > 0, got {window_s}")
    shown = impressions.filter(pl.col("shown")).with_row_index("_row")
    if events.is_empty() or shown.is_empty():
        return shown.drop("_row").with_columns(clicked=pl.lit(False))
    missing = [c for c in _EVENT_COLUMNS if c not in events.columns]
    if missing:
        raise ValueError(f"events lack the columns {missing}")
    clicks = events.select(pl.col("user_id"), pl.col("item_id"), pl.col("ts").alias("_event_ts"),
                           pl.col("request_id").alias("_event_request"))
    # the (user, item) equi-join first: the time and request conditions only filter its pairs
    pairs = shown.select("_row", "user_id", "item_id", "ts", "request_id").join(
        clicks, on=["user_id", "item_id"], how="inner")
    hit = pairs.filter(
        (pl.col("_event_ts") >= pl.col("ts"))
        & (pl.col("_event_ts") < pl.col("ts") + window_s)
        & (pl.col("_event_request").is_null() | (pl.col("_event_request") == pl.col("request_id")))
    ).select("_row").unique()
    return shown.with_columns(clicked=pl.col("_row").is_in(hit["_row"].implode())).drop("_row")
