"""The examples run as the README says: the demo (the README's main job) and the custom-solver example."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_demo_rows_fall_with_the_budget_and_keep_the_loss():
    """Two steps with the eager codegen (the default row compiles with Inductor, as in the README's run):
    every fxmem row holds less than the default, each budget's row at most its share (+ 0.02), and the
    lossless rows end at the default's loss."""
    out = _run("demo.py", "--steps", "2", "--codegen", "eager")
    rows = {
        label.strip(): (int(saved.replace(",", "")), float(loss))
        for label, saved, loss in re.findall(r"^(\S.*?)\s+([\d,]+) bytes\s+\d+%\s+[\d.]+\s+([\d.]+)$", out, re.M)
    }
    assert list(rows) == [
        "torch.compile default",
        "fxmem (no budget: lossless)",
        "fxmem memory_budget=0.15",
        "fxmem memory_budget=0.1 quantize=int8",
    ]
    default, default_loss = rows["torch.compile default"]
    assert rows["fxmem memory_budget=0.15"][0] <= 0.17 * default
    assert rows["fxmem memory_budget=0.1 quantize=int8"][0] <= 0.12 * default
    assert rows["fxmem (no budget: lossless)"][0] < default
    for label in ("fxmem (no budget: lossless)", "fxmem memory_budget=0.15"):
        assert abs(rows[label][1] - default_loss) < 1e-3
    assert "With no budget fxmem recomputes" in out


def test_custom_solver_example_runs():
    out = _run("custom_solver.py")
    assert "int8-g64" in out
