"""`bstrec monitor report` and `bstrec monitor ope` on the log of a real service run: the
synthetic test period replayed against a bundle served by the Plackett-Luce policy, with
another bundle in shadow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bstrec.cli import app as cli
from bstrec.monitoring.impressions import read_log
from bstrec.monitoring.replay import ReplayConfig, replay
from bstrec.serving.settings import Settings
from tests.serving.fixtures import Artifacts, copy_bundle, running

KEY = "monitor-key"


@pytest.fixture(scope="module")
def served_log(artifacts: Artifacts, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[Path, Path]:
    """(impression log, the logging bundle) of one replay of the synthetic test period."""
    root = tmp_path_factory.mktemp("monitor")
    logging_bundle = copy_bundle(artifacts.bundle, root / "pl", "PL", max_per_category=0,
                                 policy={"kind": "plackett_luce", "temperature": 2.0})
    log = root / "log"
    settings = Settings(bundle=logging_bundle, api_key=KEY,  # type: ignore[arg-type]
                        store_path=str(root / "store.sqlite"), seed_events=artifacts.samples,
                        seed_until="test", impression_log=log, shadow_bundle=artifacts.bundle_b)
    with running(settings) as (url, _):
        result = replay(artifacts.samples, url,
                        ReplayConfig(api_key=KEY, seed_history=False, window_s=86_400.0),
                        progress=False)
    assert result.requests > 50 and result.errors == 0
    return log, logging_bundle


def test_monitor_report_writes_the_report_with_its_plots(served_log: tuple[Path, Path],
                                                         artifacts: Artifacts,
                                                         tmp_path: Path) -> None:
    log, bundle = served_log
    out = tmp_path / "report"
    res = CliRunner().invoke(cli, ["monitor", "report", "--log", str(log), "--out", str(out),
                                   "--bundle", str(bundle), "--window-s", "86400",
                                   "--format", "html"])
    assert res.exit_code in (0, 1), res.output  # 1: an alert is breached
    assert (out / "report.html").is_file() and list(out.glob("*.png"))
    window = json.loads((out / "report.json").read_text())["window"]
    shown = read_log(log).filter(shown=True)
    assert (window["requests"], window["impressions"]) == (shown["request_id"].n_unique(),
                                                           shown.height)
    assert window["shadow_rows"] > 0  # the shadow bundle's rankings are read, not counted


def test_monitor_report_default_window_is_the_replays(served_log: tuple[Path, Path],
                                                     tmp_path: Path) -> None:
    # a click is judged with the window the replay used to click, unless told otherwise
    res = CliRunner().invoke(cli, ["monitor", "report", "--log", str(served_log[0]),
                                   "--out", str(tmp_path / "r")])
    assert res.exit_code in (0, 1), res.output
    window = json.loads((tmp_path / "r" / "report.json").read_text())["window"]
    assert window["click_window_s"] == ReplayConfig().window_s


def test_monitor_report_refuses_bad_input(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["monitor", "report", "--log", str(tmp_path / "none"),
                                   "--out", str(tmp_path / "r")])
    # the console wraps lines at its width, and the temporary path's length varies
    assert res.exit_code == 2 and "no such folder" in " ".join(res.output.split())
    tmp_path.joinpath("log").mkdir()
    res = CliRunner().invoke(cli, ["monitor", "report", "--log", str(tmp_path / "log"),
                                   "--since", "yesterday"])
    assert res.exit_code == 2 and "--since" in res.output


def test_monitor_ope_estimates_the_shadow_bundle(served_log: tuple[Path, Path],
                                                 tmp_path: Path) -> None:
    log, _ = served_log
    out = tmp_path / "ope.json"
    res = CliRunner().invoke(cli, ["monitor", "ope", "--log", str(log), "--target", "B",
                                   "--window-s", "86400", "--n-boot", "200", "--out", str(out)])
    assert res.exit_code == 0, res.output
    est = json.loads(out.read_text())
    assert est["target_version"] == "B" and est["n_requests"] > 50
    assert est["ips_lo"] <= est["ips"] <= est["ips_hi"]
    assert est["snips_lo"] <= est["snips"] <= est["snips_hi"]
    # a version without shadow rows is refused, naming the versions there are
    res = CliRunner().invoke(cli, ["monitor", "ope", "--log", str(log), "--target", "nope"])
    assert res.exit_code == 2 and "nope" in res.output
