"""Data-parallel training under torchrun: ``bstrec train ranker|retriever ... --nproc N``.

``run_job(job, nproc)`` runs a training job in one of three ways:

- in this process, when ``nproc`` is 1 and no torchrun launched it;
- natively, when this process already sits under torchrun (``RANK``, ``WORLD_SIZE`` and
  ``LOCAL_RANK`` set, e.g. ``torchrun --nproc-per-node 2 --no-python bstrec train ranker ...``):
  it joins the process group and trains as one rank;
- otherwise it launches ``nproc`` workers on this machine with torch.distributed.run's own API
  (``--standalone``: a local rendezvous on a free port), each running ``main`` of this module on
  the same job, and waits for them; the result is then read from the run folder.

Inside the workers the training loops (``bstrec.training.loop.train`` and
``bstrec.retrieval.train.train_two_tower``) see an initialised process group and wrap the model
in ``DistributedDataParallel``: gloo on CPU, NCCL when the training device is CUDA (one GPU per
local rank). Every rank reads its own slice of each global batch, so that the ranks' step-t
batches together are the one-process step-t batch; only rank 0 evaluates, writes checkpoints,
result files and logs (other ranks log errors only). The run folder must be on a filesystem
every rank sees (one machine, or a shared mount).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist

from bstrec.config import from_dict

if TYPE_CHECKING:
    from rich.console import Console

    from bstrec.retrieval.train import RetrieverResult
    from bstrec.training.loop import TrainResult

log = logging.getLogger(__name__)

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class DistributedError(RuntimeError):
    """A distributed run could not start, or one of its workers failed."""


@dataclass(frozen=True)
class Job:
    """One training job, as the CLI gives it; JSON-ready so that it reaches every worker."""

    kind: Literal["ranker", "retriever"]
    samples: str
    out: str
    model: str = ""  # the ranker's registry name (rankers only)
    model_overrides: dict[str, Any] = field(default_factory=dict)
    train_overrides: dict[str, Any] = field(default_factory=dict)
    popular_overrides: dict[str, Any] = field(default_factory=dict)  # retriever only
    item_cf_overrides: dict[str, Any] = field(default_factory=dict)  # retriever only
    resume: bool = False  # rankers only

    def __post_init__(self) -> None:
        if self.kind not in ("ranker", "retriever"):
            raise ValueError(f"job kind must be 'ranker' or 'retriever', got {self.kind!r}")
        if self.kind == "ranker" and not self.model:
            raise ValueError("a ranker job needs the model's name")
        if self.kind == "retriever" and self.resume:
            raise ValueError("the retriever's training has no resumable checkpoints")


# -- where this process stands ----------------------------------------------------------------
def under_torchrun() -> bool:
    """Whether torchrun (or another launcher with its environment) started this process."""
    return all(k in os.environ for k in _TORCHRUN_ENV)


def launched_rank() -> int:
    """This process's rank in the torchrun job that started it (0 outside one), known before
    the process group is joined and after it is left."""
    return int(os.environ["RANK"]) if under_torchrun() else 0


def world() -> tuple[int, int]:
    """(world size, rank) of the initialised process group; (1, 0) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def is_lead() -> bool:
    """Whether this process is the one that writes files and logs (rank 0, or no group)."""
    return world()[1] == 0


def local_world_size() -> int:
    """Processes of the group on this machine (1 without a group), which share its cores."""
    if world()[0] == 1:
        return 1
    return int(os.environ.get("LOCAL_WORLD_SIZE", world()[0]))


def local_device(device: str | torch.device) -> torch.device:
    """The device this rank trains on: a CUDA device becomes ``cuda:LOCAL_RANK`` in a group
    (one GPU per local rank), anything else is kept."""
    dev = torch.device(device)
    if dev.type == "cuda" and world()[0] > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def backend_for(device: str | torch.device) -> str:
    """NCCL for CUDA training, gloo otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


@contextmanager
def process_group(device: str | torch.device = "cpu") -> Iterator[None]:
    """Join the torchrun job's process group for training on ``device``; leave it at exit."""
    if not under_torchrun():
        raise DistributedError("no torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK): launch "
                               "with `--nproc N` or under torchrun")
    backend = backend_for(device)
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise DistributedError(f"device {device} asked for, but CUDA is not available")
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)
    try:
        yield
        # every rank waits for the others (rank 0 writes the outputs) before any tears its
        # connections down; after a failure there is no barrier: the launcher stops the others
        dist.barrier()
    finally:
        dist.destroy_process_group()


def broadcast_floats(values: Sequence[float], device: torch.device) -> list[float]:
    """Rank 0's ``values`` on every rank (the others pass placeholders of the same length)."""
    if world()[0] == 1:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return [float(v) for v in t.cpu()]


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum of ``value`` over the ranks (``value`` itself without a group)."""
    if world()[0] == 1:
        return value
    out = value.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (rank order) on every rank; ``[obj]`` without a group."""
    n = world()[0]
    if n == 1:
        return [obj]
    out: list[Any] = [None] * n
    dist.all_gather_object(out, obj)
    return out


# -- running a job ----------------------------------------------------------------------------
def job_device(job: Job) -> str:
    """The device a job trains on: the ranker's ``train.device``; the retriever trains on CPU."""
    return str(job.train_overrides.get("device", "cpu")) if job.kind == "ranker" else "cpu"


def run_job(job: Job, nproc: int = 1, *, console: Console | None = None,
            progress: bool = True) -> TrainResult | RetrieverResult:
    """Run ``job`` on ``nproc`` processes (see the module docstring); the result of rank 0."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    if under_torchrun():
        size = int(os.environ["WORLD_SIZE"])
        if nproc not in (1, size):
            raise DistributedError(f"--nproc {nproc} under a torchrun job of {size} processes: "
                                   "leave --nproc out, torchrun decides")
        if launched_rank() > 0:
            logging.getLogger().setLevel(logging.ERROR)  # rank 0 alone logs progress
        with process_group(job_device(job)):
            return _execute(job, console=console, progress=progress and launched_rank() == 0)
    if nproc == 1:
        return _execute(job, console=console, progress=progress)
    batch_size = global_batch_size(job)
    if batch_size % nproc:
        # the workers would refuse it too, but only after starting
        raise ValueError(f"batch_size {batch_size} does not divide among {nproc} processes: "
                         "the global batch is split evenly")
    launch(job, nproc)
    return read_result(job)


def global_batch_size(job: Job) -> int:
    """The batch size the job will train with: given, else a resumed run's, else the default."""
    if "batch_size" in job.train_overrides:
        return int(job.train_overrides["batch_size"])
    if job.kind == "retriever":
        from bstrec.retrieval.train import RetrieverTrainConfig

        return RetrieverTrainConfig().batch_size
    from bstrec.training.checkpoint import META, read_meta
    from bstrec.training.loop import LAST, TrainConfig

    last = Path(job.out) / LAST
    if job.resume and (last / META).exists():
        saved = read_meta(last, verify=False).get("train_config") or {}
        return int(saved.get("batch_size", TrainConfig().batch_size))
    return TrainConfig().batch_size


def launch(job: Job, nproc: int) -> None:
    """Run ``main`` of this module on ``nproc`` local workers under torch.distributed.run and
    wait for them; a failed worker (the others are then stopped) raises DistributedError."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun

    if job_device(job).startswith("cuda") and torch.cuda.device_count() < nproc:
        raise DistributedError(f"--nproc {nproc} on CUDA needs {nproc} GPUs, "
                               f"this machine has {torch.cuda.device_count()}")
    args = parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module", __name__,
                       "--job", json.dumps(dataclasses.asdict(job))])  # type: ignore[no-untyped-call]
    try:
        torchrun(args)  # type: ignore[no-untyped-call]
    except ChildFailedError as exc:
        raise DistributedError(f"a training process failed: {exc}") from None


def read_result(job: Job) -> TrainResult | RetrieverResult:
    """The result a finished job wrote to its run folder (rank 0 writes it)."""
    out = Path(job.out)
    if job.kind == "ranker":
        from bstrec.training.loop import TrainResult
        from bstrec.training.task import RESULT

        report = json.loads((out / RESULT).read_text())
        return TrainResult.from_dict(report["result"])
    from bstrec.retrieval.artifacts import META
    from bstrec.retrieval.train import RetrieverResult

    return RetrieverResult(**json.loads((out / META).read_text())["result"])


def _execute(job: Job, *, console: Console | None = None,
             progress: bool = True) -> TrainResult | RetrieverResult:
    if job.kind == "ranker":
        from bstrec.training.task import train_ranker

        return train_ranker(job.model, job.samples, job.out, model_overrides=job.model_overrides,
                            train_overrides=job.train_overrides, resume=job.resume,
                            progress=progress, console=console)
    return _train_retriever(job, console=console, progress=progress)


def _train_retriever(job: Job, *, console: Console | None,
                     progress: bool) -> RetrieverResult:
    from bstrec.retrieval.artifacts import train_retriever
    from bstrec.retrieval.train import RetrieverTrainConfig, train_two_tower
    from bstrec.retrieval.two_tower import TwoTowerConfig

    if is_lead():
        # rank 0 trains with the others, then fits item-CF and popularity and writes the folder
        return train_retriever(job.samples, job.out, model_overrides=job.model_overrides,
                               train_overrides=job.train_overrides,
                               popular_overrides=job.popular_overrides,
                               item_cf_overrides=job.item_cf_overrides, progress=progress,
                               console=console)
    from bstrec.data.samples import SampleSet

    model_cfg = from_dict(TwoTowerConfig, dict(job.model_overrides), where="model")
    train_cfg = from_dict(RetrieverTrainConfig, dict(job.train_overrides), where="train")
    _, result = train_two_tower(SampleSet.load(job.samples), train_cfg, model_cfg,
                                progress=False)
    return result


def _job_from_json(text: str) -> Job:
    data: Mapping[str, Any] = json.loads(text)
    return from_dict(Job, dict(data), where="--job")


def main(argv: Sequence[str] | None = None) -> None:
    """The worker entry point that ``launch`` starts under torchrun."""
    parser = argparse.ArgumentParser(prog="python -m bstrec.distributed.ddp",
                                     description="One worker of a data-parallel training job.")
    parser.add_argument("--job", required=True, help="the Job as JSON")
    args = parser.parse_args(argv)
    job = _job_from_json(args.job)
    rank = launched_rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR,
                        format=f"[rank {rank}] %(message)s")
    with process_group(job_device(job)):
        _execute(job, progress=rank == 0)


if __name__ == "__main__":
    main()
    # a worker whose job is done leaves without the interpreter's finalization: torch's and
    # gloo's C++ threads, torn down by static destructors there, aborted a rank now and then
    # under load after its work was done ("terminate called without an active exception"),
    # and the launcher then failed the whole job
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
