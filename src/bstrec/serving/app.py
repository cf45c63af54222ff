"""The HTTP service: thin FastAPI routes over :class:`~bstrec.serving.pipeline.Pipeline`.

Hot reload: a request takes the pipeline reference once and uses it to the end; a reload
builds and warms a whole new pipeline from the new bundle (under a lock, one reload at a time)
and then replaces the reference in one assignment. Requests in flight finish on the old bundle,
later ones get the new one, none waits or fails; a bundle that does not load is refused (409)
and the old one keeps serving.

Routes are under fixed paths (``/recommend``, ``/events``, ...), so a static page can be mounted
at ``/`` (``Settings.static_dir``) without hiding any of them.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations at runtime,
# and they refer to this factory's local variables (settings, the key header).
import asyncio
import gc
import logging
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import Body, Depends, FastAPI, HTTPException, Query, Request, Response, status
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, Field

import bstrec
from bstrec.data.schema import Dataset
from bstrec.features.store import FeatureStore, StoreUnavailable, open_store
from bstrec.serving import schemas
from bstrec.serving.bundle import BundleError, load_bundle
from bstrec.serving.guard import StoreGuard
from bstrec.serving.metrics import Metrics
from bstrec.serving.pipeline import IncomingEvent, NotFound, Pipeline, RequestError
from bstrec.serving.settings import Settings

log = logging.getLogger(__name__)
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
                   Awaitable[None]]
T = TypeVar("T")
JSON = "application/json"


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
        except BaseException:
            if self.owns_store:
                self.store.close()
            raise
        self.metrics.serving(self.pipeline.version)
        settle_heap()

    def _load(self, path: Path) -> Pipeline:
        bundle = load_bundle(path, verify=self.settings.verify_bundle,
                             ort_threads=self.settings.ort_threads)
        try:
            pipeline = Pipeline(bundle, self.guard)
            pipeline.warmup()
        except Exception as exc:
            raise BundleError(f"{path}: the bundle loads but does not serve: {exc}") from exc
        return pipeline

    def reload(self, path: Path | None = None) -> tuple[str, Pipeline, float]:
        """Load ``path`` (default: the configured bundle) and swap it in; returns the previous
        version, the new pipeline and the seconds it took. Raises BundleError, the old
        pipeline still serving."""
        with self._reload_lock:
            started = time.perf_counter()
            try:
                new = self._load(path or self.settings.bundle)
            except BundleError:
                self.metrics.reloads.labels("refused").inc()
                raise
            previous = self.pipeline.version
            self.pipeline = new  # the swap: one reference assignment
            self.metrics.reloads.labels("ok").inc()
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
                dataset = Dataset.load(Path(self.settings.seed_events) / "dataset")
                report = self.guard.call(lambda s: s.load_dataset(dataset))
                log.debug("feature store seeded from %s: %s", self.settings.seed_events, report)
        except StoreUnavailable as exc:
            log.warning("feature store not seeded, it is unavailable: %s", exc)

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` (a pipeline call) on the request threads, or inline on the event loop
        when ``request_threads`` is 0."""
        if self._executor is None:
            return fn()
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
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


class _BodyLimitMiddleware:
    """413 for a request whose Content-Length is over ``max_bytes``, before its body is read
    (plain ASGI: Starlette's BaseHTTPMiddleware costs a task and a stream per request)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] == "http":
            length = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
            if length.isdigit() and int(length) > self.max_bytes:
                response = JSONResponse(
                    {"detail": f"request body of {length.decode()} bytes is over the limit of "
                     f"{self.max_bytes}"}, status.HTTP_413_CONTENT_TOO_LARGE)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(settings: Settings, *, service: Service | None = None) -> FastAPI:
    """The FastAPI app. Without ``service`` it builds one (bundle loaded, store opened and
    seeded) and closes it at shutdown."""
    own = service is None
    svc = service if service is not None else Service(settings)
    if own:
        svc.seed()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if own:
            svc.close()

    app = FastAPI(title="bstrec", version=bstrec.__version__, lifespan=lifespan,
                  description="Sequence-aware two-stage recommendations (match, pre-rank, BST "
                  "rank, rules) with an online feature store.")
    app.state.service = svc
    key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="Required by POST /events and POST /admin/reload")

    async def require_key(key: Annotated[str | None, Depends(key_header)]) -> None:
        expected = settings.api_key
        if expected is None:
            raise HTTPException(status.HTTP_403_FORBIDDEN,
                                "writes are disabled: the server has no API key (BSTREC_API_KEY)")
        if key is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing API key: send X-API-Key",
                                headers={"WWW-Authenticate": "X-API-Key"})
        if not secrets.compare_digest(key.encode(), expected.get_secret_value().encode()):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "invalid API key")

    @app.exception_handler(RequestError)
    async def bad_request(_: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status.HTTP_422_UNPROCESSABLE_CONTENT)

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

    errors: dict[int | str, dict[str, Any]] = {
        422: {"model": schemas.Error, "description": "Invalid input"}}

    class RecommendQuery(BaseModel):
        # one model for the query rather than a parameter each: FastAPI validates it in one
        # pydantic call instead of one per parameter (less framework work on the hot route);
        # the OpenAPI schema lists the same parameters
        user_id: str = Field(min_length=1, max_length=256,
                             description="An unknown user gets cold-start items")
        k: int = Field(settings.k_default, ge=1, le=settings.k_max)
        now: int | None = Field(None, ge=0, description="Request time, unix seconds (replays); "
                                "default: the server clock")

    @app.get("/recommend", response_model=schemas.Recommendation, responses=errors,
             tags=["recommend"])
    async def recommend(query: Annotated[RecommendQuery, Query()]) -> Response:
        """Top k items for a user: match, pre-rank, BST rank, rules."""
        pipeline = svc.pipeline  # one bundle for the whole request, whatever reloads meanwhile

        def run() -> bytes:
            rec = pipeline.recommend(query.user_id, query.k, query.now)
            svc.metrics.observe(rec)
            # JSON straight from the validated model (pydantic-core), not through FastAPI's
            # response_model round trip via Python objects; the schema is the same
            return schemas.Recommendation.model_validate(rec).model_dump_json().encode()

        return Response(await svc.run(run), media_type=JSON)

    @app.get("/users/{user_id}/history", response_model=schemas.History, responses=errors,
             tags=["recommend"])
    async def history(user_id: str,
                      n: Annotated[int, Query(ge=1, le=200)] = 20) -> schemas.History:
        """The user's last n behaviours in the feature store, newest first."""
        pipeline = svc.pipeline
        return schemas.History.model_validate(await svc.run(lambda: pipeline.history(user_id, n)))

    @app.get("/items/{item_id}/similar", response_model=schemas.Similar,
             responses={404: {"model": schemas.Error, "description": "Unknown item"}, **errors},
             tags=["recommend"])
    async def similar(item_id: str,
                      k: Annotated[int, Query(ge=1, le=settings.k_max)] = settings.k_default
                      ) -> schemas.Similar:
        """Items similar to one item (item-CF, then two-tower neighbours, then its category)."""
        pipeline = svc.pipeline
        return schemas.Similar.model_validate(await svc.run(lambda: pipeline.similar(item_id, k)))

    @app.post("/events", response_model=schemas.IngestResult, dependencies=[Depends(require_key)],
              responses={413: {"model": schemas.Error, "description": "Batch too large"},
                         503: {"model": schemas.Error, "description": "Store unavailable"},
                         **errors}, tags=["events"])
    async def events(body: Annotated[schemas.EventIn | schemas.EventBatch, Body(
            description="One event, or {\"events\": [...]}")]) -> schemas.IngestResult:
        """Record behaviours in the online feature store (atomic per user, idempotent by
        event id); the next /recommend sees them."""
        batch = body.events if isinstance(body, schemas.EventBatch) else [body]
        if len(batch) > settings.max_batch_events:
            raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE,
                                f"batch of {len(batch)} events is over the limit of "
                                f"{settings.max_batch_events}; split it")
        incoming = [IncomingEvent(e.user_id, e.item_id, e.timestamp, e.event_id) for e in batch]
        pipeline = svc.pipeline
        try:
            result = await svc.run(lambda: pipeline.ingest(incoming))
        except RequestError:
            svc.metrics.events.labels("rejected").inc(len(batch))
            raise
        except StoreUnavailable:
            svc.metrics.events.labels("unavailable").inc(len(batch))
            raise
        svc.metrics.events.labels("stored").inc(result.stored)
        svc.metrics.events.labels("ignored").inc(result.ignored)
        return schemas.IngestResult.model_validate(result)

    @app.post("/admin/reload", response_model=schemas.Reloaded,
              dependencies=[Depends(require_key)],
              responses={409: {"model": schemas.Error, "description": "Bundle refused"}},
              tags=["admin"])
    def reload(body: schemas.ReloadRequest | None = None) -> schemas.Reloaded:
        """Swap in a bundle atomically while requests are in flight; a broken bundle is
        refused (409) and the current one keeps serving."""
        path = Path(body.bundle) if body is not None and body.bundle else None
        previous, new, seconds = svc.reload(path)
        log.info("serving bundle %s (was %s), loaded in %.1f s", new.version, previous, seconds)
        return schemas.Reloaded(model_version=new.version, previous_version=previous,
                                bundle=str(new.bundle.path), seconds=round(seconds, 3))

    @app.get("/healthz", response_model=schemas.Health, tags=["ops"])
    async def healthz() -> schemas.Health:
        """Liveness: the process answers."""
        return schemas.Health(status="ok", pid=os.getpid())

    @app.get("/readyz", response_model=schemas.Ready, tags=["ops"])
    def readyz() -> schemas.Ready:
        """Readiness: a bundle is loaded. 200 also while the store is down (requests are
        answered from fallbacks then); ``degraded`` and ``store`` say so."""
        store = svc.guard.probe()
        pipeline = svc.pipeline
        return schemas.Ready(ready=True, degraded=not store.ok, model_version=pipeline.version,
                             bundle=str(pipeline.bundle.path),
                             store=schemas.StoreHealth.model_validate(store))

    @app.get("/metrics", tags=["ops"], response_class=Response)
    def metrics() -> Response:
        """Prometheus exposition: requests, latency per route and stage, candidates per source."""
        svc.metrics.store_up.set(1.0 if svc.guard.status().ok else 0.0)
        return Response(svc.metrics.exposition(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    if settings.static_dir is not None:
        from fastapi.staticfiles import StaticFiles

        app.mount("/", StaticFiles(directory=settings.static_dir, html=True), name="static")
    app.add_middleware(_BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(_MetricsMiddleware, metrics=svc.metrics)
    return app

