"""``fp8``: per-group scaled ``torch.float8_e4m3fn`` storage.

Each group of ``group_size`` consecutive elements (logical order) gets ``scale = absmax / 448`` (fp32),
so the group's largest magnitude lands on e4m3's largest finite value. Values are divided by the scale
and clamped to +-448 before the cast: e4m3fn has no infinity, and without the clamp a value that rounds
past 448 would turn into NaN instead of saturating. Dequantization multiplies by the same scale:
``(code.to(float32) * scale).to(dtype)``.

Error bound: e4m3 has 3 mantissa bits, so in the top binade [256, 448] one ulp is 32 and nearest
rounding is off by at most 16, i.e. ``max |x - dq| <= absmax * 16 / 448 = absmax / 28``; lower binades
are finer. Relative to each element the error is at most 2**-4 of its magnitude (normal range).

Non-finite input: a NaN or +-inf makes the group's scale non-finite, so the whole group dequantizes to
NaN/inf (never finite). Stochastic rounding is not offered (casting to fp8 has no hook for it).
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

log = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0


@register_quantizer("fp8")
class Fp8Quantizer(Quantizer):
    bits: ClassVar[int] = 8
    symmetric: ClassVar[bool] = True
    # fp8's relative precision hardly depends on the group (randn error 0.0257 at 128, 0.0261 at 256);
    # 256 keeps the scale overhead at 1.6% and matches the integer quantizers.
    default_group_size: ClassVar[int] = 256
    supports_stochastic: ClassVar[bool] = False

    def quantize(self, x: Tensor) -> tuple[Tensor, ...]:
        check_float_input(x, self.name)
        g, n = to_groups(x, self.group_size)
        scale = g.abs().amax(dim=1, keepdim=True) / FP8_MAX
        # All-zero groups: divide by 1 so codes are 0 and dq is exactly 0.
        y = (g / torch.where(scale > 0, scale, 1.0)).clamp(-FP8_MAX, FP8_MAX)
        codes = y.reshape(-1)[:n].to(FP8_DTYPE)
        return codes, scale.reshape(-1)

    def dequantize(
        self,
        payload: tuple[Tensor, ...],
        shape: Sequence[int],
        dtype: torch.dtype,
        stride: Sequence[int] | None = None,
    ) -> Tensor:
        self._check_payload(payload, dtype)
        codes, scale = payload
        n = numel_of(shape)
        q = codes_to_groups(codes.reshape(-1)[:n].to(torch.float32), scale.shape[0], self.group_size)
        out = q * scale.unsqueeze(1)  # the forward divided by scale; multiply it back here
        return restore_layout(out.reshape(-1)[:n], shape, dtype, stride)

    def stored_bytes(self, numel: int, dtype: torch.dtype) -> int:
        if numel < 0:
            raise ValueError(f"{self.name}: numel must be >= 0, got {numel}")
        return numel + 4 * self.num_groups(numel)

    def error_bound(self) -> float:
        return 16.0 / FP8_MAX
