"""The plan as a table, one row per candidate tensor: with ``rich`` when it is installed, plain text when not."""

from __future__ import annotations

import io
import shutil
from typing import TYPE_CHECKING

from fxmem.inspection.text import bytes_text, is_free, percent_text, row_bits, seconds_text, shape_text, short_op
from fxmem.report import GraphReport, TensorRow

if TYPE_CHECKING:
    from fxmem.inspection.api import Report

COLUMNS = ("tensor", "op", "shape", "dtype", "size", "decision", "bits", "stored", "est. time", "reason")
RIGHT = {"size", "bits", "stored", "est. time"}
STYLE = {"keep": "bright_black", "recompute": "blue", "quantize": "dark_orange"}


def cells(row: TensorRow) -> tuple[str, ...]:
    bits = row_bits(row)
    decision = f"{row.decision} {row.fmt}" if row.decision == "quantize" and row.fmt else row.decision
    return (
        row.name,
        short_op(row),
        shape_text(row.shape),
        row.dtype,
        bytes_text(row.bytes),
        decision,
        "-" if bits is None else str(bits),
        bytes_text(row.stored_bytes) if row.decision != "recompute" else "-",
        seconds_text(row.est_time_s),
        row.reason,
    )


def graph_title(graph: GraphReport, hidden: int) -> str:
    if graph.fallback_reason:
        return f"graph {graph.graph_id}: PyTorch's partitioner ({graph.fallback_reason})"
    counts = {kind: sum(r.decision == kind for r in graph.rows) for kind in ("keep", "quantize", "recompute")}
    text = f"graph {graph.graph_id}: {len(graph.rows)} tensors: " + ", ".join(f"{k} {n}" for k, n in counts.items())
    return text + (f" (the {hidden} parameters and buffers kept are not shown)" if hidden else "")


def graph_totals(graph: GraphReport) -> str:
    peak = getattr(graph, "predicted_peak_bytes", None)
    parts = [
        f"saved {bytes_text(graph.predicted_saved_bytes)} (fxmem) vs "
        f"{bytes_text(graph.reference_saved_bytes)} (torch.compile default)",
        f"budget {bytes_text(graph.budget_bytes)}" if graph.budget_bytes is not None else "no budget",
        f"est. overhead {percent_text(graph.estimated_overhead)}",
    ]
    if peak is not None:
        parts.insert(1, f"predicted peak {bytes_text(peak)}")
    return "; ".join(parts)


def report_totals(report: Report) -> str:
    saved, reference = report.predicted_saved_bytes, report.reference_saved_bytes
    change = ""
    if saved is not None and reference:
        change = f" ({(saved - reference) / reference * 100:+.0f}%)"
    peak = report.predicted_peak_bytes
    return (
        f"total over {len(report.graphs)} graph(s): saved activations {bytes_text(saved)} (fxmem) vs "
        f"{bytes_text(reference)} (torch.compile default){change}; predicted peak "
        f"{'not simulated' if peak is None else bytes_text(peak)}; est. overhead "
        f"{percent_text(report.estimated_overhead)}"
    )


def render(report: Report, *, params: bool = False, width: int | None = None, color: bool = False) -> str:
    """The whole report as text. Parameters and buffers (which cost nothing to hold) show only with
    ``params``; ``width`` defaults to the terminal's; ``color`` adds ANSI colours (rich only)."""
    width = width or max(60, shutil.get_terminal_size((160, 24)).columns)
    try:
        import rich  # noqa: F401
    except ImportError:
        return _plain(report, params)
    return _rich(report, params, width, color)


def _shown(graph: GraphReport, params: bool) -> tuple[list[TensorRow], int]:
    rows = [row for row in graph.rows if params or not is_free(row)]
    return rows, len(graph.rows) - len(rows)


def _plain(report: Report, params: bool) -> str:
    out: list[str] = []
    for graph in report.graphs:
        rows, hidden = _shown(graph, params)
        out.append(graph_title(graph, hidden))
        table = [COLUMNS, *(cells(row) for row in rows)]
        widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS) - 1)]
        for n, line in enumerate(table):
            padded = [
                c.rjust(w) if COLUMNS[i] in RIGHT else c.ljust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=False))
            ]
            out.append("  ".join([*padded, line[-1]]).rstrip())
            if n == 0:
                out.append("  ".join("-" * w for w in [*widths, len(COLUMNS[-1])]))
        out += [graph_totals(graph), ""]
    out.append(report_totals(report))
    return "\n".join(out) + "\n"


def _rich(report: Report, params: bool, width: int, color: bool) -> str:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    buffer = io.StringIO()
    console = Console(
        file=buffer, width=width, force_terminal=color, no_color=not color, color_system="standard" if color else None
    )
    for graph in report.graphs:
        rows, hidden = _shown(graph, params)
        table = Table(
            title=graph_title(graph, hidden),
            title_justify="left",
            caption=graph_totals(graph),
            caption_justify="left",
            box=box.SIMPLE_HEAD,
        )
        for name in COLUMNS:
            table.add_column(
                name,
                justify="right" if name in RIGHT else "left",
                overflow="fold",
                no_wrap=name not in ("reason", "shape"),
                ratio=3 if name == "reason" else None,
            )
        for row in rows:
            table.add_row(*cells(row), style=STYLE.get(row.decision))
        console.print(table)
    console.print(report_totals(report))
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines()) + "\n"
