"""Download a MovieLens archive from GroupLens, check it, and unpack it atomically.

The archive goes to a temporary file outside ``data_dir``, its MD5 is checked against the
published value, and only then is it unpacked into a temporary sibling of ``data_dir/<name>``
that is renamed into place: a failed or interrupted download never leaves a half-written folder.

Checksums: the MD5 of the official ``ml-1m.zip`` and ``ml-100k.zip`` as published by GroupLens in
``<name>.zip.md5`` next to each archive (the same values are quoted by many independent
projects, e.g. scripts that verify against ``curl -O .../ml-1m.zip.md5``).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import IO, Literal

from bstrec.data.io import atomic_dir
from bstrec.data.movielens import has_movielens

MovieLensName = Literal["ml-1m", "ml-100k"]
BASE_URL = "https://files.grouplens.org/datasets/movielens/"
OFFICIAL_MD5: dict[str, str] = {
    "ml-1m": "c4d9eecfca2ab87c1945afe126590906",
    "ml-100k": "0e33842e24a9c977be4e0107933c0723",
}
_CHUNK = 1 << 16


class ChecksumError(ValueError):
    """The downloaded archive is not the expected one."""


def _fetch(url: str, out: IO[bytes], progress: bool, timeout: float) -> str:
    """Stream ``url`` into ``out``; return the MD5 of what was written."""
    md5 = hashlib.md5()
    with urllib.request.urlopen(url, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        bar = None
        if progress:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TransferSpeedColumn,
            )
            bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                           TransferSpeedColumn(), transient=True)
        task = bar.add_task(url.rsplit("/", 1)[-1], total=total) if bar else None
        try:
            if bar:
                bar.start()
            while chunk := response.read(_CHUNK):
                md5.update(chunk)
                out.write(chunk)
                if bar and task is not None:
                    bar.advance(task, len(chunk))
        finally:
            if bar:
                bar.stop()
    return md5.hexdigest()


def _extract(archive: Path, name: str, dest: Path) -> None:
    """Unpack ``archive`` into ``dest``, dropping its top folder ``<name>/``.

    Refuses members that would land outside ``dest`` (absolute paths, ``..``).
    """
    with zipfile.ZipFile(archive) as zf:
        for member in zf.infolist():
            parts = PurePosixPath(member.filename).parts
            if member.filename.startswith("/") or ".." in parts:
                raise ValueError(f"{archive.name}: unsafe member path {member.filename!r}")
            if parts and parts[0] == name:
                parts = parts[1:]
            if not parts or member.is_dir():
                continue
            target = dest.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst)


def download_movielens(
    name: MovieLensName,
    data_dir: Path,
    *,
    base_url: str = BASE_URL,
    expected_md5: str | None = None,
    progress: bool = True,
    force: bool = False,
    timeout: float = 60.0,
) -> Path:
    """Make ``data_dir/<name>/`` hold MovieLens ``name``; return that folder.

    Nothing is downloaded when the folder already holds the dataset, unless ``force``.
    ``expected_md5`` defaults to the official archive's checksum; a mismatch raises
    ChecksumError and leaves nothing behind.
    """
    if name not in OFFICIAL_MD5:
        raise ValueError(f"unknown MovieLens dataset {name!r}; choose from "
                         f"{', '.join(OFFICIAL_MD5)}")
    target = Path(data_dir) / name
    if not force and target.is_dir() and has_movielens(name, target):
        return target
    expected = (expected_md5 or OFFICIAL_MD5[name]).lower()
    url = base_url.rstrip("/") + f"/{name}.zip"
    with tempfile.TemporaryDirectory(prefix="bstrec-download-") as tmp:
        archive = Path(tmp) / f"{name}.zip"
        with archive.open("wb") as out:
            actual = _fetch(url, out, progress, timeout)
        if actual != expected:
            raise ChecksumError(
                f"{url}: MD5 {actual} does not match the expected {expected}; the download was "
                f"discarded and nothing was written to {target}")
        try:
            with atomic_dir(target) as staging:
                _extract(archive, name, staging)
                if not has_movielens(name, staging):
                    raise ValueError(f"{url}: the archive does not hold the {name} files")
        except zipfile.BadZipFile as err:
            raise ValueError(f"{url}: not a valid zip archive: {err}") from err
    return target
