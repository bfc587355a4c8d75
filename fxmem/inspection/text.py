"""Small formatting helpers shared by the table, the explanations, the picture and the DOT output."""

from __future__ import annotations

import math

from fxmem.report import TensorRow

# Bits per element of each storage format; ``keep`` stores the tensor's own dtype.
FORMAT_BITS = {"int8": 8, "fp8": 8, "int4": 4, "int2": 2, "bitmask": 1}

_DTYPE_BITS = {
    "bool": 8, "uint8": 8, "int8": 8, "float8_e4m3fn": 8, "float8_e5m2": 8, "float8_e4m3fnuz": 8,
    "float8_e5m2fnuz": 8, "int16": 16, "uint16": 16, "float16": 16, "bfloat16": 16, "int32": 32, "uint32": 32,
    "float32": 32, "complex32": 32, "int64": 64, "uint64": 64, "float64": 64, "complex64": 64, "complex128": 128,
}  # fmt: skip


def dtype_bits(dtype: str) -> int | None:
    """``"float32"`` → 32; ``None`` for a dtype fxmem does not know (or ``"-"`` for a non-tensor)."""
    if dtype in _DTYPE_BITS:
        return _DTYPE_BITS[dtype]
    import torch

    value = getattr(torch, dtype, None)
    return value.itemsize * 8 if isinstance(value, torch.dtype) else None


def format_bits(fmt: str) -> int | None:
    if fmt in FORMAT_BITS:
        return FORMAT_BITS[fmt]
    try:  # a quantizer registered by a user
        from fxmem.quant import get_quantizer

        return int(get_quantizer(fmt).bits)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def row_bits(row: TensorRow) -> int | None:
    """Bits per element as stored: the format's for ``quantize``, the dtype's for ``keep``, None for
    ``recompute`` (nothing is stored)."""
    if row.decision == "quantize" and row.fmt:
        return format_bits(row.fmt)
    if row.decision == "keep":
        return dtype_bits(row.dtype)
    return None


def bytes_text(value: float | None) -> str:
    """``16384`` → ``"16.0 KiB"``; ``None`` → ``"?"``."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "?"
    value = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def seconds_text(value: float | None) -> str:
    """``1.2e-7`` → ``"0.12 µs"``; ``0`` → ``"0"``."""
    if value is None:
        return "?"
    if value == 0:
        return "0"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value / 1e-6:.2g} µs"


def percent_text(value: float | None) -> str:
    return "?" if value is None else f"{value * 100:.1f}%"


def short_op(row: TensorRow) -> str:
    """``aten.add.Tensor`` → ``add.Tensor``; a placeholder shows as ``input`` or ``param``."""
    if row.kind in ("input", "param"):
        return row.kind
    op = row.op
    if op.startswith("<built-in function ") and op.endswith(">"):
        return op.removeprefix("<built-in function ").removesuffix(">")
    op = op.removeprefix("aten.")
    return op.removesuffix(".default")


def shape_text(shape: tuple[object, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def shape_value(dim: object) -> int | str:
    """A static dimension as an int, a symbolic one (``"s0"``, ``"2*s1"``) as its string."""
    text = str(dim)
    return int(text) if text.lstrip("-").isdigit() else text


def is_free(row: TensorRow) -> bool:
    """A parameter or buffer: held by the model anyway, so holding it for the backward costs nothing (but
    for a convolution weight Inductor copies to channels-last)."""
    return row.kind == "param" and row.stored_bytes == 0
