"""Register your own solver, cost model and quantizer, and use them from torch.compile.

    python examples/custom_solver.py

The solver here is deliberately simple: save every tensor the backward reads, except that pointwise ops
are recomputed. It shows the contract: a function from a torch-free ``Problem`` to a ``Plan``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fxmem  # noqa: E402
from fxmem.cost import RooflineCostModel, register_cost_model  # noqa: E402
from fxmem.quant import register_quantizer  # noqa: E402
from fxmem.quant.integer import Int8Quantizer  # noqa: E402
from fxmem.solve import Plan, Problem, register_solver  # noqa: E402
from fxmem.solve.problem import make_plan  # noqa: E402
from models import mlp  # noqa: E402


@register_solver("save-all-but-pointwise")
def save_all_but_pointwise(problem: Problem, formats: tuple[str, ...] = (), bits: dict | None = None) -> Plan:
    needed = problem.needed()
    saved: dict[str, str | None] = {}
    for node in problem.nodes:
        if node.name not in needed or not node.can_save:
            continue
        recomputable = node.can_recompute and node.kind in ("pointwise", "view", "getitem")
        if not recomputable:
            saved[node.name] = None
    # make_plan checks that the backward can rebuild every tensor it reads from what is saved.
    return make_plan(problem, saved, solver="save-all-but-pointwise", solve_time_s=0.0)


@register_cost_model("roofline-slow-matmul")
class SlowMatmulCostModel(RooflineCostModel):
    """The roofline model, but recomputing a matmul counts double (e.g. a GPU that is also busy)."""

    def recompute_time(self, kind: str, own_time: float) -> float:
        return super().recompute_time(kind, own_time) * (2.0 if kind == "matmul" else 1.0)


@register_quantizer("int8-g64")
class Int8Group64(Int8Quantizer):
    """int8 with groups of 64 elements: more scales, smaller error."""

    default_group_size = 64


def main() -> None:
    model, inputs = mlp.build("tiny")
    backend = fxmem.backend(codegen="eager", solver="save-all-but-pointwise", cost_model="roofline-slow-matmul")
    loss = torch.compile(model, backend=backend)(*inputs)
    loss.backward()
    report = backend.reports[0]
    print(
        f"solver {report.plan.solver}: {report.predicted_saved_bytes} bytes saved "
        f"(torch.compile's default: {report.reference_saved_bytes})"
    )
    for row in report.rows:
        print(f"  {row.name:12} {row.decision:9} {row.reason}")
    # A registered quantizer is a valid `quantize` value.
    torch._dynamo.reset()
    backend = fxmem.backend(codegen="eager", quantize="int8-g64", recompute=False, memory_budget=0.4)
    torch.compile(model, backend=backend)(*inputs).backward()
    formats = sorted({row.fmt for row in backend.reports[0].rows if row.decision == "quantize"})
    print(f"quantize='int8-g64': {backend.reports[0].predicted_saved_bytes} bytes saved, formats used: {formats}")


if __name__ == "__main__":
    main()
