"""The partition hook: capture → cost → solve → rewrite, with a fallback to PyTorch's partitioner.

``FxmemPartitioner`` is what Inductor calls through ``custom_partitioner_fn`` (and what the eager codegen
hands to AOTAutograd as ``partition_fn``). Each call plans one joint graph and appends a ``GraphReport``.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import copy
import gc
import hashlib
import itertools
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from fxmem import _compat
from fxmem.calibrate import calibrated_profile
from fxmem.capture import JointGraph, NodeFacts, UnsupportedGraph, capture
from fxmem.config import FxmemConfig
from fxmem.cost import get_cost_model, resolve_profile
from fxmem.decompositions import KEPT_WHOLE
from fxmem.memory import outside_graph_bytes, predicted_saved_bytes, read_by_backward, saved_bytes, static_vals
from fxmem.peaks import climb, fit_peak
from fxmem.planner import PlanningInputs, build_problem, unbudgeted_added_s, without_budget
from fxmem.planner import solve_keeping_comparisons_exact as _solve
from fxmem.report import GraphReport, record_report, tensor_rows
from fxmem.rewrite import save_inputs_in_place, split
from fxmem.rng import make_draws_replayable
from fxmem.simulate import Timeline, simulate
from fxmem.solve import Plan, get_solver
from fxmem.solve.mincut import solve_mincut

log = logging.getLogger(__name__)
_graph_ids = itertools.count()


# Set by fxmem.inspect: simulate torch.compile's default partition too, for the timeline picture. Building
# its forward and backward costs a sixth of the planning time, which a training compile need not spend.
_simulate_reference: contextvars.ContextVar[bool] = contextvars.ContextVar("fxmem_simulate_reference", default=False)


@contextlib.contextmanager
def simulating_reference() -> Iterator[None]:
    """Within this, each report's ``reference_timeline`` is simulated (else it is None)."""
    token = _simulate_reference.set(True)
    try:
        yield
    finally:
        _simulate_reference.reset(token)


class InfeasibleBudget(ValueError):
    """No plan meets the memory budget (raised unless ``on_infeasible="best_effort"``)."""


def _source_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class FxmemPartitioner(_compat.CustomPartitionerFn):
    """Partitions a joint graph by fxmem's plan. ``uuid()`` covers every option and fxmem's source, so
    Inductor's caches never serve a plan made under other options."""

    def __init__(self, config: FxmemConfig, on_report: Callable[[GraphReport], None] | None = None):
        self.config = config
        self.on_report = on_report

    def uuid(self) -> str:
        return hashlib.sha256(f"{self.config.cache_key()}|{_source_hash()}".encode()).hexdigest()

    def __call__(self, gm: fx.GraphModule, joint_inputs: Sequence[object], **kwargs: Any):
        return partition(gm, joint_inputs, self.config, on_report=self.on_report, **kwargs)


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy, of the same class: within ``torch.compile`` a lazy graph module, which generates its
    code only if run (the copies never are). The tensors the module holds (constants the graph reads)
    are shared: planning never changes them, and copying a real tensor fails under a compile's fake mode."""
    tensors = (
        value
        for module in gm.modules()
        for value in itertools.chain(
            module.parameters(recurse=False), module.buffers(recurse=False), vars(module).values()
        )
        if isinstance(value, torch.Tensor)
    )
    return deepcopy_graph_module(gm, {id(t): t for t in tensors})


def deepcopy_graph_module(gm: fx.GraphModule, memo: dict[int, Any] | None = None) -> fx.GraphModule:
    """``copy.deepcopy(gm, memo)``, without the FutureWarning some torch versions give on copying the
    output's pytree spec (torch's own deprecation, nothing the caller can change)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(gm, memo)


@dataclass
class Reference:
    """torch.compile's default partition of the joint graph ``gm`` (with the ops the eager codegen keeps
    whole counted as fusible, as their decompositions in Inductor's graph are): what its forward saves in bytes
    (parameters excluded) and, built on first use, its forward and backward (fxmem's fallback) and their
    simulated memory. ``error`` is why PyTorch's partitioner failed, if it did."""

    gm: fx.GraphModule
    num_fwd_outputs: int
    static_indices: list[int]  # as AOTAutograd gave them to the partitioner, which PyTorch's reads
    static_positions: list[int]  # where the parameters and buffers are (``_compat.static_input_positions``)
    codegen: str
    saved_bytes: int | None = None  # as Inductor's forward holds them: fractional budgets are of this
    split_saved_bytes: int | None = None  # as the split run by fxmem's codegen holds them (the fallback)
    error: Exception | None = None
    _split: tuple[fx.GraphModule, fx.GraphModule] | None = None

    def split(self) -> tuple[fx.GraphModule, fx.GraphModule]:
        """PyTorch's forward and backward: planning needs only what they save, so they are built only when
        fxmem falls back or ``fxmem.inspect`` simulates them."""
        if self._split is None:
            with _as_default():
                self._split = _compat.min_cut_rematerialization_partition(
                    self.gm, [], compiler="inductor", num_fwd_outputs=self.num_fwd_outputs,
                    static_lifetime_input_indices=self.static_indices,
                )  # fmt: skip
        return self._split

    def timeline(self) -> Timeline | None:
        try:
            fw, bw = self.split()
            static = static_vals(self.gm, self.static_positions)
            return simulate(fw, bw, self.num_fwd_outputs, static, fused=self.codegen == "inductor")
        except Exception as err:  # the reference is advisory
            log.info("fxmem: could not simulate the default partitioner's plan: %s", err)
            return None


@contextlib.contextmanager
def _as_default() -> Iterator[None]:
    """PyTorch's partitioner as torch.compile runs it by default: the ops the eager codegen keeps whole
    counted as fusible, as their decompositions in Inductor's graph are, and PyTorch's own
    ``activation_memory_budget`` at 1.0 whatever the user set it to (it is not the default's, and it
    bounds nothing under fxmem, whose partitioner replaces the one that reads it)."""
    with _compat.counted_as_fusible(KEPT_WHOLE), _compat.without_torch_budget():
        yield


def reference_plan(gm: fx.GraphModule, num_fwd_outputs: int, static_indices: list[int], codegen: str) -> Reference:
    """What PyTorch's default partition of ``gm`` saves. Its partitioner prepares ``gm`` (CSE, tags), so
    from then on ``gm`` belongs to the reference."""
    static_positions = _compat.static_input_positions(gm, static_indices)
    reference = Reference(gm, num_fwd_outputs, static_indices, static_positions, codegen)
    try:
        with _as_default():
            chosen = _compat.default_saved_values(
                gm, num_fwd_outputs=num_fwd_outputs, static_lifetime_input_indices=static_indices
            )
        saved = read_by_backward(gm, chosen, num_fwd_outputs)
        static = static_vals(gm, static_positions)
        # Fractions are of what Inductor's forward holds (a convolution output's view it copies holds its own
        # bytes), with its copies of parameters only where fxmem's plan runs through Inductor too. Layout
        # optimization is decided on the joint graph here; on a GPU its heuristic may decide otherwise for
        # the real forward (a parameter's copy missed makes the budget tighter, a view's copy looser).
        reference.saved_bytes = saved_bytes(
            gm, saved, static, codegen="inductor", parameter_copies=codegen == "inductor"
        )
        reference.split_saved_bytes = (
            reference.saved_bytes if codegen == "inductor" else saved_bytes(gm, saved, static, codegen=codegen)
        )
    except Exception as err:  # the reference is advisory: planning goes on without it
        log.info("fxmem: could not compute the default partitioner's plan: %s", err)
        reference.error = err
    return reference


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Planning makes many short-lived cycles (graphs, their nodes and users), enough to set off
    full collections of a heap that holds torch's modules, 0.2 s each on a small CPU, more than the
    planning itself: the collector waits until the partition is done."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@_collector_paused()
def partition(
    gm: fx.GraphModule,
    joint_inputs: Sequence[object],
    config: FxmemConfig,
    *,
    num_fwd_outputs: int,
    static_lifetime_input_indices: Sequence[int] | None = None,
    on_report: Callable[[GraphReport], None] | None = None,
    **kwargs: Any,
) -> tuple[fx.GraphModule, fx.GraphModule]:
    graph_id = next(_graph_ids)
    torch_static = list(static_lifetime_input_indices or [])  # what PyTorch's partitioner reads
    report = GraphReport(graph_id=graph_id, options=config.as_dict())
    started = time.perf_counter()
    reference = None
    try:
        # fxmem plans on a graph of its own: PyTorch's partitioner prepares gm for the reference
        own = None if _compat.partitioner_replaces_graph() else _copy(gm)
        given = gm.graph
        reference = _recorded_reference(report, gm, num_fwd_outputs, torch_static, config.codegen)
        if own is None:
            own = _graph_left_by_reference(gm, given)
        static = reference.static_positions  # where the parameters and buffers are
        fw, bw = _plan_and_split(own, num_fwd_outputs, static, config, reference.saved_bytes, report)
    except InfeasibleBudget:
        raise
    except Exception as err:  # noqa: BLE001 - any failure of fxmem's own must not cost the user a compile
        reason = f"{type(err).__name__}: {err}" if not isinstance(err, UnsupportedGraph) else str(err)
        log.warning("fxmem: graph %d falls back to PyTorch's partitioner: %s", graph_id, reason)
        report.fallback_reason = reason
        if reference is None:  # fxmem failed before the reference looked at gm
            reference = _recorded_reference(report, gm, num_fwd_outputs, torch_static, config.codegen)
        fw, bw = reference.split()  # raises where PyTorch's own partitioner fails on this graph too
        report.predicted_saved_bytes = reference.split_saved_bytes
    report.partition_time_s = time.perf_counter() - started
    record_report(report, on_report)
    return fw, bw


def _graph_left_by_reference(gm: fx.GraphModule, given: fx.Graph) -> fx.GraphModule:
    """A module around ``given``, the graph ``gm`` held before PyTorch's partitioner prepared it for the
    reference. Its CSE builds a new graph before it tags any node, so ``given`` is as it came but for the
    dead code removed: fxmem plans on it, without the cost of a copy (a twentieth of the planning time).
    Where the partitioner failed before its CSE, ``gm`` still holds ``given``, which is copied."""
    return _copy(gm) if gm.graph is given else _compat.module_around(gm, given)


def _recorded_reference(
    report: GraphReport, gm: fx.GraphModule, num_fwd_outputs: int, torch_static: list[int], codegen: str
) -> Reference:
    started = time.perf_counter()
    reference = reference_plan(gm, num_fwd_outputs, torch_static, codegen)
    report.reference_saved_bytes = reference.saved_bytes
    if _simulate_reference.get():
        report.reference_timeline = reference.timeline()
    report.add_pass("reference", started, f"torch.compile's default saves {reference.saved_bytes} bytes")
    return reference


@dataclass
class _Attempt:
    fw: fx.GraphModule
    bw: fx.GraphModule
    plan: Plan
    problem_inputs: PlanningInputs
    joint: JointGraph
    timeline: Timeline


def _attempt(
    gm: fx.GraphModule, num_fwd_outputs: int, static: list[int], config: FxmemConfig, reference: int | None,
    report: GraphReport, saved_budget: float | None = None,
) -> _Attempt:  # fmt: skip
    """Plan and split ``gm``, which this rewrites; ``saved_budget`` overrides the bytes the plan may hold."""
    t = time.perf_counter()
    _compat.force_save(gm)
    joint = capture(gm, num_fwd_outputs, static)
    if config.codegen == "eager" and make_draws_replayable(joint):
        joint = capture(gm, num_fwd_outputs, static)
    report.add_pass("capture", t, f"{len(joint.forward)} forward nodes, {len(joint.required)} read by the backward")

    t = time.perf_counter()
    profile = calibrated_profile(joint.device) if config.calibrate else resolve_profile(config.device, joint.device)
    inputs = build_problem(joint, config, get_cost_model(config.cost_model, profile), reference)
    if saved_budget is not None:  # (no plan holds more than every node)
        inputs.problem.budget_bytes = min(max(0.0, saved_budget), inputs.problem.all_bytes())
    report.device_profile = profile.name
    report.estimated_step_s = inputs.step_s
    report.add_pass("cost", t, f"{len(inputs.problem.nodes)} solver nodes on the {profile.name} profile")

    t = time.perf_counter()
    solver = get_solver(config.solver)
    fraction = isinstance(config.memory_budget, float) and saved_budget is None
    plan = _solve_fraction(solver, joint, inputs) if fraction else _solve(solver, joint, inputs)
    report.add_pass(
        "solve", t, f"{plan.solver}: keep {len(plan.saved) - len(plan.quantized)}, quantize {len(plan.quantized)}, "
        f"recompute {len(plan.recomputed)}; {plan.saved_bytes} bytes held"
        + (f"; {len(inputs.exact)} kept exact (comparisons, indices, steps)" if inputs.exact else "")
        + "".join(f"; {note}" for note in plan.notes if note.startswith(_UNBUDGETED)),
    )  # fmt: skip

    t = time.perf_counter()
    fw, bw, saved = split(joint, plan, inputs.codecs, inputs.node_codecs)
    if config.codegen == "inductor":
        save_inputs_in_place(fw, num_fwd_outputs)
    timeline = simulate(
        fw, bw, num_fwd_outputs, static_vals(gm, static), fused=config.codegen == "inductor",
        outside_bytes=outside_graph_bytes(gm),
    )  # fmt: skip
    report.add_pass("rewrite", t, f"forward saves {len(saved)} tensors; {len(plan.recomputed)} nodes recomputed")
    return _Attempt(fw, bw, plan, inputs, joint, timeline)


_UNBUDGETED = "the plan made with no budget"


def _solve_fraction(solver: Callable[..., Plan], joint: JointGraph, inputs: PlanningInputs) -> Plan:
    """A fraction's plan: the plan made with no budget where it holds no more than the fraction allows,
    else the least added time within it. Held bytes so never exceed those of no budget, and fall as the
    fraction does. With no budget fxmem recomputes what costs little, so it often holds less than a
    fraction's least-time plan: on gpt tiny 11% of the default's bytes, where the least-time plan of 0.7
    held 69% with a 31% larger predicted peak (2-core CPU, eager codegen).

    Most solves of either plan are a refinement costing 5 to 7 times the price search before it, so
    which to solve is told first from the price search's plan with no budget: the refinement only lowers
    its bytes. Where that does not fit, the least-time plan is solved; one that takes longer than no
    budget allows tells that the plan made with no budget would not fit either, as that plan holds the
    fewest bytes within that time."""
    limit = inputs.problem.budget_bytes
    with without_budget(inputs) as problem:
        quick = solve_mincut(problem, formats=inputs.formats, bits=inputs.bits, refine=False)
    plan = None
    if quick.saved_bytes > limit:
        plan = _solve(solver, joint, inputs)
        if not plan.feasible or plan.added_s > unbudgeted_added_s(inputs.step_s):
            return plan
    with without_budget(inputs):
        unbudgeted = _solve(solver, joint, inputs)
    if unbudgeted.saved_bytes > limit:
        return plan or _solve(solver, joint, inputs)
    unbudgeted.feasible = True
    unbudgeted.notes.append(f"{_UNBUDGETED} holds {unbudgeted.saved_bytes} bytes, within the budget")
    return unbudgeted


def _plan_and_split(
    gm: fx.GraphModule,
    num_fwd_outputs: int,
    static: list[int],
    config: FxmemConfig,
    reference: int | None,
    report: GraphReport,
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """fxmem's forward and backward for ``gm``, a joint graph of fxmem's own (it is rewritten)."""
    budget = config.memory_budget

    def plan_at(held: float | None) -> _Attempt:  # with no budget for ``None``
        held_config = config if held is not None else replace(config, memory_budget=None)
        return _attempt(_copy(gm), num_fwd_outputs, static, held_config, reference, report, held)

    # Looking for a lower peak costs about a planning per plan tried. Under Inductor that is little beside
    # its compile, and there recomputation fuses into early kernels of the backward; with the eager codegen
    # planning is much of the first call (gpt tiny-dropout's with no budget: 3.0x aot_eager's with the
    # search), so that plans once.
    climbs = config.codegen == "inductor"

    def unbudgeted() -> _Attempt:  # the plan made with no budget
        fewest = plan_at(None)
        return _lower_peak(plan_at, fewest, reference, report) if climbs else fewest

    if isinstance(budget, int):
        attempt = fit_peak(plan_at, unbudgeted, budget, reference)
        feasible = attempt.timeline.peak_bytes <= budget
    else:
        attempt = _attempt(_copy(gm) if climbs else gm, num_fwd_outputs, static, config, reference, report)
        if climbs and (budget is None or any(note.startswith(_UNBUDGETED) for note in attempt.plan.notes)):
            attempt = _lower_peak(plan_at, attempt, reference, report)
        feasible = attempt.plan.feasible or budget is None  # with no budget the time bound is a preference
    if not feasible:
        _infeasible(config, report, attempt)
    plan = attempt.plan
    report.plan = plan
    # (a plan tried for its peak was solved under a byte budget of its own: the report keeps the user's;
    # a fraction has a reference, build_problem needs one)
    if isinstance(budget, float):
        report.budget_bytes = budget * reference
    else:
        report.budget_bytes = None if budget is None else float(budget)
    report.timeline = attempt.timeline
    report.predicted_peak_bytes = attempt.timeline.peak_bytes
    report.predicted_saved_bytes = predicted_saved_bytes(
        attempt.fw, num_fwd_outputs, static_vals(gm, static), codegen=config.codegen
    )
    report.rows = tensor_rows(attempt.joint, plan, attempt.problem_inputs)
    return attempt.fw, attempt.bw


def _lower_peak(
    plan_at: Callable[[float | None], _Attempt], fewest: _Attempt, reference: int | None, report: GraphReport
) -> _Attempt:
    """``fewest``, the fewest bytes within the added time no budget allows, or a plan holding more, up to
    what torch.compile's default holds and what ``fewest``'s budget allows (a fraction's), for a lower
    peak within the same added time (``fxmem.peaks.climb``)."""
    problem = fewest.problem_inputs.problem
    ceiling = min(reference or problem.all_bytes(), math.inf if problem.budget_bytes is None else problem.budget_bytes)
    chosen, tried = climb(plan_at, fewest, ceiling, unbudgeted_added_s(fewest.problem_inputs.step_s))
    if chosen is not fewest:
        chosen.plan.notes.append(f"{_UNBUDGETED} holds {chosen.plan.saved_bytes} bytes, for a lower peak")
    report.add_pass(  # timed in the passes of the plans tried, listed before it
        "climb", time.perf_counter(), f"{tried} plans holding more tried; the fewest bytes "
        f"({fewest.plan.saved_bytes}) peak at {fewest.timeline.peak_bytes}, the plan taken "
        f"({chosen.plan.saved_bytes}) at {chosen.timeline.peak_bytes}",
    )  # fmt: skip
    return chosen


def _held_for_good(attempt: _Attempt) -> str:
    """What of the smallest plan's bytes no plan can drop, by cause (``_cause_for_good``)."""
    problem = attempt.problem_inputs.problem
    facts = {node.name: f for node, f in attempt.joint.facts.items()}
    causes: collections.Counter[str] = collections.Counter()
    for name, fmt in attempt.plan.saved.items():
        cause = _cause_for_good(facts[name])
        if cause:
            causes[cause] += problem.by_name[name].stored_bytes(fmt)
    parts = [f"{held} bytes {cause}" for cause, held in causes.items()]
    return "; no plan can drop " + ", ".join(parts) if parts else ""


def _cause_for_good(facts: NodeFacts) -> str | None:
    """Why a held value is held by every plan: the graph's inputs the backward reads (nothing in the graph
    makes them), values a selective-checkpoint policy marks MUST_SAVE (user annotations win over the
    budget), random draws held as drawn."""
    if facts.kind == "input":
        return "of graph inputs the backward reads"
    if facts.user_policy == "MUST_SAVE":
        return "a checkpoint policy marks MUST_SAVE"
    if facts.kind == "random":
        return "of random draws"
    return None


def _infeasible(config: FxmemConfig, report: GraphReport, attempt: _Attempt) -> None:
    budget = config.memory_budget
    if isinstance(budget, int):
        message = (
            f"memory_budget {budget} bytes cannot be met for graph {report.graph_id}: the smallest predicted peak "
            f"fxmem found is {attempt.timeline.peak_bytes} bytes ({attempt.timeline.peak_bytes / 2**20:.1f} MiB)"
        )
    else:
        message = (
            f"memory_budget {budget!r} cannot be met for graph {report.graph_id}: the smallest plan fxmem found "
            f"holds {attempt.plan.saved_bytes} bytes of activations "
            f"(budget {attempt.problem_inputs.problem.budget_bytes:.0f})"
        )
    message += _held_for_good(attempt)
    if config.strict_budget:
        raise InfeasibleBudget(message + "; pass on_infeasible='best_effort' to run with the smallest plan")
    log.warning("fxmem: %s; running with the smallest plan (on_infeasible=%r)", message, config.on_infeasible)
