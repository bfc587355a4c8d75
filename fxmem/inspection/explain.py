"""``Report.explain(name)``: one tensor's decision in a paragraph."""

from __future__ import annotations

from fxmem.inspection.text import bytes_text, dtype_bits, seconds_text, shape_text, short_op
from fxmem.report import GraphReport, TensorRow

_OP_KINDS = {
    "pointwise": "a pointwise op",
    "reduction": "a reduction or normalisation",
    "matmul": "a matmul or convolution",
    "random": "a random op",
    "collective": "a collective",
}


def _what(row: TensorRow) -> str:
    if row.kind == "input":
        what = "an input of the compiled graph"
    elif row.kind == "param":
        what = "a parameter or buffer of the model"
    elif row.kind == "view":
        what = f"a view made by {row.op} (it shares its base's storage)"
    elif row.kind == "getitem":
        what = "one output of a multi-output op"
    else:
        what = f"the output of {row.op}" + (f", {_OP_KINDS[row.kind]}" if row.kind in _OP_KINDS else "")
    sources = getattr(row, "inputs", ())
    if sources:
        what += f", computed from {', '.join(sources[:6])}" + (" and others" if len(sources) > 6 else "")
    return what


def _size(row: TensorRow) -> str:
    bits = dtype_bits(row.dtype)
    dims = [str(d) for d in row.shape]
    elements = " × ".join(dims) if dims else "1"
    article = "an" if row.dtype[:1] in "aeiou" else "a"
    text = f"It is {article} {row.dtype} tensor of shape {shape_text(row.shape)}"
    if bits is not None:
        text += f": {elements} elements × {bits // 8 if bits >= 8 else bits / 8:g} bytes"
        if row.bytes_formula != str(row.bytes):
            text += f" = {row.bytes_formula} bytes, {row.bytes:,} at the traced sizes"
        else:
            text += f" = {row.bytes:,} bytes"
    else:
        text += f", {row.bytes:,} bytes"
    return text + f" ({bytes_text(row.bytes)})."


def _decision(row: TensorRow) -> str:
    if row.decision == "recompute":
        head = f"fxmem recomputes it in the backward (≈{seconds_text(row.est_time_s)} added) and holds nothing"
    elif row.decision == "quantize":
        head = (
            f"fxmem stores it as {row.fmt}, holding {bytes_text(row.stored_bytes)} instead of "
            f"{bytes_text(row.bytes)} (≈{seconds_text(row.est_time_s)} added to quantize and dequantize)"
        )
    else:
        head = f"fxmem keeps it as it is, holding {bytes_text(row.stored_bytes)} until the backward"
    return f"Decision: {row.decision}. {head}; {row.reason}."


def _choice_text(choice: str, held: int, added: float) -> str:
    if choice == "keep":
        return f"keep holds {bytes_text(held)} and adds no time"
    if choice == "recompute":
        return f"recompute holds nothing and adds ≈{seconds_text(added)} (this op alone)"
    return f"{choice} holds {bytes_text(held)} and adds ≈{seconds_text(added)}"


def _alternatives(row: TensorRow) -> str:
    alternatives = getattr(row, "alternatives", None) or {}
    chosen = row.fmt if row.decision == "quantize" else row.decision
    others = [_choice_text(c, h, a) for c, (h, a) in alternatives.items() if c != chosen]
    if not alternatives:
        return ""
    if not others:
        return " There was no alternative: it can neither be recomputed nor stored in another format."
    missing = [c for c in ("keep", "recompute") if c not in alternatives]
    text = " Alternatives: " + "; ".join(others) + "."
    if "recompute" in missing:
        text += " It cannot be recomputed."
    return text


def explain_row(graph: GraphReport, row: TensorRow) -> str:
    """A paragraph: what the tensor is, its size, the decision and why, and what the other choices cost."""
    return (
        f"{row.name} (graph {graph.graph_id}, {short_op(row)}) is {_what(row)}. {_size(row)} "
        f"{_decision(row)}{_alternatives(row)}"
    )
