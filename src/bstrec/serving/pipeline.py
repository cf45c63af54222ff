"""The request pipeline, plain Python (the HTTP layer in app.py only translates):

1. read the user's snapshot from the feature store (last behaviours, profile);
2. match: the user's query row (features/online.py) through retrieval's sources and merge;
3. pre-rank: a dot product (two-tower) over every merged candidate, keep the best ``rank_n``;
   or, as the bundle's ``funnel`` says (serving/config.py FunnelConfig), the distilled
   pre-ranker over every merged candidate, then the light ranker on its best ``light_n``
   (stage ``light``), keeping the best ``rank_n`` for BST;
4. rank: the ``rank_n`` candidates' item columns (the offline builder's code) and the query
   row's shared user/context/history inputs, in ONE call of the exported request-shaped BST
   ranker in ONNX Runtime (shared work done once per request);
5. rules: seen filter, per-category cap (rules.py); top K with score, sources, model version.

When the feature store is unreachable the request still gets an answer: the user is served as
a cold-start user (no history, no profile) and item features are the last ones read (the
bundle's until the store was read); the result says ``degraded`` and why.

Item features: the catalogue's item inputs are kept as arrays by vocabulary index
(``ItemTable``), the bundle's overlaid with the store's. Each snapshot carries the store's item
version; the table is re-read (only the items put since) when that version moves, so a request
reads no item features while they do not change and never serves older ones than it saw. An
unknown user is no error: they take the cold-start path.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from bstrec.evaluation.objective import objective_scores
from bstrec.features.online import ItemTable, OnlineFeatures
from bstrec.features.spec import N_RESERVED, OOV
from bstrec.features.store import (
    Event,
    Features,
    ItemId,
    StoreUnavailable,
    UserId,
    UserSnapshot,
)
from bstrec.monitoring.policy import plackett_luce
from bstrec.serving.bundle import Bundle, IdType
from bstrec.serving.guard import StoreGuard
from bstrec.serving.match import OnlineMatcher
from bstrec.serving.rules import apply_rules
from bstrec.serving.runtime import RankerRuntime

I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]
STAGES = ("store", "features", "retrieve", "prerank", "light", "rank_features", "rank",
          "rules")
MAX_ID_CHARS = 256
# Events stamped further than this in the future are refused (a clock or unit error: ms for s);
# the service sets its own (Settings.max_future_s)
MAX_FUTURE_S = 86_400


class RequestError(ValueError):
    """Bad input from a caller (HTTP 422): the message says what and where."""


class EventsRefused(RequestError):
    """Events of a batch that cannot be stored, all of them named: ``problems`` holds
    (index in the batch, field, reason). Nothing of the batch is stored."""

    def __init__(self, problems: list[tuple[int, str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"events[{n}].{f}: {why}" for n, f, why in problems)
                         + " (nothing was stored)")


class NotFound(LookupError):
    """An item the bundle and the store do not know (HTTP 404)."""


@dataclass(frozen=True)
class RecommendedItem:
    item_id: ItemId
    score: float  # the served objective's score (engagement: the ranker's click probability)
    prerank_score: float
    sources: tuple[str, ...]  # the match-stage sources that proposed it
    category: str | None
    model_version: str
    title: str | None = None  # the item table's title (MovieLens), for people reading the list
    # P(the item is in the shown list) under the stochastic policy; None under greedy
    propensity: float | None = None


@dataclass
class Recommendation:
    user_id: UserId
    items: list[RecommendedItem]
    model_version: str
    request_time: int  # unix seconds the features were computed at
    path: str  # match route: regular | few | cold
    known_user: bool  # the store holds a profile or behaviours for the user
    history_length: int
    degraded: bool
    degraded_reasons: list[str]
    candidates: dict[str, int]  # merged candidates proposed by each source
    timings_ms: dict[str, float]  # per pipeline stage (STAGES)
    policy: str = "greedy"  # how the shown list was drawn (PipelineConfig.policy)
    # what the ranker read, for the impression log's drift and freshness columns (not part of
    # the HTTP answer): the newest behaviour's time and category, the profile's raw values
    newest_ts: int | None = None
    last_category: str | None = None
    # the score that ranked the list (PipelineConfig.objective): engagement, conversion, ...
    objective: str = "engagement"
    profile: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class UserState:
    """A user's store read for one request (``reasons``: why it was degraded), taken once and
    handed to every bundle that answers the request (A/B arm and shadow see the same state)."""

    user: UserId
    snapshot: UserSnapshot
    reasons: tuple[str, ...]
    read_ms: float


@dataclass(frozen=True)
class SimilarItem:
    item_id: ItemId
    score: float
    source: str  # item_cf | two_tower | category
    category: str | None


@dataclass
class Similar:
    item_id: ItemId
    items: list[SimilarItem]
    model_version: str


@dataclass(frozen=True)
class HistoryItem:
    item_id: ItemId
    timestamp: int
    category: str | None
    title: str | None


@dataclass
class History:
    user_id: UserId
    behaviours: list[HistoryItem]  # newest first
    degraded: bool
    degraded_reasons: list[str]


@dataclass(frozen=True)
class IncomingEvent:
    """An event as a caller sends it; ids may be int or str (coerced to the bundle's id type),
    ``timestamp`` None = now, ``event_id`` None = ``user:item:timestamp``."""

    user_id: int | str
    item_id: int | str
    timestamp: int | None = None
    event_id: str | None = None


@dataclass(frozen=True)
class IngestResult:
    received: int
    stored: int
    ignored: int  # already stored (same event id), or older than the user's kept window
    # the events as the store took them (ids parsed, timestamp and event id defaults filled),
    # in the request's order: what the impression log records
    events: tuple[Event, ...] = ()


@dataclass
class _Stopwatch:
    laps: dict[str, float] = field(default_factory=dict)
    last: float = field(default_factory=time.perf_counter)

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = self.laps.get(stage, 0.0) + (now - self.last) * 1e3
        self.last = now


def parse_id(value: object, kind: IdType, what: str) -> int | str:
    """A caller's id -> the bundle's id type (``"7"`` is user 7 where ids are integers)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise RequestError(f"{what} must be an integer or a string, got {value!r}")
    if isinstance(value, str) and not 0 < len(value) <= MAX_ID_CHARS:
        raise RequestError(f"{what} must have 1 to {MAX_ID_CHARS} characters")
    if kind == "str":
        return str(value)
    if isinstance(value, int):
        return value
    if not re.fullmatch(r"-?\d{1,18}", value.strip()):
        raise RequestError(f"{what} must be an integer for this bundle (its ids are integers), "
                           f"got {value!r}")
    return int(value)


class Pipeline:
    """``recommend``, ``similar`` and ``ingest`` over one bundle and the feature store.

    Thread-safe: requests share it; a reload builds a new Pipeline and swaps the reference.
    """

    def __init__(self, bundle: Bundle, guard: StoreGuard, *,
                 clock: Callable[[], float] = time.time, max_future_s: int = MAX_FUTURE_S) -> None:
        self.bundle = bundle
        self.guard = guard
        self.clock = clock
        self.max_future_s = max_future_s
        self.features = OnlineFeatures(bundle.vocabs, bundle.spec)
        # the catalogue's item inputs, from the bundle until a request reads the store's
        # version of them (_item_table)
        self.table = ItemTable.build(self.features, bundle.items)
        self._table_lock = threading.Lock()
        # per layer (ranker, prerank): its item parts of every catalogue item (ranking/export.py)
        # for one item table
        self._parts: dict[str, tuple[ItemTable, F32 | None]] = {}
        self.matcher = OnlineMatcher(bundle)
        self.item_vocab = bundle.vocabs["item_id"]
        # the query row's target: any real item (retrieval reads the history, profile and
        # context of that row, never its target columns)
        self.probe_item: ItemId = self.item_vocab.values[0]
        objective = bundle.config.objective
        # the heads of the exported ranker (ranking/export.py): a single-head graph is pCTR
        self.heads = bundle.ranker.heads
        if objective.needs_cvr and "cvr" not in self.heads and bundle.config.ranking == "model":
            raise ValueError(f"objective {objective.kind!r} needs a conversion head (pCVR): the "
                             f"bundle's ranker has {list(self.heads)}; train a multi-task ranker "
                             "(ESMM) or serve objective engagement")
        if self.guard.store.max_events < bundle.spec.max_len:
            raise ValueError(f"the feature store keeps {self.guard.store.max_events} behaviours "
                             f"per user, fewer than the ranker's history ({bundle.spec.max_len})")

    @property
    def version(self) -> str:
        return self.bundle.version

    # --- ids ----------------------------------------------------------------------------------
    def user_id(self, value: object) -> UserId:
        return parse_id(value, self.bundle.user_id_type, "user_id")

    def item_id(self, value: object) -> ItemId:
        return parse_id(value, self.bundle.item_id_type, "item_id")

    def _raw(self, index: int) -> ItemId:
        return self.item_vocab.values[index - N_RESERVED]

    def _category(self, features: Features | None) -> str | None:
        cat = None if features is None else features.get("category")
        return None if cat is None else str(cat)

    def _title(self, item: ItemId) -> str | None:
        title = self.bundle.items.get(item, {}).get("title")
        return None if title is None else str(title)

    # --- store reads with fallbacks -----------------------------------------------------------
    def _snapshot(self, user: UserId, reasons: list[str], use_store: bool) -> UserSnapshot:
        if not use_store:
            return UserSnapshot(user, (), None)
        try:
            return self.guard.call(lambda s: s.snapshot(user), user=user)
        except StoreUnavailable as exc:
            reasons.append(f"feature store unavailable ({exc}): served without the user's "
                           "history and profile (cold start)")
            return UserSnapshot(user, (), None)

    def _item_table(self, snapshot: UserSnapshot, reasons: list[str],
                    use_store: bool) -> ItemTable:
        """The item table at the store's item version of ``snapshot``: the table in use while
        the version is the same (no item read at all), else the table with the items put since
        (all of the store's, over the bundle's, after a new epoch) read and encoded, swapped in
        for the requests that follow. A store that fails meanwhile leaves the last table."""
        table, version = self.table, snapshot.items_version
        if not use_store or reasons or version is None or version == table.version:
            return table
        with self._table_lock:  # one reader per change, the others wait for its table
            table = self.table
            if version == table.version:
                return table
            try:
                changes = self.guard.call(lambda s: s.items_changed(table.version),
                                          items=True)
            except StoreUnavailable as exc:
                reasons.append(f"feature store unavailable ({exc}): item features as last read")
                return table
            self.table = table = table.updated(
                changes.items, changes.version, base=self.bundle.items if changes.full else None)
        return table

    def _item_parts(self, table: ItemTable, layer: str = "ranker") -> F32 | None:
        """(V, P) the item parts of every vocabulary index of ``table`` for the bundle's
        ``layer`` (ranker or prerank; None when its request graph reads item inputs),
        computed once per table: item features change rarely, requests share them."""
        cached = self._parts.get(layer)
        if cached is not None and cached[0] is table:
            return cached[1]
        runtime: RankerRuntime = getattr(self.bundle, layer)
        parts = runtime.item_parts(table.inputs(np.arange(len(table.present))))
        self._parts[layer] = (table, parts)  # one assignment: readers see the old pair or new
        return parts

    def _objective(self, probs: F32, cand_idx: I64, table: ItemTable) -> F32:
        """The served objective's scores (N,) of the candidates from the ranker's (N,) pCTR or
        (N, H) head probabilities; prices (for revenue) from ``table``, the item table of the
        request (the bundle's items overlaid with the store's), an item without one scoring 0
        (evaluation/objective.py)."""
        objective = self.bundle.config.objective
        if probs.ndim == 1 and objective.kind == "engagement":
            return probs  # today's path: a single-head ranker's click probability
        heads = probs if probs.ndim == 2 else probs[:, None]
        p_ctr = heads[:, self.heads.index("ctr")]
        p_cvr = heads[:, self.heads.index("cvr")] if "cvr" in self.heads else None
        price = table.prices[cand_idx] if objective.needs_price else None
        out: F32 = objective_scores(objective, p_ctr, p_cvr, price).astype(np.float32)
        return out

    # --- recommend ----------------------------------------------------------------------------
    def recommend(self, user_id: object, k: int = 10, now: int | None = None, *,
                  state: UserState | None = None, seed: int | None = None) -> Recommendation:
        """Top ``k`` items for ``user_id`` at time ``now`` (unix seconds; default the clock).
        ``state``: the user's store read already taken (``read_user``), else read here;
        ``seed``: the stochastic policy's draw (the same seed, the same list)."""
        if k < 1:
            raise RequestError(f"k must be >= 1, got {k}")
        if state is None:
            state = self.read_user(user_id)
        return self._recommend(state.user, k, now, use_store=True, state=state, seed=seed)

    def read_user(self, user_id: object) -> UserState:
        """The user's snapshot from the store (cold start, with the reason, when it is down)."""
        user = self.user_id(user_id)
        started = time.perf_counter()
        reasons: list[str] = []
        snapshot = self._snapshot(user, reasons, use_store=True)
        return UserState(user, snapshot, tuple(reasons), (time.perf_counter() - started) * 1e3)

    def warmup(self) -> Recommendation:
        """One request for a user without history (the store not read): loads every lazy part
        (ONNX session, encoders, index); then, when the store answers, its item features into
        the item table and the ranker's item parts of that table, so that no request pays for
        encoding the catalogue. Runs before the pipeline takes traffic."""
        user: UserId = -1 if self.bundle.user_id_type == "int" else "__warmup__"
        out = self._recommend(user, 10, None, use_store=False)
        reasons: list[str] = []
        table = self._item_table(self._snapshot(user, reasons, use_store=True), reasons,
                                 use_store=True)
        self._item_parts(table)
        if self.bundle.prerank is not None:
            self._item_parts(table, "prerank")
        return out

    def _recommend(self, user: UserId, k: int, now: int | None, *, use_store: bool,
                   state: UserState | None = None, seed: int | None = None) -> Recommendation:
        ts = int(self.clock()) if now is None else int(now)
        watch = _Stopwatch()
        if state is None:
            reasons: list[str] = []
            snapshot = self._snapshot(user, reasons, use_store)
            watch.lap("store")
        else:
            reasons, snapshot = list(state.reasons), state.snapshot
            watch.laps["store"] = state.read_ms

        table = self._item_table(snapshot, reasons, use_store)
        row = self.features.query_row(snapshot, table, self.probe_item, ts)
        seen_raw = {b.item_id for b in snapshot.behaviours}
        seen = np.array([i for i in self.item_vocab.encode_values(seen_raw) if i >= N_RESERVED],
                        dtype=np.int64)
        watch.lap("features")

        matched = self.matcher.match(row, seen)
        watch.lap("retrieve")

        funnel = self.bundle.config.funnel
        if funnel.prerank == "distilled" and self.bundle.prerank is not None \
                and len(matched.ids):
            # every merged candidate through the distilled pre-ranker's request graph, over
            # its item vectors cached per table
            parts = self._item_parts(table, "prerank")
            pre = self.bundle.prerank.logits_request(
                row, {} if parts is not None else table.inputs(matched.ids),
                None if parts is None else parts[matched.ids])
        else:
            pre = self.matcher.prerank(matched)
        order = np.argsort(-pre, kind="stable")
        watch.lap("prerank")
        if funnel.light_n and self.bundle.light is not None and len(order):
            # the light ranker reorders the pre-ranked best light_n; BST takes its best rank_n
            top = order[:funnel.light_n]
            light = self.bundle.light.logits_request(row, table.inputs(matched.ids[top]))
            order = top[np.argsort(-light, kind="stable")]
        order = order[:self.bundle.config.rank_n]
        watch.lap("light")

        cand_idx = matched.ids[order]
        values, categories = self.item_vocab.values, table.categories
        scores = np.zeros(0, dtype=np.float32)
        config = self.bundle.config
        if config.ranking == "popular":
            watch.lap("rank_features")
            counts = self.bundle.popular.global_
            scores = (counts[cand_idx] / max(float(counts.sum()), 1.0)).astype(np.float32)
        elif len(cand_idx):
            # the query row already holds the user's history, profile and context: only the
            # candidates' item columns are taken here (rows of the item table), and the
            # ranker's request-shaped graph takes the shared inputs once (equal to rows() + the
            # batch graph, tested)
            cand_inputs = table.inputs(cand_idx)
            parts = self._item_parts(table)
            watch.lap("rank_features")
            scores = self._objective(self.bundle.ranker.score_request(
                row, cand_inputs, None if parts is None else parts[cand_idx]), cand_idx, table)
        else:
            watch.lap("rank_features")
        watch.lap("rank")

        version = self.version
        ids = cand_idx.tolist()
        propensities: list[float | None]
        if config.policy.kind == "plackett_luce":
            # candidates exclude the seen items already (match), and the config allows no
            # category cap: the sampler's list is shown as drawn
            drawn, inclusion = plackett_luce(scores, k, config.policy.temperature,
                                             np.random.default_rng(seed))
            kept, propensities = drawn.tolist(), inclusion.tolist()
        else:
            # best first, ties in pre-rank order (a stable sort, as sorting the items was); the
            # rules read ids and categories, and only the k kept become response items
            best = np.argsort(-scores, kind="stable")
            kept = apply_rules(best.tolist(), k, item_of=lambda j: values[ids[j] - N_RESERVED],
                               category_of=lambda j: categories[ids[j]],
                               seen=seen_raw, max_per_category=config.max_per_category)
            propensities = [None] * len(kept)
        final = [RecommendedItem(item_id=(item := values[ids[j] - N_RESERVED]),
                                 score=float(scores[j]), prerank_score=float(pre[order[j]]),
                                 sources=matched.sources(int(order[j])),
                                 category=categories[ids[j]], model_version=version,
                                 title=self._title(item), propensity=p)
                 for j, p in zip(kept, propensities, strict=True)]
        watch.lap("rules")
        newest = snapshot.behaviours[-1] if snapshot.behaviours else None
        return Recommendation(
            user_id=user, items=final, model_version=version, request_time=ts,
            path=matched.path,
            known_user=snapshot.profile is not None or bool(snapshot.behaviours),
            history_length=len(snapshot.behaviours), degraded=bool(reasons),
            degraded_reasons=reasons, candidates=matched.per_source,
            timings_ms={s: round(watch.laps.get(s, 0.0), 3) for s in STAGES},
            policy=config.policy.kind, objective=config.objective.kind,
            newest_ts=None if newest is None else newest.timestamp,
            last_category=None if newest is None else self._category(
                self.bundle.items.get(newest.item_id)),
            profile={} if snapshot.profile is None else {
                name: str(v) for name, v in snapshot.profile.items() if v is not None})

    # --- history -----------------------------------------------------------------------------
    def history(self, user_id: object, n: int = 20) -> History:
        """The user's last ``n`` behaviours in the feature store, newest first (what the ranker
        reads as the sequence). An unknown user has none; a down store says so."""
        if n < 1:
            raise RequestError(f"n must be >= 1, got {n}")
        user = self.user_id(user_id)
        reasons: list[str] = []
        snapshot = self._snapshot(user, reasons, use_store=True)
        recent = list(reversed(snapshot.behaviours))[:n]
        # the categories the ranker reads for these behaviours: the item table's, at the
        # snapshot's item version
        table = self._item_table(snapshot, reasons, use_store=True)
        cats = table.category_names([b.item_id for b in recent])
        return History(user_id=user, degraded=bool(reasons), degraded_reasons=reasons,
                       behaviours=[HistoryItem(item_id=b.item_id, timestamp=b.timestamp,
                                               category=c, title=self._title(b.item_id))
                                   for b, c in zip(recent, cats, strict=True)])

    # --- similar items ------------------------------------------------------------------------
    def similar(self, item_id: object, k: int = 10) -> Similar:
        """Items like ``item_id``: item-CF neighbours, then two-tower neighbours, then popular
        items of its category. Raises NotFound for an item neither the bundle nor the
        vocabulary knows."""
        if k < 1:
            raise RequestError(f"k must be >= 1, got {k}")
        raw = self.item_id(item_id)
        idx = self.item_vocab.index.get(raw, OOV)
        if idx == OOV and raw not in self.bundle.items:
            raise NotFound(f"unknown item {raw!r}: not in this bundle's catalogue")
        out: list[tuple[int, float, str]] = []
        taken = {idx}
        if idx != OOV:
            sims, ids = self.bundle.item_cf.similar(np.array([idx]), k)
            out += [(int(i), float(s), "item_cf") for i, s in zip(ids[0], sims[0], strict=True)
                    if i >= N_RESERVED]
            taken |= {i for i, _, _ in out}
            vectors, index = self.bundle.item_vectors, self.bundle.index
            if len(out) < k and vectors is not None and index is not None:
                scores, nn = index.search(vectors[idx][None, :], k + len(taken))
                for i, s in zip(nn[0], scores[0], strict=True):
                    if i >= N_RESERVED and int(i) not in taken and len(out) < k:
                        out.append((int(i), float(s), "two_tower"))
                        taken.add(int(i))
        if len(out) < k:
            cat = self._category(self.bundle.items.get(raw))
            cat_idx = self.bundle.vocabs["category"].index.get(cat, OOV) if cat else OOV
            if cat_idx != OOV:
                pop = self.bundle.popular.category_scores([cat_idx])[0]
                for i in np.argsort(-pop, kind="stable"):
                    if len(out) >= k or pop[i] <= 0:
                        break
                    if int(i) >= N_RESERVED and int(i) not in taken:
                        out.append((int(i), float(pop[i]), "category"))
                        taken.add(int(i))
        items = [SimilarItem(item_id=self._raw(i), score=s, source=src,
                             category=self._category(self.bundle.items.get(self._raw(i))))
                 for i, s, src in out[:k]]
        return Similar(item_id=raw, items=items, model_version=self.version)

    # --- events -------------------------------------------------------------------------------
    def ingest(self, events: Sequence[IncomingEvent], now: int | None = None) -> IngestResult:
        """Validate every event, then append them all (atomic per user, idempotent by event
        id). Raises EventsRefused naming every bad event and why (nothing is stored then), and
        StoreUnavailable when the store cannot take them.

        All or nothing, rather than storing the good part of a batch: a caller that ignores the
        response body cannot mistake a refusal for success, and one that reads it resends the
        batch without the named events (the stored ones would be ignored by event id anyway).
        Late and out-of-order events are stored (the store orders a history by timestamp);
        events further than ``max_future_s`` ahead of the clock are refused, and so are items
        neither the bundle nor the store knows: the ranker could only see them as one unknown
        token with no category, and an id typo would sit in the user's history; put new items
        into the store first (``put_items``)."""
        ts_now = int(self.clock()) if now is None else int(now)
        parsed: list[tuple[int, Event]] = []
        problems: list[tuple[int, str, str]] = []
        for n, e in enumerate(events):
            try:
                user = parse_id(e.user_id, self.bundle.user_id_type, "user_id")
            except RequestError as exc:
                problems.append((n, "user_id", str(exc)))
            try:
                item = parse_id(e.item_id, self.bundle.item_id_type, "item_id")
            except RequestError as exc:
                problems.append((n, "item_id", str(exc)))
            ts = ts_now if e.timestamp is None else e.timestamp
            if isinstance(ts, bool) or not isinstance(ts, int) or ts < 0:
                problems.append((n, "timestamp", f"timestamp must be unix seconds >= 0, got {ts!r}"))
            elif ts > ts_now + self.max_future_s:
                problems.append((n, "timestamp", f"timestamp {ts} is {ts - ts_now} s in the future "
                                 f"(over {self.max_future_s} s ahead of the server clock; unix "
                                 "seconds expected, not milliseconds)"))
            if e.event_id is not None and len(e.event_id) > MAX_ID_CHARS:
                problems.append((n, "event_id", f"event_id is longer than {MAX_ID_CHARS} "
                                 "characters"))
            if problems and problems[-1][0] == n:
                continue
            eid = e.event_id or f"{user}:{item}:{ts}"
            parsed.append((n, Event(user, item, ts, eid)))
        unknown = sorted({e.item_id for _, e in parsed if e.item_id not in self.bundle.items},
                         key=str)
        if unknown:
            # items added to the store after the bundle was built are known too
            in_store = self.guard.call(lambda s: s.items(unknown), items=True)
            missing = set(unknown) - set(in_store)
            problems += [(n, "item_id", f"unknown item {e.item_id!r}: not in the catalogue")
                         for n, e in parsed if e.item_id in missing]
        if problems:
            raise EventsRefused(sorted(problems))
        batch = [e for _, e in parsed]
        users = {e.user_id for e in batch}
        # one user's events (the usual post) go through that user's shard's breaker
        flags = self.guard.call(lambda s: s.append_many(batch),
                                user=users.pop() if len(users) == 1 else None) if batch else []
        stored = sum(flags)
        return IngestResult(received=len(batch), stored=stored, ignored=len(batch) - stored,
                            events=tuple(batch))
