"""From a dataset name to materialised samples: the job behind ``bstrec data build``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from bstrec.config import from_dict
from bstrec.data.loaders import load_dataset
from bstrec.data.samples import SampleConfig, SampleSet, build_samples
from bstrec.data.tabular import ColumnMapping

# Per-dataset sample defaults, before the user's overrides: the synthetic log records
# outcomes as 0/1 values, so a positive is value >= 1 rather than MovieLens' rating >= 4.
SAMPLE_DEFAULTS: dict[str, dict[str, Any]] = {
    "synthetic-order": {"label_threshold": 1.0},
}


def sample_config(dataset: str, overrides: dict[str, Any] | None = None) -> SampleConfig:
    """The dataset's default sample config with ``overrides`` applied (unknown keys are errors)."""
    merged = {**SAMPLE_DEFAULTS.get(dataset, {}), **(overrides or {})}
    return from_dict(SampleConfig, merged, where="samples")


def build(
    dataset: str,
    out: Path,
    *,
    data_dir: Path | None = None,
    input_path: Path | None = None,
    mapping: ColumnMapping | None = None,
    strict: bool = True,
    sample_overrides: dict[str, Any] | None = None,
    dataset_options: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> SampleSet:
    """Load ``dataset``, build its samples and write them to ``out`` (atomically)."""
    stage = progress or (lambda name: None)
    cfg = sample_config(dataset, sample_overrides)
    stage(f"loading {dataset}")
    ds = load_dataset(dataset, data_dir, strict=strict, input_path=input_path, mapping=mapping,
                      **(dataset_options or {}))
    samples = build_samples(ds, cfg, progress=stage)
    stage(f"writing {out}")
    samples.save(out)
    return samples
