"""The MovieLens downloader against a real HTTP server on 127.0.0.1 serving a zip built here."""

from __future__ import annotations

import hashlib
import threading
import zipfile
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from bstrec.data.download import OFFICIAL_MD5, ChecksumError, download_movielens
from bstrec.data.loaders import available
from bstrec.data.movielens import load_ml100k


class Served:
    """What the test server serves, and how many requests it answered."""

    def __init__(self, root: Path, url: str) -> None:
        self.root = root
        self.url = url
        self.requests: list[str] = []


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Served]:
    root = tmp_path / "www"
    root.mkdir()
    served: Served

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            served.requests.append(self.path)
            super().do_GET()

        def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    served = Served(root, f"http://127.0.0.1:{httpd.server_address[1]}/datasets/")
    (root / "datasets").mkdir()
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield served
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def ml100k_zip(server: Served, writers: Any, tmp_path: Path) -> str:
    """Build ml-100k.zip (files under ml-100k/, like the official one); return its MD5."""
    src = writers.ml100k(tmp_path / "src" / "ml-100k")
    archive = server.root / "datasets" / "ml-100k.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ml-100k/", "")
        for f in sorted(src.iterdir()):
            zf.write(f, f"ml-100k/{f.name}")
    return hashlib.md5(archive.read_bytes()).hexdigest()


def test_download_verifies_and_extracts(server: Served, writers: Any, tmp_path: Path) -> None:
    md5 = ml100k_zip(server, writers, tmp_path)
    data_dir = tmp_path / "data"
    out = download_movielens("ml-100k", data_dir, base_url=server.url, expected_md5=md5,
                             progress=False)
    assert out == data_dir / "ml-100k"
    assert sorted(p.name for p in out.iterdir()) == ["u.data", "u.genre", "u.item", "u.user"]
    assert load_ml100k(out).events.height == 4
    assert available("ml-100k", data_dir)
    assert [p.name for p in data_dir.iterdir()] == ["ml-100k"]  # no temporary left over
    assert server.requests == ["/datasets/ml-100k.zip"]

    # Present: no second download, unless forced.
    download_movielens("ml-100k", data_dir, base_url=server.url, expected_md5=md5,
                       progress=False)
    assert len(server.requests) == 1
    download_movielens("ml-100k", data_dir, base_url=server.url, expected_md5=md5,
                       progress=True, force=True)
    assert len(server.requests) == 2
    assert load_ml100k(out).events.height == 4


def test_checksum_mismatch_leaves_nothing(server: Served, writers: Any, tmp_path: Path) -> None:
    ml100k_zip(server, writers, tmp_path)
    data_dir = tmp_path / "data"
    with pytest.raises(ChecksumError) as err:
        download_movielens("ml-100k", data_dir, base_url=server.url, expected_md5="0" * 32,
                           progress=False)
    assert "does not match the expected 00000000" in str(err.value)
    assert "nothing was written" in str(err.value)
    assert not data_dir.exists()


def test_default_checksum_is_the_official_one(server: Served, writers: Any,
                                              tmp_path: Path) -> None:
    ml100k_zip(server, writers, tmp_path)  # not the official archive: must be refused
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with pytest.raises(ChecksumError, match=OFFICIAL_MD5["ml-100k"]):
        download_movielens("ml-100k", data_dir, base_url=server.url, progress=False)
    assert list(data_dir.iterdir()) == []


def test_archive_without_the_dataset_files_leaves_nothing(server: Served,
                                                          tmp_path: Path) -> None:
    archive = server.root / "datasets" / "ml-1m.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ml-1m/README", "nothing here")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    data_dir = tmp_path / "data"
    with pytest.raises(ValueError, match="does not hold the ml-1m files"):
        download_movielens("ml-1m", data_dir, base_url=server.url, expected_md5=md5,
                           progress=False)
    assert list(data_dir.iterdir()) == []


def test_unsafe_member_is_refused(server: Served, tmp_path: Path) -> None:
    archive = server.root / "datasets" / "ml-1m.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ml-1m/../../evil.txt", "x")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="unsafe member path"):
        download_movielens("ml-1m", tmp_path / "data", base_url=server.url, expected_md5=md5,
                           progress=False)
    assert not (tmp_path / "evil.txt").exists()


def test_http_error_and_unknown_name(server: Served, tmp_path: Path) -> None:
    import urllib.error

    with pytest.raises(urllib.error.HTTPError):
        download_movielens("ml-1m", tmp_path / "data", base_url=server.url, progress=False)
    assert not (tmp_path / "data").exists()
    with pytest.raises(ValueError, match="unknown MovieLens dataset"):
        download_movielens("ml-20m", tmp_path / "data")  # type: ignore[arg-type]
