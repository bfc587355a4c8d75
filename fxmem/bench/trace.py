"""Allocation traces: what a CUDA step allocated, next to what fxmem's simulator predicted for it.

``python -m fxmem.bench.runner ... --trace DIR`` (and ``python -m fxmem.bench.sweep ... --trace DIR``)
writes one JSON file per configuration: the caching allocator's events over the measured step, each
allocation with the line of code that made it; the source of the generated modules those lines are in
(Inductor's output code); each graph's predicted timeline; and the forward and backward graphs fxmem
simulated, as tables that ``load_simulation`` turns back into graphs (with fake values), so that
the simulator's fused model can be checked and changed against what Inductor's code really allocated on
a GPU, on any machine.
"""

from __future__ import annotations

import contextlib
import json
import operator
import os
import re
import sys
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["load_simulation", "ran_simulation", "recorded_simulations", "trace_path", "write_trace"]

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
    simulations: Sequence[dict[str, Any]] = (),
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
    peaks = [s["peak_bytes"] for s in simulations]
    graphs = [
        {
            "graph_id": r.graph_id,
            "predicted_peak_bytes": r.predicted_peak_bytes,
            "static_bytes": r.timeline.static_bytes,
            "points": r.timeline.points,
            # the simulation of the plan it chose: the last one with its peak (None if not recorded)
            "simulation": max((i for i, p in enumerate(peaks) if p == r.timeline.peak_bytes), default=None),
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
        "simulations": list(simulations),  # from recorded_simulations
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(trace))


@contextlib.contextmanager
def recorded_simulations(sink: list[dict[str, Any]]) -> Iterator[None]:
    """Append to ``sink`` every plan fxmem's partitioner simulates inside the block: its forward and
    backward as tables (``load_simulation`` reads them back), the simulation's arguments and peak."""
    from fxmem import partitioner

    simulate = partitioner.simulate

    def recording(fw: Any, bw: Any, num_fwd_outputs: int, static: Any, **kwargs: Any) -> Any:
        static = list(static)
        timeline = simulate(fw, bw, num_fwd_outputs, static, **kwargs)
        storages: dict[Any, int] = {}
        sink.append({
            "forward": _graph_table(fw, storages), "backward": _graph_table(bw, storages),
            "static": sorted({_storage_id(v, storages) for v in static if _is_tensor(v)}),
            "num_fwd_outputs": num_fwd_outputs, "peak_bytes": timeline.peak_bytes, **kwargs,
        })  # fmt: skip
        return timeline

    partitioner.simulate = recording
    try:
        yield
    finally:
        partitioner.simulate = simulate


def ran_simulation(trace: dict[str, Any]) -> dict[str, Any] | None:
    """The recorded simulation of the plan a one-graph trace's step ran (``load_simulation`` reads it),
    or ``None`` if it was not recorded."""
    index = trace["graphs"][0].get("simulation")
    return None if index is None else trace["simulations"][index]


def load_simulation(recorded: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """``(forward, backward, keyword arguments)`` for ``fxmem.simulate.simulate`` from a recorded plan."""
    bases: dict[int, Any] = {}
    fw, fw_vals = _graph_from_table(recorded["forward"], bases)
    bw, _ = _graph_from_table(recorded["backward"], bases)
    static_ids = set(recorded["static"])
    static = [val for storage, val in fw_vals if storage in static_ids]
    kwargs = {k: recorded[k] for k in ("fused", "outside_bytes") if k in recorded}
    return fw, bw, {"num_fwd_outputs": recorded["num_fwd_outputs"], "static": static, **kwargs}


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def _storage_id(val: Any, storages: dict[Any, int]) -> int:
    from fxmem.memory import storage_key

    return storages.setdefault(storage_key(val), len(storages))


def _graph_table(gm: Any, storages: dict[Any, int]) -> list[list[Any]]:
    """One row per node: name, op, target, its arguments and keyword arguments (``_encode``), fxmem's kind,
    and the value (a tensor's sizes, strides, offset, dtype, device and storage, or None)."""
    from fxmem.memory import storage_bytes

    rows = []
    for node in gm.graph.nodes:
        val, value = node.meta.get("val"), None
        if _is_tensor(val):
            shape, stride = [int(s) for s in val.shape], [int(s) for s in val.stride()]
            value = [shape, stride, int(val.storage_offset()), str(val.dtype), val.device.type,
                     _storage_id(val, storages), storage_bytes(val)]  # fmt: skip
        kind = getattr(node.meta.get("fxmem"), "kind", None)
        rows.append([node.name, node.op, str(node.target), _encode(node.args), _encode(node.kwargs), kind, value])
    return rows


def _encode(value: Any) -> Any:
    """An argument as JSON: a node as ``{"node": name}``, a dtype, device, layout or memory format by name,
    a size by its traced value, containers item by item."""
    import torch
    import torch.fx as fx

    from fxmem._compat import hint

    if isinstance(value, fx.Node):
        return {"node": value.name}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {"dict": {k: _encode(v) for k, v in value.items()}}
    if isinstance(value, torch.SymInt):
        return hint(value)
    if isinstance(value, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return {type(value).__name__: str(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return {"repr": repr(value)}


def _decode(value: Any, nodes: dict[str, Any]) -> Any:
    import torch

    if isinstance(value, list):
        return tuple(_decode(v, nodes) for v in value)
    if not isinstance(value, dict):
        return value
    ((tag, item),) = value.items()
    if tag == "node":
        return nodes[item]
    if tag == "dict":
        return {k: _decode(v, nodes) for k, v in item.items()}
    if tag == "device":
        return torch.device(item)
    if tag in ("dtype", "layout", "memory_format"):
        return getattr(torch, item.removeprefix("torch."))
    return item  # a value JSON cannot hold, as its repr


def _target(name: str) -> Any:
    import torch

    if name == str(operator.getitem):
        return operator.getitem
    found: Any = torch.ops
    for part in name.split("."):
        found = getattr(found, part, None)
        if found is None:
            return _unknown_op
    return found


def _unknown_op(*args: Any) -> None:
    """Stands for an op the loading torch does not have (fxmem classes it ``other``)."""


def _graph_from_table(rows: list[list[Any]], bases: dict[int, Any]) -> tuple[Any, list[tuple[int, Any]]]:
    """The graph of a table, and its tensor values with their storages' ids."""
    import torch
    import torch.fx as fx

    from fxmem._compat import FakeTensorMode

    graph, nodes, vals, mode = fx.Graph(), {}, [], FakeTensorMode()
    for name, op, target, args, kwargs, kind, value in rows:
        args, kwargs = _decode(args, nodes), _decode(kwargs, nodes)
        if op == "output":
            graph.output(*args)
            break
        if op == "placeholder":
            node = graph.placeholder(name)
        else:
            node = graph.create_node(op, _target(target), args, kwargs, name=name)
        if kind is not None:
            node.meta["fxmem"] = types.SimpleNamespace(kind=kind)
        if value is not None:
            shape, stride, offset, dtype, device, storage, nbytes = value
            with mode:  # fake tensors: on the device recorded, with no memory behind them
                if storage not in bases:
                    bases[storage] = torch.empty(nbytes, dtype=torch.uint8, device=device).untyped_storage()
                empty = torch.empty(0, dtype=getattr(torch, dtype.removeprefix("torch.")), device=device)
                node.meta["val"] = empty.set_(bases[storage], offset, shape, stride)
            vals.append((storage, node.meta["val"]))
        nodes[name] = node
    return fx.GraphModule(torch.nn.Module(), graph), vals
