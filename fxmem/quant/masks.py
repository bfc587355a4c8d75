"""Lossless bit packing: boolean masks at 8 per byte, and the sub-byte code packing used by int4/int2.

Bit order is little-endian within a byte: element ``8*k + i`` of a mask lives in bit ``i`` of byte ``k``
(likewise 2 codes per byte for 4 bits, 4 for 2 bits). Everything here is traceable by ``make_fx``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import numel_of, restore_layout


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack a 1-d uint8 tensor of values ``< 2**bits`` into ``ceil(len * bits / 8)`` bytes."""
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"pack_bits: bits must be 1, 2, 4 or 8, got {bits}")
    if codes.dtype != torch.uint8 or codes.dim() != 1:
        raise ValueError(f"pack_bits: expected a 1-d uint8 tensor, got {codes.dtype} of dim {codes.dim()}")
    per = 8 // bits
    if per == 1:
        return codes
    n = codes.shape[0]
    nbytes = (n + per - 1) // per
    pad = nbytes * per - n
    if not (isinstance(pad, int) and pad == 0):
        codes = F.pad(codes, (0, pad))
    # The codes' bits do not overlap once shifted into place, so their sum is their bitwise or, and one
    # reduction is a few graph nodes (``per - 1`` ors would be ``3 * per``).
    return (codes.view(nbytes, per) << _offsets(per, bits, codes.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, bits: int, n: Any) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` codes as a 1-d uint8 tensor."""
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"unpack_bits: bits must be 1, 2, 4 or 8, got {bits}")
    per = 8 // bits
    if per == 1:
        return packed.reshape(-1)[:n]
    codes = (packed.reshape(-1, 1) >> _offsets(per, bits, packed.device)) & ((1 << bits) - 1)
    return codes.reshape(-1)[:n]


def _offsets(per: int, bits: int, device: torch.device) -> Tensor:
    """Where each of a byte's ``per`` codes starts: bits ``0, bits, 2 * bits, ...``."""
    return torch.arange(per, dtype=torch.uint8, device=device) * bits


def packed_bool_bytes(numel: int) -> int:
    """Bytes :func:`pack_bool` uses for ``numel`` booleans."""
    if numel < 0:
        raise ValueError(f"packed_bool_bytes: numel must be >= 0, got {numel}")
    return (numel + 7) // 8


def pack_bool(x: Tensor) -> Tensor:
    """A bool tensor (any shape or layout, read in logical order) -> uint8 with 8 booleans per byte."""
    if not isinstance(x, Tensor) or x.dtype != torch.bool:
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"pack_bool: expected a bool tensor, got {got}")
    return pack_bits(x.reshape(-1).to(torch.uint8), 1)


def unpack_bool(packed: Tensor, shape: Sequence[Any], stride: Sequence[Any] | None = None) -> Tensor:
    """Inverse of :func:`pack_bool`: a bool tensor of ``shape`` (with exactly ``stride`` if given)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_bool: expected a uint8 tensor, got {packed.dtype}")
    bits = unpack_bits(packed, 1, numel_of(shape))
    return restore_layout(bits, shape, torch.bool, stride)
