"""Cost models: how long a node takes, to run once and to run again in the backward.

The default ``roofline`` model: time = max(FLOPs / peak FLOP/s, bytes moved / bandwidth) on a device
profile, with a discount for ops Inductor fuses into their consumer (recomputing a pointwise op there
costs little more than reading its inputs). Quantize and dequantize cost the bytes they move.
Register another with ``@register_cost_model("name")`` on a ``CostModel`` subclass.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceProfile:
    """Peak dense FLOP/s by dtype and memory bandwidth in bytes/s: vendor figures derated ~25% in
    ``PROFILES``, measured on the device with ``calibrate=True`` (``fxmem.calibrate``). ``draws_per_s``:
    random numbers the default generator makes per second, where that is slower than writing them (a
    CPU's: on a 2-core CPU a dropout mask's draw took 7 ns per element, 100 times an add's; a GPU's keeps
    up with memory)."""

    name: str
    flops: dict[str, float]
    bandwidth: float
    draws_per_s: float = math.inf

    def peak_flops(self, dtype: torch.dtype | None) -> float:
        key = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
        return self.flops[key]


PROFILES: dict[str, DeviceProfile] = {
    "h100": DeviceProfile("h100", {"bf16": 740e12, "fp16": 740e12, "fp32": 370e12}, 2.5e12),
    "h200": DeviceProfile("h200", {"bf16": 740e12, "fp16": 740e12, "fp32": 370e12}, 3.6e12),
    "a100": DeviceProfile("a100", {"bf16": 234e12, "fp16": 234e12, "fp32": 117e12}, 1.5e12),
    # fp32 on GPUs assumes TF32 matmuls; the CPU figure is a few cores of AVX2.
    "cpu": DeviceProfile("cpu", {"bf16": 2e11, "fp16": 2e11, "fp32": 2e11}, 2e10, draws_per_s=1.5e8),
}


def resolve_profile(name: str, device: torch.device | None) -> DeviceProfile:
    """``auto`` reads the device the graph runs on."""
    if name != "auto":
        return PROFILES[name]
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        card = torch.cuda.get_device_name(device).lower()
        for key in ("h200", "h100", "a100"):
            if key in card:
                return PROFILES[key]
        log.info("no profile for %r; using the h100 profile", card)
        return PROFILES["h100"]
    return PROFILES["cpu"]


# How much of an op's own time recomputing it in the backward adds, by kind. Pointwise ops and views
# fuse into the consumer; a reduction mostly does (a norm's statistics); matmuls are paid in full.
RECOMPUTE_FACTOR = {
    "view": 0.0,
    "getitem": 0.0,  # the op producing the tuple carries the cost
    "pointwise": 0.05,
    "reduction": 0.5,
    "matmul": 1.0,
    "other": 1.0,
}
# Quantize fuses into the producer and dequantize into the consumer: they add roughly the stored bytes
# written and read, plus a pass over the full tensor each that fusion does not hide entirely.
QUANT_FUSION_FACTOR = 0.25
# Seconds of penalty per full-tensor pass, scaled by the bits dropped below 8 (see precision_penalty).
PRECISION_PENALTY = 4.0


class CostModel:
    """Times in seconds. ``node_time`` takes the FLOPs and bytes a node moves."""

    def __init__(self, profile: DeviceProfile):
        self.profile = profile

    def node_time(self, flops: float, bytes_moved: float, dtype: torch.dtype | None) -> float:
        raise NotImplementedError

    def draw_time(self, numbers: int) -> float:
        """What drawing ``numbers`` random numbers adds to an op's time (a replayed draw)."""
        return numbers / self.profile.draws_per_s

    def recompute_time(self, kind: str, own_time: float) -> float:
        raise NotImplementedError

    def quant_time(self, full_bytes: int, stored_bytes: int) -> float:
        raise NotImplementedError

    def precision_penalty(self, full_bytes: int, bits: int) -> float:
        """A price, in seconds, on storing ``full_bytes`` in ``bits`` bits: grows as bits shrink, so the
        solver narrows a tensor only when the budget needs it. Not a time anyone waits."""
        return PRECISION_PENALTY * (8 - min(bits, 8)) / 8 * full_bytes / self.profile.bandwidth


_COST_MODELS: dict[str, type[CostModel]] = {}


def register_cost_model(name: str) -> Callable[[type[CostModel]], type[CostModel]]:
    def decorate(cls: type[CostModel]) -> type[CostModel]:
        _COST_MODELS[name] = cls
        return cls

    return decorate


def available_cost_models() -> tuple[str, ...]:
    return tuple(sorted(_COST_MODELS))


def get_cost_model(name: str, profile: DeviceProfile) -> CostModel:
    try:
        return _COST_MODELS[name](profile)
    except KeyError:
        raise ValueError(f"cost_model: unknown {name!r}; known: {', '.join(available_cost_models())}") from None


@register_cost_model("roofline")
class RooflineCostModel(CostModel):
    def node_time(self, flops: float, bytes_moved: float, dtype: torch.dtype | None) -> float:
        return max(flops / self.profile.peak_flops(dtype), bytes_moved / self.profile.bandwidth)

    def recompute_time(self, kind: str, own_time: float) -> float:
        return RECOMPUTE_FACTOR.get(kind, 1.0) * own_time

    def quant_time(self, full_bytes: int, stored_bytes: int) -> float:
        moved = 2 * stored_bytes + QUANT_FUSION_FACTOR * 2 * full_bytes
        return moved / self.profile.bandwidth
