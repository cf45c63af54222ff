"""Fixtures of the service tests: one tiny bundle per session (synthetic log, a BST with one small
MLP layer and a two-tower, each trained one epoch), variants of it, and stores. Registered for
the whole suite by tests/conftest.py (``pytest_plugins``), so that the monitoring tests share the
same session bundle instead of building their own."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from typer.testing import CliRunner

from bstrec.cli import app as cli
from bstrec.data.build import build
from bstrec.data.schema import Dataset
from bstrec.features.store import FeatureStore, StoreConfig, open_store
from bstrec.retrieval.train import RetrieverTrainConfig, train_two_tower
from bstrec.retrieval.two_tower import TwoTowerConfig
from bstrec.serving.app import create_app
from bstrec.serving.bundle import RANKER, Bundle, load_bundle
from bstrec.serving.bundle import copy_bundle as bundle_copy
from bstrec.serving.guard import StoreGuard
from bstrec.serving.pipeline import Pipeline
from bstrec.serving.server import BackgroundServer
from bstrec.serving.settings import Settings
from bstrec.training.task import train_ranker
from tests.features.conftest import RedisServer, redis_binary


@dataclass(frozen=True)
class Artifacts:
    samples: Path
    ranker: Path
    retriever: Path
    bundle: Path  # version "A"
    bundle_b: Path  # the same models, version "B", another category cap
    broken: Path  # ranker.onnx truncated

    def dataset(self) -> Dataset:
        return Dataset.load(self.samples / "dataset")


def copy_bundle(src: Path, dst: Path, version: str, **pipeline: object) -> Path:
    return bundle_copy(src, dst, version=version, pipeline=pipeline)


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    threads = torch.get_num_threads()  # training sets it process-wide; given back below
    root = tmp_path_factory.mktemp("serving")
    samples = root / "samples"
    build("synthetic-order", samples, dataset_options={"n_users": 80, "events_per_user": [10, 30]})
    ranker = root / "bst"
    # toy sizes and one thread: the tests check plumbing, not accuracy, on 2 shared cores
    train_ranker("bst", samples, ranker, model_overrides={
        "mlp": [16], "item_dim": 8, "cat_dim": 4, "pos_dim": 4, "heads": 2, "embed_dim": 4},
        train_overrides={"max_epochs": 1, "batch_size": 128, "num_threads": 1}, progress=False)
    from bstrec.data.samples import SampleSet

    retriever = root / "two_tower"
    train_two_tower(SampleSet.load(samples),
                    RetrieverTrainConfig(max_epochs=1, batch_size=256, eval_queries=100, num_threads=1),
                    TwoTowerConfig(dim=16, token_dim=16, feat_dim=4, heads=2, user_hidden=(16,),
                                   item_hidden=(16,)), out_dir=retriever, progress=False)
    bundle = root / "bundle_a"
    # through the command line, so that `bstrec bundle build` is covered too
    res = CliRunner().invoke(cli, ["bundle", "build", "--samples", str(samples), "--ranker",
                                   str(ranker), "--retriever", str(retriever), "--out",
                                   str(bundle), "--version", "A", "--set", "rank_n=60"])
    assert res.exit_code == 0, res.output
    bundle_b = copy_bundle(bundle, root / "bundle_b", "B", max_per_category=2)
    broken = copy_bundle(bundle, root / "broken", "broken")
    onnx = broken / RANKER
    onnx.write_bytes(onnx.read_bytes()[:1000])
    torch.set_num_threads(threads)
    return Artifacts(samples, ranker, retriever, bundle, bundle_b, broken)


@pytest.fixture(scope="session")
def bundle(artifacts: Artifacts) -> Bundle:
    return load_bundle(artifacts.bundle)


@pytest.fixture
def store(tmp_path: Path, artifacts: Artifacts) -> Iterator[FeatureStore]:
    """An embedded store holding the whole synthetic log."""
    s = open_store(StoreConfig(path=str(tmp_path / "store.sqlite")))
    s.load_dataset(artifacts.dataset())
    yield s
    s.close()


@pytest.fixture
def pipeline(bundle: Bundle, store: FeatureStore) -> Pipeline:
    return Pipeline(bundle, StoreGuard(store, "embedded"), clock=lambda: 1_800_000_000)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own (stoppable, restartable on its port); skipped with the
    reason when redis-server is not installed."""
    server = RedisServer(redis_binary(), tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def http_client(url: str) -> httpx.Client:
    """A client of the test servers. It drops a pooled connection after 1 s idle: uvicorn closes
    one after 5 s (``timeout_keep_alive``), httpx's default keeps it 5 s too, and a request sent
    on a connection the server is closing at that moment fails with "Server disconnected without
    sending a response" (seen with a module-scoped client on a loaded machine)."""
    return httpx.Client(base_url=url, timeout=30, limits=httpx.Limits(keepalive_expiry=1.0))


@contextmanager
def running(settings: Settings) -> Iterator[tuple[str, httpx.Client]]:
    """A real uvicorn server on a free loopback port serving ``settings``, and a client."""
    app = create_app(settings)
    with BackgroundServer(app) as server, http_client(server.url) as client:
        yield server.url, client
