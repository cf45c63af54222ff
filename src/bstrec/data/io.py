"""File helpers shared by every writer: nothing half-written is ever left behind."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` in one rename.

    On an exception the temporary directory is removed and ``path`` is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        # Move the old one aside first: rename cannot replace a non-empty directory.
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling file path; on success it is renamed onto ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_described_dir(root: Path, meta_name: str, *, what: str, format_version: int,
                       required: tuple[str, ...], hashes_key: str, verify: bool,
                       error: type[Exception]) -> dict[str, Any]:
    """The JSON object ``root/meta_name`` of a self-describing folder (checkpoint, bundle), after
    checking that it exists, parses, has ``format_version`` and the ``required`` keys and, with
    ``verify``, that every file it lists under ``hashes_key`` is there with that sha256.
    Every failure raises ``error`` naming the folder or file and what is wrong."""
    meta_path = root / meta_name
    if not root.is_dir():
        raise error(f"{root} is not a {what} directory (it does not exist)")
    if not meta_path.exists():
        raise error(f"{root} is not a {what}: {meta_name} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{meta_path} is corrupted: {exc}") from None
    if not isinstance(meta, dict):
        raise error(f"{meta_path} is corrupted: expected a JSON object")
    version = meta.get("format_version")
    if version != format_version:
        raise error(f"{root}: {what} format version {version!r} is not supported (this bstrec "
                    f"reads version {format_version})")
    for key in required:
        if key not in meta:
            raise error(f"{meta_path} is corrupted: no {key!r}")
    if verify:
        for name, digest in meta[hashes_key].items():
            file = root / name
            if not file.is_file():
                raise error(f"{root} is incomplete: {name} is missing")
            if sha256_file(file) != digest:
                raise error(f"{file} is corrupted: its sha256 does not match the one recorded "
                            f"in {meta_name}")
    return meta
