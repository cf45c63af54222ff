"""From a dataset name to materialised samples: the job behind ``bstrec data build``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

from bstrec.config import from_dict
from bstrec.data.loaders import load_dataset
from bstrec.data.samples import SampleConfig, SampleSet, build_samples
from bstrec.data.tabular import ColumnMapping

# Per-dataset sample defaults, before the user's overrides: the synthetic log records
# outcomes as 0/1 values, so a positive is value >= 1 rather than MovieLens' rating >= 4.
SAMPLE_DEFAULTS: dict[str, dict[str, Any]] = {
    "synthetic-order": {"label_threshold": 1.0},
    # the views are the impressions a click-and-conversion ranker (ESMM) learns from: every
    # view is a click, and a later buy of its item its conversion
    "synthetic-taobao": {"positive_actions": ["pv"]},
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


# A csv/parquet log at least this large is built partition by partition by default: the
# in-memory build's peak grows with the log while the partitioned build's stays near one
# partition's, and below this size the in-memory build is the faster (benchmarks/results/
# scale.json keys build_small and build, from benchmarks/bench_build_scale.py).
OUT_OF_CORE_EVENTS = 2_000_000
CSV_BYTES_PER_EVENT = 32  # a rough lower bound: an id, an item, a timestamp and separators
_TABLE_OPTIONS = {"csv": ("separator", "has_header", "feedback", "timestamp_format"),
                  "parquet": ("feedback", "timestamp_format")}


def wants_partitions(dataset: str, input_path: Path | None) -> bool:
    """Whether ``bstrec data build`` builds out of core without being asked to: a csv/parquet
    log of ``OUT_OF_CORE_EVENTS`` or more (Parquet: its row count; CSV: guessed from its size)."""
    if dataset not in _TABLE_OPTIONS or input_path is None or not Path(input_path).is_file():
        return False
    if dataset == "csv":
        return Path(input_path).stat().st_size >= OUT_OF_CORE_EVENTS * CSV_BYTES_PER_EVENT
    try:
        rows = pl.scan_parquet(input_path).select(pl.len()).collect().item()
    except (pl.exceptions.PolarsError, OSError):
        return False  # not readable: the loader reports it
    return bool(rows >= OUT_OF_CORE_EVENTS)


def build_partitioned(
    dataset: str,
    out: Path,
    *,
    data_dir: Path | None = None,
    input_path: Path | None = None,
    mapping: ColumnMapping | None = None,
    strict: bool = True,
    sample_overrides: dict[str, Any] | None = None,
    dataset_options: dict[str, Any] | None = None,
    partitions: int | None = None,
    engine: str = "local",
    scheduler: str | None = None,
    workers: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``build`` partition by partition (``bstrec.distributed.build``): the same files and
    rows, in bounded memory, on this process (``engine="local"``) or a Dask cluster
    (``engine="dask"``: ``scheduler`` address, or a local cluster of ``workers`` processes,
    default 2).
    A csv/parquet log is scanned lazily, never loaded whole. Returns the manifest."""
    from bstrec.distributed.build import ENGINES, dask_client, dask_runner
    from bstrec.distributed.build import build_partitioned as run_partitions

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if scheduler is not None and engine != "dask":
        raise ValueError("a scheduler address needs engine='dask'")
    if workers is not None and (engine != "dask" or scheduler is not None):
        raise ValueError("workers sizes the local Dask cluster: it needs engine='dask' and no "
                         "scheduler address")
    stage = progress or (lambda name: None)
    cfg = sample_config(dataset, sample_overrides)
    options = dataset_options or {}
    source: Any
    if dataset in _TABLE_OPTIONS:
        from bstrec.data.tabular import scan_table

        unknown = sorted(set(options) - set(_TABLE_OPTIONS[dataset]))
        if unknown:
            raise ValueError(f"{dataset}: unknown options {', '.join(unknown)} "
                             f"(allowed: {', '.join(_TABLE_OPTIONS[dataset])})")
        if input_path is None or mapping is None:
            raise ValueError(f"{dataset}: needs input_path and a column mapping "
                             "(user_id=..., item_id=..., timestamp=...)")
        stage(f"scanning {input_path}")
        scanned = scan_table(Path(input_path), mapping, fmt="csv" if dataset == "csv"
                             else "parquet", strict=strict, **options)
        source = scanned.save
    else:
        stage(f"loading {dataset}")
        source = load_dataset(dataset, data_dir, strict=strict, input_path=input_path,
                              mapping=mapping, **options)
    if engine == "local":
        return run_partitions(source, out, cfg, partitions=partitions, progress=stage)
    with dask_client(scheduler, workers or 2) as client:
        return run_partitions(source, out, cfg, partitions=partitions,
                              runner=dask_runner(client), progress=stage)
