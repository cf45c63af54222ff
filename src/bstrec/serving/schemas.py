"""Request and response models of the HTTP API (published in its OpenAPI schema)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

Id = StrictInt | StrictStr
# An id as a caller sends it: what the pipeline can parse (pipeline.parse_id: 1 to 256
# characters, integers of at most 18 digits), so that the schema refuses the rest itself
IdIn = (Annotated[StrictInt, Field(ge=-(10**18 - 1), le=10**18 - 1)]
        | Annotated[StrictStr, Field(min_length=1, max_length=256)])


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", from_attributes=True)


class RecommendedItem(_Model):
    item_id: Id
    score: float = Field(description="The served objective's score (engagement: the ranker's "
                         "click probability)")
    prerank_score: float = Field(description="The pre-rank score (two-tower dot product)")
    sources: list[str] = Field(description="Match-stage sources that proposed the item")
    category: str | None
    model_version: str
    title: str | None = Field(None, description="The item's title, where the catalogue has one")
    propensity: float | None = Field(
        None, description="Probability that the item is in the shown list under the stochastic "
        "policy (null under greedy)")


class Recommendation(_Model):
    request_id: str = Field(description="This answer's id (also in the X-Request-ID header): "
                            "send it back with the events that follow it (POST /events)")
    user_id: Id
    items: list[RecommendedItem]
    model_version: str
    arm: str = Field(description="Experiment arm: A or B when two bundles are served, else "
                     "default")
    policy: str = Field(description="How the list was drawn: greedy or plackett_luce")
    objective: str = Field(description="The score that ranked the list: engagement (pCTR), "
                           "conversion (pCTCVR), revenue (pCTCVR x price) or blend")
    request_time: int = Field(description="Unix seconds the features were computed at")
    path: str = Field(description="Match route: regular, few (1-2 behaviours) or cold")
    known_user: bool
    history_length: int
    degraded: bool = Field(description="True when fallbacks answered (e.g. feature store down)")
    degraded_reasons: list[str]
    candidates: dict[str, int] = Field(description="Merged candidates proposed by each source")
    timings_ms: dict[str, float] = Field(description="Milliseconds per pipeline stage")


class HistoryItem(_Model):
    item_id: Id
    timestamp: int
    category: str | None
    title: str | None


class History(_Model):
    user_id: Id
    behaviours: list[HistoryItem] = Field(description="Newest first")
    degraded: bool
    degraded_reasons: list[str]


class SimilarItem(_Model):
    item_id: Id
    score: float
    source: str
    category: str | None


class Similar(_Model):
    item_id: Id
    items: list[SimilarItem]
    model_version: str


class EventIn(_Model):
    user_id: IdIn
    item_id: IdIn
    timestamp: StrictInt | None = Field(None, ge=0, description="Unix seconds; default: now")
    event_id: StrictStr | None = Field(
        None, max_length=256, description="Idempotency key; default user:item:timestamp")
    request_id: StrictStr | None = Field(
        None, max_length=64, description="The request_id of the /recommend answer this event "
        "follows (a click on a recommended item), for the impression log; per event, since one "
        "batch may answer several recommendations")


class EventBatch(_Model):
    events: list[EventIn] = Field(min_length=1)


class IngestResult(_Model):
    received: int
    stored: int
    ignored: int = Field(description="Already stored, or older than the user's kept window")


class StoreHealth(_Model):
    ok: bool
    backend: str
    error: str | None
    down_since: float | None


class Ready(_Model):
    ready: bool
    degraded: bool
    model_version: str
    bundle: str
    store: StoreHealth


class Health(_Model):
    status: str
    pid: int = Field(description="The worker process that answered (several with --workers)")


ReloadTarget = Literal["A", "B", "shadow"]


class ReloadRequest(_Model):
    bundle: str | None = Field(None, max_length=4096, description="Bundle directory, under the "
                               "server's bundle root; default: the one configured for target")
    target: ReloadTarget = Field("A", description="What the bundle replaces: arm A (the main "
                                 "bundle), arm B of an experiment, or the shadow bundle")


class Reloaded(_Model):
    model_version: str
    previous_version: str
    bundle: str
    seconds: float


class Error(_Model):
    detail: str


class ValidationIssue(BaseModel):
    """One item of FastAPI's validation error (its ``ValidationError`` schema): where (``loc``,
    e.g. ``["body", "events", 3, "item_id"]``), why (``msg``) and a machine-readable ``type``."""

    loc: list[str | int]
    msg: str
    type: str
    input: Any = None
    ctx: dict[str, Any] | None = None


class ValidationErrors(BaseModel):
    """Every 422: FastAPI's validation error body, the service's own refusals included."""

    detail: list[ValidationIssue]
