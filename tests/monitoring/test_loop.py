"""The whole feedback loop against a real HTTP server: serve a bundle with the impression log
on, replay the test period's first behaviours, build samples from what was shown and clicked,
train a ranker on them, bundle it, hot-reload it while requests keep coming (none may fail),
and replay the next behaviours on the new version."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import polars as pl
import torch
from typer.testing import CliRunner

from bstrec.cli import app as cli
from bstrec.data.impressions import build_impression_samples
from bstrec.data.samples import SampleSet
from bstrec.monitoring.impressions import read_log
from bstrec.monitoring.replay import ReplayConfig, replay
from bstrec.serving.app import create_app
from bstrec.serving.bundle import build_bundle
from bstrec.serving.config import PipelineConfig
from bstrec.serving.server import BackgroundServer
from bstrec.serving.settings import Settings
from bstrec.training.task import train_ranker
from tests.serving.fixtures import Artifacts, copy_bundle, http_client

KEY = "loop-key"
FIRST = 110  # test behaviours replayed on the first model; the rest go to the second


def keep_requesting(url: str, stop: threading.Event, seen: list[tuple[int, str]]) -> None:
    """/recommend in a loop until ``stop``: (status, model version) of every answer."""
    with http_client(url) as client:
        n = 0
        while not stop.is_set():
            n += 1
            r = client.get("/recommend", params={"user_id": 1 + n % 50, "k": 5})
            seen.append((r.status_code, r.json().get("model_version", "") if r.status_code == 200
                         else r.text))


def test_replay_retrain_reload_replay(artifacts: Artifacts, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    root = tmp_path / "bundles"
    root.mkdir()
    served = copy_bundle(artifacts.bundle, root / "a", "A")
    logs = tmp_path / "log"
    # no seed_events: the replay seeds the history before the test period itself
    settings = Settings(bundle=served, bundle_root=root, store_path=str(tmp_path / "s.sqlite"),
                        events_key=KEY, admin_key=KEY, impression_log=logs,
                        impression_flush_s=0.2)
    app = create_app(settings)
    with BackgroundServer(app) as server, http_client(server.url) as client:
        first = replay(artifacts.samples, server.url,
                       ReplayConfig(k=10, limit=FIRST, api_key=KEY), progress=False)
        assert first.errors == 0 and first.requests == FIRST
        assert first.versions == {"A": FIRST} and first.seeded > 0
        app.state.service.impressions.flush(timeout_s=30)
        shown = read_log(logs)
        assert shown["request_id"].n_unique() == FIRST
        assert set(shown["model_version"]) == {"A"}

        # retrain on what was shown: labels are clicks within the window
        samples = build_impression_samples(logs, artifacts.samples, tmp_path / "imp")
        loaded = SampleSet.load(samples)
        rows = pl.concat(loaded.splits.values())
        assert rows.height == shown.filter("shown").height
        assert 0 < rows["label"].sum() < rows.height
        # the log's clicks are the replay's, less those on behaviours after its last one (the
        # replay judged them from the dataset; they were never posted)
        assert 0 < loaded.manifest["impressions"]["clicked"] <= first.clicks
        run = tmp_path / "bst_imp"
        train_ranker("bst", samples, run, model_overrides={
            "mlp": [16], "item_dim": 8, "cat_dim": 4, "pos_dim": 4, "heads": 2, "embed_dim": 4},
            train_overrides={"max_epochs": 1, "batch_size": 128, "num_threads": 1},
            progress=False)
        torch.set_num_threads(threads)
        new = build_bundle(samples, run, root / "b", retriever_dir=artifacts.retriever,
                           pipeline_config=PipelineConfig(rank_n=60), version="B")

        # hot reload under load: no request may fail, later ones get the new version
        stop, seen = threading.Event(), list[tuple[int, str]]()
        worker = threading.Thread(target=keep_requesting, args=(server.url, stop, seen))
        worker.start()
        try:
            while len(seen) < 5:
                time.sleep(0.02)
            r = client.post("/admin/reload", json={"bundle": str(new)},
                            headers={"X-API-Key": KEY})
            assert r.status_code == 200, r.text
            assert r.json()["model_version"] == "B"
            reloaded_at = len(seen)
            deadline = time.monotonic() + 30
            while len(seen) < reloaded_at + 5 and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            stop.set()
            worker.join(30)
        assert all(status == 200 for status, _ in seen), [s for s in seen if s[0] != 200][:3]
        assert seen[-1][1] == "B" and {v for _, v in seen} <= {"A", "B"}

        # the rest of the test period, through the command line (the key from the environment)
        res = CliRunner().invoke(cli, [
            "replay", "--samples", str(artifacts.samples), "--service", server.url,
            "--skip", str(FIRST), "--no-seed-history", "--json"],
            env={"BSTREC_EVENTS_KEY": KEY})
        assert res.exit_code == 0, res.output
        second = json.loads(res.output)
        assert second["errors"] == 0 and second["requests"] > 0
        assert second["versions"] == {"B": second["requests"]}
        app.state.service.impressions.flush(timeout_s=30)
        assert set(read_log(logs)["model_version"]) == {"A", "B"}

