"""The simulator's model of what Inductor writes to memory: which nodes of a graph get a buffer."""

from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fxmem.simulate import _stored_nodes


def _stored(fn, *inputs: torch.Tensor) -> set[str]:
    gm = make_fx(fn)(*inputs)
    return {n.name for n in _stored_nodes(gm) if n.op == "call_function"}


def test_reused_pointwise_is_inlined_into_each_consumer_unless_a_matmul_reads_it():
    """A cast read by a reduction and by a pointwise op is computed inside both kernels (the fp32 copy of
    a large logits gradient is never written); the same cast feeding a matmul is written for it."""

    def reused(x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        return (y.sum(dim=1, keepdim=True) * y).exp()

    assert _stored(reused, torch.ones(4, 8, dtype=torch.bfloat16)) == {"sum_1", "exp"}

    def into_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (x * 2) @ w

    assert _stored(into_matmul, torch.ones(4, 8), torch.ones(8, 3)) == {"mul", "mm"}


def test_a_reused_result_that_reads_many_buffers_is_written_once():
    """Inductor writes a reused loop body that reads more than four buffers rather than redo it per
    consumer; read once, it stays inlined."""

    def sum_of(*xs: torch.Tensor) -> torch.Tensor:
        total = xs[0]
        for x in xs[1:]:
            total = total + x
        return total

    def reused(*xs: torch.Tensor) -> torch.Tensor:
        y = sum_of(*xs)
        return y.amax(dim=0) + y.amin(dim=0)

    five, four = [torch.ones(4, 8) for _ in range(5)], [torch.ones(4, 8) for _ in range(4)]
    assert "add_3" in _stored(reused, *five)
    assert _stored(reused, *four) == {"amax", "amin", "add_3"}
    assert "add_3" not in _stored(lambda *xs: sum_of(*xs).amax(dim=0), *five)


def test_heavy_reused_results_are_written_on_the_cpu_only():
    """On the CPU, Inductor writes a reused result that calls exp, log, sigmoid or tanh."""

    def reused_exp(x: torch.Tensor) -> torch.Tensor:
        y = x.exp()
        return y.sum() + y.amax()

    assert "exp" in _stored(reused_exp, torch.ones(4, 8))
    assert "exp" not in _stored(reused_exp, torch.ones(4, 8, device="meta"))
