"""The pipeline's knobs. They travel inside a bundle (manifest ``pipeline``), so that a reload
changes models and the way they are combined together, atomically."""

from __future__ import annotations

from dataclasses import dataclass, field

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

    def __post_init__(self) -> None:
        if self.rank_n < 1:
            raise ValueError(f"rank_n must be >= 1, got {self.rank_n}")
        if self.max_per_category < 0:
            raise ValueError(f"max_per_category must be >= 0, got {self.max_per_category}")
