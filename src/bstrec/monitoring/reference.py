"""The training reference a bundle carries (``reference.json``): what served traffic is compared
with to tell drift of the ranker's inputs, stale models and silent candidate sources.

It holds the distributions of the input features the impression log records, the newest event
time of the bundle's data, which candidate sources each match path merges, and the
distribution of the ranker's predictions on rows it did not fit (for the report's plot of served
scores beside training scores).

The ranker's outputs (its scores and the categories of what it shows) are NOT alerted against
this reference: the training data holds no shown lists, only random targets with all their
scores, so the top k of a ranking is a different population by construction. They are compared
with a baseline of served traffic instead (alerts.py).

Logged feature -> reference feature (names are those of ``IMPRESSION_SCHEMA``):

- ``history_length``: behaviours in the sample's history. The samples keep at most the spec's
  ``max_len`` and the feature store more, so logged lengths are clipped to ``history_cap``
  before they are compared: beyond it the ranker reads nothing more;
- ``freshness_s``: seconds from the newest behaviour to the sample (missing: no behaviour);
- ``last_category``: the newest behaviour's category;
- ``user.<name>``: the profile value ``name`` in ``user_features``, as a string.

Which rows:

- the request-level features (the first three) are fitted on the validation split, one row per
  request (a positive and its negatives share one), and read once per request on the served
  side. Requests come after the data's end, and a user's history only grows with time, so the
  train split (which also holds every user's early, short histories) is a shifted reference
  even when nothing is broken; the validation split is the period just before serving. The
  train split stands in when there is no validation split. (Topping a small validation split
  up with the newest train requests was tried: it brings the short histories back);
- the user features are counted once per distinct user on both sides (the reference: the
  distinct users of those same rows; served: the distinct users of the window). Weighted by
  requests, a few hundred heavy users dominate any period and the PSI of their profiles
  measures who happens to be active, not a broken feature.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt
import polars as pl

from bstrec.config import ConfigError, from_dict
from bstrec.monitoring.drift import (
    CategoricalDistribution,
    Distribution,
    NumericDistribution,
    distribution_from_dict,
)

if TYPE_CHECKING:
    from torch import nn

    from bstrec.data.samples import SampleSet
    from bstrec.serving.config import PipelineConfig

REFERENCE = "reference.json"
FORMAT_VERSION = 1
MAX_ROWS = 20_000
USER_PREFIX = "user."
# features with one value per request; user features have one per user
REQUEST_FEATURES = ("history_length", "freshness_s", "last_category")


@dataclass(frozen=True)
class Reference:
    """Training-time distributions and expectations of one bundle."""

    predictions: NumericDistribution
    features: Mapping[str, Distribution]
    data_end: float  # unix seconds of the newest event in the bundle's data
    # match path (regular | few | cold) -> the sources its merge takes candidates from
    expected_sources: Mapping[str, tuple[str, ...]]
    history_cap: int  # the ranker's max_len; logged history lengths are clipped to it
    catalog_size: int | None = None  # items the bundle can recommend
    feature_rows: int = 0  # requests the request-level features were fitted on
    scored_rows: int = 0  # rows the prediction distribution was fitted on
    feature_users: int = 0  # distinct users the user features were fitted on

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["features"] = {k: dataclasses.asdict(v) for k, v in self.features.items()}
        out["expected_sources"] = {k: list(v) for k, v in self.expected_sources.items()}
        return {"format_version": FORMAT_VERSION, **out}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = REFERENCE) -> Reference:
        body = dict(data)
        version = body.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ConfigError(f"{where}: format_version {version!r}, this bstrec reads "
                              f"{FORMAT_VERSION}")
        raw_features = body.pop("features", {})
        raw_sources = body.pop("expected_sources", {})
        raw_predictions = body.pop("predictions", None)
        if not isinstance(raw_features, dict) or not isinstance(raw_sources, dict) \
                or not isinstance(raw_predictions, dict):
            raise ConfigError(f"{where}: predictions, features and expected_sources must be "
                              "mappings")
        predictions = distribution_from_dict(raw_predictions, where=f"{where}.predictions")
        if not isinstance(predictions, NumericDistribution):
            raise ConfigError(f"{where}.predictions: must be numeric")
        features = {str(k): distribution_from_dict(v, where=f"{where}.features.{k}")
                    for k, v in raw_features.items()}
        sources = {str(k): tuple(str(s) for s in v) for k, v in raw_sources.items()}
        # the scalar fields through from_dict: unknown keys and wrong types are errors
        scalars = from_dict(_Scalars, body, where=where)
        return cls(predictions=predictions, features=features, expected_sources=sources,
                   **dataclasses.asdict(scalars))

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / REFERENCE
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Reference:
        """From ``reference.json`` or the directory (a bundle) holding it."""
        p = Path(path)
        if p.is_dir():
            p = p / REFERENCE
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{p}: cannot read the reference: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a JSON object")
        return cls.from_dict(data, where=str(p))


@dataclass(frozen=True)
class _Scalars:
    data_end: float
    history_cap: int
    catalog_size: int | None = None
    feature_rows: int = 0
    scored_rows: int = 0
    feature_users: int = 0


# --- building -------------------------------------------------------------------------------

def expected_sources(config: PipelineConfig, *, has_retriever: bool) -> dict[str, tuple[str, ...]]:
    """Match path -> the sources with a positive quota on it that the bundle can serve (the
    two-tower needs a retriever; the others are fitted in every bundle)."""
    from bstrec.retrieval.candidates import CandidateGenerator
    from bstrec.retrieval.coldstart import COLD, FEW, REGULAR

    # the generator's own plans, so the expectation cannot disagree with the merge; the catalog
    # is not read for them
    plans = CandidateGenerator(None, config=config.candidates).plans()  # type: ignore[arg-type]
    names = {REGULAR: "regular", FEW: "few", COLD: "cold"}
    out: dict[str, tuple[str, ...]] = {}
    for route, quotas in plans.items():
        usable = tuple(n for n, q in quotas.items()
                       if q > 0 and (has_retriever or n != "two_tower"))
        # the merge backfills from popular when a path has no usable source
        out[names[route]] = usable or ("popular",)
    return out


def _decode(codes: pl.Series, values: list[Any]) -> pl.Series:
    """Vocabulary indices -> raw values as strings (padding and OOV -> null)."""
    from bstrec.features.spec import N_RESERVED

    index = pl.Series(range(N_RESERVED, N_RESERVED + len(values)), dtype=pl.Int64)
    raw = pl.Series([str(v) for v in values], dtype=pl.String)
    return codes.cast(pl.Int64).replace_strict(index, raw, default=None, return_dtype=pl.String)


def request_rows(frame: pl.DataFrame) -> pl.DataFrame:
    """One sample row per request: sampled negatives repeat their positive's user, time and
    history, so they would count one request several times. (Two behaviours at the same second
    are two requests: their histories differ by the first of them.)"""
    return frame.unique(["user_id", "timestamp", "hist_item"], keep="first", maintain_order=True)


def sample_features(rows: pl.DataFrame, samples: SampleSet, max_len: int
                    ) -> dict[str, pl.Series]:
    """The request-level logged features' values on sample rows (their encoded columns,
    decoded)."""
    cat_values = samples.vocabs["category"].values
    return {
        "history_length": rows["hist_item"].list.len().clip(upper_bound=max_len)
        .cast(pl.Float64),
        "freshness_s": rows["hist_dt"].list.min().cast(pl.Float64),
        "last_category": _decode(rows["hist_cat"].list.last(), cat_values),
    }


def user_profiles(users: pl.Series, samples: SampleSet) -> dict[str, pl.Series]:
    """``user.<name>`` -> the profile value of each of ``users`` (as strings; null: unknown)."""
    dataset = samples.dataset
    if dataset is None:
        return {}
    names = [n for n in dataset.user_features if n in dataset.users.columns]
    if not names:
        return {}
    profiles = users.to_frame("user_id").join(
        dataset.users.select("user_id", *names), on="user_id", how="left", maintain_order="left")
    return {USER_PREFIX + n: profiles[n].cast(pl.String) for n in names}


def build_reference(samples: SampleSet, model: nn.Module, config: PipelineConfig, *,
                    has_retriever: bool, valid: pl.DataFrame | None = None,
                    max_rows: int = MAX_ROWS, seed: int = 0) -> Reference:
    """The reference of a bundle built from ``samples`` (with its train split and dataset) and
    the eager ranker ``model``, fitted on ``valid`` (the train split when it is None or empty):
    predictions scored on at most ``max_rows`` of its rows, request-level features on at most
    ``max_rows`` of its requests, user features on at most ``max_rows`` of those requests'
    distinct users."""
    if samples.dataset is None:
        raise ValueError("the reference needs the samples' dataset tables")
    base = valid if valid is not None and not valid.is_empty() else samples.splits["train"]
    spec = samples.spec
    requests = _sample(request_rows(base), max_rows, seed)
    users = _sample(requests.select(pl.col("user_id").unique(maintain_order=True)), max_rows,
                    seed)["user_id"]
    features: dict[str, Distribution] = {}
    values = {**sample_features(requests, samples, spec.max_len),
              **user_profiles(users, samples)}
    for name, v in values.items():
        features[name] = (NumericDistribution.fit(v) if v.dtype == pl.Float64
                          else CategoricalDistribution.fit(v))
    # predictions on rows the ranker did not fit (the plot's training side)
    scored = _sample(base, max_rows, seed)
    preds = (_served_scores(model, scored, samples, config) if len(scored)
             else np.zeros(0, dtype=np.float32))
    newest = samples.dataset.events["timestamp"].cast(pl.Float64).max()
    data_end = float(newest) if isinstance(newest, int | float) else math.nan
    return Reference(
        predictions=NumericDistribution.fit(preds.astype(np.float64)),
        features=features, data_end=data_end,
        expected_sources=expected_sources(config, has_retriever=has_retriever),
        history_cap=spec.max_len, catalog_size=len(samples.dataset.items),
        feature_rows=len(requests), scored_rows=len(scored), feature_users=len(users))


def _served_scores(model: nn.Module, rows: pl.DataFrame, samples: SampleSet,
                   config: PipelineConfig) -> npt.NDArray[np.float32]:
    """What the pipeline would serve for ``rows``: a single-label ranker's click probability,
    or a multi-task one's heads combined by the config's objective (evaluation/objective.py)."""
    import torch

    from bstrec.evaluation.objective import objective_scores
    from bstrec.ranking.multitask import is_multitask
    from bstrec.training.loop import predict
    from bstrec.training.tensors import Batch, TensorSplit

    split = TensorSplit.from_frame(rows, samples.spec)
    if not is_multitask(model):
        return predict(model, split)
    heads = cast(Callable[[Batch], tuple[torch.Tensor, torch.Tensor]], model.heads)
    model.eval()
    with torch.no_grad():
        logits = [torch.stack(heads(b), 1) for b in split.batches(4096)]
    p_ctr, p_cvr = torch.sigmoid(torch.cat(logits)).numpy().T
    price = None
    if config.objective.needs_price and samples.dataset is not None \
            and "price" in samples.dataset.items.columns:
        price = rows.select("item_id").join(samples.dataset.items.select("item_id", "price"),
                                            on="item_id", how="left",
                                            maintain_order="left")["price"].to_numpy()
    return objective_scores(config.objective, p_ctr, p_cvr, price).astype(np.float32)


def _sample(frame: pl.DataFrame, n: int, seed: int) -> pl.DataFrame:
    return frame if len(frame) <= n else frame.sample(n, seed=seed)


# --- served values --------------------------------------------------------------------------

def served_features(shown: pl.DataFrame, reference: Reference) -> dict[str, pl.Series]:
    """The values of ``reference.features`` in impression rows (``shown``, IMPRESSION_SCHEMA):
    request-level features once per request, user features once per distinct user (the
    newest request's profile); features the reference lacks, and names it holds that are
    neither (the shown ``category`` of references built before output baselines), are
    skipped."""
    out: dict[str, pl.Series] = {}
    requests = shown.unique("request_id", keep="first", maintain_order=True)
    for name in REQUEST_FEATURES:
        if name not in reference.features:
            continue
        values = requests[name]
        if name == "history_length":
            values = values.clip(upper_bound=reference.history_cap)
        out[name] = values.cast(pl.Float64) if name != "last_category" else values
    user = [n.removeprefix(USER_PREFIX) for n in reference.features if n.startswith(USER_PREFIX)]
    if user:
        users = requests.unique("user_id", keep="last", maintain_order=True)
        profile = users["user_features"].str.json_decode(
            pl.Struct({n: pl.String for n in user}))
        for n in user:
            out[USER_PREFIX + n] = profile.struct.field(n)
    return out


def drift(shown: pl.DataFrame, reference: Reference) -> dict[str, float]:
    """Input feature -> PSI of ``shown`` impression rows against ``reference`` (the outputs'
    drift is measured against served traffic: alerts.output_drift)."""
    return {n: reference.features[n].psi(v) for n, v in served_features(shown, reference).items()}
