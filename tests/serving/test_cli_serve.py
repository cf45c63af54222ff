"""`bstrec serve` as a user runs it: a subprocess serving a bundle on a loopback port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from bstrec.cli import app
from bstrec.serving.server import free_port, settings_json
from bstrec.serving.settings import Settings
from tests.serving.fixtures import Artifacts


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_starts_from_a_bundle_and_answers(artifacts: Artifacts, tmp_path: Path,
                                                workers: int) -> None:
    port = free_port()
    exe = Path(sys.executable).parent / "bstrec"
    env = os.environ | {"BSTREC_API_KEY": "cli-key", "BSTREC_WORKERS": str(workers)}
    proc = subprocess.Popen(
        [str(exe), "serve", "--bundle", str(artifacts.bundle), "--port", str(port),
         "--store-path", str(tmp_path / "store.sqlite"), "--seed-events", str(artifacts.samples)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "bstrec serve did not become ready"
            time.sleep(0.2)
        rec = httpx.get(f"{url}/recommend", params={"user_id": 3, "k": 3}, timeout=30).json()
        assert rec["model_version"] == "A" and len(rec["items"]) == 3 and rec["known_user"]
        r = httpx.post(f"{url}/events", json={"user_id": 3, "item_id": 5},
                       headers={"X-API-Key": "cli-key"}, timeout=30)
        assert r.status_code == 200, r.text
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out


def test_serve_refuses_a_broken_bundle(artifacts: Artifacts) -> None:
    res = CliRunner().invoke(app, ["serve", "--bundle", str(artifacts.broken)],
                             env={"BSTREC_API_KEY": "k"})
    assert res.exit_code == 2 and "ranker.onnx is corrupted" in res.output.replace("\n", "")


def test_worker_settings_round_trip_with_the_keys(tmp_path: Path) -> None:
    settings = Settings(bundle=tmp_path, api_key="s3cret", events_key="ev", admin_key="adm",
                        read_key="rd", workers=2, seed_events=None, k_max=50, static_dir=None)
    back = Settings.model_validate_json(settings_json(settings))
    assert back == settings
    assert [k.get_secret_value() for k in (back.api_key, back.events_key, back.admin_key,
                                           back.read_key) if k is not None] == [
        "s3cret", "ev", "adm", "rd"]


def test_serve_options_and_keys_reach_the_settings(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The access options become settings; keys come from the environment only, and with none
    there serve makes up an API key and prints it."""
    seen: list[Settings] = []
    monkeypatch.setattr("bstrec.serving.server.serve", seen.append)
    for name in ("API", "EVENTS", "ADMIN", "READ"):
        monkeypatch.delenv(f"BSTREC_{name}_KEY", raising=False)
    args = ["serve", "--bundle", str(tmp_path), "--bundle-root", str(tmp_path.parent),
            "--public-history", "--max-future-s", "60"]
    res = CliRunner().invoke(app, args, env={"BSTREC_EVENTS_KEY": "ev", "BSTREC_ADMIN_KEY": "ad"})
    assert res.exit_code == 0, res.output
    s = seen.pop()
    assert s.bundle_root == tmp_path.parent and s.public_history and s.max_future_s == 60
    assert s.events_key is not None and s.events_key.get_secret_value() == "ev"
    assert s.admin_secret() is not None and s.api_key is None
    res = CliRunner().invoke(app, ["serve", "--bundle", str(tmp_path)])
    assert res.exit_code == 0 and "X-API-Key:" in res.output, res.output
    s = seen.pop()
    assert s.api_key is not None and not s.public_history and s.max_future_s == 300
    assert s.reload_root() == tmp_path.parent.resolve()
