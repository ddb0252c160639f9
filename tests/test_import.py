"""The package imports no array framework, and the main example runs end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "compare_projections.py"

HEAVY = ("torch", "jax", "cupy", "array_api_strict", "scipy", "hypothesis")


def test_import_pulls_in_no_framework():
    code = (
        f"import sys, tr_projections\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    loaded = proc.stdout.strip()
    assert loaded == "", f"`import tr_projections` imported {loaded}"


@pytest.mark.skipif(not EXAMPLE.exists(), reason="examples/ is not part of this checkout")
def test_compare_projections_example_runs():
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    table = [line.split() for line in proc.stdout.splitlines()]
    methods = {row[1] for row in table if len(row) > 2 and row[0] == "numpy"}
    assert {"kl", "frobenius", "wasserstein"} <= methods, proc.stdout
