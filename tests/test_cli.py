"""The command line, end to end on small inputs (the real-data paths are covered in tests/data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bstrec.cli import app

runner = CliRunner()


def write_csv(path: Path, bad_line: str | None = None) -> Path:
    lines = ["uid,sku,ts,kind"]
    for i in range(400):
        lines.append(f"u{i % 23},{i % 37},{1_700_000_000 + 60 * i},click")
    if bad_line is not None:
        lines.insert(7, bad_line)
    path.write_text("\n".join(lines) + "\n")
    return path


MAPPING = ["--column", "user_id=uid", "--column", "item_id=sku", "--column", "timestamp=ts",
           "--column", "action=kind"]


def test_data_build_and_stats_on_a_csv_log(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "log.csv")
    out = tmp_path / "out"
    res = runner.invoke(app, ["data", "build", "--dataset", "csv", "--input", str(src), *MAPPING,
                              "--out", str(out), "--set", "negatives=2"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["protocol"] == "log-ctr"  # the file stem names a csv dataset
    # each positive with two negatives, but the first event's: nothing precedes it to draw from
    assert sum(manifest["splits"].values()) == 400 * 3 - 2
    assert manifest["negatives_not_drawn"]["empty_catalogue"] == 2
    assert manifest["config"]["negatives"] == 2
    res = runner.invoke(app, ["data", "stats", str(out)])
    assert res.exit_code == 0, res.output
    assert "train" in res.output and "config hash" in res.output


def test_data_build_reports_file_and_line_and_leaves_nothing(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "log.csv", bad_line="u1,5,yesterday,click")
    out = tmp_path / "out"
    res = runner.invoke(app, ["data", "build", "--dataset", "csv", "--input", str(src), *MAPPING,
                              "--out", str(out)])
    assert res.exit_code == 2
    assert "log.csv:8" in res.output and "yesterday" in res.output
    assert not out.exists()
    res = runner.invoke(app, ["data", "build", "--dataset", "csv", "--input", str(src), *MAPPING,
                              "--out", str(out), "--lenient"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "manifest.json").read_text())["source"]["skipped_rows"] == {
        "log.csv": 1}


@pytest.mark.parametrize("args, message", [
    (["--set", "max_lenn=3"], "max_lenn"),
    (["--dataset", "nope"], "nope"),
])
def test_data_build_rejects_unknown_keys_and_datasets(tmp_path: Path, args: list[str],
                                                      message: str) -> None:
    base = ["data", "build", "--out", str(tmp_path / "o")]
    if "--dataset" not in args:
        base += ["--dataset", "synthetic-order"]
    res = runner.invoke(app, [*base, *args])
    assert res.exit_code == 2
    assert message in res.output
    assert not (tmp_path / "o").exists()


def test_quickstart_without_data_dir_falls_back_to_synthetic(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BSTREC_DATA_DIR", raising=False)
    out = tmp_path / "qs"
    res = runner.invoke(app, ["quickstart", "--out", str(out)])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())  # the console wraps lines at its width
    assert "synthetic-order" in text
    report = (out / "report.md").read_text()
    manifest = json.loads((out / "samples" / "manifest.json").read_text())
    assert manifest["protocol"] == "synthetic-order"
    assert f"{manifest['splits']['train']:,}" in report
    # the match stage was trained and bundled: a two-tower beside item-CF and popularity
    assert (out / "two_tower" / "best").is_dir() and (out / "bundle" / "two_tower").is_dir()
    # trained, evaluated on test, compared with each reference in one line
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    # the ranker chosen on valid AUC among the BST and the baselines, all scored on test
    selection = json.loads((out / "selection" / "selection.json").read_text())
    chosen = selection["chosen"]["name"]
    assert {t["name"] for t in selection["trials"]} == {"bst", "wdl", "wdl_seq", "din"}
    assert set(metrics["models"]) == {"bst", "wdl", "wdl_seq", "din"}
    assert metrics["n_test"] == manifest["splits"]["test"]
    assert "## Model selection" in report and f"{chosen} (selected)" in report
    assert "## Evaluation (test split)" in report and "reference: rate_lr" in report
    bundle = json.loads((out / "bundle" / "manifest.json").read_text())
    assert bundle["ranker"]["model_name"] == chosen
    verdict = next(line for line in report.splitlines()
                   if line.startswith(f"Selected ranker {chosen}: test AUC"))
    assert "item rate (ref. a)" in verdict and "rate LR (ref. b)" in verdict
    assert verdict in text
    # served: the user's recent history beside recommendations from at least two sources
    section = report.split("## Serving", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| # ")]
    assert len(rows) == 10 and all(r[1] for r in rows), "ten recent behaviours"
    assert all(r[2] and r[4] for r in rows), "ten recommendations, each with its sources"
    sources = {s.strip() for r in rows for s in r[4].split(",")}
    assert len(sources & {"two_tower", "item_cf", "popular"}) >= 2, sources
    assert "sources among the 10 recommendations" in text
    # every stage timed, and the total
    assert "## Time per stage" in report and "training the two-tower retriever" in report
    for stage in ("selecting the ranker", "building the bundle", "serving", "total"):
        assert stage in text
    assert str((out / "report.md").resolve()) in res.output.replace("\n", "")


def test_train_then_evaluate_writes_the_report(tmp_path: Path) -> None:
    samples = tmp_path / "syn"
    res = runner.invoke(app, ["data", "build", "--dataset", "synthetic-order", "--out",
                              str(samples), "--option", "n_users=80",
                              "--option", "events_per_user=[10,30]"])
    assert res.exit_code == 0, res.output
    small = ["--set", "mlp=[16]", "--train", "max_epochs=1", "--train", "batch_size=128"]
    runs = []
    for model, seed in (("bst", 0), ("bst", 1), ("din", 0), ("wdl", 0)):
        out = tmp_path / f"{model}{seed}"
        res = runner.invoke(app, ["train", "ranker", "--model", model, "--samples", str(samples),
                                  "--out", str(out), *small, "--train", f"seed={seed}"])
        assert res.exit_code == 0, res.output
        runs += ["--run", f"{model}={out}"]
    report_dir = tmp_path / "report"
    res = runner.invoke(app, ["evaluate", "--samples", str(samples), *runs, "--out",
                              str(report_dir), "--n-boot", "50"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert metrics["models"]["bst"]["seeds"] == 2 and metrics["models"]["din"]["seeds"] == 1
    assert metrics["baseline"] == "wdl" and metrics["bootstrap"]["a"] == "bst"
    assert set(metrics["references"]) == {"item_rate", "rate_lr"}
    for png in ("auc_by_history_length.png", "calibration.png", "attention.png"):
        assert (report_dir / png).stat().st_size > 1000
    assert "| bst | 2 |" in (report_dir / "report.md").read_text()

    bad = runner.invoke(app, ["evaluate", "--samples", str(samples), "--run", "bst",
                              "--out", str(tmp_path / "r2")])
    assert bad.exit_code == 2 and "expected NAME=PATH" in bad.output
    missing = runner.invoke(app, ["evaluate", "--samples", str(samples), "--run",
                                  f"bst={tmp_path / 'nowhere'}", "--out", str(tmp_path / "r3")])
    assert missing.exit_code == 2 and "holds no checkpoint" in missing.output
