"""Model selection on the valid split: train a grid of trials over seeds, pick the best by mean
valid AUC, and keep its checkpoint (``bstrec train ranker --select``).

Each (trial, seed) trains with ``bstrec.training.task.train_ranker`` into its own run folder;
trials are ranked by the mean over the seeds of each run's best valid AUC (the early-stopped
epoch), because seeds of one setting spread about as much as settings differ (see
benchmarks/tune_bst.py). The test split is never read, so the chosen setting can be tested once,
afterwards. ``out_dir`` of ``select``::

    runs/<trial>/seed<k>/   one training run each (best/, last/, train_result.json)
    selection.json          every trial's valid AUC per seed, mean, stalled flag; the choice
    selection.md            the same as a table
    selected/               the chosen trial's best seed's best/ checkpoint (``bstrec bundle
                            build --ranker OUT/selected``)

A run that has its train_result.json is reused as it is and one with a last/ checkpoint is
resumed, so the selection can be stopped and started again, or given more trials or seeds.
A trial with a stalled run (valid AUC at chance, see loop.py) is never chosen.

The default grid (``default_grid``): BST over output concat/target x mlp_norm none/batch x
wide off/on x lr 1e-3/4e-3 (16 cells, the other settings at their defaults), plus the wdl,
wdl_seq and din baselines at their defaults. A YAML grid file replaces it (``load_grid``)::

    trials:
      - name: target_bn
        model: bst
        model_overrides: {output: target, mlp_norm: batch}
        train_overrides: {lr: 0.004}
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from bstrec.config import ConfigError, from_dict, load_yaml
from bstrec.data.io import atomic_dir, atomic_file
from bstrec.training.loop import BEST, LAST, TrainConfig
from bstrec.training.task import RESULT, train_ranker

SELECTION_JSON = "selection.json"
SELECTION_MD = "selection.md"
SELECTED = "selected"
RUNS = "runs"
BASELINES = ("wdl", "wdl_seq", "din")
# train settings that change how a run is computed, not what it computes: a reused run may differ
_RUNTIME_KEYS = frozenset({"num_threads", "device", "checkpoint_every", "eval_batch_size"})
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=-]*$")


@dataclass(frozen=True)
class Trial:
    """One grid cell: a ranker from the registry with model and train config overrides."""

    name: str  # its run folder's name: letters, digits, _ . = -
    model: str = "bst"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    train_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"trial name {self.name!r}: use letters, digits and _ . = - only")
        for key in ("model_overrides", "train_overrides"):
            if not isinstance(getattr(self, key), dict):
                raise ValueError(f"trial {self.name!r}: {key} must be a mapping")


@dataclass(frozen=True)
class GridFile:
    """The YAML grid file: ``trials:``, a list of ``Trial`` fields."""

    trials: tuple[Trial, ...]


@dataclass
class TrialResult:
    trial: Trial
    valid_auc: dict[int, float]  # seed -> the run's best valid AUC
    stalled: dict[int, bool]  # seed -> the run's stalled flag
    runs: dict[int, Path]

    @property
    def mean_auc(self) -> float:
        return sum(self.valid_auc.values()) / len(self.valid_auc) if self.valid_auc else math.nan

    @property
    def eligible(self) -> bool:
        """Never chosen: a trial with a stalled run, or with no valid AUC."""
        return not any(self.stalled.values()) and not math.isnan(self.mean_auc)

    def best_seed(self) -> int:
        return max(self.valid_auc, key=lambda s: self.valid_auc[s])


@dataclass
class Selection:
    trials: list[TrialResult]
    seeds: list[int]
    chosen: TrialResult | None
    selected: Path | None  # OUT/selected, the chosen run's best/ checkpoint

    def to_dict(self) -> dict[str, Any]:
        return {
            "seeds": self.seeds,
            "trials": [{
                "name": r.trial.name, "model": r.trial.model,
                "model_overrides": r.trial.model_overrides,
                "train_overrides": r.trial.train_overrides,
                "valid_auc": {str(s): a for s, a in r.valid_auc.items()},
                "mean_valid_auc": r.mean_auc, "stalled": any(r.stalled.values()),
                "runs": {str(s): str(p) for s, p in r.runs.items()},
            } for r in self.trials],
            "chosen": None if self.chosen is None else {
                "name": self.chosen.trial.name, "mean_valid_auc": self.chosen.mean_auc,
                "seed": self.chosen.best_seed(),
                "run": str(self.chosen.runs[self.chosen.best_seed()]),
                "checkpoint": str(self.selected)},
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }


def default_grid(baselines: bool = True) -> list[Trial]:
    """16 BST cells (output x mlp_norm x wide x lr), then the wdl, wdl_seq, din baselines."""
    trials = []
    for output in ("concat", "target"):
        for norm in ("none", "batch"):
            for wide in (False, True):
                for lr in (1e-3, 4e-3):
                    name = (f"bst_{output}_{'bn' if norm == 'batch' else 'nonorm'}_"
                            f"{'wide' if wide else 'nowide'}_lr{lr:g}")
                    trials.append(Trial(name, "bst",
                                        {"output": output, "mlp_norm": norm, "wide": wide},
                                        {"lr": lr}))
    return with_baselines(trials) if baselines else trials


def with_baselines(trials: Sequence[Trial]) -> list[Trial]:
    """``trials`` and the baselines at their defaults (those not already a trial's name)."""
    names = {t.name for t in trials}
    return [*trials, *(Trial(b, b) for b in BASELINES if b not in names)]


def load_grid(path: str | Path) -> list[Trial]:
    """The trials of a YAML grid file; unknown keys, here or in a trial, are errors."""
    return list(from_dict(GridFile, load_yaml(path), where=str(path)).trials)


def check_grid(trials: Sequence[Trial], train_overrides: Mapping[str, Any] | None = None) -> None:
    """Every trial's model and configs are valid (ConfigError otherwise), before any training."""
    from bstrec.ranking import RANKERS

    if not trials:
        raise ConfigError("the grid has no trials")
    names = [t.name for t in trials]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"trial names must be unique; repeated: {dupes}")
    if "seed" in (train_overrides or {}):
        raise ConfigError("the seeds are given apart (--seeds), not as a train override")
    for t in trials:
        if t.model not in RANKERS:
            raise ConfigError(f"trial {t.name!r}: unknown ranker {t.model!r}; known: "
                              f"{sorted(RANKERS)}")
        entry = RANKERS[t.model]
        from_dict(entry.config, {**dict(entry.fixed), **t.model_overrides},
                  where=f"trial {t.name}.model_overrides")
        if "seed" in t.train_overrides:
            raise ConfigError(f"trial {t.name!r}: the seeds are given apart, not as train_overrides")
        from_dict(TrainConfig, {**(train_overrides or {}), **t.train_overrides},
                  where=f"trial {t.name}.train_overrides")


def select(samples_dir: str | Path, out_dir: str | Path, trials: Sequence[Trial],
           seeds: Sequence[int] = (0,), train_overrides: Mapping[str, Any] | None = None,
           console: Console | None = None) -> Selection:
    """Train every (trial, seed) in ``out_dir/runs``, choose the trial of best mean valid AUC.

    Train configs: ``train_overrides`` (every trial's), then the trial's own, then the seed.
    Writes selection.json, selection.md and selected/ (see the module docstring); raises
    ValueError when no trial is eligible (all stalled), after writing the two reports.
    """
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be given, each once; got {list(seeds)}")
    check_grid(trials, train_overrides)
    out = Path(out_dir)
    results = []
    n_runs, done = len(trials) * len(seeds), 0
    for trial in trials:
        res = TrialResult(trial, {}, {}, {})
        for seed in seeds:
            run = out / RUNS / trial.name / f"seed{seed}"
            train_cfg = {**(train_overrides or {}), **trial.train_overrides, "seed": seed}
            done += 1
            if (run / RESULT).exists():
                _check_reused(run, trial, train_cfg)
                how = "reused"
            else:
                if console is not None:
                    console.log(f"[{done}/{n_runs}] training {trial.name} seed {seed}")
                train_ranker(trial.model, samples_dir, run, model_overrides=trial.model_overrides,
                             train_overrides=train_cfg, resume=(run / LAST).exists(),
                             progress=False, console=console)
                how = "trained"
            result = json.loads((run / RESULT).read_text())["result"]
            auc = result.get("best_valid_auc")
            res.valid_auc[seed] = math.nan if auc is None else float(auc)
            res.stalled[seed] = bool(result.get("stalled", False))
            res.runs[seed] = run
            if console is not None:
                console.log(f"[{done}/{n_runs}] {trial.name} seed {seed} ({how}): valid AUC "
                            f"{res.valid_auc[seed]:.4f}" + (" [red]stalled[/red]"
                                                            if res.stalled[seed] else ""))
        results.append(res)
    eligible = [r for r in results if r.eligible]
    chosen = max(eligible, key=lambda r: r.mean_auc) if eligible else None  # first of ties
    selected = None
    if chosen is not None:
        selected = out / SELECTED
        with atomic_dir(selected) as tmp:
            shutil.copytree(chosen.runs[chosen.best_seed()] / BEST, tmp, dirs_exist_ok=True)
    selection = Selection(results, list(seeds), chosen, selected)
    with atomic_file(out / SELECTION_JSON) as tmp:
        tmp.write_text(json.dumps(selection.to_dict(), indent=2) + "\n")
    with atomic_file(out / SELECTION_MD) as tmp:
        tmp.write_text(selection_markdown(selection))
    if chosen is None:
        raise ValueError(f"no trial can be chosen: every trial has a stalled run (see "
                         f"{out / SELECTION_MD})")
    return selection


def overrides_text(trial: Trial) -> str:
    parts = [f"{k}={v}" for k, v in trial.model_overrides.items()]
    parts += [f"train.{k}={v}" for k, v in trial.train_overrides.items()]
    return ", ".join(parts) or "defaults"


def selection_rows(selection: Selection) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the selection table, best mean valid AUC first."""
    header = ["trial", "model", "overrides", *(f"seed {s}" for s in selection.seeds),
              "mean", "stalled", "chosen"]
    order = sorted(selection.trials, key=lambda r: (not r.eligible, -r.mean_auc
                                                    if not math.isnan(r.mean_auc) else 0.0))
    rows = [[r.trial.name, r.trial.model, overrides_text(r.trial),
             *(f"{r.valid_auc[s]:.4f}" for s in selection.seeds), f"{r.mean_auc:.4f}",
             "yes" if any(r.stalled.values()) else "", "*" if r is selection.chosen else ""]
            for r in order]
    return header, rows


def selection_markdown(selection: Selection, level: int = 1) -> str:
    """selection.md; ``level``: its heading's level (2 inside another document)."""
    header, rows = selection_rows(selection)
    lines = [f"{'#' * level} Model selection (valid AUC)", "",
             f"Trials ranked by the mean over seeds {selection.seeds} of each run's best valid "
             "AUC; a trial with a stalled run is never chosen. The test split was not read.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if selection.chosen is not None:
        c = selection.chosen
        lines += ["", f"Chosen: **{c.trial.name}** (mean valid AUC {c.mean_auc:.4f}); its seed "
                      f"{c.best_seed()} checkpoint is in `{selection.selected}`."]
    else:
        lines += ["", "Chosen: none (every trial has a stalled run)."]
    return "\n".join(lines) + "\n"


def _check_reused(run: Path, trial: Trial, train_cfg: Mapping[str, Any]) -> None:
    """A finished run is reused only if it was trained with this trial's settings."""
    from bstrec.ranking import RANKERS

    report = json.loads((run / RESULT).read_text())
    entry = RANKERS[trial.model]
    want_model = _json(dataclasses.asdict(from_dict(
        entry.config, {**dict(entry.fixed), **trial.model_overrides})))
    want_train = _json(dataclasses.asdict(from_dict(TrainConfig, dict(train_cfg))))
    differ = [] if report.get("model") == trial.model else ["model"]
    differ += [k for k in trial.model_overrides
               if report.get("model_config", {}).get(k) != want_model[k]]
    differ += [f"train.{k}" for k in train_cfg if k not in _RUNTIME_KEYS
               and report.get("train_config", {}).get(k) != want_train[k]]
    if differ:
        raise ConfigError(f"{run} was trained with other settings than trial {trial.name!r} "
                          f"({', '.join(differ)} differ): remove it or choose another --out")


def _json(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(d))
    return out
