"""Figures in README.md come from the results files: its status table is what
benchmarks/readme_status.py renders from benchmarks/results/rank_*.json, never a retyped copy."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_readme_status_table_is_rendered_from_the_results_files() -> None:
    proc = subprocess.run([sys.executable, "benchmarks/readme_status.py", "--check"], cwd=REPO,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
