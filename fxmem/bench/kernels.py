"""A traced step kernel by kernel: the bytes the allocator held at each kernel Inductor generated, next to
the bytes the fused walk predicts there.

    python -m fxmem.bench.replay --kernels out/traces/a.json

A peak error (``python -m fxmem.bench.replay``) says how far the simulator is off; this says where. The
generated code names, before each kernel it launches, the graph nodes the kernel computes ("Topologically
Sorted Source Nodes"). A kernel's measured bytes are the most the allocator held while allocating for it
(since the previous kernel), and its predicted bytes the highest point of the fused walk at the nodes it
names. Nodes Inductor names by the user's code (a recomputed forward op is named after the forward's)
match no graph node: such a kernel has no prediction.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["KernelRow", "format_kernel_table", "generated_kernels", "kernel_table"]

_SOURCE_NODES = re.compile(r"#\s*Topologically Sorted Source Nodes: \[(.*?)\]")
# What generated code does between a kernel's comment and its launch: allocate, pick a stream, comment.
_NOT_A_LAUNCH = re.compile(r"^\s*(#|$)|= empty_strided|get_raw_stream\(")
_PHASE = re.compile(r"# AOT ID: \[.*?_(forward|backward|inference)'")


@dataclass(frozen=True)
class KernelRow:
    phase: str
    index: int  # position among its graph's generated kernels
    nodes: tuple[str, ...]  # the graph nodes the generated code says it computes
    measured: int | None  # bytes the allocator held at its allocations; None if it allocated nothing
    predicted: int | None  # the fused walk's highest point at its nodes; None if none is a graph node


def generated_kernels(source: str) -> list[tuple[int, tuple[str, ...]]]:
    """``(line, source nodes)`` of each kernel that generated code's ``call`` launches, in order (lines
    from 1). The kernels' definitions above it carry the same comments."""
    kernels, nodes, calling = [], None, False
    for number, line in enumerate(source.splitlines(), start=1):
        calling = calling or line.lstrip().startswith("def call(")
        found = _SOURCE_NODES.search(line) if calling else None
        if found:
            nodes = tuple(name.strip() for name in found.group(1).split(",") if name.strip())
        elif calling and nodes is not None and not _NOT_A_LAUNCH.search(line):
            kernels.append((number, nodes))
            nodes = None
    return kernels


def _measured_by_kernel(trace: dict[str, Any], filename: str, lines: list[int]) -> dict[int, int]:
    """The most bytes allocated while each kernel's allocations were made, by the kernel's index."""
    live, by_kernel = trace["allocated_before"], {}
    for action, _addr, size, file, line in trace["events"]:
        if action == "alloc":
            live += size
            if file == filename:
                index = bisect.bisect_left(lines, line)
                by_kernel[index] = max(by_kernel.get(index, 0), live)
        elif action == "free_requested":
            live -= size
    return by_kernel


def kernel_table(trace: dict[str, Any]) -> list[KernelRow]:
    """Every generated kernel of a one-graph trace (``fxmem.bench.trace``), forward then backward, with
    what the allocator held there and what fxmem's fused walk predicts for the plan the step ran."""
    from fxmem.bench.trace import load_simulation, ran_simulation
    from fxmem.simulate import simulate

    if len(trace.get("graphs", [])) != 1:
        raise ValueError(f"a kernel table needs a trace of one graph, not {len(trace.get('graphs', []))}")
    chosen = ran_simulation(trace)
    if chosen is None:
        raise ValueError("the trace does not hold the plan its step ran")
    fw, bw, kwargs = load_simulation(chosen)
    points: dict[tuple[str, str], int] = {}
    for phase, name, live in simulate(fw, bw, **kwargs).points:
        points[phase, name] = max(points.get((phase, name), 0), live)
    rows = []
    for filename, source in trace["sources"].items():
        header = _PHASE.search(source[:200])
        if header is None:
            continue
        phase = "forward" if header.group(1) == "inference" else header.group(1)
        kernels = generated_kernels(source)
        measured = _measured_by_kernel(trace, filename, [line for line, _ in kernels])
        for index, (_, nodes) in enumerate(kernels):
            predicted = [points[phase, n] for n in nodes if (phase, n) in points]
            rows.append(KernelRow(phase, index, nodes, measured.get(index), max(predicted, default=None)))
    return sorted(rows, key=lambda r: (r.phase != "forward", r.index))


def format_kernel_table(rows: list[KernelRow], top: int = 15) -> str:
    """The ``top`` kernels by measured bytes, in order, with the error of each prediction, and a summary."""
    if not rows:
        return "no generated kernels in the trace (its sources hold no Inductor output code)"
    measured = [r for r in rows if r.measured is not None]
    shown = sorted(sorted(measured, key=lambda r: -r.measured)[:top], key=lambda r: (r.phase != "forward", r.index))
    lines = [f"{'phase':8s} {'kernel':>6s} {'measured MiB':>12s} {'predicted MiB':>13s} {'error':>7s}  source nodes"]
    for r in shown:
        predicted = "" if r.predicted is None else f"{r.predicted / 2**20:.1f}"
        error = "" if r.predicted is None else f"{(r.predicted - r.measured) / r.measured * 100:+.1f}%"
        nodes = ", ".join(r.nodes)
        nodes = nodes if len(nodes) <= 70 else nodes[:67] + "..."
        lines.append(f"{r.phase:8s} {r.index:6d} {r.measured / 2**20:12.1f} {predicted:>13s} {error:>7s}  {nodes}")
    matched = sum(r.predicted is not None for r in rows)
    lines.append(f"{matched} of {len(rows)} kernels name a graph node; {len(measured)} allocated")
    return "\n".join(lines)
