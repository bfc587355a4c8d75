"""Shared test utilities: fresh reference models, one training step, saved-tensor accounting."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import ModuleType
from typing import Any

import torch

import fxmem
import models.gpt
import models.mlp
import models.resnet
import models.vit

MODULES: dict[str, ModuleType] = {
    "gpt": models.gpt,
    "resnet": models.resnet,
    "vit": models.vit,
    "mlp": models.mlp,
}
# Every (model, preset) pair with a tiny preset, e.g. ("gpt", "tiny-dropout").
TINY_PRESETS: list[tuple[str, str]] = [
    (name, preset) for name, module in MODULES.items() for preset in module.PRESETS if preset.startswith("tiny")
]
SEED = 0


def build(name: str, preset: str = "tiny", seed: int = SEED) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    """A freshly built ``(model, inputs)``: the same ``seed`` always gives the same weights and data, so a
    compiled run and an eager run start from identical states."""
    model, inputs = MODULES[name].build(preset, seed=seed)
    return model, tuple(inputs)


def params_and_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def measure_saved_bytes(
    fn: Callable[..., Any],
    *inputs: Any,
    exclude: Iterable[torch.Tensor] = (),
    on_save: Callable[[torch.Tensor], None] | None = None,
) -> tuple[Any, int]:
    """Run ``fn(*inputs)`` and return ``(its result, bytes saved for the backward)``; ``on_save`` sees each
    saved tensor.

    Every tensor autograd saves goes through ``saved_tensors_hooks``; tensors are grouped by storage (a
    view and its base count once) and the storages of ``exclude`` (parameters and buffers) are left out.
    The saved tensors stay referenced by the autograd graph, so no storage is freed and reused while the
    forward runs."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in excluded:
            storages[ptr] = max(storages.get(ptr, 0), storage.nbytes())
        if on_save is not None:
            on_save(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn(*inputs)
    return result, sum(storages.values())


def run_step(
    model: torch.nn.Module,
    inputs: Sequence[Any],
    backend: Any = None,
    options: Mapping[str, Any] | None = None,
    *,
    seed: int | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """One forward and backward of ``model(*inputs)`` (the loss): eagerly when ``backend`` is None, else
    through ``torch.compile(model, backend=backend, options=options)``.

    Returns ``(loss, gradients of the parameters in order, bytes saved for the backward)``. With ``seed``,
    the RNG is seeded right before the forward (for models with dropout)."""
    model.zero_grad(set_to_none=True)
    fn = model if backend is None else torch.compile(model, backend=backend, options=options)
    if seed is not None:
        torch.manual_seed(seed)
    loss, saved = measure_saved_bytes(fn, *inputs, exclude=params_and_buffers(model))
    loss.backward()
    return loss.detach(), param_grads(model), saved


def eager_step(
    name: str, preset: str = "tiny", *, seed: int | None = None
) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """``run_step`` on a fresh model, without compiling."""
    model, inputs = build(name, preset)
    return run_step(model, inputs, seed=seed)


def rel_err(a: Any, b: Any) -> float:
    """``||a - b|| / ||b||``; for sequences of tensors (e.g. parameter gradients), the largest over pairs."""
    if isinstance(a, torch.Tensor):
        a, b = [a], [b]
    a, b = list(a), list(b)
    assert len(a) == len(b), f"comparing {len(a)} tensors with {len(b)}"
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape, f"shape {tuple(x.shape)} vs {tuple(y.shape)}"
        x, y = x.detach().double(), y.detach().double()
        denom = y.norm().item()
        err = (x - y).norm().item()
        worst = max(worst, err / denom if denom > 0 else err)
    return worst


def plan_rows(report: Any) -> list[tuple[str, str, str | None]]:
    """A report's decisions as comparable ``(tensor name, keep|recompute|quantize, format)`` triples."""
    return [(row.name, row.decision, row.fmt) for row in report.rows]


def fxmem_warnings(records: Iterable[logging.LogRecord]) -> list[logging.LogRecord]:
    """The WARNING records logged by fxmem's loggers."""
    return [r for r in records if r.levelno == logging.WARNING and (r.name == "fxmem" or r.name.startswith("fxmem."))]


def param_grads(model: torch.nn.Module) -> list[torch.Tensor]:
    """Copies of ``model``'s parameter gradients, in order."""
    return [p.grad.detach().clone() for p in model.parameters()]


def cosines(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> list[float]:
    """The cosine similarity of each pair of tensors, flattened (float64)."""
    return [
        torch.nn.functional.cosine_similarity(x.flatten().double(), y.flatten().double(), dim=0).item()
        for x, y in zip(a, b, strict=True)
    ]


def planned_reports(backend: Any, count: int) -> list[Any]:
    """``backend``'s reports, asserting there are ``count`` of them (no recompile) and none fell back."""
    reports = backend.reports
    assert len(reports) == count, [r.summary() for r in reports]
    assert all(r.fallback_reason is None for r in reports), [r.fallback_reason for r in reports]
    return reports


def fresh_step(
    make: Callable[[], torch.nn.Module], inputs: Sequence[Any], backend: Any, seed: int | None = None
) -> tuple[list[torch.Tensor], int]:
    """A fresh ``make()``'s gradients (dense) and saved bytes after one step with ``backend`` (eagerly when
    None), from a reset Dynamo and the same initial weights each time."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    _, grads, saved = run_step(make(), inputs, backend, seed=seed)
    return [g.to_dense() for g in grads], saved


def assert_fractions_within_default(
    make: Callable[[], torch.nn.Module],
    inputs: Sequence[Any],
    *,
    budgets: Sequence[float] = (0.7, 0.4, 0.1),
    slack: float = 0.02,
    grad_tol: float = 1e-5,
    seed: int | None = None,
) -> None:
    """With ``codegen="eager"`` and each fractional budget B in turn, fxmem plans ``make()`` without a
    fallback, saves at most (B + ``slack``) x what torch.compile's default (Inductor) saves, no more than
    at the larger budget before, with gradients within ``grad_tol`` of eager's (``rel_err``)."""
    grads_ref, _ = fresh_step(make, inputs, None, seed)
    _, default = fresh_step(make, inputs, "inductor", seed)
    previous = None
    for budget in budgets:
        backend = fxmem.backend(memory_budget=budget, codegen="eager", quantize="none")
        grads, saved = fresh_step(make, inputs, backend, seed)
        assert all(r.fallback_reason is None for r in backend.reports)
        assert saved <= (budget + slack) * default, (budget, saved, default)
        assert previous is None or saved <= previous, (budget, saved, previous)
        assert rel_err(grads, grads_ref) <= grad_tol, budget
        previous = saved


def assert_planned_within(
    budget: float,
    make: Callable[[], torch.nn.Module],
    inputs: Sequence[Any],
    *,
    codegen: str = "eager",
    slack: float = 0.02,
    grad_tol: float = 1e-5,
) -> None:
    """fxmem plans ``make()``'s one graph at ``budget`` with ``codegen`` (no fallback), saves the bytes it
    predicts and at most (budget + ``slack``) x torch.compile's default, with eager's gradients."""
    grads_ref, _ = fresh_step(make, inputs, None)
    _, default = fresh_step(make, inputs, "inductor")
    backend = fxmem.backend(memory_budget=budget, codegen=codegen, quantize="none")
    grads, saved = fresh_step(make, inputs, backend)
    (report,) = backend.reports
    assert report.fallback_reason is None
    assert saved == report.predicted_saved_bytes <= (budget + slack) * default
    assert rel_err(grads, grads_ref) <= grad_tol
