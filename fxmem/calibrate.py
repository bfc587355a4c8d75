"""On-device calibration of the cost model (``calibrate=True``).

The built-in profiles in ``fxmem.cost`` are vendor peaks derated by a guess. Calibration instead times,
once per device and process, a square matmul in each dtype a profile lists and a large copy, so the
roofline model sees what this machine reaches: a shared or throttled CPU, an unlisted or power-capped
GPU, fp32 matmuls with TF32 on or off as the process has set it.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable

import torch

from fxmem import _compat
from fxmem.cost import DeviceProfile, resolve_profile

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Large enough to approach peak throughput, small enough to keep calibration well under a second, also
# on CPUs without native fp16 (a few GFLOP/s there).
_MATMUL_SIZE = {"cpu": 384, "cuda": 4096}
# Well past the last-level cache, so the copy measures memory rather than cache bandwidth.
_COPY_BYTES = {"cpu": 64 * 2**20, "cuda": 512 * 2**20}
_REPEATS = 3


def calibrated_profile(device: torch.device | None) -> DeviceProfile:
    """The measured profile of ``device`` (CPU when ``None``), measured on the first call only. Devices
    other than CPU and CUDA keep the built-in profile."""
    device = torch.device("cpu") if device is None else device
    if device.type not in _MATMUL_SIZE:
        log.info("fxmem: cannot calibrate %s; using the built-in profile", device)
        return resolve_profile("auto", device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # one cache entry per card
    return _measure(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of the fastest of a few runs, after a warm-up run that picks kernels and allocates."""
    fn()
    _sync(device)
    best = math.inf
    for _ in range(_REPEATS):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def _measure(device: torch.device) -> DeviceProfile:
    started = time.perf_counter()
    n = _MATMUL_SIZE[device.type]
    numel = _COPY_BYTES[device.type] // 4
    # The partitioner runs under AOTAutograd's fake mode, where tensors have no data to time.
    with _compat.unset_fake_temporarily(), torch.no_grad():
        generator = torch.Generator(device).manual_seed(0)  # the global RNG (and so dropout) stays untouched
        flops = {}
        for key, dtype in _DTYPES.items():
            a, b = (torch.rand(n, n, generator=generator, device=device, dtype=dtype) for _ in range(2))
            flops[key] = 2 * n**3 / _best_time(functools.partial(torch.mm, a, b), device)
        src = torch.empty(numel, device=device)
        dst = torch.empty_like(src)
        bandwidth = 2 * 4 * numel / _best_time(functools.partial(dst.copy_, src), device)  # read + write
        draws_per_s = math.inf  # a GPU's generator keeps up with writing the numbers
        if device.type == "cpu":  # a dropout mask's draw, from a generator of its own
            mask = dst[: numel // 16]
            draw = functools.partial(mask.bernoulli_, 0.5, generator=generator)
            draws_per_s = mask.numel() / _best_time(draw, device)
    profile = DeviceProfile(f"calibrated-{device}", flops, bandwidth, draws_per_s)
    log.info(
        "fxmem: calibrated %s in %.2fs: %s, %.3g B/s, %.3g random numbers/s",
        device, time.perf_counter() - started, ", ".join(f"{k} {v:.3g} FLOP/s" for k, v in flops.items()), bandwidth,
        draws_per_s,
    )  # fmt: skip
    return profile
