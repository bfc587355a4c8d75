"""fxmem with the rest of a training setup: autocast, fused optimizers, graph breaks, recurrent modules,
forward-only graphs, and the capacity planner built on dynamic shapes (``fxmem.capacity``).

Dynamic shapes are in ``test_dynamic_shapes.py``, data parallelism (DDP, FSDP2) in
``test_distributed.py``. All CPU, ``codegen="eager"`` except the ``slow`` Inductor variants.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxmem
import models.gpt
import models.mlp
from fxmem import _compat, capacity
from fxmem.report import BACKWARD_ONLY_REASON
from tests.helpers import build, cosines, param_grads, planned_reports, rel_err

# fp32 with codegen="eager": the joint graph Inductor sees, with its decompositions, run op by op; they
# round differently from eager's fused kernels.
EAGER_TOL = 1e-5
# fp32 with Inductor: fused kernels reorder floating-point reductions.
INDUCTOR_TOL = 1e-4
# bf16 autocast: one bf16 rounding is ~4e-3 relative, and the decomposed ops (batch norm as mean, variance
# and pointwise steps) each round in bf16; fxmem's lossless plan must stay within 2e-2 of eager autocast
# (observed: 1.2e-2 on resnet, bit for bit on gpt).
AUTOCAST_TOL = 2e-2
# int8 storage of the bf16 activations: each gradient must point the same way as the lossless run's.
QUANT_COSINE = 0.99
QUANT_OPTIONS = {"memory_budget": 0.3, "quantize": "int8", "recompute": False, "codegen": "eager"}
MODULES = {"gpt": models.gpt, "mlp": models.mlp}


# --- autocast and optimizers --------------------------------------------------------------------------------


def _autocast_step(name: str, options: dict | None) -> tuple[torch.Tensor, list[torch.Tensor], list]:
    """One bf16-autocast forward and backward of a fresh tiny model; eager when ``options`` is None."""
    torch._dynamo.reset()
    model, inputs = build(name)
    backend = None if options is None else fxmem.backend(**options)
    fn = model if backend is None else torch.compile(model, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fn(*inputs)
    loss.backward()
    return loss.detach(), param_grads(model), [] if backend is None else planned_reports(backend, 1)


@pytest.mark.parametrize("name", ["gpt", "resnet"])
def test_bf16_autocast(name):
    eager_loss, eager_grads, _ = _autocast_step(name, None)
    loss, grads, reports = _autocast_step(name, {"codegen": "eager"})
    assert rel_err(loss, eager_loss) <= AUTOCAST_TOL
    assert rel_err(grads, eager_grads) <= AUTOCAST_TOL
    assert any(row.dtype == "bfloat16" for row in reports[0].rows), "autocast should save bf16 activations"

    # A tight budget without recomputation: the bf16 activations the backward reads are stored as int8.
    q_loss, q_grads, q_reports = _autocast_step(name, QUANT_OPTIONS)
    rows = q_reports[0].rows
    assert any(row.dtype == "bfloat16" and row.decision == "quantize" and row.fmt == "int8" for row in rows)
    # recompute=False: only views (free to rebuild from their base), constants and what only the backward
    # reads are computed in the backward.
    rebuilt = [r for r in rows if r.decision == "recompute" and r.inputs and r.reason != BACKWARD_ONLY_REASON]
    assert {row.kind for row in rebuilt} <= {"view", "getitem"}
    assert q_reports[0].predicted_saved_bytes < q_reports[0].reference_saved_bytes
    assert rel_err(q_loss, loss) <= EAGER_TOL  # the forward never reads what it stores quantized
    assert min(cosines(q_grads, grads)) >= QUANT_COSINE


def _adamw_kind() -> dict[str, bool]:
    """Fused AdamW where this torch has it on CPU, else the foreach implementation."""
    if "fused" in inspect.signature(torch.optim.AdamW).parameters:
        try:
            torch.optim.AdamW([nn.Parameter(torch.zeros(1))], fused=True).step()
            return {"fused": True}
        except RuntimeError:
            pass
    return {"foreach": True}


def test_adamw_steps_after_the_fxmem_backward():
    """Two training steps under bf16 autocast: fxmem's gradients feed a fused (or foreach) AdamW, and the
    parameters after them agree with eager training's."""
    kind = _adamw_kind()
    models_ = {}
    for label, options in (("eager", None), ("fxmem", {"codegen": "eager", "memory_budget": 0.4})):
        torch._dynamo.reset()
        model, inputs = build("gpt")
        backend = None if options is None else fxmem.backend(**options)
        fn = model if backend is None else torch.compile(model, backend=backend)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, **kind)
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                fn(*inputs).backward()
            optimizer.step()
        if backend is not None:
            planned_reports(backend, 1)  # the second step reuses the first step's plan
        models_[label] = model
    moved = [
        (p.detach() - q.detach()).norm().item()
        for p, q in zip(models_["fxmem"].parameters(), build("gpt")[0].parameters(), strict=True)
    ]
    assert min(moved) > 0, "every parameter should have been updated"
    assert rel_err(list(models_["fxmem"].parameters()), list(models_["eager"].parameters())) <= AUTOCAST_TOL


# --- graph breaks ----------------------------------------------------------------------------------------


class _Half(nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(F.gelu(self.fc(self.ln(x))))


class TwoGraphs(nn.Module):
    """Two residual MLP halves with an explicit graph break between them."""

    def __init__(self) -> None:
        super().__init__()
        self.first = _Half()
        self.second = _Half()
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        torch._dynamo.graph_break()
        return F.cross_entropy(self.head(self.second(h)), labels)


def _two_graphs() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = TwoGraphs()
    return model, (torch.randn(32, 64), torch.randint(0, 10, (32,)))


def _graph_break_step(options: dict) -> tuple[list[torch.Tensor], list[torch.Tensor], list[fxmem.GraphReport]]:
    torch._dynamo.reset()
    model, inputs = _two_graphs()
    reference = copy.deepcopy(model)
    reference(*inputs).backward()
    backend = fxmem.backend(**options)
    torch.compile(model, backend=backend)(*inputs).backward()
    return param_grads(model), param_grads(reference), planned_reports(backend, 2)


def test_graph_break_both_graphs_planned():
    grads, expected, reports = _graph_break_step({"codegen": "eager"})
    assert rel_err(grads, expected) <= EAGER_TOL
    assert all(r.rows for r in reports)


def test_graph_break_fractional_budget_applies_to_each_graph():
    grads, expected, reports = _graph_break_step({"codegen": "eager", "memory_budget": 0.4})
    assert rel_err(grads, expected) <= EAGER_TOL
    for report in reports:  # each graph against its own default, not the total
        assert report.budget_bytes == pytest.approx(0.4 * report.reference_saved_bytes)
        assert report.predicted_saved_bytes <= report.budget_bytes


def test_graph_break_absolute_budget_applies_to_each_graph_not_the_total():
    model, inputs = _two_graphs()
    lossless = fxmem.inspect(model, *inputs)
    budget = max(g.predicted_peak_bytes for g in lossless)  # each graph alone fits it
    torch._dynamo.reset()
    grads, expected, reports = _graph_break_step({"codegen": "eager", "memory_budget": budget})
    assert rel_err(grads, expected) <= EAGER_TOL
    assert all(r.predicted_peak_bytes <= budget for r in reports)
    # The graphs' peaks stack (the first graph's saved tensors and the second's parameters are live while
    # the second runs): the predicted peak of the whole step exceeds the budget each graph was held to.
    assert fxmem.Report(reports).predicted_peak_bytes > budget


# --- recurrent modules ---------------------------------------------------------------------------------------


class _LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(torch.tanh(self.embed(x)))
        return self.head(h).square().mean()


def test_an_lstm_is_planned_once_dynamo_compiles_it():
    """Dynamo runs a model holding an ``nn.LSTM`` eagerly unless ``allow_rnn`` is set, so no backend sees
    it (fxmem makes no report); with it, the unrolled cells are one graph fxmem plans like any other."""
    torch.manual_seed(0)
    model, x = _LSTMNet(), torch.randn(8, 6, 8)
    eager = copy.deepcopy(model)
    eager(x).backward()
    backend = fxmem.backend(memory_budget=0.4, codegen="eager", quantize="none")
    torch.compile(copy.deepcopy(model), backend=backend)(x).backward()
    assert backend.reports == []
    torch._dynamo.reset()
    with torch._dynamo.config.patch(allow_rnn=True):
        torch.compile(model, backend=backend)(x).backward()
    (report,) = planned_reports(backend, 1)
    assert report.predicted_saved_bytes <= (0.4 + 0.02) * report.reference_saved_bytes
    assert rel_err(param_grads(model), param_grads(eager)) <= EAGER_TOL


# --- forward-only graphs ---------------------------------------------------------------------------------


def test_forward_only_graphs_are_not_planned():
    model, inputs = _two_graphs()
    with torch.no_grad():
        expected = model(*inputs)
        backend = fxmem.backend(codegen="eager")
        got = torch.compile(model, backend=backend)(*inputs)
    assert rel_err(got, expected) <= EAGER_TOL
    assert backend.reports == [] and fxmem.reports() == []

    # Frozen parameters and inputs without grad: no backward either, even with grad mode on.
    torch._dynamo.reset()
    model.requires_grad_(False)
    backend = fxmem.backend(codegen="eager")
    got = torch.compile(model, backend=backend)(*inputs)
    assert rel_err(got, expected) <= EAGER_TOL
    assert backend.reports == []


# --- capacity: the largest batch that fits -----------------------------------------------------------------

# (model, budget): budgets that land the answer where the plan at each static size is the dynamic plan.
CAPACITY_CASES = [("mlp", 60_000), ("gpt", "1MB")]


@pytest.mark.parametrize("case", CAPACITY_CASES, ids=lambda c: c[0])
def test_max_batch_size_brackets_the_budget(case):
    name, budget = case
    module = MODULES[name]
    model, inputs = module.build("tiny", batch_size=4)
    before = [p.detach().clone() for p in model.parameters()]
    best = capacity.max_batch_size(model, inputs, budget)
    budget_bytes = capacity._budget_bytes(budget)
    assert 4 <= best < capacity.DEFAULT_MAX_BATCH
    # Checked by planning the model at those exact, static sizes.
    peaks = {}
    for size in (best, best + 1):
        torch._dynamo.reset()
        peaks[size] = fxmem.inspect(model, *module.build("tiny", batch_size=size)[1]).predicted_peak_bytes
    assert peaks[best] <= budget_bytes < peaks[best + 1], (best, peaks)
    # Nothing of the caller's changed: parameters, gradients, the inputs' dynamic marks.
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert all(p.grad is None for p in model.parameters())
    assert not any(hasattr(x, "_dynamo_dynamic_indices") for x in inputs)


def test_peak_model_matches_static_planning():
    """The formulas reproduce the simulator at other sizes. Planned statically, a size gets its own plan,
    which for mlp tiny is the dynamic plan (made at 4) below 12; from 12 on the static plan holds less."""
    model, inputs = models.mlp.build("tiny", batch_size=4)
    peak = capacity.peak_model(model, inputs)
    assert peak.traced_batch == 4 and "B" in peak.formula
    assert peak(4) == peak.report().predicted_peak_bytes
    for size in (2, 7, 9):
        torch._dynamo.reset()
        static = fxmem.inspect(model, *models.mlp.build("tiny", batch_size=size)[1])
        assert (peak(size), peak.saved(size)) == (static.predicted_peak_bytes, static.predicted_saved_bytes)


@pytest.mark.slow
def test_peak_model_with_inductor_codegen(inductor_cache):
    """Under Inductor fused kernels hold less: the formulas follow the fused simulation."""
    model, inputs = models.mlp.build("tiny", batch_size=4)
    peak = capacity.peak_model(model, inputs, codegen="inductor")
    assert peak(4) == peak.report().predicted_peak_bytes
    torch._dynamo.reset()
    static = fxmem.inspect(model, *models.mlp.build("tiny", batch_size=9)[1], codegen="inductor")
    assert peak(9) == static.predicted_peak_bytes


def test_max_batch_size_extremes():
    model, inputs = models.mlp.build("tiny", batch_size=4)
    peak = capacity.peak_model(model, inputs)
    assert capacity.largest_fitting(peak, peak(1) - 1) == 0  # not even one sample fits
    assert capacity.largest_fitting(peak, 2**62, max_batch=100) == 100  # capped
    assert capacity.largest_fitting(peak, peak(50)) == 50


def test_largest_fitting_bisects():
    assert capacity.largest_fitting(lambda b: 10 * b, 95, 1000) == 9
    assert capacity.largest_fitting(lambda b: 10 * b, 100, 1000) == 10
    assert capacity.largest_fitting(lambda b: b * b, 10**6, 10**9) == 1000
    assert capacity.largest_fitting(lambda b: 5, 4, 10) == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"memory_budget": 0.5}, "memory_budget"),
        ({"memory_budget": -1}, "memory_budget"),
        ({"memory_budget": True}, "memory_budget"),
        ({"memory_budget": "8 parsecs"}, "memory_budget"),
        ({"batch_dim": 2}, "batch_dim"),
        ({"batch_dim": "0"}, "batch_dim"),
        ({"max_batch": 0}, "max_batch"),
        ({"quantize": "int7"}, "quantize"),
    ],
)
def test_max_batch_size_validates_its_arguments(kwargs, match):
    model, inputs = models.mlp.build("tiny", batch_size=4)
    with pytest.raises(ValueError, match=match):
        capacity.max_batch_size(model, inputs, **kwargs)


def test_max_batch_size_validates_the_inputs():
    model, (x, labels) = models.mlp.build("tiny", batch_size=4)
    with pytest.raises(ValueError, match="disagree"):
        capacity.max_batch_size(model, (x, labels[:3]), "1GiB")
    with pytest.raises(ValueError, match="at least 2"):
        capacity.max_batch_size(model, (x[:1], labels[:1]), "1GiB")
    with pytest.raises(TypeError, match="nn.Module"):
        capacity.max_batch_size(lambda x, y: x, (x, labels), "1GiB")


# --- caching -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_inspect_with_inductor_on_a_warm_cache(inductor_cache):
    """FxmemPartitioner.uuid() is stable, so the caches would serve the graph training compiled without
    calling the partitioner; inspect turns the caches off for its own compile, so it still plans."""
    model, inputs = models.mlp.build("tiny")
    backend = fxmem.backend()  # codegen="inductor": training saves the compiled graph to the cache
    torch.compile(model, backend=backend)(*inputs).backward()
    assert len(backend.reports) == 1
    torch._dynamo.reset()
    report = fxmem.inspect(model, *inputs, codegen="inductor")  # same options: a cache hit
    assert len(report) == 1


# --- torch.compile's mode ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compile_mode_sets_inductors_config(monkeypatch, inductor_cache):
    """``mode=`` reaches Inductor as with the ``"inductor"`` backend, beside fxmem's partitioner. On a CPU
    Inductor skips the CUDA graphs "reduce-overhead" asks for; the plan and the gradients are unchanged."""
    seen = []
    compile_fx = _compat.compile_fx

    def recording(gm, example_inputs, config_patches):
        seen.append(config_patches)
        return compile_fx(gm, example_inputs, config_patches=config_patches)

    monkeypatch.setattr(_compat, "compile_fx", recording)
    model, inputs = models.mlp.build("tiny")
    reference = copy.deepcopy(model)
    reference(*inputs).backward()
    backend = fxmem.backend(memory_budget=0.4)
    torch.compile(model, backend=backend, mode="reduce-overhead")(*inputs).backward()
    (patches,) = seen
    assert patches["triton.cudagraphs"] is True and "custom_partitioner_fn" in patches
    (report,) = planned_reports(backend, 1)
    assert report.predicted_saved_bytes <= report.budget_bytes
    assert rel_err(param_grads(model), param_grads(reference)) <= INDUCTOR_TOL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_replay_the_planned_step(inductor_cache):
    """On a GPU "reduce-overhead" records fxmem's forward and backward as CUDA graphs (none skipped) and
    replays them: every step's gradients match eager's, the first (recording) and the later (replays)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model, inputs = models.mlp.build("tiny")
    model, inputs = model.cuda(), [x.cuda() for x in inputs]
    reference = copy.deepcopy(model)
    reference(*inputs).backward()
    backend = fxmem.backend(memory_budget=0.4)
    compiled = torch.compile(model, backend=backend, mode="reduce-overhead")
    counters.clear()
    for _ in range(4):  # warm-up, recording, then replays
        model.zero_grad(set_to_none=True)
        compiled(*inputs).backward()
        assert rel_err(param_grads(model), param_grads(reference)) <= INDUCTOR_TOL
    assert counters["inductor"]["cudagraph_skips"] == 0
    (report,) = planned_reports(backend, 1)
    assert report.predicted_saved_bytes <= report.budget_bytes


@pytest.mark.parametrize(
    ("options", "mode", "match"),
    [
        ({"codegen": "eager"}, "max-autotune", "mode='max-autotune' sets Inductor's config and needs codegen="),
        ({}, "fastest", "mode must be one of 'default', .*'max-autotune'.*; got 'fastest'"),
    ],
)
def test_compile_mode_errors(options, mode, match):
    gm = torch.fx.symbolic_trace(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=match):
        fxmem.backend(**options)(gm, [torch.randn(1, 2)], mode=mode)
