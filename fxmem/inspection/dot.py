"""Graphviz DOT text of the candidate tensors, coloured by decision. Producing the text needs no graphviz;
render it with ``dot -Tsvg plan.dot -o plan.svg``."""

from __future__ import annotations

from collections.abc import Sequence

from fxmem.inspection.text import bytes_text, is_free, shape_text, short_op
from fxmem.report import GraphReport, TensorRow

# Fill colours: keep = grey, recompute = blue, quantize = orange.
FILL = {"keep": "#d0d0d0", "recompute": "#9ecae1", "quantize": "#fdae6b"}
BORDER = {"keep": "#707070", "recompute": "#2171b5", "quantize": "#d94801"}


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _node_id(graph: GraphReport, name: str) -> str:
    return _quote(f"g{graph.graph_id}:{name}")


def _label(row: TensorRow) -> str:
    if row.decision == "recompute":
        held = "recomputed"
    elif row.decision == "quantize":
        held = f"{row.fmt}: {bytes_text(row.stored_bytes)}"
    else:
        held = f"kept: {bytes_text(row.stored_bytes)}"
    return f"{row.name}\n{short_op(row)} {shape_text(row.shape)} {row.dtype}\n{held}"


def to_dot(graphs: Sequence[GraphReport], *, params: bool = False) -> str:
    """One cluster per graph; an edge ``a -> b`` when ``b`` is computed from ``a`` (through nodes that are
    not candidates). Parameters and buffers are left out unless ``params``."""
    lines = [
        "digraph fxmem {",
        "  rankdir=LR;",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
        '  edge [color="#909090"];',
    ]
    for graph in graphs:
        rows = [row for row in graph.rows if params or not is_free(row)]
        shown = {row.name for row in rows}
        title = f"graph {graph.graph_id}"
        if graph.fallback_reason:
            title += f" (PyTorch's partitioner: {graph.fallback_reason})"
        lines += [f"  subgraph cluster_{graph.graph_id} {{", f"    label={_quote(title)};"]
        for row in rows:
            color = FILL.get(row.decision, "white")
            border = BORDER.get(row.decision, "black")
            lines.append(
                f"    {_node_id(graph, row.name)} [label={_quote(_label(row))}, fillcolor={_quote(color)}, "
                f"color={_quote(border)}, tooltip={_quote(row.reason)}];"
            )
        for row in rows:
            for source in getattr(row, "inputs", ()):
                if source in shown:
                    lines.append(f"    {_node_id(graph, source)} -> {_node_id(graph, row.name)};")
        lines.append("  }")
    lines += [
        "  subgraph cluster_legend {",
        '    label="decision"; fontsize=10;',
        *(
            f"    {_quote('legend:' + kind)} [label={_quote(kind)}, fillcolor={_quote(FILL[kind])}, "
            f"color={_quote(BORDER[kind])}];"
            for kind in FILL
        ),
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"
