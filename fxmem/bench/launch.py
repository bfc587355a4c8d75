"""Run a matrix: each configuration in a fresh ``python -m fxmem.bench.runner`` process.

A child that crashes, hangs past its timeout or prints no row still yields a row, with an ``error``. With
``jobs > 1`` several children compile at once and take turns, through a lock file, for the timed steps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fxmem.bench.matrix import BenchConfig
from fxmem.bench.runner import empty_row

__all__ = ["resolve_spec", "run_matrix"]

_REPO = Path(__file__).resolve().parents[2]
_MIN_START_S = 20.0  # don't start a configuration with less time than this left in the budget
_LIVE: set[subprocess.Popen[str]] = set()  # children running now: ended with the parent, whatever ends it


def resolve_spec(spec: str) -> str:
    """``FILE.py:FACTORY`` with FILE made absolute; a path that is not found from the working directory
    is tried from fxmem's source tree, so ``models/gpt.py:tiny`` works from anywhere in a checkout."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise ValueError(f"expected FILE.py:FACTORY, e.g. models/gpt.py:tiny, got {spec!r}")
    for candidate in (Path(path), _REPO / path):
        if candidate.is_file():
            return f"{candidate.resolve()}:{name}"
    raise ValueError(f"{spec!r}: no such file {path!r}")


def _child_env(cold: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    if cold:  # compile_s then times a compile, not a cache hit
        env["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
    # The child must import this fxmem, installed or not.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _run_one(
    spec: str,
    config: BenchConfig,
    timeout: float,
    args: list[str],
    log: Callable[[str], None] | None,
    env: dict[str, str],
    cut: bool = False,
) -> dict[str, Any]:
    command = [sys.executable, "-m", "fxmem.bench.runner", "--spec", spec, "--label", config.label]
    command += ["--config", json.dumps(config.as_dict()), *args]
    row = empty_row(config.as_dict(), config.label)
    started = time.perf_counter()
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # so a timeout can end the child's compile workers too
    )
    _LIVE.add(process)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(process)
        out, err = process.communicate()
        row["error"] = f"timed out after {timeout:.0f} s" + (" (the matrix's time budget ran out)" if cut else "")
        row["wall_s"] = time.perf_counter() - started
        if log and err:
            log(_tail(err))
        return row
    finally:
        _LIVE.discard(process)
    row["wall_s"] = time.perf_counter() - started
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        reason = f"exit status {process.returncode}" if process.returncode else "no row printed"
        row["error"] = f"the benchmark process failed ({reason}): {_tail(err, 3) or '(no output)'}"
        if log and err:
            log(_tail(err))
        return row
    result = json.loads(lines[-1])
    result["wall_s"] = row["wall_s"]
    if log and result.get("error") and err:
        log(_tail(err))
    return result


def _kill(process: subprocess.Popen[str]) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_matrix(
    spec: str,
    configs: Sequence[BenchConfig],
    *,
    steps: int = 20,
    warmup: int = 3,
    device: str = "cpu",
    dtype: str = "float32",
    timeout: float = 600.0,
    time_budget: float | None = None,
    jobs: int = 1,
    threads: int | None = None,
    cold: bool = False,
    trace: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per configuration, in the order given. Rows marked ``skipped`` (checkpointing a model
    without blocks) are left out. ``time_budget`` (seconds, whole matrix) stops starting configurations
    once spent and cuts the timeouts of running ones to it. ``cold`` disables Inductor's caches.
    ``trace``: a folder for each CUDA row's allocation trace (``fxmem.bench.trace``)."""
    spec = resolve_spec(spec)
    env = _child_env(cold)
    deadline = None if time_budget is None else time.monotonic() + time_budget
    with tempfile.TemporaryDirectory(prefix="fxmem-bench-") as tmp:
        args = ["--steps", str(steps), "--warmup", str(warmup), "--device", device, "--dtype", dtype]
        if threads:
            args += ["--threads", str(threads)]
        if trace:
            args += ["--trace", str(Path(trace).resolve())]
        if jobs > 1:
            args += ["--lock", str(Path(tmp) / "timing.lock")]
        total = len(configs)

        stopping = threading.Event()

        def work(index: int, config: BenchConfig) -> dict[str, Any]:
            if stopping.is_set():
                return empty_row(config.as_dict(), config.label)
            limit, cut = timeout, False
            if deadline is not None:
                left = deadline - time.monotonic()
                if left < _MIN_START_S:
                    row = empty_row(config.as_dict(), config.label)
                    row["error"] = f"not run: the time budget of {time_budget:.0f} s was spent"
                    return row
                limit, cut = min(limit, left), left < limit
            if progress:
                progress(f"[{index + 1}/{total}] {config.system} {config.label} ...")
            row = _run_one(spec, config, limit, args, progress, env, cut)
            if progress:
                progress(f"[{index + 1}/{total}] {config.system} {config.label}: {_outcome(row)}")
            return row

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            try:
                rows = list(pool.map(work, range(total), configs))
            except BaseException:  # Ctrl-C or SIGTERM: the children run in sessions of their own
                stopping.set()
                pool.shutdown(wait=False, cancel_futures=True)
                for process in list(_LIVE):
                    _kill(process)
                raise
    return [r for r in rows if not r.get("skipped")]


def _outcome(row: dict[str, Any]) -> str:
    if row.get("skipped"):
        return f"skipped ({row['skipped']})"
    if row.get("error"):
        return f"error: {row['error'].splitlines()[0][:200]}"
    return f"{row['step_ms']:.2f} ms/step, first step {row['compile_s']:.1f} s"
