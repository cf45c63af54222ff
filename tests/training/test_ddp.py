"""Data-parallel training under torchrun (gloo, CPU): 2 processes follow the 1-process run with
the same global batch, a killed 2-process run resumes bit-identical to an uninterrupted one,
and a run resumes with another process count. (Dropout is off in these runs, for the 1-vs-2
comparison; that each rank's dropout stream is saved and restored is checked on the files.)

Why the 1-vs-2 tolerances hold: with dropout off, the only randomness is the permutation, which
every rank draws alike, and the ranks' halves of each global batch make up the 1-process
batch. DDP averages the two half-batch mean gradients, which is the full batch's mean gradient
up to float32 rounding (two partial sums instead of one, ~1e-7 relative); over the 57 Adam
steps the weights drift apart by at most 1e-6 (measured), except the attention's key bias
(see the test), so weights and valid predictions agree to ATOL = 1e-5. The valid AUC depends
on the predictions' order only: a swap of two scores closer than ATOL among the 400 valid rows
moves it by 1/(n_pos n_neg), about 2.5e-5; AUC_TOL allows 20 such swaps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from typer.testing import CliRunner

from bstrec.cli import app
from bstrec.distributed.ddp import DistributedError, Job, run_job
from bstrec.training.checkpoint import restore_rng_state
from bstrec.training.loop import TrainResult
from bstrec.training.task import evaluate_checkpoint
from tests.training.test_loop import write_samples

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is needed")

ATOL = 1e-5
AUC_TOL = 5e-4
# a small BST on the tiny samples of test_loop (1200 train rows: 19 batches of 64 an epoch)
BST = {"item_dim": 8, "cat_dim": 4, "pos_dim": 4, "embed_dim": 4, "heads": 2, "mlp": [16]}
TRAIN = {"batch_size": 64, "lr": 0.01, "num_threads": 1, "patience": 0}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> None:
    # the workers inherit it: torchrun would otherwise warn and set it itself
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_samples(tmp_path_factory.mktemp("ddp") / "samples")


def ranker_job(samples: Path, out: Path, *, dropout: float = 0.0, resume: bool = False,
               **train: Any) -> Job:
    return Job("ranker", str(samples), str(out), model="bst",
               model_overrides={**BST, "dropout": dropout},
               train_overrides={**TRAIN, **train}, resume=resume)


def weights(run: Path, name: str = "last") -> dict[str, torch.Tensor]:
    return load_file(str(run / name / "model.safetensors"))


def history(result: TrainResult) -> list[tuple[int, int, float]]:
    return [(h.epoch, h.steps, h.valid_auc) for h in result.history]


@pytest.fixture(scope="module")
def two(samples: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainResult]:
    """A 2-process run (dropout off, 3 epochs) through the CLI's torchrun launch; tests copy
    its folder before resuming it."""
    out = tmp_path_factory.mktemp("two") / "run"
    train = {**TRAIN, "max_epochs": 3, "checkpoint_every": 4}
    args = ["train", "ranker", "--samples", str(samples), "--out", str(out), "--model", "bst",
            "--nproc", "2"] + [a for k, v in {**BST, "dropout": 0.0}.items()
                               for a in ("--set", f"{k}={v}")] + [
        a for k, v in train.items() for a in ("--train", f"{k}={v}")]
    cli = CliRunner().invoke(app, args)
    assert cli.exit_code == 0, cli.output
    report = json.loads((out / "train_result.json").read_text())
    assert report["processes"] == 2
    return out, TrainResult.from_dict(report["result"])


def test_two_processes_follow_one_and_resume_on_one(samples: Path, tmp_path: Path,
                                                    two: tuple[Path, TrainResult]) -> None:
    one = run_job(ranker_job(samples, tmp_path / "one", max_epochs=4), 1, progress=False)
    assert isinstance(one, TrainResult)
    two_dir, two_result = two
    assert [(e, s) for e, s, _ in history(two_result)] == [(1, 19), (2, 38), (3, 57)]
    for a, b in zip(history(two_result), history(one)[:3], strict=True):
        assert a[2] == pytest.approx(b[2], abs=AUC_TOL)
    for h2, h1 in zip(two_result.history, one.history[:3], strict=True):
        assert h2.train_loss == pytest.approx(h1.train_loss, rel=1e-5)
    # only rank 0 wrote, without DDP's "module." prefix; every rank's RNG is in last/
    assert set(weights(two_dir)) == set(weights(tmp_path / "one"))
    rng = load_file(str(two_dir / "last" / "optimizer.safetensors"))
    assert not torch.equal(rng["rng.torch"], rng["rng.rank1.torch"])
    restore_rng_state(two_dir / "last", rank=1)
    assert torch.equal(torch.get_rng_state(), rng["rng.rank1.torch"])

    # resumed on 1 process for epoch 4: where the 1-process run is after 4 epochs
    out = tmp_path / "two"
    shutil.copytree(two_dir, out)
    four = run_job(ranker_job(samples, out, max_epochs=4, resume=True), 1, progress=False)
    assert isinstance(four, TrainResult)
    assert [(e, s) for e, s, _ in history(four)] == [(e, s) for e, s, _ in history(one)]
    assert four.history[-1].valid_auc == pytest.approx(one.history[-1].valid_auc, abs=AUC_TOL)
    ref, got = weights(tmp_path / "one"), weights(out)
    # the attention's key bias has a zero gradient in exact arithmetic (a softmax ignores a
    # shift common to a row), so Adam's normalised steps follow its float noise: it differs,
    # and changes no output
    q, _, v = got.pop("blocks.0.qkv.bias").chunk(3)
    q_ref, _, v_ref = ref.pop("blocks.0.qkv.bias").chunk(3)
    torch.testing.assert_close(torch.cat([q, v]), torch.cat([q_ref, v_ref]), atol=ATOL, rtol=0)
    for k, w in got.items():
        torch.testing.assert_close(w, ref[k], atol=ATOL, rtol=0, msg=k)
    scores = {name: evaluate_checkpoint(tmp_path / name / "last", samples, "valid")
              for name in ("one", "two")}
    np.testing.assert_allclose(scores["two"]["predictions"], scores["one"]["predictions"],
                               atol=ATOL)


def test_killed_run_resumes_bit_identical(samples: Path, tmp_path: Path,
                                          two: tuple[Path, TrainResult]) -> None:
    """A 2-process run killed after its first checkpoint and resumed on 2 processes ends as
    the uninterrupted one, bit for bit (same process count: same reduction order)."""
    ref_dir, ref = two
    run = tmp_path / "run"
    job = ranker_job(samples, run, max_epochs=3, checkpoint_every=4)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "bstrec.distributed.ddp", "--job", json.dumps(dataclasses.asdict(job))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta, deadline = run / "last" / "checkpoint.json", time.monotonic() + 180
    while not meta.exists():
        assert launcher.poll() is None and time.monotonic() < deadline, "no checkpoint came"
        time.sleep(0.01)
    # what a scheduler's preemption does: torchrun passes the SIGTERM on to its workers
    launcher.send_signal(signal.SIGTERM)
    launcher.wait(timeout=60)
    killed = json.loads(meta.read_text())["train_state"]
    assert not killed["finished"] and killed["step"] < 3 * 19

    res = run_job(ranker_job(samples, run, max_epochs=3, checkpoint_every=4, resume=True), 2,
                  progress=False)
    assert isinstance(res, TrainResult)
    assert history(res) == history(ref)
    for name in ("last", "best"):
        a, b = weights(run, name), weights(ref_dir, name)
        assert all(torch.equal(a[k], b[k]) for k in b), name
    a, b = (load_file(str(p / "last" / "optimizer.safetensors")) for p in (run, ref_dir))
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_retriever_on_two_processes(tmp_path: Path) -> None:
    """In-batch negatives span the global batch (the other rank's items are gathered), so with
    dropout off the 2-process two-tower follows the 1-process one like the ranker does."""
    from bstrec.data.samples import SampleConfig, build_samples
    from bstrec.retrieval.artifacts import load_artifacts
    from bstrec.retrieval.catalog import QuerySet
    from bstrec.retrieval.train import RetrieverResult, retrieve
    from tests.retrieval.conftest import tiny_dataset

    samples = tmp_path / "samples"
    sample_set = build_samples(tiny_dataset(), SampleConfig(max_len=5))
    sample_set.save(samples)
    model = {"dim": 16, "token_dim": 16, "encoder": "mean", "item_id_dropout": 0.0,
             "dropout": 0.0}
    train = {"batch_size": 64, "max_epochs": 2, "lr": 5e-3, "temperature": 0.1, "eval_k": 5,
             "num_threads": 1, "patience": 0}
    results = {n: run_job(Job("retriever", str(samples), str(tmp_path / f"r{n}"),
                              model_overrides=model, train_overrides=train), n, progress=False)
               for n in (1, 2)}
    one, two = results[1], results[2]
    assert isinstance(one, RetrieverResult) and isinstance(two, RetrieverResult)
    for a, b in zip(two.history, one.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["valid_recall@5"] == pytest.approx(b["valid_recall@5"], abs=0.02)
    assert two.best_valid > 0.5  # learned: a random ranking of 32 items finds ~5/32
    r = load_artifacts(tmp_path / "r2")
    queries = QuerySet.from_samples(sample_set, "test")
    _, ids = retrieve(r.model, r.catalog, queries, 5)
    assert ids.shape == (len(queries), 5) and np.all(ids >= 2)


def test_bad_launches_are_clear_errors(samples: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="batch_size 64 does not divide among 3 processes"):
        run_job(ranker_job(samples, tmp_path / "x"), 3)
    with pytest.raises(ValueError, match="--nproc must be >= 1"):
        run_job(ranker_job(samples, tmp_path / "x"), 0)
    with pytest.raises(ValueError, match="needs the model's name"):
        Job("ranker", str(samples), str(tmp_path))
    with pytest.raises(ValueError, match="no resumable checkpoints"):
        Job("retriever", str(samples), str(tmp_path), resume=True)



def test_a_failed_worker_fails_the_launch(samples: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """What torchrun raises when a worker fails (the others are stopped) becomes an error the
    CLI reports (a real failing launch would cost a test another torchrun start)."""
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def failing(args: Any) -> None:
        failure = ProcessFailure(local_rank=1, pid=1, exitcode=1, error_file="")
        raise ChildFailedError(args.training_script, {1: failure})

    monkeypatch.setattr(torchrun, "run", failing)
    with pytest.raises(DistributedError, match="a training process failed"):
        run_job(ranker_job(samples, tmp_path / "y"), 2)
    cli = CliRunner().invoke(app, ["train", "ranker", "--samples", str(samples), "--out",
                                   str(tmp_path / "y"), "--model", "bst", "--nproc", "2",
                                   "--train", "batch_size=64"])
    assert cli.exit_code == 2 and "a training process failed" in cli.output
