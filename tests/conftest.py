"""Shared fixtures. Real datasets come from $BSTREC_DATA_DIR, else ../shared/data beside the repo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
