"""The HTTP service: thin FastAPI routes over :class:`~bstrec.serving.pipeline.Pipeline`.

Hot reload: a request takes the pipeline reference once and uses it to the end; a reload
builds and warms a whole new pipeline from the new bundle (under a lock, one reload at a time)
and then replaces the reference in one assignment. Requests in flight finish on the old bundle,
later ones get the new one, none waits or fails; a bundle that does not load is refused (409)
and the old one keeps serving.

Routes are under fixed paths (``/recommend``, ``/events``, ...), so a static page can be mounted
at ``/`` (``Settings.static_dir``) without hiding any of them.

Hostile input: every error answer is either ``schemas.Error`` (``{"detail": "..."}``) or FastAPI's
validation error (422, ``{"detail": [{"loc": [...], "msg": ..., "type": ...}]}``), and each
route's OpenAPI entry lists the statuses it can answer. Unknown query parameters are 422 (a
typo such as ``kk=5`` would otherwise be served with the default silently). Bodies are limited
however they are framed (Content-Length or chunked), and a write route checks its key before it
reads a byte of the body.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations at runtime,
# and they refer to this factory's local variables (settings, the key header).
import asyncio
import gc
import json
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Query, Request, Response, status
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, Field, SecretStr
from starlette.routing import BaseRoute, Match, Mount

import bstrec
from bstrec.data.schema import Dataset
from bstrec.features.store import FeatureStore, StoreUnavailable, open_store
from bstrec.monitoring.experiments import arm_of
from bstrec.monitoring.impressions import EventRow, ImpressionLog, ImpressionRow
from bstrec.monitoring.live import LiveMonitor
from bstrec.monitoring.reference import Reference
from bstrec.monitoring.replay import period_start
from bstrec.serving import schemas
from bstrec.serving.bundle import BundleError, load_bundle
from bstrec.serving.guard import StoreGuard
from bstrec.serving.metrics import Metrics
from bstrec.serving.pipeline import (
    MAX_ID_CHARS,
    EventsRefused,
    IncomingEvent,
    IngestResult,
    NotFound,
    Pipeline,
    Recommendation,
    RequestError,
    UserState,
)
from bstrec.serving.schemas import ReloadTarget
from bstrec.serving.settings import Settings

log = logging.getLogger(__name__)
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
                   Awaitable[None]]
T = TypeVar("T")
JSON = "application/json"
# `now` of /recommend: unix seconds up to 2100-01-01; far larger values overflowed the int64
# time arithmetic (a 500), and a replay time past 2100 is a caller's mistake
MAX_NOW = 4_102_444_800
# an integer id as the bundle's integer vocabularies take it (int64 without the last digit);
# [0-9], not \d, which takes other scripts' digits too
INT_ID = r"^-?[0-9]{1,18}$"
# On a refusal before the body was read: uvicorn then closes the connection after the answer
# instead of reading (and dropping) the rest of the body to keep the connection alive
CLOSE = {"Connection": "close"}
# the experiment arm of every answer when no second bundle splits the traffic
DEFAULT_ARM = "default"
SHADOW_ARM = "shadow"
# the pipeline's Recommendation fields an answer carries (the others feed the impression log)
RESPONSE_FIELDS = tuple(name for name in schemas.Recommendation.model_fields
                        if name not in ("request_id", "arm"))
# by number: Starlette renamed these two constants (RFC 9110's names), older releases lack them
CONTENT_TOO_LARGE, UNPROCESSABLE_CONTENT = 413, 422


def settle_heap() -> None:
    """Take the objects alive now (bundle, models, vocabularies, store: hundreds of thousands
    for ML-1M) out of the cyclic garbage collector's full collections, which would otherwise
    walk them all while the requests in flight wait. Called once a
    pipeline is loaded and warmed up; a reload undoes the previous freeze first, so that the
    old pipeline's objects can be collected."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class Service:
    """What the routes share: the pipeline being served, the store (behind its breaker), the
    metrics. Reload and seeding work without HTTP too."""

    def __init__(self, settings: Settings, store: FeatureStore | None = None) -> None:
        self.settings = settings
        self.owns_store = store is None
        self.store = store if store is not None else open_store(settings.store_config())
        self.guard = StoreGuard(self.store, settings.store, retry_s=settings.store_retry_s)
        self.metrics = Metrics()
        self._reload_lock = threading.Lock()
        # The pipeline is CPU-bound and holds the GIL for most of a request: threads of one
        # process running requests at once only take turns on the GIL (each one's request then
        # lasts as long as all of them together, and they convoy on the store's lock), so
        # requests run ``request_threads`` at a time and the others wait in the event loop
        # (0, the default: on the event loop itself).
        self._executor = None if settings.request_threads == 0 else ThreadPoolExecutor(
            settings.request_threads, thread_name_prefix="bstrec-request")
        try:
            self.pipeline = self._load(settings.bundle)
            # the experiment's other bundles: loaded once, not swapped by a reload
            self.pipeline_b = None if settings.bundle_b is None else self._load(settings.bundle_b)
            self.shadow = (None if settings.shadow_bundle is None
                           else self._load(settings.shadow_bundle))
        except BaseException:
            if self.owns_store:
                self.store.close()
            raise
        self.metrics.serving(self.pipeline.version)
        log_config = settings.impression_log_config()
        # last, so that a bundle that does not load leaves no thread behind
        self.impressions = None if log_config is None else ImpressionLog(log_config)
        # one thread: shadow scoring never takes more than a core from the served requests
        self._shadow_pool = None if self.shadow is None else ThreadPoolExecutor(
            1, thread_name_prefix="bstrec-shadow")
        self._shadow_pending = 0  # submitted and not yet done
        self._shadow_lock = threading.Lock()
        self.monitor = None if settings.alert_window == 0 else LiveMonitor.from_file(
            settings.alert_window, settings.alert_config)
        settle_heap()

    def _load(self, path: Path) -> Pipeline:
        bundle = load_bundle(path, verify=self.settings.verify_bundle,
                             ort_threads=self.settings.ort_threads)
        try:
            pipeline = Pipeline(bundle, self.guard, max_future_s=self.settings.max_future_s)
            pipeline.warmup()
        except Exception as exc:
            raise BundleError(f"{path}: the bundle loads but does not serve: {exc}") from exc
        return pipeline

    def reload(self, path: Path | None = None, target: ReloadTarget = "A"
               ) -> tuple[str, Pipeline, float]:
        """Load ``path`` (default: the bundle configured for ``target``) and swap it in as
        ``target`` (arm A, the main bundle; arm B; or the shadow bundle); returns the previous
        version, the new pipeline and the seconds it took. Raises BundleError, the old
        pipeline still serving, and RequestError for a target that no bundle serves."""
        attribute, configured = {"A": ("pipeline", self.settings.bundle),
                                 "B": ("pipeline_b", self.settings.bundle_b),
                                 "shadow": ("shadow", self.settings.shadow_bundle)}[target]
        with self._reload_lock:
            current: Pipeline | None = getattr(self, attribute)
            if current is None:
                # starting an experiment changes who sees what: a restart with its settings
                raise RequestError(f"no bundle serves {target!r} to reload: start the service "
                                   "with BSTREC_BUNDLE_B or BSTREC_SHADOW_BUNDLE")
            previous = current.version
            del current  # no reference of ours may keep the old pipeline past settle_heap
            started = time.perf_counter()
            try:
                new = self._load(path or configured or self.settings.bundle)
            except BundleError:
                self.metrics.reloads.labels("refused").inc()
                raise
            setattr(self, attribute, new)  # the swap: one reference assignment
            self.metrics.reloads.labels("ok").inc()
            if target == "A":
                self.metrics.serving(new.version)
            settle_heap()  # the old pipeline lives on only in the requests still using it
            return previous, new, time.perf_counter() - started

    def seed(self) -> None:
        """Put the bundle's items (and ``seed_events``' log) into the store; a store that is
        down is only logged: the service answers from fallbacks meanwhile."""
        try:
            if self.settings.seed_items:
                items = self.pipeline.bundle.items
                self.guard.call(lambda s: s.put_items(items))
            if self.settings.seed_events is not None:
                root = Path(self.settings.seed_events)
                dataset = Dataset.load(root / "dataset")
                until = self.settings.seed_until
                if until == "test":
                    until = int(period_start(json.loads((root / "manifest.json").read_text())))
                report = self.guard.call(lambda s: s.load_dataset(dataset, until))
                log.debug("feature store seeded from %s: %s", self.settings.seed_events, report)
        except StoreUnavailable as exc:
            log.warning("feature store not seeded, it is unavailable: %s", exc)

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` (a pipeline call) on the request threads, or inline on the event loop
        when ``request_threads`` is 0."""
        if self._executor is None:
            return fn()
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def arm(self, user_id: str) -> tuple[str, Pipeline]:
        """The experiment arm of ``user_id`` and the pipeline that answers it."""
        b = self.pipeline_b
        if b is None:
            return DEFAULT_ARM, self.pipeline
        arm = arm_of(user_id, self.settings.share_b, self.settings.experiment_salt)
        return arm, (b if arm == "B" else self.pipeline)

    def recommend(self, user_id: str, k: int, now: int | None,
                  request_id: str) -> tuple[Recommendation, str]:
        """The answer of ``user_id``'s arm, logged; the shadow bundle (if any) is given the
        same store read and request time and scored on its own thread."""
        arm, pipeline = self.arm(user_id)
        state = pipeline.read_user(user_id)
        # the stochastic policy's draw from the request id: a logged list can be redrawn
        rec = pipeline.recommend(user_id, k, now, state=state, seed=int(request_id[:16], 16))
        self.metrics.observe(rec)
        self.log_recommendation(request_id, rec, arm)
        if self._shadow_pool is not None and self.shadow is not None:
            with self._shadow_lock:
                drop = self._shadow_pending >= self.settings.shadow_max_pending
                self._shadow_pending += not drop
            if drop:
                self.metrics.shadow.labels("dropped").inc()
            else:
                self._shadow_pool.submit(self._score_shadow, self.shadow, request_id, k,
                                         rec.request_time, state)
        return rec, arm

    def _score_shadow(self, shadow: Pipeline, request_id: str, k: int, now: int,
                      state: UserState) -> None:
        try:
            rec = shadow.recommend(state.user, k, now, state=state,
                                   seed=int(request_id[:16], 16))
        except Exception:  # a shadow failure must not reach the served answers
            log.exception("shadow bundle %s failed on request %s", shadow.version, request_id)
            self.metrics.shadow.labels("failed").inc()
            return
        finally:
            with self._shadow_lock:
                self._shadow_pending -= 1
        self.metrics.shadow.labels("scored").inc()
        self.log_recommendation(request_id, rec, SHADOW_ARM, shown=False)

    def log_recommendation(self, request_id: str, rec: Recommendation, arm: str = DEFAULT_ARM,
                           *, shown: bool = True) -> None:
        """One impression row per item (enqueued only: no I/O on the request path); shown
        rows also feed the live alerts."""
        if self.impressions is None and (self.monitor is None or not shown):
            return
        received = time.time()
        user, degraded = str(rec.user_id), list(rec.degraded_reasons)
        ts = float(rec.request_time)
        freshness = None if rec.newest_ts is None else ts - rec.newest_ts
        # per request, repeated on its rows (Parquet's dictionary encoding stores them once)
        profile, candidates = json.dumps(rec.profile), json.dumps(rec.candidates)
        timings = json.dumps(rec.timings_ms)
        k = len(rec.items)
        rows = [ImpressionRow(
            request_id=request_id, user_id=user, ts=ts, received_at=received,
            model_version=rec.model_version, arm=arm, path=rec.path, degraded=degraded,
            position=n, item_id=str(item.item_id), score=item.score,
            prerank_score=item.prerank_score, sources=list(item.sources), shown=shown,
            policy=rec.policy, propensity=item.propensity, k=k, category=item.category,
            history_length=rec.history_length, freshness_s=freshness,
            last_category=rec.last_category, user_features=profile, candidates=candidates,
            timings_ms=timings)
            for n, item in enumerate(rec.items)]
        if self.impressions is not None:
            self.impressions.log_impressions(rows)
        if self.monitor is not None and shown:
            self.monitor.add(rows)

    def references(self) -> dict[str, Reference | None]:
        """The training reference of each bundle served, by version."""
        pipelines = [p for p in (self.pipeline, self.pipeline_b) if p is not None]
        return {p.version: p.bundle.reference for p in pipelines}

    def log_events(self, request_ids: list[str | None], result: IngestResult) -> None:
        """One event row per event of an ingested request (``request_ids`` in its order)."""
        if self.impressions is None:
            return
        received = time.time()
        self.impressions.log_events([EventRow(
            request_id=rid, user_id=str(e.user_id), item_id=str(e.item_id), ts=float(e.timestamp),
            event_id=e.event_id, received_at=received)
            for rid, e in zip(request_ids, result.events, strict=True)])

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self._shadow_pool is not None:
            self._shadow_pool.shutdown(wait=True)
        # after the requests in flight: their rows are in the last batch
        if self.impressions is not None:
            self.impressions.close()
        if self.owns_store:
            self.store.close()


class _MetricsMiddleware:
    """Counts and times every HTTP request by route template (bounded label values)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        code = [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                code[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            # the router writes the matched route into this same scope
            name = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, name, str(code[0])).inc()
            self.metrics.latency.labels(method, name).observe(time.perf_counter() - started)


class _BodyTooLarge(HTTPException):
    """Raised from ``receive`` once a body passes the limit: FastAPI lets an HTTPException from
    reading the body through (any other exception there becomes a 400), and the exception
    middleware answers it as any other HTTPException."""

    def __init__(self, max_bytes: int, what: str) -> None:
        super().__init__(CONTENT_TOO_LARGE,
                         f"request body of {what} is over the limit of {max_bytes}",
                         headers=CLOSE)


class _BodyLimitMiddleware:
    """413 for a request whose body is over ``max_bytes``: at once when its Content-Length says
    so, else (chunked) as soon as the bytes read pass it, so that no body is read whole (plain
    ASGI: Starlette's BaseHTTPMiddleware costs a task and a stream per request)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(_BodyTooLarge(self.max_bytes, f"{length.decode()} bytes"),
                               scope, receive, send)
            return
        read = 0
        started = False

        async def counted() -> Message:
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes, f"at least {read} bytes")
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _BodyTooLarge as exc:  # read outside FastAPI's body parsing
            if started:
                raise
            await self._refuse(exc, scope, receive, send)

    @staticmethod
    async def _refuse(exc: _BodyTooLarge, scope: Scope, receive: Callable[[], Awaitable[Message]],
                      send: Callable[[Message], Awaitable[None]]) -> None:
        response = JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)
        await response(scope, receive, send)


KeyCheck = Callable[[str | None], None]
Responses = dict[int | str, dict[str, Any]]


def key_check(keys: list[SecretStr | None], what: str, setting: str) -> KeyCheck:
    """A check of an X-API-Key header value against the configured ``keys``: 401 without a
    key, 403 for a wrong one, 403 when none is configured (``what`` is then closed)."""
    # an empty key would let in a caller who sends an empty header: as good as none
    accepted = [k.get_secret_value().encode() for k in keys if k is not None and len(k)]

    def check(key: str | None) -> None:
        if not accepted:
            raise HTTPException(status.HTTP_403_FORBIDDEN,
                                f"{what} disabled: the server has no key for it ({setting})")
        if key is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing API key: send X-API-Key",
                                headers={"WWW-Authenticate": "X-API-Key"})
        given = key.encode()
        # every key compared, so that the time taken does not tell which one matched
        matched = [secrets.compare_digest(given, k) for k in accepted]
        if not any(matched):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "invalid API key")

    return check


def key_first(check: KeyCheck) -> type[APIRoute]:
    """A route class whose requests pass ``check`` before their body is read: FastAPI reads and
    parses a body before it solves any dependency, so a key checked by a dependency alone
    comes after the whole body was read from a caller who has no key."""

    class KeyFirstRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def checked(request: Request) -> Response:
                try:
                    check(request.headers.get("x-api-key"))
                except HTTPException as exc:
                    exc.headers = {**(exc.headers or {}), **CLOSE}
                    raise
                return await handler(request)

            return checked

    return KeyFirstRoute


def error(description: str) -> dict[str, Any]:
    return {"model": schemas.Error, "description": description}


def validation(description: str) -> dict[str, Any]:
    """A documented 422 in FastAPI's validation error schema (one shape for every 422)."""
    return {"model": schemas.ValidationErrors, "description": description}


class _PageMount(Mount):
    """The static page at ``/``, for the paths no API route has: a wrong method on an API path
    (OPTIONS /events) is then the router's 405 with the route's Allow header, not the page's
    405 with GET, HEAD. Consulted only by requests no route matched in full."""

    def __init__(self, directory: Path, routes: list[BaseRoute]) -> None:
        from fastapi.staticfiles import StaticFiles

        super().__init__("/", app=StaticFiles(directory=directory, html=True), name="static")
        self.routes_before = list(routes)  # included routers too, hence matches(), not paths

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http" and any(r.matches(scope)[0] != Match.NONE
                                           for r in self.routes_before):
            return Match.NONE, {}
        return super().matches(scope)


def id_constraints(kind: str) -> dict[str, Any]:
    """Constraints of a user or item id parameter for a bundle whose ids are ``kind``: an id the
    bundle could never know is refused by the documented schema, not by a rule it hides."""
    if kind == "int":
        return {"pattern": INT_ID, "description": "An integer id (this bundle's ids are integers)"}
    return {"min_length": 1, "max_length": MAX_ID_CHARS}


def create_app(settings: Settings, *, service: Service | None = None) -> FastAPI:
    """The FastAPI app. Without ``service`` it builds one (bundle loaded, store opened and
    seeded) and closes it at shutdown. The OpenAPI schema describes the ids of the bundle
    served at start (integers or strings); a reload to a bundle of the other kind needs a
    restart for the schema to follow."""
    own = service is None
    svc = service if service is not None else Service(settings)
    if own:
        svc.seed()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if own:
            svc.close()

    query_names: dict[str, frozenset[str]] = {}

    async def known_query(request: Request) -> None:
        """422 for a query parameter the route does not take: ``kk=5`` for ``k=5`` would
        otherwise be answered with the default k, the typo unnoticed."""
        route = request.scope.get("route")
        if not request.query_params or not isinstance(route, APIRoute):
            return
        names = query_names.get(route.path_format)
        if names is None:  # the route's documented query parameters, read once
            ops = app.openapi()["paths"].get(route.path_format, {}).values()
            names = query_names[route.path_format] = frozenset(
                p["name"] for op in ops for p in op.get("parameters", []) if p["in"] == "query")
        unknown = [k for k in dict.fromkeys(request.query_params.keys()) if k not in names]
        if unknown:
            takes = ", ".join(sorted(names)) or "no query parameters"
            raise RequestValidationError([
                {"type": "extra_forbidden", "loc": ("query", k), "input": request.query_params[k],
                 "msg": f"unknown query parameter {k!r}: {route.path_format} takes {takes}"}
                for k in unknown])

    app = FastAPI(title="bstrec", version=bstrec.__version__, lifespan=lifespan,
                  dependencies=[Depends(known_query)],
                  description="Sequence-aware two-stage recommendations (match, pre-rank, BST "
                  "rank, rules) with an online feature store.")
    app.state.service = svc
    key_header = APIKeyHeader(
        name="X-API-Key", auto_error=False,
        description="POST /events: the events key; POST /admin/reload: the admin key; "
        "GET /users/{user_id}/history: the read or the admin key (unless public_history)")
    check_events = key_check([settings.events_secret()], "event writes are",
                             "BSTREC_EVENTS_KEY or BSTREC_API_KEY")
    check_admin = key_check([settings.admin_secret()], "admin is",
                            "BSTREC_ADMIN_KEY or BSTREC_API_KEY")
    check_read = key_check([settings.read_key, settings.admin_secret()], "reading histories is",
                           "BSTREC_READ_KEY, BSTREC_ADMIN_KEY or BSTREC_API_KEY; or "
                           "BSTREC_PUBLIC_HISTORY=true")

    # The key checks as dependencies too: they put the key in the OpenAPI schema (the route
    # classes have checked it already, before the body, so these pass at once).
    async def events_key(key: Annotated[str | None, Depends(key_header)]) -> None:
        check_events(key)

    async def admin_key(key: Annotated[str | None, Depends(key_header)]) -> None:
        check_admin(key)

    async def read_key(key: Annotated[str | None, Depends(key_header)]) -> None:
        check_read(key)

    @app.exception_handler(RequestError)
    async def bad_request(_: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"detail": [{"type": "value_error", "loc": ["request"],
                                         "msg": str(exc)}]},
                            UNPROCESSABLE_CONTENT)

    @app.exception_handler(NotFound)
    async def not_found(_: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc.args[0])}, status.HTTP_404_NOT_FOUND)

    @app.exception_handler(StoreUnavailable)
    async def store_down(_: Request, exc: StoreUnavailable) -> JSONResponse:
        return JSONResponse({"detail": f"feature store unavailable, retry later: {exc}"},
                            status.HTTP_503_SERVICE_UNAVAILABLE,
                            headers={"Retry-After": str(max(1, round(settings.store_retry_s)))})

    @app.exception_handler(BundleError)
    async def bundle_refused(_: Request, exc: BundleError) -> JSONResponse:
        return JSONResponse({"detail": f"bundle refused, still serving "
                             f"{svc.pipeline.version}: {exc}"}, status.HTTP_409_CONFLICT)

    invalid: Responses = {422: validation("Invalid input: a parameter out of its documented range, or an "
                               "unknown query parameter")}
    keyed: Responses = {401: error("No X-API-Key"), 403: error("Wrong key, or no key configured for "
                                                   "this route")}
    body_errors: Responses = {400: error("The body could not be read (e.g. not UTF-8)"),
                   413: error(f"Body over {settings.max_body_bytes} bytes")}
    user_kind = svc.pipeline.bundle.user_id_type
    item_kind = svc.pipeline.bundle.item_id_type

    class RecommendQuery(BaseModel):
        # one model for the query rather than a parameter each: FastAPI validates it in one
        # pydantic call instead of one per parameter (less framework work on the hot route);
        # the OpenAPI schema lists the same parameters
        user_id: str = Field(**(id_constraints(user_kind) | {
            "description": "An unknown user gets cold-start items"}))
        k: int = Field(settings.k_default, ge=1, le=settings.k_max)
        now: int | None = Field(None, ge=0, le=MAX_NOW, description="Request time, unix seconds "
                                "up to 2100-01-01 (replays); default: the server clock")

    request_id_header: Responses = {200: {"headers": {"X-Request-ID": {
        "description": "The answer's request_id, as in the body", "schema": {"type": "string"}}}}}

    @app.get("/recommend", response_model=schemas.Recommendation,
             responses=request_id_header | invalid, tags=["recommend"])
    async def recommend(query: Annotated[RecommendQuery, Query()]) -> Response:
        """Top k items for a user: match, pre-rank, BST rank, rules."""
        request_id = uuid.uuid4().hex  # the impression log's key, echoed back with the events

        def run() -> bytes:
            # one bundle for the whole request, whatever reloads meanwhile (svc.arm reads the
            # reference once)
            rec, arm = svc.recommend(query.user_id, query.k, query.now, request_id)
            body = {name: getattr(rec, name) for name in RESPONSE_FIELDS}
            # JSON straight from the validated model (pydantic-core), not through FastAPI's
            # response_model round trip via Python objects; the schema is the same
            return schemas.Recommendation.model_validate(
                {**body, "request_id": request_id, "arm": arm}).model_dump_json().encode()

        return Response(await svc.run(run), media_type=JSON,
                        headers={"X-Request-ID": request_id})

    @app.get("/users/{user_id}/history", response_model=schemas.History,
             dependencies=[] if settings.public_history else [Depends(read_key)],
             responses=invalid | ({} if settings.public_history else keyed), tags=["recommend"])
    async def history(user_id: Annotated[str, PathParam(**id_constraints(user_kind))],
                      n: Annotated[int, Query(ge=1, le=200)] = 20) -> schemas.History:
        """The user's last n behaviours in the feature store, newest first. Needs the read or
        the admin key unless the server runs with public_history."""
        pipeline = svc.pipeline
        return schemas.History.model_validate(await svc.run(lambda: pipeline.history(user_id, n)))

    @app.get("/items/{item_id}/similar", response_model=schemas.Similar,
             responses=invalid | {404: error("Unknown item")}, tags=["recommend"])
    async def similar(item_id: Annotated[str, PathParam(**id_constraints(item_kind))],
                      k: Annotated[int, Query(ge=1, le=settings.k_max)] = settings.k_default
                      ) -> schemas.Similar:
        """Items similar to one item (item-CF, then two-tower neighbours, then its category)."""
        pipeline = svc.pipeline
        return schemas.Similar.model_validate(await svc.run(lambda: pipeline.similar(item_id, k)))

    events_router = APIRouter(route_class=key_first(check_events))

    @events_router.post(
        "/events", response_model=schemas.IngestResult, dependencies=[Depends(events_key)],
        responses=keyed | body_errors | {
            413: error(f"Body over {settings.max_body_bytes} bytes, or more than "
                       f"{settings.max_batch_events} events: split it"),
            422: validation(
                "Invalid body, or events the schema cannot judge: an item neither the bundle "
                "nor the store knows, an id that is not an integer where the bundle's ids are, "
                f"a timestamp over {settings.max_future_s} s ahead of the server clock. Each "
                "error's loc names the event (body, events, index, field) and msg says why; "
                "nothing of the request was stored"),
            503: error("Feature store unavailable (Retry-After)")}, tags=["events"])
    async def events(body: Annotated[schemas.EventIn | schemas.EventBatch, Body(
            description="One event, or {\"events\": [...]}")]) -> schemas.IngestResult:
        """Record behaviours in the online feature store (atomic per user, idempotent by
        event id; late and out-of-order events are stored in timestamp order); the next
        /recommend sees them. All or nothing: a request with a refused event stores none."""
        batch = body.events if isinstance(body, schemas.EventBatch) else [body]
        if len(batch) > settings.max_batch_events:
            raise HTTPException(CONTENT_TOO_LARGE,
                                f"batch of {len(batch)} events is over the limit of "
                                f"{settings.max_batch_events}; split it")
        incoming = [IncomingEvent(e.user_id, e.item_id, e.timestamp, e.event_id) for e in batch]
        pipeline = svc.pipeline
        try:
            result = await svc.run(lambda: pipeline.ingest(incoming))
        except EventsRefused as exc:
            svc.metrics.events.labels("rejected").inc(len(batch))
            where: tuple[str | int, ...] = (
                ("body", "events") if isinstance(body, schemas.EventBatch) else ("body",))
            raise RequestValidationError([
                {"type": "value_error", "msg": why,
                 "loc": (*where, n, field) if len(where) == 2 else (*where, field)}
                for n, field, why in exc.problems]) from None
        except StoreUnavailable:
            svc.metrics.events.labels("unavailable").inc(len(batch))
            raise
        svc.metrics.events.labels("stored").inc(result.stored)
        svc.metrics.events.labels("ignored").inc(result.ignored)
        svc.log_events([e.request_id for e in batch], result)
        return schemas.IngestResult.model_validate(result)

    admin_router = APIRouter(route_class=key_first(check_admin))
    root = settings.reload_root()

    def under_root(raw: str) -> Path:
        """``raw`` resolved (symlinks, ``..``), if it lies under the bundle root. The refusal is
        the same whether the path outside exists or not: it must not tell the caller what is
        on disk out there."""
        try:
            path = Path(raw).resolve()
        except (OSError, ValueError, RuntimeError):  # NUL byte, symlink loop
            path = None
        if path is None or not path.is_relative_to(root):
            raise HTTPException(status.HTTP_403_FORBIDDEN,
                                f"bundles are loaded only from under the bundle root {root}")
        return path

    @admin_router.post(
        "/admin/reload", response_model=schemas.Reloaded, dependencies=[Depends(admin_key)],
        responses=keyed | body_errors | {
            403: error("Wrong key, no admin key configured, or a bundle outside the bundle "
                       "root"),
            409: error("Bundle refused (missing, corrupted or not serving): the current one "
                       "keeps serving")} | invalid, tags=["admin"])
    def reload(body: schemas.ReloadRequest | None = None) -> schemas.Reloaded:
        """Swap in a bundle atomically while requests are in flight; a broken bundle is
        refused (409) and the current one keeps serving. ``bundle`` must lie under the bundle
        root (``bundle_root``, default: the configured bundle's parent directory)."""
        path = under_root(body.bundle) if body is not None and body.bundle else None
        previous, new, seconds = svc.reload(path, "A" if body is None else body.target)
        log.info("serving bundle %s (was %s), loaded in %.1f s", new.version, previous, seconds)
        return schemas.Reloaded(model_version=new.version, previous_version=previous,
                                bundle=str(new.bundle.path), seconds=round(seconds, 3))

    app.include_router(events_router)
    app.include_router(admin_router)

    @app.get("/healthz", response_model=schemas.Health, responses=invalid, tags=["ops"])
    async def healthz() -> schemas.Health:
        """Liveness: the process answers."""
        return schemas.Health(status="ok", pid=os.getpid())

    @app.get("/readyz", response_model=schemas.Ready, responses=invalid, tags=["ops"])
    def readyz() -> schemas.Ready:
        """Readiness: a bundle is loaded. 200 also while the store is down (requests are
        answered from fallbacks then); ``degraded`` and ``store`` say so."""
        store = svc.guard.probe()
        pipeline = svc.pipeline
        return schemas.Ready(ready=True, degraded=not store.ok, model_version=pipeline.version,
                             bundle=str(pipeline.bundle.path),
                             store=schemas.StoreHealth.model_validate(store))

    text: Responses = {200: {"content": {"text/plain": {"schema": {"type": "string"}}}}}

    @app.get("/metrics", tags=["ops"], response_class=Response, responses=text | invalid)
    def metrics() -> Response:
        """Prometheus exposition: requests, latency per route and stage, candidates per source."""
        svc.metrics.store_up.set(1.0 if svc.guard.status().ok else 0.0)
        if svc.monitor is not None:
            svc.metrics.alerts(svc.monitor.alerts(svc.references()))
        if (log := svc.impressions) is not None:
            rows = svc.metrics.impression_rows
            for kind, n in log.rows_written.items():
                rows.labels(f"written_{kind}").set(n)
            rows.labels("lost").set(log.rows_lost)
            rows.labels("dropped").set(log.rows_dropped)
        return Response(svc.metrics.exposition(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    if settings.static_dir is not None:
        app.router.routes.append(_PageMount(settings.static_dir, app.router.routes))
    app.add_middleware(_BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(_MetricsMiddleware, metrics=svc.metrics)
    return app
