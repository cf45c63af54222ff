"""How sample statistics (a manifest) are shown: a rich table on the terminal, Markdown in reports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _rows(m: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    return [(s, f"{n:,}", f"{m['positive_rate'][s]:.4f}", f"{m['empty_history'][s]:,}")
            for s, n in m["splits"].items()]


def _vocab_line(m: dict[str, Any]) -> str:
    return "train vocabularies: " + ", ".join(f"{k} {v:,}" for k, v in m["vocab_sizes"].items())


def print_manifest(console: Console, m: dict[str, Any], path: Path) -> None:
    table = Table(title=f"{m['protocol']} samples ({m['dataset']})")
    table.add_column("split")
    for col in ("samples", "positive rate", "empty history"):
        table.add_column(col, justify="right")
    for row in _rows(m):
        table.add_row(*row)
    console.print(table)
    console.print(f"t80 = {m['t80']}, t90 = {m['t90']}")
    console.print(_vocab_line(m))
    console.print(f"config hash {m['config_hash']}; written to [bold]{path}[/bold]")


def manifest_markdown(m: dict[str, Any]) -> str:
    lines = [
        f"Protocol `{m['protocol']}` on `{m['dataset']}`, config hash `{m['config_hash']}`, "
        f"built {m['created']}.",
        "",
        "| split | samples | positive rate | empty history |",
        "|---|---:|---:|---:|",
        *(f"| {' | '.join(r)} |" for r in _rows(m)),
        "",
        f"t80 = {m['t80']}, t90 = {m['t90']}.",
        "",
        _vocab_line(m).capitalize() + ".",
        "",
    ]
    return "\n".join(lines)
