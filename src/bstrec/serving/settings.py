"""Service settings from the environment (prefix ``BSTREC_``) or keyword arguments; unknown
keyword arguments are errors. ``bstrec serve`` fills them from its options."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from bstrec.features.store import StoreConfig
from bstrec.monitoring.impressions import ImpressionLogConfig

WEB_DIR = Path(__file__).resolve().parent / "web"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BSTREC_", extra="forbid", frozen=True)

    bundle: Path = Field(description="Bundle directory served at start and by a plain reload")
    # the online feature store
    store: Literal["embedded", "redis", "redis_cluster"] = "embedded"
    store_path: str = "artifacts/feature_store.sqlite"
    # redis_cluster: one node or several, comma-separated, from which the others are learnt
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "bstrec"
    max_events: int = Field(50, ge=1, description="Behaviours kept per user")
    store_retry_s: float = Field(1.0, gt=0, description="Seconds between retries of a down store")
    # seeding at start: the bundle's item table, and optionally a samples dir's event log
    seed_items: bool = True
    seed_events: Path | None = None
    # with seed_events: only the events before this time (unix seconds), or before the samples'
    # test period ("test"), so that a replay of that period (`bstrec replay`) finds each user's
    # history and profile as of its start and nothing later; profiles and items are all loaded
    seed_until: int | Literal["test"] | None = None
    # Keys (X-API-Key). Separate scopes, so that the key handed to every event producer cannot
    # swap the model: POST /events takes ``events_key``, POST /admin/reload ``admin_key``, each
    # falling back to ``api_key`` (one key for both, as before) when unset; a scope without
    # any key is closed (403). GET /users/{id}/history shows what a user did, so it takes
    # ``read_key`` or the admin key unless ``public_history`` (the web page sends its key field).
    api_key: SecretStr | None = None
    events_key: SecretStr | None = None
    admin_key: SecretStr | None = None
    read_key: SecretStr | None = None
    public_history: bool = False
    # POST /admin/reload loads bundles only from under this directory (symlinks and `..`
    # resolved first); None: the configured bundle's parent directory
    bundle_root: Path | None = None
    # events stamped further ahead of the server clock than this are refused: producers' clocks
    # drift by seconds, while milliseconds sent as seconds or local time sent as UTC land far
    # ahead and would sit at the newest end of a history for hours or forever
    max_future_s: int = Field(300, ge=0)
    # limits
    k_default: int = Field(10, ge=1)
    k_max: int = Field(100, ge=1)
    max_batch_events: int = Field(1000, ge=1)
    max_body_bytes: int = Field(1_000_000, ge=1_024)
    # threads per request for ONNX Runtime and torch (the two-tower user tower)
    ort_threads: int = Field(1, ge=1)
    torch_threads: int = Field(1, ge=1)
    # uvicorn worker processes, each with its own bundle and the shared store: the pipeline's
    # Python parts hold the GIL, so one process uses about one core whatever the thread count.
    # With several, POST /admin/reload and GET /metrics reach only the worker that takes the
    # request: roll a new bundle out by restarting the service.
    workers: int = Field(1, ge=1)
    # requests that run the pipeline at once in a worker, on threads of their own (the others
    # wait in its event loop); more threads of one process only take turns on the GIL. 0 (the
    # default): on the event loop itself, which saves the hand-over to a thread and back (server
    # CPU per request; compare with benchmarks/bench_serving.py --levels 4 under
    # BSTREC_REQUEST_THREADS=1 and 0, side by side), while a worker can run only one request at
    # a time either way
    request_threads: int = Field(0, ge=0)
    verify_bundle: bool = True  # check every file's sha256 at load
    # the impression log (monitoring/impressions.py): every /recommend answer and every event,
    # in Parquet segments under this directory, written off the request path in batches of
    # ``impression_flush_rows`` rows or every ``impression_flush_s`` seconds, flushed at
    # shutdown; None: nothing is logged
    impression_log: Path | None = None
    # the defaults are ImpressionLogConfig's (its comments say why)
    impression_flush_rows: int = Field(ImpressionLogConfig.flush_rows, ge=1)
    impression_flush_s: float = Field(ImpressionLogConfig.flush_interval_s, gt=0)
    # rows waiting for the log's writer at most; past it rows are dropped and counted on /metrics
    impression_max_queued_rows: int = Field(ImpressionLogConfig.max_queued_rows, ge=1)
    # experiments: a second bundle served to ``share_b`` of the users (arm B, the main bundle
    # being arm A), split by a salted hash of the user id: a user stays in one arm
    bundle_b: Path | None = None
    share_b: float = Field(0.5, ge=0, le=1)
    experiment_salt: str = "bstrec"
    # a candidate bundle scored on every request, off the request path, on the same store read
    # and logged (shown = false), never served: what `bstrec monitor ope` evaluates
    shadow_bundle: Path | None = None
    # shadow scorings waiting for the shadow thread beyond this are dropped (bstrec_shadow
    # {outcome="dropped"}): a shadow slower than the traffic must not queue without bound
    shadow_max_pending: int = Field(100, ge=1)
    # live alerts on /metrics (gauges bstrec_alert): thresholds (a YAML of
    # monitoring/alerts.py's AlertConfig; None: its defaults) over the last ``alert_window``
    # shown items against each bundle's training reference; 0: off
    alert_window: int = Field(0, ge=0)
    alert_config: Path | None = None
    # the web page mounted at / (API routes take precedence); None: no page
    static_dir: Path | None = WEB_DIR
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65_535)

    @model_validator(mode="after")
    def _k_in_range(self) -> Settings:
        if self.k_default > self.k_max:
            raise ValueError(f"k_default {self.k_default} is over k_max {self.k_max}")
        if self.seed_until is not None and self.seed_events is None:
            raise ValueError("seed_until goes with seed_events (the log it cuts)")
        if self.shadow_bundle is not None and self.impression_log is None:
            raise ValueError("shadow_bundle needs impression_log: a shadow ranking is only "
                             "logged, never served")
        return self

    def events_secret(self) -> SecretStr | None:
        return self.events_key or self.api_key

    def admin_secret(self) -> SecretStr | None:
        return self.admin_key or self.api_key

    def reload_root(self) -> Path:
        """The directory reload may load bundles from, symlinks and `..` resolved."""
        root = self.bundle_root if self.bundle_root is not None else self.bundle.resolve().parent
        return root.resolve()

    def impression_log_config(self) -> ImpressionLogConfig | None:
        if self.impression_log is None:
            return None
        return ImpressionLogConfig(self.impression_log, flush_rows=self.impression_flush_rows,
                                   flush_interval_s=self.impression_flush_s,
                                   max_queued_rows=self.impression_max_queued_rows)

    def store_config(self) -> StoreConfig:
        return StoreConfig(backend=self.store, path=self.store_path, url=self.redis_url,
                           prefix=self.redis_prefix, max_events=self.max_events)
