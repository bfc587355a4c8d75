"""``calibrate=True``: the measured device profile is sane, measured once per device, and planned with."""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import fxmem
from fxmem import calibrate
from fxmem.calibrate import calibrated_profile
from fxmem.cost import PROFILES
from tests.helpers import build, eager_step, rel_err, run_step

# fp32 with codegen="eager": calibration changes only the cost model's numbers, and the eager codegen
# runs the same aten ops as eager PyTorch, so gradients agree to rounding.
EAGER_TOL = 1e-6
# Calibration takes about 0.2 s on a 2-core CPU; the bound leaves room for a loaded test machine.
CPU_SECONDS = 2.0


@pytest.fixture(autouse=True)
def _uncalibrated():
    calibrate._measure.cache_clear()
    yield
    calibrate._measure.cache_clear()


def _assert_sane(profile, flops_range, bandwidth_range) -> None:
    assert set(profile.flops) == set(PROFILES["cpu"].flops)
    for key, value in profile.flops.items():
        assert math.isfinite(value) and flops_range[0] < value < flops_range[1], (key, value)
    assert math.isfinite(profile.bandwidth) and bandwidth_range[0] < profile.bandwidth < bandwidth_range[1]


def test_cpu_calibration_is_sane_and_quick():
    started = time.perf_counter()
    profile = calibrated_profile(torch.device("cpu"))
    elapsed = time.perf_counter() - started
    assert profile.name == "calibrated-cpu"
    # fp16 matmuls fall back to a slow path on CPUs without native fp16: a few GFLOP/s.
    _assert_sane(profile, (1e8, 1e14), (1e8, 1e13))
    assert elapsed < CPU_SECONDS, elapsed


def test_measured_once_per_device(monkeypatch):
    calls = []

    def fake_time(fn, device):
        calls.append(device)
        return 1e-3

    monkeypatch.setattr(calibrate, "_best_time", fake_time)
    first = calibrated_profile(None)
    assert len(calls) == 5  # a matmul per dtype, a copy and (on the CPU) a draw
    assert calibrated_profile(torch.device("cpu")) is first
    assert len(calls) == 5
    n = calibrate._MATMUL_SIZE["cpu"]
    assert first.flops["fp32"] == pytest.approx(2 * n**3 / 1e-3)
    assert first.bandwidth == pytest.approx(2 * calibrate._COPY_BYTES["cpu"] / 1e-3)
    assert first.draws_per_s == pytest.approx(calibrate._COPY_BYTES["cpu"] / 4 / 16 / 1e-3)


def test_calibration_times_real_tensors_under_fake_mode_and_leaves_the_rng_alone(monkeypatch):
    timed = calibrate._best_time

    def real_only(fn, device):
        assert not isinstance(fn(), FakeTensor)  # fake ops take no time: the numbers would be nonsense
        return timed(fn, device)

    monkeypatch.setattr(calibrate, "_best_time", real_only)
    rng = torch.get_rng_state()
    with FakeTensorMode():  # as inside the partitioner
        profile = calibrated_profile(torch.device("cpu"))
    _assert_sane(profile, (1e8, 1e14), (1e8, 1e13))
    assert 1e6 < profile.draws_per_s < 1e11  # a CPU's generator: slower than its memory
    assert torch.equal(torch.get_rng_state(), rng)


def test_devices_without_calibration_keep_the_builtin_profile():
    assert calibrated_profile(torch.device("meta")) is PROFILES["cpu"]


def test_compile_plans_with_the_calibrated_profile():
    loss_ref, grads_ref, _ = eager_step("mlp")
    model, inputs = build("mlp")
    backend = fxmem.backend(calibrate=True, codegen="eager")
    loss, grads, _ = run_step(model, inputs, backend)
    [report] = backend.reports
    assert report.fallback_reason is None, report.fallback_reason
    assert report.device_profile == "calibrated-cpu"
    assert rel_err(loss, loss_ref) <= EAGER_TOL
    assert rel_err(grads, grads_ref) <= EAGER_TOL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_calibration_is_sane():
    index = torch.cuda.current_device()
    profile = calibrated_profile(torch.device("cuda"))
    assert profile.name == f"calibrated-cuda:{index}"
    _assert_sane(profile, (1e12, 1e16), (1e10, 1e14))
    assert calibrated_profile(torch.device("cuda", index)) is profile
