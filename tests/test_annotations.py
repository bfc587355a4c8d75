"""User annotations win: nodes inside a torch.utils.checkpoint region are recomputed, not saved."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

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
