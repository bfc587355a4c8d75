"""Quantizers for saved activations: ``int8``, ``int4``, ``int2``, ``fp8``, and lossless bool packing.

``get_quantizer("int4")`` returns a :class:`Quantizer`; its ``quantize`` / ``dequantize`` are traceable
by ``make_fx`` and compile with Inductor.
"""

from __future__ import annotations

from . import fp8, integer  # noqa: F401  (importing registers the quantizers)
from .base import (
    DEFAULT_GROUP_SIZE,
    Quantizer,
    available_quantizers,
    get_quantizer,
    register_quantizer,
)
from .fp8 import Fp8Quantizer
from .integer import Int2Quantizer, Int4Quantizer, Int8Quantizer, IntegerQuantizer
from .masks import pack_bool, packed_bool_bytes, unpack_bool

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "Fp8Quantizer",
    "Int2Quantizer",
    "Int4Quantizer",
    "Int8Quantizer",
    "IntegerQuantizer",
    "Quantizer",
    "available_quantizers",
    "get_quantizer",
    "pack_bool",
    "packed_bool_bytes",
    "register_quantizer",
    "unpack_bool",
]
