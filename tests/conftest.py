"""Shared fixtures. Real datasets come from $BSTREC_DATA_DIR, else ../shared/data beside the repo."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the service tests' session bundle and stores, shared with the monitoring tests
pytest_plugins = ["tests.serving.fixtures"]
# Debian package -> node ids of the tests skipped for want of it, for the summary's last line.
_MISSING_PROGRAMS: dict[str, set[str]] = {}
_SKIP_MARK = "not found on PATH: install it (Debian: apt-get install "


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def system_program(package: str, *names: str) -> str:
    """The path of a program from Debian package ``package`` (the first of ``names`` found on
    PATH or in /usr/bin, /usr/sbin), or skip the test; under CI=true, fail instead, since
    .ci/system-deps installs it there."""
    for name in names:
        found = shutil.which(name) or next(
            (p for p in (f"/usr/bin/{name}", f"/usr/sbin/{name}") if Path(p).exists()), None)
        if found is not None:
            return found
    msg = f"{names[0]} {_SKIP_MARK}{package})"
    if in_ci():
        pytest.fail(msg + "; CI must have it (.ci/system-deps installs it)")
    pytest.skip(msg)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and isinstance(report.longrepr, tuple) and _SKIP_MARK in report.longrepr[2]:
        package = report.longrepr[2].split(_SKIP_MARK, 1)[1].split(")", 1)[0]
        _MISSING_PROGRAMS.setdefault(package, set()).add(report.nodeid)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> Iterator[None]:
    """One closing line, after pytest's short summary, naming what was skipped for want of a
    system program and the command that installs it (``make test`` runs that itself when it
    is root on Debian)."""
    yield
    if not _MISSING_PROGRAMS:
        return
    count = sum(len(ids) for ids in _MISSING_PROGRAMS.values())
    packages = " ".join(sorted(_MISSING_PROGRAMS))
    terminalreporter.write_line(
        f"{count} tests skipped for want of {packages}: install with `sudo apt-get install -y "
        f"--no-install-recommends {packages}` (or `sudo bash .ci/system-deps`), then rerun "
        "`make test`", yellow=True, bold=True)


def data_root() -> Path:
    env = os.environ.get("BSTREC_DATA_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data_root() -> Path:
    return data_root()


def require(name: str, *files: str) -> Path:
    """The folder of dataset ``name``, or skip the test saying what is missing and where."""
    folder = data_root() / name
    missing = [f for f in files if not any(folder.glob(f))]
    if not folder.is_dir() or missing:
        pytest.skip(f"{name} not found in {data_root()} (missing {missing or [name + '/']}; "
                    "set BSTREC_DATA_DIR to a folder holding it)")
    return folder
