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
    assert sum(manifest["splits"].values()) == 400 * 3  # each positive with two negatives
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
    assert "synthetic-order" in res.output
    report = (out / "report.md").read_text()
    manifest = json.loads((out / "samples" / "manifest.json").read_text())
    assert manifest["protocol"] == "synthetic-order"
    assert f"{manifest['splits']['train']:,}" in report
    assert str((out / "report.md").resolve()) in res.output.replace("\n", "")
