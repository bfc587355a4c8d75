"""Tests for the ``fxmem`` command line: ``python -m fxmem inspect FILE.py:FACTORY ...``."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from fxmem.__main__ import build_parser, main, parse_budget, progress

ROOT = Path(__file__).resolve().parent.parent
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None

CUSTOM_FACTORY = '''
"""A model the repository has never seen, as a user would write it."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class TwoTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.left = nn.Linear(24, 48)
        self.right = nn.Linear(24, 48)
        self.head = nn.Linear(48, 5)

    def forward(self, x, y):
        h = torch.tanh(self.left(x)) * torch.sigmoid(self.right(x))  # (B, 48)
        return F.cross_entropy(self.head(h), y)


def make_model():
    torch.manual_seed(0)
    return TwoTower(), (torch.randn(32, 24), torch.randint(0, 5, (32,)))
'''


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fxmem", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_inspect_gpt_end_to_end(tmp_path):
    json_path, png_path, dot_path = tmp_path / "plan.json", tmp_path / "x.png", tmp_path / "x.dot"
    plot = ["--plot", str(png_path)] if HAVE_MATPLOTLIB else []
    args = ["inspect", "models/gpt.py:tiny", "--budget", "0.4", "--json", str(json_path), "--dot", str(dot_path)]
    result = _run(*args, *plot, env={"FXMEM_LOG": "debug"})
    assert result.returncode == 0, result.stderr
    data = json.loads(json_path.read_text())
    (graph,) = data["graphs"]
    assert graph["options"]["memory_budget"] == 0.4
    shown = [t["name"] for t in graph["tensors"] if t["kind"] != "param"]
    assert shown and all(name in result.stdout for name in shown)
    assert "decision" in result.stdout and "total over 1 graph" in result.stdout
    assert dot_path.read_text().startswith("digraph fxmem {")
    if HAVE_MATPLOTLIB:
        assert png_path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "DEBUG" in result.stderr  # FXMEM_LOG=debug
    assert "Traceback" not in result.stderr


def test_user_factory_file(tmp_path, capsys):
    path = tmp_path / "my_model.py"
    path.write_text(textwrap.dedent(CUSTOM_FACTORY))
    json_path = tmp_path / "plan.json"
    code = main(["inspect", f"{path}:make_model", "--budget", "0.5", "--quantize", "int8", "--json", str(json_path)])
    out = capsys.readouterr().out
    assert code == 0
    (graph,) = json.loads(json_path.read_text())["graphs"]
    assert graph["options"]["quantize"] == ["int8"] and graph["predicted_saved_bytes"] > 0
    assert all(t["name"] in out for t in graph["tensors"] if t["kind"] != "param")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["inspect", "models/gpt.py"], "expected FILE.py:FACTORY"),
        (["inspect", "no/such/file.py:tiny"], "no such file"),
        (["inspect", "models/gpt.py:no_such_factory"], "no callable 'no_such_factory'; callables there: "),
        (["inspect", "models/gpt.py:tiny", "--budget", "1.5"], "memory_budget"),
        (["inspect", "models/gpt.py:tiny", "--budget", "6 parsecs"], "cannot read '6 parsecs'"),
        (["inspect", "models/gpt.py:tiny", "--quantize", "int3"], "quantize: unknown value 'int3'"),
        (["inspect", "models/gpt.py:tiny", "-o", "nonsense"], "expected KEY=VALUE"),
        (["inspect", "models/gpt.py:tiny", "-o", "colour=blue"], "unknown fxmem option(s) 'colour'"),
        (["inspect", "models/gpt.py:tiny", "--plot", "timeline.pdf"], ".png or .svg"),
    ],
)
def test_bad_options_exit_2(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "inspect" in capsys.readouterr().err


def test_bench_unavailable(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fxmem.bench.cli", None)  # as if fxmem.bench were not installed
    argv = ["bench", "models/gpt.py:tiny", "--steps", "1"]
    assert build_parser().parse_args(argv).handler.__name__ == "unavailable"  # never runs a real benchmark
    assert main(argv) == 2
    assert "bench is unavailable" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text,value", [("0.4", 0.4), ("1", 1), ("123456", 123456), ("6GiB", "6GiB"), (" 1.5GB ", "1.5GB")]
)
def test_parse_budget(text, value):
    assert parse_budget(text) == value and type(parse_budget(text)) is type(value)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_spinner():
    terminal, pipe = _Terminal(), io.StringIO()
    with progress("planning", delay=0.0, stream=terminal):
        time.sleep(0.3)
    with progress("planning", delay=0.0, stream=pipe):
        time.sleep(0.1)
    assert "planning" in terminal.getvalue() and terminal.getvalue().endswith("\r\033[K")
    assert pipe.getvalue() == ""  # not a terminal: no spinner


def test_verbose_turns_on_debug_logging(capsys):
    logger = logging.getLogger("fxmem")
    level, handlers = logger.level, list(logger.handlers)
    try:
        assert main(["inspect", "models/gpt.py", "-v"]) == 2
        assert logger.level == logging.DEBUG
    finally:
        logger.handlers[:] = handlers
        logger.setLevel(level)
    assert "expected FILE.py:FACTORY" in capsys.readouterr().err
