"""Figures in the documents come from the results files: README.md's status table is what
benchmarks/readme_status.py renders from benchmarks/results/rank_*.json, docs/scaling.md's plan
what benchmarks/scaling_plan.py derives from the results files, never a retyped copy."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_readme_status_table_is_rendered_from_the_results_files() -> None:
    proc = subprocess.run([sys.executable, "benchmarks/readme_status.py", "--check"], cwd=REPO,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_scaling_plan_is_rendered_from_the_results_files() -> None:
    proc = subprocess.run([sys.executable, "benchmarks/scaling_plan.py", "--check"], cwd=REPO,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
