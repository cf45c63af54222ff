"""What every benchmark script shares: machine description, results JSON, BENCHMARKS.md sections."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "system": platform.system()}


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def write_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """An exclusive lock across processes: benchmark scripts that finish at the same time
    read-modify-write the same files."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def merge_result(name: str, key: str, value: Any) -> Path:
    """Set ``key`` of ``results/<name>.json`` to ``value``, keeping its other keys: several
    scripts each own one part of a shared results file (``scale.json``)."""
    path = RESULTS / f"{name}.json"
    with _locked(name):
        data = json.loads(path.read_text()) if path.exists() else {}
        data[key] = value
        path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def rendered_block(path: Path, key: str, body: str) -> str:
    """``path``'s text with the block between ``<!-- key:start -->`` and ``<!-- key:end -->``
    replaced by ``body``: figures in prose documents are rendered, never retyped."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    text = path.read_text()
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path} has no {start} ... {end} block")
    return pattern.sub(lambda _: f"{start}\n{body}\n{end}", text)


def write_or_check(path: Path, new: str, check: bool, script: str) -> int:
    """Write ``new`` to ``path``; with ``check``, only compare and return 1 when it differs."""
    if not check:
        path.write_text(new)
        print(f"rewrote {path}")
        return 0
    if new != path.read_text():
        print(f"{path.name} differs from benchmarks/results: run `python {script}`", file=sys.stderr)
        return 1
    return 0


def update_section(key: str, markdown: str) -> None:
    """Replace (or append) the section between ``<!-- key:start -->`` and ``<!-- key:end -->``."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    with _locked("benchmarks_md"):
        text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
        text = pattern.sub(lambda _: block, text) if pattern.search(text) else (
            text.rstrip() + "\n\n" + block + "\n")
        BENCHMARKS_MD.write_text(text)


def rewrite_sections(prefix: str, protocols: list[str],
                     markdown: Callable[[dict[str, Any]], str]) -> None:
    """``--markdown-only`` of the per-protocol benchmarks: rewrite the section ``<prefix>_<p>``
    of each protocol from its results file, running nothing."""
    for protocol in protocols:
        path = RESULTS / f"{prefix}_{protocol}.json"
        if not path.exists():
            continue
        try:
            section = markdown(json.loads(path.read_text()))
        except KeyError as exc:
            print(f"{protocol}: {path} lacks {exc} (an older layout): rerun the benchmark")
            continue
        update_section(f"{prefix}_{protocol}", section)
        print(f"{protocol}: rewrote its BENCHMARKS.md section from {path}")


def timed(fn: Callable[[], Any], reps: int) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` calls after 3 warm-up calls."""
    for _ in range(3):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def ensure_samples(dataset: str, out: Path, data_dir: str) -> Path:
    """``out`` holding ``dataset``'s samples, built (``bstrec data build``) unless already there."""
    if not (out / "manifest.json").exists():
        from bstrec.data.build import build

        build(dataset, out, data_dir=Path(data_dir))
    return out
