"""The eager codegen (``codegen="eager"``) plans the joint graph Inductor would partition: Inductor's
decompositions and its joint-graph clean-ups (not its pattern rewrites), but for an op it keeps whole
where that leaves the plan unchanged (batch norm's backward)."""

from __future__ import annotations

import copy

import pytest
import torch

import fxmem
from tests.helpers import rel_err, run_step

# Decomposed ops round differently from eager's fused kernels.
EAGER_TOL = 1e-5
BUDGET = 0.4
BUDGET_SLACK = 0.02  # the slack fractional budgets are allowed over B x the default


class _NoOps(torch.nn.Module):
    """An explicit clone and a product with ones: Inductor's joint-graph passes remove both before it
    partitions, so torch.compile's default saves the activation once. Without those passes the eager
    codegen's default saved it twice over (and fractional budgets were fractions of that)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(16, 32)
        self.b = torch.nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        h = h.clone() * torch.ones_like(h)
        return self.b(h).square().mean() + h.square().mean()


@pytest.mark.slow
def test_default_is_measured_on_the_graph_inductor_partitions():
    x = torch.randn(8, 16)
    torch.manual_seed(0)
    model = _NoOps()
    _, eager_grads, _ = run_step(copy.deepcopy(model), (x,))
    _, _, default = run_step(copy.deepcopy(model), (x,), "inductor")
    torch._dynamo.reset()
    backend = fxmem.backend(memory_budget=BUDGET, codegen="eager", quantize="none")
    _, grads, saved = run_step(copy.deepcopy(model), (x,), backend)
    (report,) = backend.reports
    assert report.fallback_reason is None
    assert report.reference_saved_bytes == default
    assert saved <= (BUDGET + BUDGET_SLACK) * default
    assert rel_err(grads, eager_grads) <= EAGER_TOL


@pytest.mark.parametrize("variant", ["affine", "no-affine", "no-running-stats", "batchnorm1d", "eval", "channels-last"])
def test_batch_norm_backward_kept_whole_matches_eager(variant):
    """The eager codegen keeps batch norm's backward as one op in training (traced without the running
    statistics the forward updates in place); every variant gives eager's gradients and running stats."""
    torch.manual_seed(0)
    one_d = variant == "batchnorm1d"
    norm = (torch.nn.BatchNorm1d if one_d else torch.nn.BatchNorm2d)(
        6, affine=variant != "no-affine", track_running_stats=variant != "no-running-stats"
    )
    conv = (torch.nn.Conv1d if one_d else torch.nn.Conv2d)(3, 6, 3, bias=False)  # (a bias before a norm: grad ~0)
    head = torch.nn.Linear(48 if one_d else 384, 2)
    model = torch.nn.Sequential(conv, norm, torch.nn.ReLU(), torch.nn.Flatten(), head)
    x = torch.randn(4, 3, 10) if one_d else torch.randn(4, 3, 10, 10)
    if variant == "channels-last":
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    if variant == "eval":
        model.eval()
    twin = copy.deepcopy(model)
    eager_loss, eager_grads, _ = run_step(_Loss(model), (x,))
    torch._dynamo.reset()
    loss, grads, _ = run_step(_Loss(twin), (x,), fxmem.backend(codegen="eager"))
    assert rel_err(loss, eager_loss) < EAGER_TOL
    assert rel_err(grads, eager_grads) < EAGER_TOL
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(dict(twin.named_buffers())[name], buffer)


class _Loss(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).square().mean()
