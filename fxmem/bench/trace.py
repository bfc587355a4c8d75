"""Allocation traces: what a CUDA step allocated, next to what fxmem's simulator predicted for it.

``python -m fxmem.bench.runner ... --trace DIR`` (and ``python -m fxmem.bench.sweep ... --trace DIR``)
writes one JSON file per configuration: the caching allocator's events over the measured step, each
allocation with the line of code that made it; the source of the generated modules those lines are in
(Inductor's output code); and each graph's predicted timeline. It is how the simulator's fused model is
checked against what Inductor's code really allocates on a GPU.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["trace_path", "write_trace"]

_LIBRARY_DIRS = tuple(
    str(Path(p).resolve()) for p in {sys.prefix, sys.base_prefix, os.path.dirname(os.__file__)}
)  # torch, the standard library and every other installed package live under these
_KEPT_ACTIONS = ("alloc", "free_requested", "free_completed")


def trace_path(directory: str, label: str) -> Path:
    """A file in ``directory`` named after a configuration's label."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_") or "config"
    return Path(directory) / f"{slug}.json"


def _origin(frames: Sequence[dict[str, Any]]) -> tuple[str, int] | None:
    """The innermost frame outside installed packages: for a compiled graph, a line of its generated code."""
    for frame in frames:
        filename = frame.get("filename", "")
        if filename and not str(Path(filename).resolve()).startswith(_LIBRARY_DIRS):
            return filename, int(frame.get("line", 0))
    return None


def write_trace(
    path: Path,
    row: dict[str, Any],
    reports: Sequence[Any],
    events: Sequence[dict[str, Any]],
    allocated_before: int,
    peak_bytes: int,
) -> None:
    """Write the trace of one configuration's measured step to ``path`` (JSON)."""
    kept, sources = [], {}
    for event in events:
        if event.get("action") not in _KEPT_ACTIONS:
            continue
        origin = _origin(event.get("frames") or ())
        kept.append([event["action"], event["addr"], event["size"], *(origin or ("", 0))])
        if origin and origin[0] not in sources and os.path.isfile(origin[0]):
            sources[origin[0]] = Path(origin[0]).read_text()
    graphs = [
        {
            "graph_id": r.graph_id,
            "predicted_peak_bytes": r.predicted_peak_bytes,
            "static_bytes": r.timeline.static_bytes,
            "points": r.timeline.points,
        }
        for r in reports
        if getattr(r, "timeline", None) is not None
    ]
    trace = {
        "label": row.get("label"),
        "options": row.get("options"),
        "peak_bytes": peak_bytes,  # max_memory_allocated over the traced step
        "allocated_before": allocated_before,
        "events": kept,  # [action, addr, size, file, line]
        "sources": sources,
        "graphs": graphs,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(trace))
