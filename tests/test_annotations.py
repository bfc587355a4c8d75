"""User annotations win: nodes inside a torch.utils.checkpoint region are recomputed, not saved, and a
selective-checkpoint policy's MUST_SAVE and MUST_RECOMPUTE are obeyed whatever the budget."""

from __future__ import annotations

import functools
import logging

import pytest
import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import fxmem


class CheckpointedMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(64, 256)
        self.down = torch.nn.Linear(256, 64)
        self.head = torch.nn.Linear(64, 10)

    def block(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        hidden = checkpoint(self.block, x, use_reentrant=False)
        return torch.nn.functional.cross_entropy(self.head(hidden), y)


@pytest.mark.parametrize("recompute", [True, False])
def test_checkpointed_region_is_recomputed_with_eager_gradients(recompute):
    """Also with ``recompute=False``: the user's annotation wins over the option (it once left the
    region's nodes neither savable nor recomputable, and the graph fell back to PyTorch's partitioner)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = CheckpointedMLP()
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    backend = fxmem.backend(codegen="eager", recompute=recompute)
    torch.compile(model, backend=backend)(x, y).backward()
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x, y).backward()
    for got, want in zip(compiled_grads, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    (report,) = backend.reports
    assert report.fallback_reason is None
    # The ReLU lives inside the checkpointed block: the user asked for it to be recomputed.
    relu_rows = [row for row in report.rows if row.op == "aten.relu.default"]
    assert relu_rows and all(row.decision == "recompute" for row in relu_rows)


def _matmuls_must_save(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    matmul = op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
    return CheckpointPolicy.MUST_SAVE if matmul else CheckpointPolicy.PREFER_RECOMPUTE


def _matmuls_must_recompute(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    matmul = op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
    return CheckpointPolicy.MUST_RECOMPUTE if matmul else CheckpointPolicy.PREFER_SAVE


class SelectiveMLP(torch.nn.Module):
    """Two residual blocks, checkpointed under a selective policy (a function as the ones above)."""

    def __init__(self, policy) -> None:
        super().__init__()
        self.up = torch.nn.Linear(32, 128)
        self.down = torch.nn.Linear(128, 32)
        self.head = torch.nn.Linear(32, 1)
        self.context = functools.partial(create_selective_checkpoint_contexts, policy)

    def block(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.silu(self.up(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(2):
            x = x + checkpoint(self.block, x, use_reentrant=False, context_fn=self.context)
        return self.head(x).square().mean()


@pytest.mark.parametrize(
    ("policy", "budget", "held"),
    [(_matmuls_must_save, 0.1, True), (_matmuls_must_recompute, None, False)],
)
def test_selective_checkpoint_policies_win_over_the_budget(policy, budget, held, caplog):
    """MUST_SAVE holds the matmuls' outputs even where the budget asks for less (a WARNING says how many
    bytes the policy holds); MUST_RECOMPUTE recomputes them even with no budget, where fxmem would hold
    them, and PREFER_SAVE beside it warns of nothing. Gradients are eager's either way."""
    torch.manual_seed(0)
    model = SelectiveMLP(policy)
    x = torch.randn(16, 32)
    model(x).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    backend = fxmem.backend(codegen="eager", memory_budget=budget, quantize="none")
    with caplog.at_level(logging.WARNING, logger="fxmem"):
        torch.compile(model, backend=backend)(x).backward()
    for got, want in zip((p.grad for p in model.parameters()), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    (report,) = backend.reports
    matmuls = {f"addmm_{i}" if i else "addmm" for i in range(4)}  # (the fifth, the head's, is not checkpointed)
    if held:
        assert matmuls <= set(report.plan.saved)
    else:
        assert matmuls.isdisjoint(report.plan.saved) and "addmm" in report.plan.recomputed
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "fxmem" in r.name]
    if held:
        policy_bytes = 2 * 16 * (128 + 32) * 4
        assert any(f"{policy_bytes} bytes a checkpoint policy marks MUST_SAVE" in w for w in warnings)
    else:
        assert not warnings
