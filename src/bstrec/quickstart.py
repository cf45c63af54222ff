"""The quickstart job: real data when the data directory holds it, synthetic data otherwise."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from rich.console import Console

from bstrec.data.build import build
from bstrec.data.loaders import available, resolve_data_dir
from bstrec.data.report import manifest_markdown, print_manifest

# Preference order: the BST setting first, then the complete smaller log, then synthetic data.
PREFERENCE = ("ml-1m", "ml-100k")


def choose_dataset(data_dir: Path | None) -> str:
    for name in PREFERENCE:
        if data_dir is not None and available(name, data_dir):
            return name
    return "synthetic-order"


def run_quickstart(
    data_dir: Path | None,
    out: Path,
    console: Console,
    stages: Callable[[str], AbstractContextManager[Callable[[str], None]]],
) -> Path:
    """Build samples, write a short report, print where everything is. Returns the report path."""
    start = time.perf_counter()
    data_dir = resolve_data_dir(data_dir)
    name = choose_dataset(data_dir)
    where = f"from {data_dir}" if name != "synthetic-order" else "(no real dataset found: synthetic)"
    console.print(f"[bold]quickstart[/bold] on {name} {where}")
    samples_dir = out / "samples"
    with stages(f"building {name} samples") as progress:
        samples = build(name, samples_dir, data_dir=data_dir, progress=progress)
    report = out / "report.md"
    report.write_text(f"# bstrec quickstart: {name}\n\n## Samples\n\n"
                      + manifest_markdown(samples.manifest))
    print_manifest(console, samples.manifest, samples_dir)
    console.print(f"artifacts: [bold]{out.resolve()}[/bold]")
    console.print(f"report:    [bold]{report.resolve()}[/bold]")
    console.print(f"quickstart finished in {time.perf_counter() - start:.1f} s")
    return report
