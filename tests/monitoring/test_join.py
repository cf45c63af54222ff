"""Click join: window bounds, request pinning, shadow rows, duplicate events, empty frames.
Also the row builders the other monitoring tests share."""

from __future__ import annotations

from typing import Any

import polars as pl
import pytest

from bstrec.monitoring.impressions import EVENT_SCHEMA, IMPRESSION_SCHEMA, EventRow, ImpressionRow
from bstrec.monitoring.join import join_clicks

IMPRESSION_POLARS = pl.DataFrame(IMPRESSION_SCHEMA.empty_table()).schema
EVENT_POLARS = pl.DataFrame(EVENT_SCHEMA.empty_table()).schema


def impression(request: str = "r1", item: str = "i1", *, user: str = "u1", ts: float = 100.0,
               position: int = 0, **overrides: Any) -> ImpressionRow:
    row = ImpressionRow(
        request_id=request, user_id=user, ts=ts, received_at=ts, model_version="A",
        arm="default", path="regular", degraded=[], position=position, item_id=item, score=0.1,
        prerank_score=None, sources=["popular"], shown=True, policy="greedy", propensity=None,
        k=10, category="c", history_length=3, freshness_s=60.0, last_category="c",
        user_features="{}", candidates='{"popular": 50}', timings_ms='{"rank": 1.0}')
    row.update(overrides)  # type: ignore[typeddict-item]
    return row


def event(item: str = "i1", ts: float = 110.0, *, user: str = "u1", request: str | None = None,
          n: int = 0) -> EventRow:
    return EventRow(request_id=request, user_id=user, item_id=item, ts=ts,
                    event_id=f"{user}:{item}:{ts}:{n}", received_at=ts)


def impressions_frame(rows: list[ImpressionRow]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=IMPRESSION_POLARS)


def events_frame(rows: list[EventRow]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=EVENT_POLARS)


def clicked(imps: list[ImpressionRow], evs: list[EventRow], window_s: float = 60.0
            ) -> list[bool]:
    joined = join_clicks(impressions_frame(imps), events_frame(evs), window_s)
    return joined["clicked"].to_list()


def test_window_is_closed_at_the_impression_and_open_at_its_end() -> None:
    imps = [impression(ts=100.0)]
    assert clicked(imps, [event(ts=100.0)]) == [True]  # at the impression time
    assert clicked(imps, [event(ts=159.999)]) == [True]
    assert clicked(imps, [event(ts=160.0)]) == [False]  # ts + window_s is outside
    assert clicked(imps, [event(ts=99.999)]) == [False]  # before the answer


def test_only_the_same_user_and_item_click() -> None:
    imps = [impression(item="i1"), impression(item="i2", position=1)]
    evs = [event(item="i2"), event(item="i1", user="u2")]
    assert clicked(imps, evs) == [False, True]


def test_an_event_naming_a_request_clicks_only_that_request() -> None:
    imps = [impression("r1", ts=100.0), impression("r2", ts=105.0)]
    assert clicked(imps, [event(ts=110.0, request="r2")]) == [False, True]
    # without a request id it clicks every impression it follows within the window
    assert clicked(imps, [event(ts=110.0)]) == [True, True]
    # a request id of an answer not in the frame clicks nothing
    assert clicked(imps, [event(ts=110.0, request="r9")]) == [False, False]


def test_shadow_rows_are_dropped_and_never_clicked() -> None:
    imps = [impression(item="i1"), impression(item="i1", shown=False, model_version="B")]
    joined = join_clicks(impressions_frame(imps), events_frame([event()]), 60.0)
    assert joined.height == 1 and joined["model_version"].to_list() == ["A"]
    assert joined["clicked"].to_list() == [True]


def test_duplicate_events_click_once_and_keep_rows_and_order() -> None:
    imps = [impression(item=f"i{p}", position=p) for p in (2, 0, 1)]
    evs = [event("i0", 110.0, n=0), event("i0", 110.0, n=1), event("i0", 120.0, n=2)]
    joined = join_clicks(impressions_frame(imps), events_frame(evs), 60.0)
    assert joined.height == 3
    assert joined["position"].to_list() == [2, 0, 1]
    assert joined["clicked"].to_list() == [False, True, False]
    assert set(joined.columns) == {*IMPRESSION_POLARS, "clicked"}


def test_empty_frames() -> None:
    assert clicked([], [event()]) == []
    assert clicked([impression()], []) == [False]
    no_columns = join_clicks(impressions_frame([impression()]), pl.DataFrame(), 60.0)
    assert no_columns["clicked"].to_list() == [False]
    with pytest.raises(ValueError, match="window_s"):
        join_clicks(impressions_frame([]), events_frame([]), 0.0)
