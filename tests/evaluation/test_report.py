from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from bstrec.evaluation.metrics import auc, rela_impr
from bstrec.evaluation.report import (
    attention_view,
    evaluation_summary,
    history_buckets,
    write_report,
)

PNG = b"\x89PNG\r\n\x1a\n"


def make_case(seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    n = 800
    y = (rng.random(n) < 0.55).astype(np.float32)
    lengths = rng.integers(0, 21, n)
    frame = pl.DataFrame({
        "user_id": rng.integers(0, 40, n),
        "label": y,
        "hist_item": [list(range(k)) for k in lengths],
    })

    def probs(strength: float) -> np.ndarray:
        z = strength * (y - 0.5) + rng.standard_normal(n)
        return 1 / (1 + np.exp(-z))

    return {
        "protocol": "test-ctr",
        "test_frame": frame,
        "predictions": {"WDL": [probs(0.8), probs(0.8)], "din": probs(1.2),
                        "bst": [probs(1.6), probs(1.6), probs(1.6)]},
        "references": {"item_rate": probs(0.5), "rate_lr": probs(1.0)},
        "n_boot": 200,
    }


def cells(md: str, first: str) -> list[str]:
    """The cells of the first table row whose first cell is ``first`` (the results table)."""
    for line in md.splitlines():
        parts = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and parts[0] == first:
            return parts[1:]
    raise AssertionError(f"no row {first!r} in report")


def mean_of(cell: str) -> float:
    return float(cell.split("±")[0])


def test_history_buckets() -> None:
    ids, names = history_buckets([0, 1, 4, 5, 9, 10, 19, 20, 25])
    assert names == ["0", "1-4", "5-9", "10-19", "20+"]
    assert ids.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_write_report_files_and_numbers(tmp_path: Path) -> None:
    case = make_case()
    att = np.random.default_rng(1).dirichlet(np.ones(5), size=(2, 5))
    tokens = ["m1", "m2", "m3", "m4", "target"]
    path = write_report(tmp_path / "rep", **case, attention=att, attention_tokens=tokens)
    out = tmp_path / "rep"
    assert path == out / "report.md"
    for name in ("report.md", "metrics.json", "auc_by_history_length.png", "calibration.png",
                 "attention.png"):
        assert (out / name).is_file(), name
    for name in ("auc_by_history_length.png", "calibration.png", "attention.png"):
        assert (out / name).read_bytes()[:8] == PNG

    summary = evaluation_summary(**case)
    assert json.loads((out / "metrics.json").read_text()) == summary
    md = path.read_text()

    y = case["test_frame"]["label"].to_numpy()
    bst = summary["models"]["bst"]
    assert bst["seeds"] == 3
    assert bst["auc"]["values"] == pytest.approx([auc(y, p) for p in case["predictions"]["bst"]])
    assert summary["baseline"] == "WDL"  # matched case-insensitively
    base_auc = summary["models"]["WDL"]["auc"]["mean"]
    assert bst["rela_impr"] == pytest.approx(rela_impr(bst["auc"]["mean"], base_auc))

    for name, label in [("WDL", "WDL"), ("din", "din"), ("bst", "bst"),
                        ("item_rate", "item rate (ref. a)"), ("rate_lr", "rate LR (ref. b)")]:
        row = {**summary["models"], **summary["references"]}[name]
        seeds, a, g, ll, e, ri = cells(md, label)
        assert int(seeds) == row["seeds"]
        for cell, key in [(a, "auc"), (g, "gauc"), (ll, "logloss"), (e, "ece")]:
            assert mean_of(cell) == pytest.approx(row[key]["mean"], abs=5e-5)
            if row["seeds"] > 1:
                assert float(cell.split("±")[1]) == pytest.approx(row[key]["std"], abs=5e-5)
        assert float(ri.rstrip("%")) == pytest.approx(row["rela_impr"], abs=5e-3)

    # the history table's row of bst
    hist_rows = [line for line in md.split("## AUC by history length")[1].splitlines()
                 if line.startswith("| bst |")]
    assert len(hist_rows) == 1
    values = [c.strip() for c in hist_rows[0].strip("|").split("|")[1:]]
    for cell, v in zip(values, bst["auc_by_history"], strict=True):
        assert cell == "n/a" if v is None else float(cell) == pytest.approx(v, abs=5e-5)
    assert sum(summary["history"]["n"]) == case["test_frame"].height

    boot = summary["bootstrap"]
    assert (boot["a"], boot["b"]) == ("bst", "din")
    assert boot["lo"] <= boot["diff"] <= boot["hi"]
    assert f"= {boot['diff']:.4f}, 95% interval [{boot['lo']:.4f}, {boot['hi']:.4f}]" in md


def test_report_without_baseline_or_pair(tmp_path: Path) -> None:
    case = make_case(2)
    case["predictions"] = {"bst": case["predictions"]["bst"]}
    del case["references"]
    write_report(tmp_path, **case)
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["baseline"] is None and summary["bootstrap"] is None
    assert summary["models"]["bst"]["rela_impr"] is None
    assert not (tmp_path / "attention.png").exists()
    md = (tmp_path / "report.md").read_text()
    assert "RelaImpr is not reported" in md and "paired bootstrap" not in md


def test_report_rejects_misshaped_predictions() -> None:
    case = make_case()
    case["predictions"] = {"bst": np.zeros(3)}
    with pytest.raises(ValueError, match="bst"):
        evaluation_summary(**case)


def test_more_bootstrap_pairs(tmp_path: Path) -> None:
    """``also_compare`` adds pairs after the main one; absent models are skipped."""
    case = make_case(3)
    write_report(tmp_path, **case, also_compare=[("din", "WDL"), ("bst", "nope")])
    summary = json.loads((tmp_path / "metrics.json").read_text())
    pairs = [(b["a"], b["b"]) for b in summary["bootstraps"]]
    assert pairs == [("bst", "din"), ("din", "WDL")]
    assert summary["bootstrap"] == summary["bootstraps"][0]
    alone = evaluation_summary(**{**case, "predictions": {
        k: case["predictions"][k] for k in ("din", "WDL")}}, compare=("din", "WDL"))
    assert alone["bootstrap"]["diff"] == pytest.approx(summary["bootstraps"][1]["diff"])
    md = (tmp_path / "report.md").read_text()
    assert "## AUC difference bst - din" in md and "## AUC difference din - WDL" in md


def test_attention_view_drops_padding_and_keeps_the_target_row() -> None:
    rng = np.random.default_rng(3)
    att = rng.dirichlet(np.ones(5), size=(3, 5))  # (heads, L+1, L+1), rows sum to one
    tokens = ["", "", "Heat (1995)", "Alien (1979)", "target: Brazil (1985)"]
    mean, target, labels = attention_view(att, tokens)
    assert labels == tokens[2:]
    assert mean == pytest.approx(att[:, 2:, 2:].mean(axis=0))
    assert target == pytest.approx(att[:, 4, 2:])
    # no labels: positions, nothing dropped; one map: one head
    mean1, target1, labels1 = attention_view(att[0], None)
    assert labels1 == ["0", "1", "2", "3", "4"] and target1.shape == (1, 5)
    assert mean1 == pytest.approx(att[0])
    with pytest.raises(ValueError, match="tokens"):
        attention_view(att, tokens[1:])


def test_attention_plot_is_written_with_titles(tmp_path: Path) -> None:
    att = np.random.default_rng(4).dirichlet(np.ones(21) * 50, size=(8, 21))
    tokens = [f"A rather long movie title number {i} (1999)" for i in range(20)] + ["target: X"]
    write_report(tmp_path, **make_case(), attention=att, attention_tokens=tokens)
    assert (tmp_path / "attention.png").read_bytes()[:8] == PNG
