"""The pipeline's knobs. They travel inside a bundle (manifest ``pipeline``), so that a reload
changes models and the way they are combined together, atomically."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from bstrec.evaluation.objective import ObjectiveConfig
from bstrec.monitoring.policy import PolicyConfig
from bstrec.retrieval.candidates import CandidateConfig


def _serving_candidates() -> CandidateConfig:
    # Fewer candidates than offline evaluation uses: pre-rank scores them all, and latency
    # grows with the count while recall beyond a few hundred barely moves.
    return CandidateConfig(quotas=(("two_tower", 200), ("item_cf", 100), ("popular", 50)),
                           source_k=200)


@dataclass(frozen=True)
class FunnelConfig:
    """The layers between match and rank (issue 25). The default is the two-layer funnel:
    the two-tower dot product pre-ranks every merged candidate, BST ranks the best ``rank_n``.

    ``prerank="distilled"``: the bundle's distilled pre-ranker (ranking/prerank.py) scores every
    merged candidate instead; ``light_n`` > 0: the bundle's light ranker (e.g. DIN) reorders the
    pre-ranked best ``light_n`` before BST takes its best ``rank_n`` (three layers). Each layer
    orders its candidates by its own model's score; ``timings_ms`` has one entry per layer."""

    prerank: Literal["two_tower", "distilled"] = "two_tower"
    light_n: int = 0  # candidates the light ranker scores; 0 = no light layer

    def __post_init__(self) -> None:
        if self.prerank not in ("two_tower", "distilled"):
            raise ValueError(f"funnel.prerank must be two_tower or distilled, got {self.prerank!r}")
        if self.light_n < 0:
            raise ValueError(f"funnel.light_n must be >= 0, got {self.light_n}")


@dataclass(frozen=True)
class PipelineConfig:
    """(``bstrec.config.from_dict`` fills it; unknown keys are errors)."""

    candidates: CandidateConfig = field(default_factory=_serving_candidates)
    # how many pre-ranked candidates the BST ranker scores (one batch)
    rank_n: int = 100
    # diversity: at most this many items of one category in a response; 0 = no cap. Backfilled
    # from the capped items when the cap leaves fewer than k.
    max_per_category: int = 4
    # "model": the ranker's click probabilities; "popular": the items' share of the training
    # events, no ranker called (the popularity-only bundle an A/B test or an off-policy log
    # compares against: its candidates then come from the "popular" quota alone)
    ranking: Literal["model", "popular"] = "model"
    # how the shown list is drawn from the ranked candidates: greedy (the best k) or
    # plackett_luce (sampled, each shown item's propensity logged for off-policy estimates)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    # the score that ranks the candidates (evaluation/objective.py): engagement (pCTR, what
    # every single-head ranker gives), conversion (pCTR x pCVR), revenue (x the item's price)
    # or a blend; all but engagement need a multi-task ranker (ESMM); the response says which
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    # pre-rank and light layers (FunnelConfig); the default keeps the two-tower pre-rank
    funnel: FunnelConfig = field(default_factory=FunnelConfig)

    def __post_init__(self) -> None:
        if self.rank_n < 1:
            raise ValueError(f"rank_n must be >= 1, got {self.rank_n}")
        if self.max_per_category < 0:
            raise ValueError(f"max_per_category must be >= 0, got {self.max_per_category}")
        if self.ranking not in ("model", "popular"):
            raise ValueError(f"ranking must be model or popular, got {self.ranking!r}")
        if self.ranking == "popular" and self.objective.kind != "engagement":
            raise ValueError("ranking popular calls no ranker: its objective can only be "
                             f"engagement, got {self.objective.kind!r}")
        if self.funnel.light_n and self.funnel.light_n < self.rank_n:
            raise ValueError(f"funnel.light_n ({self.funnel.light_n}) must be 0 or >= rank_n "
                             f"({self.rank_n}): BST ranks the light ranker's best rank_n")
        if self.policy.kind == "plackett_luce" and self.max_per_category:
            # the logged propensities are the sampler's: a cap applied after it would change
            # which items are shown without the propensities saying so
            raise ValueError("policy plackett_luce needs max_per_category 0 (no category cap), "
                             f"got {self.max_per_category}")
