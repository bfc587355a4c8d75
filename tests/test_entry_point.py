"""``backend="fxmem"`` works through the ``torch_dynamo_backends`` entry point alone, in a fresh interpreter
that never imports fxmem itself."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json
    import sys

    import torch
    import torch.nn as nn
    import torch._dynamo


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(16, 32)
            self.norm = nn.LayerNorm(32)
            self.fc2 = nn.Linear(32, 4)

        def forward(self, x, y):
            h = torch.nn.functional.gelu(self.norm(self.fc1(x)))
            return torch.nn.functional.cross_entropy(self.fc2(h), y)


    def step(backend=None, options=None):
        torch.manual_seed(0)
        model = Net()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(8, 16, generator=g)
        y = torch.randint(0, 4, (8,), generator=g)
        fn = model if backend is None else torch.compile(model, backend=backend, options=options)
        loss = fn(x, y)
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters()]


    result = {"listed": "fxmem" in torch._dynamo.list_backends()}
    result["imported_before"] = any(name == "fxmem" or name.startswith("fxmem.") for name in sys.modules)
    loss_ref, grads_ref = step()
    loss, grads = step("fxmem", {"codegen": "eager"})
    result["imported_after"] = "fxmem" in sys.modules
    result["loss_err"] = abs(loss.item() - loss_ref.item()) / abs(loss_ref.item())
    result["grad_err"] = max(((a - b).norm() / b.norm()).item() for a, b in zip(grads, grads_ref))
    result["reports"] = len(sys.modules["fxmem"].reports()) if "fxmem" in sys.modules else None
    print("RESULT " + json.dumps(result))
    """
)
# fp32 with codegen="eager": the same aten ops as eager, so the gradients agree to rounding.
EAGER_TOL = 1e-6


def test_backend_resolves_through_the_entry_point():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, cwd="/"
    )  # cwd="/": fxmem must come from the installed distribution, not the checkout on sys.path
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout
    result = json.loads(lines[0].removeprefix("RESULT "))
    assert result["listed"] is True
    assert result["imported_before"] is False
    assert result["imported_after"] is True
    assert result["loss_err"] <= EAGER_TOL
    assert result["grad_err"] <= EAGER_TOL
    assert result["reports"] == 1
