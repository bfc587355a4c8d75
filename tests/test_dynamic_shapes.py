"""Dynamic shapes (``dynamic=True``, ``mark_dynamic``): one plan, made at the first batch size, serves
every size without a recompile, quantized or not; and ``fxmem.capacity``'s formulas follow its payloads.

All CPU, ``codegen="eager"`` except the ``slow`` Inductor variants.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

import fxmem
import fxmem.planner
import models.gpt
import models.mlp
import models.vit
from fxmem import _compat, capacity
from fxmem.quant import get_quantizer
from tests.helpers import cosines, measure_saved_bytes, param_grads, params_and_buffers, planned_reports, rel_err

# fp32 with codegen="eager": decomposed ops round differently from eager's fused kernels.
EAGER_TOL = 1e-5
# The brief's bound for a plan reused across sizes (observed: bit for bit).
DYNAMIC_TOL = 1e-4
# int8 storage of activations: each gradient must point the same way as eager's.
QUANT_COSINE = 0.99
BATCH_SIZES = (4, 8, 12)
# A symbolic size in a formula, as Dynamo names them (s0, s77, ...).
SYMBOL = re.compile(r"\bs\d+\b")
MODULES = {"gpt": models.gpt, "mlp": models.mlp, "vit": models.vit}


def _dynamic_steps(
    name: str, options: dict, how: str = "dynamic", preset: str = "tiny", sizes: tuple[int, ...] = BATCH_SIZES
) -> tuple[fxmem.FxmemCompiler, list[list[torch.Tensor]], list[list[torch.Tensor]], list[int]]:
    """Train steps at ``sizes`` through one compiled model (``how``: "dynamic", "mark_dynamic", or
    "static" for the first size only), the RNG seeded alike for eager so dropout draws the same masks:
    fxmem's gradients, eager's, and the bytes saved for the backward at each size."""
    module = MODULES[name]
    model, _ = module.build(preset, batch_size=sizes[0])
    reference = copy.deepcopy(model)
    backend = fxmem.backend(**options)
    compiled = torch.compile(model, backend=backend, dynamic={"dynamic": True, "static": False}.get(how))
    grads, eager_grads, saved = [], [], []
    for size in sizes[:1] if how == "static" else sizes:
        _, inputs = module.build(preset, batch_size=size, seed=size)
        if how == "mark_dynamic":
            for x in inputs:
                torch._dynamo.mark_dynamic(x, 0)
        model.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        torch.manual_seed(size)
        loss, nbytes = measure_saved_bytes(compiled, *inputs, exclude=params_and_buffers(model))
        loss.backward()
        torch.manual_seed(size)
        reference(*inputs).backward()
        grads.append(param_grads(model))
        eager_grads.append(param_grads(reference))
        saved.append(nbytes)
    return backend, grads, eager_grads, saved


def _dynamic_run(name: str, how: str, options: dict) -> tuple[fxmem.FxmemCompiler, list[float]]:
    """``_dynamic_steps``' backend and its gradient errors against eager at each size."""
    backend, grads, eager_grads, _ = _dynamic_steps(name, options, how)
    return backend, [rel_err(g, e) for g, e in zip(grads, eager_grads, strict=True)]


@pytest.mark.parametrize("how", ["dynamic", "mark_dynamic"])
@pytest.mark.parametrize("name", ["gpt", "mlp"])
def test_dynamic_shapes_one_plan_serves_every_batch_size(name, how):
    backend, errors = _dynamic_run(name, how, {"codegen": "eager"})
    assert max(errors) <= DYNAMIC_TOL, errors
    (report,) = planned_reports(backend, 1)  # one graph, planned once: no recompile for 8 or 12
    # The sizes are formulas in the batch symbol: a batch-sized activation's bytes read e.g. "256*s77".
    symbolic = [row for row in report.rows if SYMBOL.search(row.bytes_formula)]
    assert symbolic, [row.bytes_formula for row in report.rows]
    assert all(row.bytes == 0 or row.bytes_formula != str(row.bytes) for row in symbolic)


@pytest.mark.slow
def test_dynamic_shapes_with_inductor(inductor_cache):
    backend, errors = _dynamic_run("mlp", "dynamic", {"codegen": "inductor"})
    assert max(errors) <= DYNAMIC_TOL, errors
    (report,) = planned_reports(backend, 1)
    assert any(SYMBOL.search(row.bytes_formula) for row in report.rows)


def test_quantization_under_dynamic_shapes(monkeypatch):
    """One plan, made at the first size, quantizes and serves every size with no recompile: its codecs
    read the sizes as symbols, so the payloads grow with the batch (saved bytes affine in it), and at the
    traced size the plan and its gradients are those of a static compile that leaves as many elements
    unquantized (under dynamic shapes, those under two scale groups of the largest kind; see
    composability.md)."""
    options = {"codegen": "eager", "memory_budget": 0.3, "quantize": "int8"}
    backend, grads, eager_grads, saved = _dynamic_steps("gpt", options)
    (report,) = planned_reports(backend, 1)
    assert report.plan.quantized, report.summary()
    assert saved[0] == report.predicted_saved_bytes
    slope = (saved[1] - saved[0]) / (BATCH_SIZES[1] - BATCH_SIZES[0])
    assert saved[2] - saved[0] == slope * (BATCH_SIZES[2] - BATCH_SIZES[0]) > 0, saved
    for got, want in zip(grads, eager_grads, strict=True):
        assert min(cosines(got, want)) >= QUANT_COSINE
    floor = fxmem.planner.dynamic_min_quant_numel([get_quantizer("int8")])
    monkeypatch.setattr(fxmem.planner, "MIN_QUANT_NUMEL", floor)
    static, static_grads, _, static_saved = _dynamic_steps("gpt", options, "static")
    # (node names differ: the dynamic graph has its sizes as inputs)
    assert sorted(static.reports[0].plan.quantized.values()) == sorted(report.plan.quantized.values())
    assert static_saved[0] == saved[0]
    assert rel_err(grads[0], static_grads[0]) <= EAGER_TOL


def test_quantized_codecs_add_no_guard_on_the_batch():
    """vit tiny's tokens (16 patches and a class token) fill a tensor's last scale group by an amount that
    changes with the batch. The codecs are traced answering shape checks as for any size, so they add no
    guard on it: one plan serves batches 4, 6 and 5 (before, 6 recompiled). Where this torch cannot trace
    them so (2.11), the checks guard: a recompile, with every plan still quantized."""
    options = {"codegen": "eager", "memory_budget": 0.1, "quantize": "int8"}
    backend, grads, eager_grads, _ = _dynamic_steps("vit", options, sizes=(4, 6, 5))
    oblivious = _compat._oblivious_slices_stay_backed()
    reports = planned_reports(backend, 1) if oblivious else backend.reports
    assert all(report.fallback_reason is None and report.plan.quantized for report in reports)
    for got, want in zip(grads, eager_grads, strict=True):
        assert min(cosines(got, want)) >= QUANT_COSINE


def test_tensors_of_one_scale_group_stay_unquantized_under_dynamic_shapes():
    """mlp tiny's activations hold 128 to 256 elements at batch 4: quantized statically, not under dynamic
    shapes, where a single group's count would be a size Inductor specializes on."""
    options = {"codegen": "eager", "memory_budget": 0.2, "quantize": "int8"}
    static, _, _, _ = _dynamic_steps("mlp", options, "static")
    assert static.reports[0].plan.quantized
    dynamic, _, _, _ = _dynamic_steps("mlp", options)
    (report,) = planned_reports(dynamic, 1)
    assert not report.plan.quantized


def test_packed_masks_under_dynamic_shapes():
    """Dropout masks packed 8 per byte under dynamic shapes: lossless, at every size."""
    options = {"codegen": "eager", "memory_budget": 0.3, "quantize": "none"}
    backend, grads, eager_grads, _ = _dynamic_steps("gpt", options, preset="tiny-dropout")
    (report,) = planned_reports(backend, 1)
    assert "bitmask" in report.plan.quantized.values(), report.summary()
    assert max(rel_err(g, e) for g, e in zip(grads, eager_grads, strict=True)) <= DYNAMIC_TOL


@pytest.mark.slow
def test_quantization_under_dynamic_shapes_with_inductor(inductor_cache):
    options = {"codegen": "inductor", "memory_budget": 0.3, "quantize": "int8"}
    backend, grads, eager_grads, _ = _dynamic_steps("gpt", options)
    (report,) = planned_reports(backend, 1)  # no recompile: Inductor specialized no codec on a size
    assert report.plan.quantized, report.summary()
    for got, want in zip(grads, eager_grads, strict=True):
        assert min(cosines(got, want)) >= QUANT_COSINE


def test_peak_model_counts_quantized_payloads():
    """With quantization, the saved-bytes formula follows the payloads: at every size it gives what the
    same plan, compiled with dynamic shapes, saves for the backward."""
    options = {"codegen": "eager", "quantize": "int8"}
    model, inputs = models.gpt.build("tiny", batch_size=BATCH_SIZES[0])
    peak = capacity.peak_model(model, inputs, **options)
    assert all(report.plan.quantized for report in peak.reports)
    _, _, _, saved = _dynamic_steps("gpt", options)
    assert [peak.saved(size) for size in BATCH_SIZES] == saved
