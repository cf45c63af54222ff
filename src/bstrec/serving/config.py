"""The pipeline's knobs. They travel inside a bundle (manifest ``pipeline``), so that a reload
changes models and the way they are combined together, atomically."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from bstrec.monitoring.policy import PolicyConfig
from bstrec.retrieval.candidates import CandidateConfig


def _serving_candidates() -> CandidateConfig:
    # Fewer candidates than offline evaluation uses: pre-rank scores them all, and latency
    # grows with the count while recall beyond a few hundred barely moves.
    return CandidateConfig(quotas=(("two_tower", 200), ("item_cf", 100), ("popular", 50)),
                           source_k=200)


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

    def __post_init__(self) -> None:
        if self.rank_n < 1:
            raise ValueError(f"rank_n must be >= 1, got {self.rank_n}")
        if self.max_per_category < 0:
            raise ValueError(f"max_per_category must be >= 0, got {self.max_per_category}")
        if self.ranking not in ("model", "popular"):
            raise ValueError(f"ranking must be model or popular, got {self.ranking!r}")
        if self.policy.kind == "plackett_luce" and self.max_per_category:
            # the logged propensities are the sampler's: a cap applied after it would change
            # which items are shown without the propensities saying so
            raise ValueError("policy plackett_luce needs max_per_category 0 (no category cap), "
                             f"got {self.max_per_category}")
