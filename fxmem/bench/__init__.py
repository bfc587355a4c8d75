"""The benchmark tool: ``fxmem bench SPEC`` runs eager, eager with per-block checkpointing, torch.compile
(default, activation-memory budgets, the fp8 activation pass) and fxmem (budgets x quantization) on one
model, each configuration in a fresh process, and compares step time against memory.

Stages, one module each: ``matrix`` (which configurations), ``launch`` (a fresh process per
configuration), ``runner`` (one configuration, in that process; ``systems`` sets each system up and
``measure`` counts saved bytes), ``results`` (table and JSON), ``plot`` (the Pareto plot), ``targets``
(the checks against fxmem's targets), ``cli`` (the command). Beside them: ``sweep`` (absolute budgets
against measured peaks), ``trace`` (allocation traces of a CUDA step), ``replay`` (traces against the
simulator's fused model and its variants) and ``kernels`` (a trace against the prediction, kernel by
kernel).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# Lazy, so that ``python -m fxmem.bench.runner`` does not import its own module twice.
_WHERE = {
    "BenchConfig": "matrix",
    "default_configs": "matrix",
    "parse_config": "matrix",
    "parse_configs": "matrix",
    "run_config": "runner",
    "run_matrix": "launch",
    "format_table": "results",
    "load_results": "results",
}

__all__ = [
    # the matrix
    "BenchConfig",
    "default_configs",
    "parse_config",
    "parse_configs",
    # running it
    "run_config",
    "run_matrix",
    # results
    "format_table",
    "load_results",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'fxmem.bench' has no attribute {name!r}")
    return getattr(import_module(f"fxmem.bench.{_WHERE[name]}"), name)
