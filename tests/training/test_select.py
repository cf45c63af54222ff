"""Model selection (bstrec.training.select, `bstrec train ranker --select`): every (trial, seed)
is trained once, the choice is the best mean valid AUC among trials without a stalled run, its
checkpoint is bundle-ready, and the test split is never read."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from bstrec.cli import app
from bstrec.config import ConfigError
from bstrec.data.build import build
from bstrec.training.checkpoint import META
from bstrec.training.select import (
    SELECTED,
    SELECTION_JSON,
    SELECTION_MD,
    Selection,
    Trial,
    check_grid,
    default_grid,
    load_grid,
    select,
    with_baselines,
)
from bstrec.training.task import RESULT

# toy sizes and one thread: the tests check the selection, not accuracy, on 2 shared cores
TINY_BST = {"mlp": [16], "item_dim": 8, "cat_dim": 4, "pos_dim": 4, "heads": 2, "embed_dim": 4}
# stall checks off: on this tiny log a run may well sit near chance; stalls are faked below
TRAIN = {"max_epochs": 1, "batch_size": 128, "num_threads": 1, "stall_margin": 0.0}
SEEDS = [0, 1]
TRIALS = [
    Trial("concat", "bst", {**TINY_BST, "output": "concat"}),
    Trial("target_lr", "bst", {**TINY_BST, "output": "target"}, {"lr": 4e-3}),
    Trial("wdl", "wdl", {"mlp": [16], "embed_dim": 4, "item_dim": 8, "cat_dim": 4}),
]


@dataclass(frozen=True)
class Selected:
    samples: Path
    out: Path
    selection: Selection


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("select") / "samples"
    build("synthetic-order", path, dataset_options={"n_users": 80, "events_per_user": [10, 30]})
    (path / "samples" / "test.parquet").unlink()  # selection must never read it
    return path


@pytest.fixture(scope="module")
def selected(samples: Path) -> Selected:
    threads = torch.get_num_threads()  # training sets it process-wide; given back below
    out = samples.parent / "selection"
    selection = select(samples, out, TRIALS, SEEDS, TRAIN)
    torch.set_num_threads(threads)
    return Selected(samples, out, selection)


def run_results(out: Path) -> dict[str, dict[int, dict[str, Any]]]:
    return {t.name: {s: json.loads((out / "runs" / t.name / f"seed{s}" / RESULT).read_text())
                     for s in SEEDS} for t in TRIALS}


def test_choice_is_argmax_of_mean_valid_auc(selected: Selected) -> None:
    assert not (selected.samples / "samples" / "test.parquet").exists()
    runs = run_results(selected.out)
    means = {name: sum(r["result"]["best_valid_auc"] for r in by_seed.values()) / len(SEEDS)
             for name, by_seed in runs.items()}
    best = max(means, key=lambda n: means[n])
    report = json.loads((selected.out / SELECTION_JSON).read_text())
    assert selected.selection.chosen is not None
    assert report["chosen"]["name"] == best == selected.selection.chosen.trial.name
    assert report["chosen"]["mean_valid_auc"] == pytest.approx(means[best])
    for t in report["trials"]:
        assert t["mean_valid_auc"] == pytest.approx(means[t["name"]])
        assert t["valid_auc"] == {str(s): runs[t["name"]][s]["result"]["best_valid_auc"]
                                  for s in SEEDS}
        # the seed is the selection's, the rest the shared and the trial's train overrides
        for s in SEEDS:
            cfg = runs[t["name"]][s]["train_config"]
            assert cfg["seed"] == s and cfg["max_steps"] == 0 and cfg["max_epochs"] == 1
    assert runs["target_lr"][0]["train_config"]["lr"] == 4e-3
    assert runs["concat"][0]["train_config"]["lr"] == 1e-3
    best_seed = max(SEEDS, key=lambda s: runs[best][s]["result"]["best_valid_auc"])
    src = selected.out / "runs" / best / f"seed{best_seed}" / "best"
    copied = selected.out / SELECTED
    assert sorted(p.name for p in copied.iterdir()) == sorted(p.name for p in src.iterdir())
    for p in src.iterdir():
        assert (copied / p.name).read_bytes() == p.read_bytes()


def test_table_lists_every_trial(selected: Selected) -> None:
    md = (selected.out / SELECTION_MD).read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and "trial" not in line]
    assert sorted(r.split(" | ")[0][2:] for r in rows) == sorted(t.name for t in TRIALS)
    chosen = selected.selection.chosen
    assert chosen is not None
    marked = [r for r in rows if r.rstrip().endswith("| * |")]
    assert len(marked) == 1 and marked[0].startswith(f"| {chosen.trial.name} |")
    assert "output=target, train.lr=0.004" in md


def test_resume_does_not_retrain(selected: Selected) -> None:
    runs = selected.out / "runs"
    before = {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()}
    again = select(selected.samples, selected.out, TRIALS, SEEDS, TRAIN)
    after = {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()}
    assert after == before
    assert again.chosen is not None and selected.selection.chosen is not None
    assert again.chosen.trial == selected.selection.chosen.trial


def test_reused_run_must_match_the_trial(selected: Selected) -> None:
    other = [Trial("concat", "bst", {**TINY_BST, "output": "concat"}, {"lr": 4e-3})]
    with pytest.raises(ConfigError, match=r"train\.lr"):
        select(selected.samples, selected.out, other, SEEDS, TRAIN)


def test_stalled_run_is_never_chosen(selected: Selected, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(selected.out, out)
    chosen = selected.selection.chosen
    assert chosen is not None
    path = out / "runs" / chosen.trial.name / "seed1" / RESULT
    report = json.loads(path.read_text())
    report["result"]["stalled"] = True
    path.write_text(json.dumps(report))
    again = select(selected.samples, out, TRIALS, SEEDS, TRAIN)
    rest = [r for r in selected.selection.trials if r.trial != chosen.trial]
    assert again.chosen is not None
    assert again.chosen.trial == max(rest, key=lambda r: r.mean_auc).trial
    stalled = {t["name"]: t["stalled"]
               for t in json.loads((out / SELECTION_JSON).read_text())["trials"]}
    assert stalled == {t.name: t == chosen.trial for t in TRIALS}
    # every trial stalled: nothing can be chosen, and the reports say so
    for t in TRIALS:
        for s in SEEDS:
            p = out / "runs" / t.name / f"seed{s}" / RESULT
            report = json.loads(p.read_text())
            report["result"]["stalled"] = True
            p.write_text(json.dumps(report))
    with pytest.raises(ValueError, match="stalled"):
        select(selected.samples, out, TRIALS, SEEDS, TRAIN)
    assert json.loads((out / SELECTION_JSON).read_text())["chosen"] is None


def test_bundle_builds_from_the_selected_checkpoint(selected: Selected, tmp_path: Path) -> None:
    from bstrec.serving.bundle import build_bundle, load_bundle

    threads = torch.get_num_threads()
    path = build_bundle(selected.samples, selected.out / SELECTED, tmp_path / "bundle",
                        version="sel")
    torch.set_num_threads(threads)
    assert load_bundle(path).version == "sel"


def test_grid_files_and_checks(tmp_path: Path) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text("trials:\n  - name: a\n    model_overrides: {output: target}\n"
                    "    train_overrides: {lr: 4e-3}\n  - {name: b, model: din}\n")
    trials = load_grid(grid)
    assert [t.name for t in trials] == ["a", "b"] and trials[0].model == "bst"
    check_grid(trials)
    for text, match in [("trials:\n  - {name: a, modle: bst}\n", "modle"),
                        ("trials: []\nseeds: [0]\n", "seeds"),
                        ("trials:\n  - {name: a, model_overrides: {outptu: target}}\n", "outptu"),
                        ("trials:\n  - {name: a, train_overrides: {lrr: 1}}\n", "lrr"),
                        ("trials:\n  - {name: a, model: bts}\n", "bts"),
                        ("trials:\n  - {name: a}\n  - {name: a, model: din}\n", "unique"),
                        ("trials:\n  - {name: ../a}\n", "trial name")]:
        grid.write_text(text)
        with pytest.raises(ConfigError, match=match):
            check_grid(load_grid(grid))
    cells = default_grid(baselines=False)
    assert len(cells) == 16 and len({t.name for t in cells}) == 16
    assert {(t.model_overrides["output"], t.model_overrides["mlp_norm"], t.model_overrides["wide"],
             t.train_overrides["lr"]) for t in cells} == {
        (o, n, w, lr) for o in ("concat", "target") for n in ("none", "batch")
        for w in (False, True) for lr in (1e-3, 4e-3)}
    assert [t.name for t in default_grid()[16:]] == ["wdl", "wdl_seq", "din"]
    assert [t.name for t in with_baselines([Trial("din", "din", {"mlp": [8]})])] == [
        "din", "wdl", "wdl_seq"]
    check_grid(default_grid(), {"max_epochs": 2})


def test_cli_end_to_end(samples: Path, tmp_path: Path) -> None:
    grid = tmp_path / "grid.yaml"
    small, target = {**TINY_BST, "mlp": [8]}, {**TINY_BST, "output": "target"}
    grid.write_text(f"trials:\n  - {{name: small, model_overrides: {json.dumps(small)}}}\n"
                    f"  - {{name: target, model_overrides: {json.dumps(target)}}}\n")
    out = tmp_path / "sel"
    threads = torch.get_num_threads()
    args = ["train", "ranker", "--select", "--samples", str(samples), "--out", str(out),
            "--grid", str(grid), "--no-baselines", "--seeds", "3",
            *(x for k, v in TRAIN.items() for x in ("--train", f"{k}={v}"))]
    res = CliRunner().invoke(app, args)
    torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    report = json.loads((out / SELECTION_JSON).read_text())
    assert [t["name"] for t in report["trials"]] == ["small", "target"]
    assert report["seeds"] == [3]
    aucs = {t["name"]: t["valid_auc"]["3"] for t in report["trials"]}
    assert report["chosen"]["name"] == max(aucs, key=lambda n: aucs[n])
    assert "small" in res.output and "target" in res.output and "chosen" in res.output
    assert (out / SELECTED / META).exists()
    # --set and another --model are errors with --select; --model stays required without it
    for extra in (["--set", "dropout=0.1"], ["--model", "din"]):
        res = CliRunner().invoke(app, [*args, *extra])
        assert res.exit_code == 2 and "--select" in res.output, res.output
    res = CliRunner().invoke(app, ["train", "ranker", "--samples", str(samples), "--out",
                                   str(tmp_path / "x")])
    assert res.exit_code == 2 and "--model is required" in res.output
    assert not math.isnan(report["chosen"]["mean_valid_auc"])
