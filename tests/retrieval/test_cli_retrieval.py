"""`bstrec train retriever`, `bstrec index build` and `bstrec similar` end to end on tiny data."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from bstrec.cli import app
from bstrec.data.samples import SampleSet
from bstrec.retrieval.artifacts import load_artifacts
from bstrec.retrieval.index import FaissIndex

runner = CliRunner()


def test_train_index_similar(tiny_samples: SampleSet, tmp_path: Path) -> None:
    samples = tiny_samples.save(tmp_path / "samples")
    out = tmp_path / "retriever"
    res = runner.invoke(app, ["train", "retriever", "--samples", str(samples), "--out", str(out),
                              "--set", "encoder=mean", "--set", "dim=8", "--set", "token_dim=8",
                              "--train", "max_epochs=2", "--train", "batch_size=64",
                              "--train", "num_threads=1", "--popular", "half_life_days=10"])
    assert res.exit_code == 0, res.output
    assert "best epoch" in res.output
    meta = json.loads((out / "retriever.json").read_text())
    assert meta["popular"]["half_life_days"] == 10 and meta["model"]["encoder"] == "mean"
    r = load_artifacts(out)
    assert r.index is not None and len(r.index) == len(r.catalog.candidates)

    res = runner.invoke(app, ["index", "build", "--retriever", str(out), "--kind", "hnsw",
                              "--set", "hnsw_m=8"])
    assert res.exit_code == 0, res.output
    r = load_artifacts(out)
    assert isinstance(r.index, FaissIndex) and r.index.config.hnsw_m == 8

    # item 10 is followed by 11 for every user who watches it: its top co-occurring neighbours
    res = runner.invoke(app, ["similar", "--retriever", str(out), "--item", "10", "-k", "3"])
    assert res.exit_code == 0, res.output
    assert "11" in res.output or "9" in res.output
    res = runner.invoke(app, ["similar", "--retriever", str(out), "--item", "10", "--by",
                              "vectors"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["similar", "--retriever", str(out), "--item", "424242"])
    assert res.exit_code == 2 and "not in the retriever" in res.output
    res = runner.invoke(app, ["train", "retriever", "--samples", str(samples), "--out",
                              str(tmp_path / "x"), "--train", "temprature=0.1"])
    assert res.exit_code == 2 and "unknown keys" in res.output
