"""What fxmem decided for each compiled graph, and why: the records the inspection tools read."""

from __future__ import annotations

import logging
import time
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fxmem.rng import generator_state
from fxmem.solve.problem import Decision

if TYPE_CHECKING:
    from fxmem.capture import JointGraph, NodeFacts
    from fxmem.planner import PlanningInputs
    from fxmem.simulate import Timeline
    from fxmem.solve import Plan
    from fxmem.solve.problem import Problem, SolverNode

log = logging.getLogger("fxmem")
_REPORTS: list[GraphReport] = []
BACKWARD_ONLY_REASON = "only the backward reads it: computed there instead of in the forward"
EXACT_REASON = "a comparison, index or step, held: recomputed from a quantized or recomputed input, it could flip"
SNAPSHOT_REASON = "the random generator's state before a draw: held so that the backward can replay the draw"


@dataclass
class PassRecord:
    name: str
    seconds: float
    summary: str


@dataclass
class TensorRow:
    """One tensor the backward reads, and what fxmem does with it."""

    name: str
    op: str
    kind: str
    shape: tuple[Any, ...]
    dtype: str
    bytes: int
    bytes_formula: str
    decision: str  # keep | recompute | quantize
    fmt: str | None
    stored_bytes: int
    est_time_s: float
    reason: str
    inputs: tuple[str, ...] = ()  # the nearest tensors in ``rows`` this one is computed from
    alternatives: dict[str, tuple[int, float]] = field(default_factory=dict)  # choice -> (bytes held, added s)


@dataclass
class GraphReport:
    graph_id: int
    options: dict[str, Any]
    rows: list[TensorRow] = field(default_factory=list)
    plan: Plan | None = None
    predicted_saved_bytes: int | None = None
    predicted_peak_bytes: int | None = None
    timeline: Timeline | None = None
    reference_timeline: Timeline | None = None
    reference_saved_bytes: int | None = None
    budget_bytes: float | None = None
    device_profile: str | None = None
    estimated_step_s: float | None = None
    partition_time_s: float = 0.0
    fallback_reason: str | None = None
    passes: list[PassRecord] = field(default_factory=list)

    def add_pass(self, name: str, started: float, summary: str) -> None:
        self.passes.append(PassRecord(name, time.perf_counter() - started, summary))

    @property
    def estimated_overhead(self) -> float | None:
        if self.plan is None or not self.estimated_step_s:
            return None
        return self.plan.added_s / self.estimated_step_s

    def summary(self) -> str:
        if self.fallback_reason:
            return f"graph {self.graph_id}: PyTorch's partitioner ({self.fallback_reason})"
        overhead = self.estimated_overhead
        overhead_text = "?" if overhead is None else f"{overhead * 100:.1f}%"
        return (
            f"graph {self.graph_id}: saved activations {_mib(self.reference_saved_bytes)} (torch.compile) -> "
            f"{_mib(self.predicted_saved_bytes)} (fxmem), est. overhead {overhead_text}"
        )


def _mib(value: int | None) -> str:
    return "?" if value is None else f"{value / 2**20:.2f} MiB"


def tensor_rows(joint: JointGraph, plan: Plan, inputs: PlanningInputs) -> list[TensorRow]:
    problem = inputs.problem
    recomputed, required = set(plan.recomputed), set(joint.required)  # sets: a deep graph has thousands
    rows = []
    for node in joint.forward:
        if node.name not in plan.saved and (node.name not in recomputed or node not in required):
            continue  # neither held nor read by the backward (an intermediate of a recomputation)
        facts = joint.facts[node]
        tensor = facts.tensor
        solver_node = problem.by_name[node.name]
        decision = plan.decision(node.name) if node.name in plan.saved else Decision("recompute")
        stored = 0 if decision.kind == "recompute" else solver_node.stored_bytes(decision.fmt)
        exact = node.name in inputs.exact
        reason = _reason(decision.kind, facts, solver_node, decision.fmt, problem, plan.saved, exact=exact)
        if node.target is generator_state:
            reason = SNAPSHOT_REASON
        rows.append(
            TensorRow(
                name=node.name,
                op=_op_label(node.target),
                kind=facts.kind,
                shape=tuple(str(d) for d in tensor.shape) if tensor else (),
                dtype=str(tensor.dtype).removeprefix("torch.") if tensor else "-",
                bytes=tensor.nbytes if tensor else 0,
                bytes_formula=str(tensor.nbytes_expr) if tensor else "0",
                decision=decision.kind,
                fmt=decision.fmt,
                stored_bytes=stored,
                est_time_s=solver_node.recompute_s
                if decision.kind == "recompute"
                else _quant_time(solver_node, decision.fmt),
                reason=reason,
                alternatives=_alternatives(solver_node),
            )
        )
    _link_rows(joint, rows)
    return rows


def _op_label(target: Any) -> str:
    """An op as torch prints it (``aten.add.Tensor``); a function of fxmem's as its qualified name."""
    if isinstance(target, types.FunctionType):
        return f"{target.__module__}.{target.__qualname__}"
    return str(target)


def _alternatives(node: Any) -> dict[str, tuple[int, float]]:
    choices = {"keep": (node.save_bytes, 0.0)} if node.can_save else {}
    if node.can_recompute:
        choices["recompute"] = (0, node.recompute_s)
    choices.update((o.fmt, (o.stored_bytes, o.added_s)) for o in node.quant_options)
    return choices


def _link_rows(joint: JointGraph, rows: list[TensorRow]) -> None:
    """Set each row's ``inputs``: the nearest rows among its ancestors, looking through other nodes."""
    names = {row.name for row in rows}
    nearest: dict[str, tuple[str, ...]] = {}
    for node in joint.forward:
        found: dict[str, None] = {}
        for arg in node.all_input_nodes:
            found.update(dict.fromkeys((arg.name,) if arg.name in names else nearest.get(arg.name, ())))
        nearest[node.name] = tuple(found)
    for row in rows:
        row.inputs = nearest[row.name]


def _quant_time(node: Any, fmt: str | None) -> float:
    return next((o.added_s for o in node.quant_options if o.fmt == fmt), 0.0)


def _reason(
    decision: str,
    facts: NodeFacts,
    node: Any,
    fmt: str | None,
    problem: Problem,
    saved: Mapping[str, str | None],
    *,
    exact: bool = False,
) -> str:
    kind = facts.kind
    if exact:
        return EXACT_REASON
    if decision == "recompute" and facts.backward_only:
        return BACKWARD_ONLY_REASON
    if decision == "recompute":
        return f"{kind} op: recomputing costs less than holding {node.save_bytes} bytes"
    if decision == "quantize":
        return f"stored as {fmt}: the cheapest way to hold it under the budget"
    if facts.written_into is not None:
        return f"written into {facts.written_into.name} by the forward: the backward reads it back from there"
    if facts.overwritten:
        return "an input the forward updates in place: the forward saves a copy of the value it had"
    if node.save_bytes == 0:
        return "a parameter or buffer: holding it costs nothing"
    if not node.can_recompute:
        return _held_reason(facts)
    return _blocked_reason(node, problem, saved) or "recomputing it would cost more time than the budget allows"


def _held_reason(facts: NodeFacts) -> str:
    """Why a node the backward reads can only be held."""
    if facts.kind == "input":
        return "a graph input: nothing in the graph can recompute it"
    if facts.user_policy == "MUST_SAVE":
        return "the checkpoint policy says MUST_SAVE"
    if facts.can_recompute:
        return "recompute=False: only views, constants and what the backward alone reads are recomputed"
    return f"{facts.kind} op: cannot be recomputed (random, impure, or it updates state)"


def _blocked_reason(node: SolverNode, problem: Problem, saved: Mapping[str, str | None]) -> str | None:
    """Why a recomputable node is held after all: recomputing it needs a tensor that can be neither held
    nor recomputed (e.g. the tuple a random op with several outputs returns), or needs tensors held that
    the plan does not hold and that cannot be recomputed, as many bytes as it holds or more (a mask
    computed from int64 labels). Looks through the inputs that would be recomputed with it."""

    def rebuilt(source: SolverNode) -> bool:
        return source.name not in saved and source.can_recompute

    only_held: dict[str, int] = {}
    for source in problem.reached(rebuilt, start=node.inputs):
        if source.name in saved or source.can_recompute:
            continue
        if not source.can_save:
            return f"recomputing it needs {source.name} ({source.kind} op), which can be neither held nor recomputed"
        if source.save_bytes:
            only_held[source.name] = source.save_bytes
    extra = sum(only_held.values())
    if only_held and extra >= node.save_bytes:
        return f"recomputing it needs {', '.join(only_held)} held: {extra} bytes, against its own {node.save_bytes}"
    return None


def record_report(report: GraphReport, on_report: Callable[[GraphReport], None] | None) -> None:
    _REPORTS.append(report)
    log.info("fxmem: %s", report.summary())
    if on_report is not None:
        on_report(report)


def reports() -> list[GraphReport]:
    """The reports of every graph fxmem planned in this process, oldest first."""
    return list(_REPORTS)


def clear_reports() -> None:
    _REPORTS.clear()
