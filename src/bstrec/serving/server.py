"""Running the service: ``serve`` (blocking, ``bstrec serve``) and ``BackgroundServer`` (a real
uvicorn server in a thread, on a loopback port: the quickstart and the service tests)."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from types import TracebackType

import uvicorn
from fastapi import FastAPI
from pydantic import SecretStr
from uvicorn.supervisors import Multiprocess

from bstrec.serving.settings import Settings


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


# Where ``serve`` hands the settings to its worker processes (no BSTREC_ prefix: not a setting)
WORKER_SETTINGS_ENV = "_BSTREC_WORKER_SETTINGS"


def serve(settings: Settings, *, log_level: str = "info") -> None:
    """Load the bundle, open and seed the store, serve until interrupted; with
    ``settings.workers`` > 1, in that many uvicorn worker processes."""
    import torch

    from bstrec.serving.app import Service, create_app

    torch.set_num_threads(settings.torch_threads)
    if settings.workers == 1:
        app = create_app(settings)
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level,
                    access_log=False)
        return
    # Several processes: uvicorn imports the app factory in each worker, so the settings travel
    # in the environment; the store is seeded once, here, rather than by every worker at once.
    service = Service(settings)
    try:
        service.seed()
    finally:
        service.close()
    os.environ[WORKER_SETTINGS_ENV] = settings_json(
        settings.model_copy(update={"seed_items": False, "seed_events": None}))
    config = uvicorn.Config("bstrec.serving.server:worker_app", factory=True,
                            workers=settings.workers, host=settings.host, port=settings.port,
                            log_level=log_level, access_log=False)
    # Our own listening socket, not uvicorn's (Config.bind_socket): that one has protocol 0,
    # which the workers' connections inherit, and asyncio sets TCP_NODELAY only on IPPROTO_TCP
    # sockets; every response then waited for Nagle and a delayed ACK (seen as a fixed delay
    # per request on loopback in benchmarks/bench_serving.py).
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((settings.host, settings.port))
        sock.set_inheritable(True)
        logging.getLogger("uvicorn.error").info(
            "Uvicorn running on http://%s:%d with %d workers", settings.host,
            sock.getsockname()[1], settings.workers)
        Multiprocess(config, sockets=[sock]).run()
    finally:
        sock.close()


def settings_json(settings: Settings) -> str:
    """``settings`` as JSON, the keys included (pydantic masks secrets when it dumps)."""
    data = settings.model_dump(mode="json")
    for name, value in settings:
        if isinstance(value, SecretStr):
            data[name] = value.get_secret_value()
    return json.dumps(data)


def worker_app() -> FastAPI:
    """The app of one worker process of ``serve`` (uvicorn calls it in each worker)."""
    import torch

    from bstrec.serving.app import create_app

    # model_validate_json reads these values only, not the environment's BSTREC_* variables
    settings = Settings.model_validate_json(os.environ[WORKER_SETTINGS_ENV])
    torch.set_num_threads(settings.torch_threads)
    return create_app(settings)


class BackgroundServer:
    """``with BackgroundServer(app) as srv: httpx.get(srv.url + "/healthz")``."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int | None = None,
                 log_level: str = "warning") -> None:
        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(uvicorn.Config(app, host=self.host, port=self.port,
                                                    log_level=log_level, access_log=False))
        self.thread = threading.Thread(target=self.server.run, name="bstrec-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
