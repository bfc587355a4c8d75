"""Per-group integer quantizers ``int8``, ``int4``, ``int2`` (asymmetric min/max; int4/int2 bit-packed).

Each group of ``group_size`` consecutive elements (logical order) gets its own fp32 scale.

* asymmetric (all three registered quantizers): ``scale = (max - min) / L`` with ``L = 2**bits - 1``,
  codes ``round((x - min) / scale)`` in [0, L] as uint8, packed 2 (int4) or 4 (int2) per byte;
  ``dq = min + code * scale``. A group whose min is exactly 0 (typical after ReLU) maps 0 to code 0 and
  back to exactly 0. With ``keep_sign=True`` (used for ReLU outputs) it also maps every positive value
  to a code of at least 1, so the sign pattern a ReLU's backward reads survives exactly (values in
  (0, step/2) then err by up to one step).
* symmetric (kept for subclasses, ``symmetric = True``): ``scale = absmax / qmax``, codes
  ``round(x / scale)`` in [-qmax, qmax]; zero is always exact and there is no zero point.

Why asymmetric everywhere: at equal bytes per element (asymmetric with group 256 vs symmetric with
group 128, both 8.25 / 4.25 / 2.25 bits) min/max had lower error on every test distribution, equal on
randn and about half on one-sided data (ReLU/GELU/softmax outputs, which dominate saved activations):
a symmetric grid spends half its levels on a sign that is absent and, with 16 or 4 levels, also wastes
one level to have an exact 0.

Scales and zero points are fp32: fp16 would overflow for bf16/fp32 activations above 65504 * L and
lose precision in the zero point for offset data. The asymmetric path works on halves (``x/2 - min/2``)
so ``max - min`` cannot overflow fp32 even for values near the fp32 limit.

Rounding is to nearest (ties to even), or stochastic (``floor(y + U[0,1))``, unbiased) with
``stochastic=True``. Bounds on ``|x - dq|`` relative to the group range (asymmetric), deterministic /
stochastic: int8 1/510 / 1/255, int4 1/30 / 1/15, int2 1/6 / 1/3 (symmetric: 1/(2 qmax) / 1/qmax of the
group absmax).

Non-finite input: a group holding a NaN or +-inf gets a NaN/inf scale or zero point, so the whole
group dequantizes to non-finite values (NaN, or +-inf where the code is non-zero). The bad values
therefore never come back finite, at the cost of poisoning their group, which matters little because
a step with a non-finite activation is discarded anyway (e.g. by the AMP grad scaler).
Groups whose scale underflows fp32 (subnormal data) lose their spread and come back as the group min.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from .base import (
    Quantizer,
    check_float_input,
    codes_to_groups,
    numel_of,
    register_quantizer,
    restore_layout,
    to_groups,
)
from .masks import pack_bits, unpack_bits

log = logging.getLogger(__name__)


class IntegerQuantizer(Quantizer):
    """Shared implementation; subclasses set ``bits``, ``symmetric`` and ``default_group_size``.

    ``keep_sign=True`` (for a ReLU's output, whose backward reads the sign): in a group whose minimum is
    exactly 0, a positive value never comes back as 0 — it rounds up to one step instead."""

    def __init__(self, group_size: int | None = None, stochastic: bool = False, keep_sign: bool = False) -> None:
        super().__init__(group_size, stochastic)
        if not isinstance(keep_sign, bool):
            raise ValueError(f"{self.name}: keep_sign must be a bool, got {keep_sign!r}")
        self.keep_sign = keep_sign

    def options(self) -> dict[str, object]:
        return {**super().options(), "keep_sign": self.keep_sign}

    def _round(self, y: Tensor) -> Tensor:
        if self.stochastic:
            return torch.floor(y + torch.rand_like(y))
        return torch.round(y)

    # -- forward ------------------------------------------------------------------------------------

    def quantize(self, x: Tensor) -> tuple[Tensor, ...]:
        check_float_input(x, self.name)
        g, n = to_groups(x, self.group_size)
        if self.symmetric:
            qmax = 2 ** (self.bits - 1) - 1
            scale = g.abs().amax(dim=1, keepdim=True) / qmax
            # All-zero groups have scale 0: divide by 1 instead so codes are 0 (and dq exactly 0).
            y = g / torch.where(scale > 0, scale, 1.0)
            # NaN codes would cast to garbage bytes; the NaN/inf scale already marks the group.
            q = torch.nan_to_num(self._round(y), nan=0.0).clamp(-qmax, qmax).reshape(-1)[:n]
            if self.bits == 8:
                codes = q.to(torch.int8)
            else:  # offset to unsigned so it packs like the asymmetric codes
                codes = pack_bits((q + 2 ** (self.bits - 1)).to(torch.uint8), self.bits)
            return codes, scale.reshape(-1)

        top = 2**self.bits - 1
        lo = g.amin(dim=1, keepdim=True)
        hi = g.amax(dim=1, keepdim=True)
        scale = hi / top - lo / top  # not (hi - lo) / top: that overflows for |values| near fp32 max
        half = scale * 0.5
        y = (g * 0.5 - lo * 0.5) / torch.where(half > 0, half, 1.0)
        q = torch.nan_to_num(self._round(y), nan=0.0).clamp(0, top)
        if self.keep_sign:  # not by default: it would turn tiny probabilities into a full step
            q = torch.where((q == 0) & (g > 0) & (lo == 0), 1.0, q)
        q = q.reshape(-1)[:n]
        codes = pack_bits(q.to(torch.uint8), self.bits)
        return codes, scale.reshape(-1), lo.reshape(-1)

    # -- backward -----------------------------------------------------------------------------------

    def dequantize(
        self,
        payload: tuple[Tensor, ...],
        shape: Sequence[int],
        dtype: torch.dtype,
        stride: Sequence[int] | None = None,
    ) -> Tensor:
        self._check_payload(payload, dtype)
        codes, scale = payload[0], payload[1]
        n = numel_of(shape)
        if self.bits == 8 and self.symmetric:
            q = codes.reshape(-1)[:n].to(torch.float32)
        else:
            q = unpack_bits(codes, self.bits, n).to(torch.float32)
            if self.symmetric:
                q = q - 2 ** (self.bits - 1)
        q = codes_to_groups(q, scale.shape[0], self.group_size)
        if self.symmetric:
            out = q * scale.unsqueeze(1)
        else:
            lo = payload[2]
            # Mirror of the halved forward: min/2 + code*scale/2 stays finite, doubling is exact.
            out = (q * (scale * 0.5).unsqueeze(1) + (lo * 0.5).unsqueeze(1)) * 2.0
        return restore_layout(out.reshape(-1)[:n], shape, dtype, stride)

    # -- accounting ---------------------------------------------------------------------------------

    def stored_bytes(self, numel: int, dtype: torch.dtype) -> int:
        if numel < 0:
            raise ValueError(f"{self.name}: numel must be >= 0, got {numel}")
        code_bytes = -(-numel * self.bits // 8)
        per_group = 4 if self.symmetric else 8  # fp32 scale (+ fp32 zero point)
        return code_bytes + per_group * self.num_groups(numel)

    def error_bound(self) -> float:
        # One step in units of the group absmax (1/qmax) or range (1/L). Nearest rounding is off by at
        # most half a step, stochastic rounding by less than one step.
        step = 1.0 / (2 ** (self.bits - 1) - 1) if self.symmetric else 1.0 / (2**self.bits - 1)
        return step if self.stochastic else step / 2


# Group size 256 for all three. Bytes per element = bits/8 + 8 / group_size; the error grows slowly with
# the group (a Gaussian group's range grows ~sqrt(2 ln G)). Measured on 1M randn values, halving the
# group from 512 to 256 cuts the error by ~0.6 (log units) per extra stored bit, about what one more code
# bit buys (ln 2); from 256 to 128 only ~0.35 per bit. So 256 is the knee: overhead 3% (int8), 6%
# (int4), 12.5% (int2) of the codes. ActNN also uses 256 for its 2-bit groups.


@register_quantizer("int8")
class Int8Quantizer(IntegerQuantizer):
    bits: ClassVar[int] = 8
    symmetric: ClassVar[bool] = False
    default_group_size: ClassVar[int] = 256


@register_quantizer("int4")
class Int4Quantizer(IntegerQuantizer):
    bits: ClassVar[int] = 4
    symmetric: ClassVar[bool] = False
    default_group_size: ClassVar[int] = 256


@register_quantizer("int2")
class Int2Quantizer(IntegerQuantizer):
    bits: ClassVar[int] = 2
    symmetric: ClassVar[bool] = False
    default_group_size: ClassVar[int] = 256
