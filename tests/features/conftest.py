"""Fixtures for the feature store tests: a real redis-server on a free loopback port, a real
3-master Redis Cluster, and stores of every backend behind one parametrised fixture."""

from __future__ import annotations

import itertools
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from redis.crc import key_slot

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

    def __init__(self, binary: str, workdir: Path, args: Sequence[str] = ()) -> None:
        self.binary, self.workdir, self.port = binary, workdir, _free_port()
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), *self.args],
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


class RedisClusterServers:
    """A Redis Cluster of ``masters`` redis-server processes on 127.0.0.1, no replicas, the slots
    cut in equal ranges. ``cluster-require-full-coverage no``: while one master is down, the
    others keep serving their slots, and a master restarted on its port with its nodes.conf
    rejoins with its slots (empty: no persistence)."""

    def __init__(self, binary: str, workdir: Path, masters: int = 3) -> None:
        # the bus port is set, not left at port + 10000, which may be past 65535
        self.nodes = [RedisServer(binary, workdir / f"node{i}", [
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-port", str(_free_port()), "--cluster-node-timeout", "1000",
            "--cluster-require-full-coverage", "no"]) for i in range(masters)]
        edges = [round(i * 16384 / masters) for i in range(masters + 1)]
        self.slots = [(lo, hi - 1) for lo, hi in itertools.pairwise(edges)]

    @property
    def url(self) -> str:
        """Every node as a seed, so that a client starting while one is down still finds the rest."""
        return ",".join(f"redis://127.0.0.1:{n.port}" for n in self.nodes)

    def node_of(self, key: str) -> int:
        """Index of the master that holds ``key``'s slot."""
        slot = key_slot(key.encode())
        return next(i for i, (lo, hi) in enumerate(self.slots) if lo <= slot <= hi)

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        clients = [redis.Redis(port=n.port, decode_responses=True) for n in self.nodes]
        try:
            for i, (client, (lo, hi)) in enumerate(zip(clients, self.slots, strict=True)):
                client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)
            for node in self.nodes[1:]:
                clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", node.port,
                                           node.args[node.args.index("--cluster-port") + 1])
            self.wait_ok(clients)
        finally:
            for client in clients:
                client.close()

    def wait_ok(self, clients: Sequence[redis.Redis] | None = None, timeout_s: float = 20) -> None:
        """Until every node sees every node and all slots assigned, with state ok."""
        own = clients is None
        clients = clients or [redis.Redis(port=n.port, decode_responses=True) for n in self.nodes]
        want = {"cluster_state": "ok", "cluster_slots_assigned": "16384",
                "cluster_slots_ok": "16384", "cluster_known_nodes": str(len(self.nodes))}
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                infos = [dict(line.split(":", 1) for line in
                              client.execute_command("CLUSTER", "INFO").split())
                         for client in clients]
                if all(want.items() <= info.items() for info in infos):
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the cluster did not form within {timeout_s} s: {infos}")
                time.sleep(0.05)
        finally:
            if own:
                for client in clients:
                    client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


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


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    cluster = RedisClusterServers(redis_binary(), tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def own_redis_cluster(tmp_path: Path) -> Iterator[RedisClusterServers]:
    """A cluster of the test's own, whose masters the test may stop and start."""
    cluster = RedisClusterServers(redis_binary(), tmp_path / "redis-cluster")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


StoreFactory = Callable[..., tuple[FeatureStore, StoreConfig]]


@pytest.fixture(params=["embedded", "redis", "redis_cluster"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """``make_store(max_events=...)`` -> (a fresh store of the parametrised backend, its config)."""
    backend = request.param
    opened: list[FeatureStore] = []
    base = StoreConfig(backend=backend, path=str(tmp_path / "store.sqlite"))
    if backend in ("redis", "redis_cluster"):
        server: RedisServer | RedisClusterServers = request.getfixturevalue(
            "redis_server" if backend == "redis" else "redis_cluster")
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
