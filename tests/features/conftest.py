"""Fixtures for the feature store tests: a real redis-server on a free loopback port, and stores
of both backends behind one parametrised fixture."""

from __future__ import annotations

import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from bstrec.features.store import FeatureStore, StoreConfig, open_store
from tests.conftest import system_program


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def redis_binary() -> str:
    """The redis-server binary, or skip (fail in CI, which must install it: .ci/system-deps)."""
    return system_program("redis-server", "redis-server")


class RedisServer:
    """One redis-server process on 127.0.0.1 (no persistence), stoppable and restartable on the
    same port."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary, self.workdir, self.port = binary, workdir, _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.workdir / 'redis.log').read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port} within 10 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(redis_binary(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of the test's own, which the test may stop and start."""
    server = RedisServer(redis_binary(), tmp_path / "redis")
    server.start()
    yield server
    server.stop()


StoreFactory = Callable[..., tuple[FeatureStore, StoreConfig]]


@pytest.fixture(params=["embedded", "redis"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """``make_store(max_events=...)`` -> (a fresh store of the parametrised backend, its config)."""
    backend = request.param
    opened: list[FeatureStore] = []
    base = StoreConfig(backend=backend, path=str(tmp_path / "store.sqlite"))
    if backend == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        base = replace(base, url=server.url, prefix=f"t{uuid.uuid4().hex[:12]}")

    def make(**overrides: object) -> tuple[FeatureStore, StoreConfig]:
        cfg = replace(base, **overrides)  # type: ignore[arg-type]
        store = open_store(cfg)
        opened.append(store)
        return store, cfg

    yield make
    for store in opened:
        try:
            store.clear()
        finally:
            store.close()
