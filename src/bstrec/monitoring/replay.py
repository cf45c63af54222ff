"""Replay: drive a running service (``bstrec serve``) through a dataset's test period, in time
order, as if its users were arriving live (``bstrec replay``).

Test period: the time span of the samples' test split, i.e. every event with
``timestamp >= t90``, ``manifest.json``'s second cut point of the samples' timestamps
(``split_quantiles`` of data/samples.py, ../shared/PROTOCOL.md step 4). P1 (ml1m-ctr) has one
sample per rating, so its test period is the test split's ratings, the last tenth of the
samples; for implicit logs (P5) it is every event at or after t90, sampled negatives aside.
Everything before it is the users' history.

1. Seeding: the store must hold each user's history as of the test start and nothing later.
   Best: ``bstrec serve --seed-events SAMPLES --seed-until test`` (profiles, items, and the
   events before the test period) and ``seed_history`` off. Else (``seed_history`` on) every
   event before the test period is posted (POST /events, in batches); events carry no
   profiles, so the users are then served without their profile features. Plain
   ``--seed-events SAMPLES`` loads the WHOLE log, test period included: every replayed user's
   history would already hold the behaviours being replayed (and the seen-item rule would
   hide them).
2. For every test behaviour (user, item, t) in time order (the builder's behaviour order within
   a user: timestamp, then item id): GET /recommend?user_id=..&now=t&k=..; a shown item is a
   click when the user really interacted with it within ``[t, t + window_s)`` (the dataset's
   events); then the behaviour itself is posted, without a ``request_id`` (the user behaved,
   they did not click on one answer), so that the impression log's clicks (monitoring/join.py:
   every answer that showed the item within the window before the event) are the replay's.

``freeze_item`` is a fault injector: every posted event's item is replaced by that item, as
when an upstream feature is frozen to a constant; the recommendations then drift on a history
of one item, which the monitoring should catch.

The schedule (which events seed, which behaviours arrive, what counts as a click) is plain
functions over frames (``split_log``, ``ClickOracle``, ``run_schedule``); ``replay`` binds
them to HTTP (httpx, one keep-alive connection).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import polars as pl

from bstrec.data.impressions import DEFAULT_WINDOW_S
from bstrec.data.samples import SampleSet, prepare_events
from bstrec.data.schema import Dataset

log = logging.getLogger(__name__)

Id = int | str
Event = dict[str, Any]
# what a service answer gives the schedule: its request_id, the shown item ids, the body
Answer = tuple[str | None, list[Id], dict[str, Any]]


class ReplayError(RuntimeError):
    """The replay could not go on (service unreachable, refused key, too many errors); holds
    what was done until then in ``result``."""

    def __init__(self, message: str, result: ReplayResult | None = None) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class ReplayConfig:
    k: int = 10
    window_s: float = DEFAULT_WINDOW_S
    limit: int | None = None  # replay only N test behaviours
    # start at the N-th test behaviour: to go on after a replay of the first N, whose events
    # the store holds already (with seed_history off)
    skip: int = 0
    seed_history: bool = True
    freeze_item: Id | None = None
    api_key: str | None = None  # the service's events key (X-API-Key of POST /events)
    # under the service's default max_batch_events: a larger batch is refused whole (413)
    batch_events: int = 1_000
    max_errors: int = 20  # failed calls tolerated before the replay stops
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if not self.window_s > 0:
            raise ValueError(f"window_s must be > 0, got {self.window_s}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")
        if self.skip < 0:
            raise ValueError(f"skip must be >= 0, got {self.skip}")
        if self.batch_events < 1:
            raise ValueError(f"batch_events must be >= 1, got {self.batch_events}")
        if self.max_errors < 0:
            raise ValueError(f"max_errors must be >= 0, got {self.max_errors}")


@dataclass
class ReplayResult:
    requests: int = 0  # /recommend answers
    shown: int = 0  # items shown over all answers
    clicks: int = 0  # shown items the user interacted with within the window
    hits: int = 0  # answers with at least one click
    events_posted: int = 0  # test behaviours posted
    seeded: int = 0  # history events posted before the test period
    stored: int = 0  # events the service stored (the rest it ignored: duplicates, too old)
    refused: int = 0  # events the service refused (422: e.g. an item it does not know)
    errors: int = 0  # failed calls (4xx/5xx, timeouts)
    versions: dict[str, int] = field(default_factory=dict)  # answers per model version
    arms: dict[str, int] = field(default_factory=dict)  # answers per experiment arm
    test_start: float = 0.0
    seconds: float = 0.0

    @property
    def ctr(self) -> float:
        """Clicks per shown item."""
        return self.clicks / self.shown if self.shown else 0.0

    @property
    def hit_rate(self) -> float:
        """Answers with a click per answer."""
        return self.hits / self.requests if self.requests else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "shown": self.shown, "clicks": self.clicks,
                "hits": self.hits, "ctr": round(self.ctr, 6),
                "hit_rate": round(self.hit_rate, 6), "events_posted": self.events_posted,
                "seeded": self.seeded, "stored": self.stored, "refused": self.refused,
                "errors": self.errors,
                "versions": dict(self.versions), "arms": dict(self.arms),
                "test_start": self.test_start, "seconds": round(self.seconds, 3)}


# --- the schedule, without HTTP -------------------------------------------------------------

def period_start(manifest: dict[str, Any]) -> float:
    """The start of the test period: the samples' ``t90`` (behaviours at or after it are the
    test split's)."""
    if "t90" not in manifest:
        raise ValueError("the samples' manifest has no t90: rebuild them with `bstrec data build`")
    return float(manifest["t90"])


def with_event_ids(events: pl.DataFrame) -> pl.DataFrame:
    """``event_id`` filled where missing as the store's ``load_dataset`` fills it
    (``user:item:timestamp:k``, k over repeats of the triple), so that a replayed event and the
    same event seeded by ``serve --seed-events`` are one."""
    triple = ["user_id", "item_id", "timestamp"]
    return events.with_columns(pl.coalesce(
        pl.col("event_id"),
        pl.concat_str([*(pl.col(c).cast(pl.String) for c in triple),
                       pl.int_range(pl.len()).over(triple).cast(pl.String)], separator=":"),
    ).alias("event_id"))


def split_log(dataset: Dataset, start: float, freeze_item: Id | None = None
              ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``(history, arrivals)``: the events before ``start`` and those at or after it, each
    ``user_id``, ``item_id``, ``timestamp``, ``event_id``; arrivals in time order (within a
    user, the builder's behaviour order), ``item_id`` replaced by ``freeze_item`` if given
    (``original_item`` keeps the real one, which decides the clicks)."""
    events = with_event_ids(prepare_events(dataset)).select(
        "user_id", "item_id", "timestamp", "event_id")
    if freeze_item is not None:
        if dataset.items.filter(pl.col("item_id") == freeze_item).height == 0:
            raise ValueError(f"freeze_item {freeze_item!r} is not in the dataset's item table")
        events = events.with_columns(pl.col("item_id").alias("original_item"),
                                     pl.lit(freeze_item, dtype=events.schema["item_id"])
                                     .alias("item_id"))
    else:
        events = events.with_columns(pl.col("item_id").alias("original_item"))
    history = events.filter(pl.col("timestamp") < start)
    arrivals = (events.filter(pl.col("timestamp") >= start)
                .sort("timestamp", "user_id", "original_item", maintain_order=True))
    return history, arrivals


class ClickOracle:
    """Whether a user interacted with an item within ``[t, t + window_s)``, from the real
    events (``user_id``, ``item_id``, ``timestamp``)."""

    def __init__(self, events: pl.DataFrame, window_s: float) -> None:
        self.window_s = window_s
        grouped = (events.sort("user_id", "timestamp", maintain_order=True)
                   .group_by("user_id", maintain_order=True)
                   .agg(pl.col("timestamp"), pl.col("item_id")))
        self._by_user: dict[Id, tuple[np.ndarray, list[Id]]] = {
            u: (np.asarray(ts, dtype=np.int64), items)
            for u, ts, items in grouped.iter_rows()}

    def clicked(self, user: Id, t: float, shown: Sequence[Id]) -> list[Id]:
        """The items of ``shown`` (in its order) the user interacted with in the window."""
        found = self._by_user.get(user)
        if found is None:
            return []
        ts, items = found
        lo, hi = np.searchsorted(ts, [t, t + self.window_s], side="left")
        touched = set(items[int(lo):int(hi)])
        return [i for i in shown if i in touched]


def event_body(user: Id, item: Id, timestamp: int, event_id: str,
               request_id: str | None = None) -> Event:
    body: Event = {"user_id": user, "item_id": item, "timestamp": timestamp,
                   "event_id": event_id}
    if request_id is not None:
        body["request_id"] = request_id
    return body


def seed_batches(history: pl.DataFrame, size: int) -> Iterator[list[Event]]:
    """POST /events bodies of the history, ``size`` events at most, in time order."""
    ordered = history.sort("timestamp", maintain_order=True)
    for batch in ordered.iter_slices(size):
        yield [event_body(u, i, int(t), e) for u, i, t, e in
               batch.select("user_id", "item_id", "timestamp", "event_id").iter_rows()]


@dataclass(frozen=True)
class Step:
    """One arrival as the schedule played it."""

    user_id: Id
    timestamp: int
    answered: bool  # False: the recommend call failed
    request_id: str | None
    shown: list[Id]
    clicked: list[Id]
    event: Event


def run_schedule(arrivals: pl.DataFrame, oracle: ClickOracle,
                 recommend: Callable[[Id, int], Answer | None],
                 post: Callable[[list[Event]], object], *,
                 on_step: Callable[[Step], None] | None = None) -> Iterator[Step]:
    """Play ``arrivals`` (``split_log``'s) in order: ask ``recommend(user, t)`` (None: the call
    failed; the behaviour is still posted), judge the clicks by ``oracle``, ``post`` the
    behaviour. Yields each step after its post."""
    for user, item, t, event_id in arrivals.select(
            "user_id", "item_id", "timestamp", "event_id").iter_rows():
        answer = recommend(user, int(t))
        request_id, shown = (answer[0], answer[1]) if answer is not None else (None, [])
        clicked = oracle.clicked(user, t, shown)
        # no request_id: the replayed user behaved, they did not click on one answer; every
        # answer that showed the item within the window before it is clicked, the oracle's rule
        # and the log join's (monitoring/join.py) for events without one, so that the log's
        # clicks are the replay's
        event = event_body(user, item, int(t), event_id)
        post([event])
        step = Step(user, int(t), answer is not None, request_id, shown, clicked, event)
        if on_step is not None:
            on_step(step)
        yield step


# --- HTTP -----------------------------------------------------------------------------------

class ServiceClient:
    """The calls the replay makes, on one keep-alive httpx client; counts failed calls and
    raises ReplayError once more than ``max_errors`` failed, or at once when the service is
    unreachable or refuses the key."""

    def __init__(self, url: str, config: ReplayConfig, result: ReplayResult,
                 client: httpx.Client | None = None) -> None:
        self.url = url.rstrip("/")
        self.config = config
        self.result = result
        self.owns_client = client is None
        self.client = client if client is not None else httpx.Client(
            base_url=self.url, timeout=config.timeout_s,
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
        self.headers = {} if config.api_key is None else {"X-API-Key": config.api_key}

    def close(self) -> None:
        if self.owns_client:
            self.client.close()

    def _fail(self, what: str, detail: str) -> None:
        self.result.errors += 1
        if self.result.errors <= 3:
            log.warning("replay: %s failed: %s", what, detail)
        if self.result.errors > self.config.max_errors:
            raise ReplayError(f"stopped after {self.result.errors} failed calls; the last: "
                              f"{what}: {detail}", self.result)

    def _call(self, method: str, path: str, *, refusals: bool = False,
              **kwargs: Any) -> httpx.Response | None:
        """The response, or None after a failure that was counted; ``refusals``: a 422 is
        handed back rather than counted."""
        try:
            r = self.client.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.RemoteProtocolError) as exc:
            raise ReplayError(f"the service at {self.url} is unreachable ({exc}): is "
                              "`bstrec serve` running there?", self.result) from exc
        except httpx.TimeoutException as exc:
            self._fail(f"{method} {path}", f"no answer within {self.config.timeout_s} s ({exc})")
            return None
        if r.status_code in (401, 403):
            raise ReplayError(f"{method} {path}: {r.status_code} {_detail(r)}: give the "
                              "service's events key (--api-key, or BSTREC_EVENTS_KEY / "
                              "BSTREC_API_KEY)", self.result)
        if r.status_code == 422 and refusals:
            return r
        if r.status_code >= 400:
            self._fail(f"{method} {path}", f"{r.status_code} {_detail(r)}")
            return None
        return r

    def check(self) -> None:
        """Fails early, with the reason, when nothing answers at the URL."""
        r = self._call("GET", "/healthz")
        if r is None:
            raise ReplayError(f"{self.url}/healthz did not answer 200: is this a bstrec "
                              "service?", self.result)

    def recommend(self, user: Id, t: int) -> Answer | None:
        r = self._call("GET", "/recommend",
                       params={"user_id": str(user), "k": self.config.k, "now": t})
        if r is None:
            return None
        body: dict[str, Any] = r.json()
        version, arm = str(body.get("model_version")), body.get("arm")
        self.result.versions[version] = self.result.versions.get(version, 0) + 1
        if arm is not None:
            self.result.arms[str(arm)] = self.result.arms.get(str(arm), 0) + 1
        return body.get("request_id"), [i["item_id"] for i in body.get("items", [])], body

    def post(self, events: list[Event]) -> int:
        """Posts ``events``; returns how many the service stored (0 when refused). A batch is
        all or nothing: when the service refuses some of its events (422, each named), the
        others are posted again without them, and the refused ones counted."""
        r = self._call("POST", "/events", json={"events": events}, headers=self.headers,
                       refusals=True)
        if r is not None and r.status_code == 422:
            bad = _refused_indices(r, len(events))
            kept = [e for n, e in enumerate(events) if n not in bad]
            if bad and self.result.refused == 0:
                log.warning("replay: the service refuses events (counted in `refused`), "
                            "the first: %s", _detail(r))
            self.result.refused += len(events) - len(kept)
            r = (self._call("POST", "/events", json={"events": kept}, headers=self.headers)
                 if bad and kept else None)
            if not bad:
                self._fail("POST /events", f"422 {_detail(r)}" if r is not None else "422")
        if r is None:
            return 0
        stored = int(r.json().get("stored", 0))
        self.result.stored += stored
        return stored


def _refused_indices(r: httpx.Response, n: int) -> set[int]:
    """The events a 422 of POST /events names (``loc``: body, events, index, field)."""
    try:
        issues = r.json().get("detail", [])
    except ValueError:
        return set()
    out = set()
    for issue in issues if isinstance(issues, list) else []:
        loc = issue.get("loc", []) if isinstance(issue, dict) else []
        if len(loc) >= 3 and loc[:2] == ["body", "events"] and isinstance(loc[2], int) \
                and 0 <= loc[2] < n:
            out.add(loc[2])
    return out


def _detail(r: httpx.Response) -> str:
    try:
        detail = r.json().get("detail", r.text)
    except ValueError:
        detail = r.text
    return str(detail)[:500]


def load_replay_log(samples_dir: str | Path) -> tuple[Dataset, float]:
    """The dataset tables and test start of ``bstrec data build``'s output."""
    samples = SampleSet.load(samples_dir, splits=())
    if samples.dataset is None:
        raise ValueError(f"{samples_dir} has no dataset/ tables: rebuild it with "
                         "`bstrec data build`")
    return samples.dataset, period_start(samples.manifest)


def replay(samples_dir: str | Path, url: str, config: ReplayConfig | None = None, *,
           client: httpx.Client | None = None, progress: bool = True) -> ReplayResult:
    """Replay the test period of the samples in ``samples_dir`` against the service at ``url``
    (see the module docstring). ``client``: an httpx client to use (its base_url must be
    ``url``; kept open); ``progress``: a rich progress bar. Raises ReplayError when the
    service is unreachable, refuses the key or fails more than ``max_errors`` calls."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    cfg = config or ReplayConfig()
    started = time.perf_counter()
    dataset, start = load_replay_log(samples_dir)
    freeze = _as_item(cfg.freeze_item, dataset) if cfg.freeze_item is not None else None
    history, arrivals = split_log(dataset, start, freeze)
    arrivals = arrivals.slice(cfg.skip, cfg.limit)
    # clicks are the users' real interactions, never the frozen ones
    oracle = ClickOracle(dataset.events.filter(pl.col("timestamp") >= start), cfg.window_s)
    result = ReplayResult(test_start=start)
    service = ServiceClient(url, cfg, result, client)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())
    try:
        service.check()
        with Progress(*columns, disable=not progress, transient=False) as bar:
            if cfg.seed_history:
                task = bar.add_task("seeding history", total=history.height)
                for batch in seed_batches(history, cfg.batch_events):
                    service.post(batch)
                    result.seeded += len(batch)
                    bar.advance(task, len(batch))
            task = bar.add_task("replaying the test period", total=arrivals.height)
            for step in run_schedule(arrivals, oracle, service.recommend, service.post):
                result.events_posted += 1
                if step.answered:
                    result.requests += 1
                    result.shown += len(step.shown)
                    result.clicks += len(step.clicked)
                    result.hits += bool(step.clicked)
                bar.advance(task)
    finally:
        service.close()
        result.seconds = time.perf_counter() - started
    return result


def _as_item(raw: Id, dataset: Dataset) -> Id:
    """A command-line item id in the dataset's id type."""
    if dataset.items.schema["item_id"] == pl.Int64:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"freeze_item {raw!r}: the dataset's item ids are integers") from None
    return str(raw)
