"""The JSON form of a plan (``schema_version`` 1): plain dicts, lists, strings and numbers only.

{"graphs": [{"graph_id", "tensors": [{"name", "op", "kind", "shape", "dtype", "bytes", "bytes_formula",
             "decision", "format", "bits", "stored_bytes", "est_time_s", "reason", "inputs",
             "alternatives"}],
             "predicted_saved_bytes", "predicted_peak_bytes", "reference_saved_bytes", "budget_bytes",
             "estimated_overhead", "estimated_step_s", "device_profile", "fallback_reason",
             "passes": [{"name", "seconds", "summary"}], "options": {...}}],
 "fxmem_version": "...", "schema_version": 1}
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from fxmem.inspection.text import row_bits, shape_value
from fxmem.report import GraphReport, TensorRow

SCHEMA_VERSION = 1
TENSOR_KEYS = (
    "name", "op", "kind", "shape", "dtype", "bytes", "bytes_formula", "decision", "format", "bits",
    "stored_bytes", "est_time_s", "reason", "inputs", "alternatives",
)  # fmt: skip
GRAPH_KEYS = (
    "graph_id", "tensors", "predicted_saved_bytes", "predicted_peak_bytes", "reference_saved_bytes",
    "budget_bytes", "estimated_overhead", "estimated_step_s", "device_profile", "fallback_reason", "passes",
    "options",
)  # fmt: skip


def jsonable(value: Any) -> Any:
    """``value`` with tuples as lists, dtypes and sympy expressions as strings, non-finite floats as None."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, numbers.Integral) or getattr(value, "is_Integer", False):  # sympy integers too
        return int(value)
    if isinstance(value, numbers.Real) and not getattr(value, "free_symbols", None):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    return str(value)


def tensor_dict(row: TensorRow) -> dict[str, Any]:
    return {
        "name": row.name,
        "op": row.op,
        "kind": row.kind,
        "shape": [shape_value(d) for d in row.shape],
        "dtype": row.dtype,
        "bytes": jsonable(row.bytes),
        "bytes_formula": row.bytes_formula,
        "decision": row.decision,
        "format": row.fmt,
        "bits": row_bits(row),
        "stored_bytes": jsonable(row.stored_bytes),
        "est_time_s": jsonable(float(row.est_time_s)),
        "reason": row.reason,
        "inputs": list(getattr(row, "inputs", ())),
        "alternatives": {
            choice: {"stored_bytes": jsonable(held), "est_time_s": jsonable(float(added))}
            for choice, (held, added) in getattr(row, "alternatives", {}).items()
        },
    }


def graph_dict(graph: GraphReport) -> dict[str, Any]:
    return {
        "graph_id": graph.graph_id,
        "tensors": [tensor_dict(row) for row in graph.rows],
        "predicted_saved_bytes": jsonable(graph.predicted_saved_bytes),
        "predicted_peak_bytes": jsonable(getattr(graph, "predicted_peak_bytes", None)),
        "reference_saved_bytes": jsonable(graph.reference_saved_bytes),
        "budget_bytes": jsonable(graph.budget_bytes),
        "estimated_overhead": jsonable(graph.estimated_overhead),
        "estimated_step_s": jsonable(graph.estimated_step_s),
        "device_profile": graph.device_profile,
        "fallback_reason": graph.fallback_reason,
        "passes": [{"name": p.name, "seconds": jsonable(p.seconds), "summary": p.summary} for p in graph.passes],
        "options": jsonable(graph.options),
    }


def report_dict(graphs: Iterable[GraphReport]) -> dict[str, Any]:
    from fxmem import __version__

    return {
        "graphs": [graph_dict(g) for g in graphs],
        "fxmem_version": __version__,
        "schema_version": SCHEMA_VERSION,
    }
