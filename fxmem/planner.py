"""From a captured joint graph to a solver ``Problem``, and from quantizer names to graph codecs."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from fxmem import _compat
from fxmem.capture import JointGraph, NodeFacts, op_name
from fxmem.config import FxmemConfig
from fxmem.cost import CostModel
from fxmem.quant import IntegerQuantizer, Quantizer, get_quantizer, pack_bool, packed_bool_bytes, unpack_bool
from fxmem.rewrite import Codec
from fxmem.rng import draws_zeros_and_ones
from fxmem.solve import Plan, Problem, QuantOption, SolverNode

BITMASK = "bitmask"  # lossless: a saved bool tensor, or a Bernoulli draw of any dtype, at 1 bit per element
# Below this many elements the scales and the extra kernels cost more than quantizing saves.
MIN_QUANT_NUMEL = 256
_ROW_GROUP_MAX = 1024  # the largest group of a norm input's row-aligned int8 (see _row_group)
# With no budget, fxmem may add this fraction of the estimated step time.
DEFAULT_MAX_OVERHEAD = 0.02
# The backward costs about twice the forward.
STEP_OVER_FORWARD = 3.0


@dataclass
class PlanningInputs:
    problem: Problem
    formats: tuple[str, ...]
    bits: dict[str, int]
    codecs: dict[str, Codec]
    node_codecs: dict[tuple[str, str], Codec]  # (node, format) overrides: row-aligned groups, sign keeping
    step_s: float  # estimated time of a training step on the profile
    # (node, format) pairs whose codec keeps signs exactly (ReLU outputs in integer formats).
    sign_kept: set[tuple[str, str]] = field(default_factory=set)
    # Comparisons, indices and steps kept exact (see ``solve_keeping_comparisons_exact``): never recomputed.
    exact: set[str] = field(default_factory=set)


def make_codec(fmt: str, config: FxmemConfig, group_size: int | None = None, keep_sign: bool = False) -> Codec:
    if fmt == BITMASK:  # (a draw of 0s and 1s is packed as x != 0 and unpacked to its dtype)
        return Codec(
            BITMASK,
            lambda x: (pack_bool(x if x.dtype == torch.bool else x != 0),),
            lambda p, like: unpack_bool(p[0], like.shape, like.stride()).to(like.dtype),
        )
    group = group_size or config.group_size
    extra = {"keep_sign": True} if keep_sign else {}
    quantizer = get_quantizer(fmt, group_size=group, stochastic=config.stochastic_rounding, **extra)
    return Codec(
        fmt,
        lambda x: tuple(quantizer.quantize(x)),
        lambda p, like: quantizer.dequantize(p, like.shape, like.dtype, like.stride()),
    )


def dynamic_min_quant_numel(quantizers: Iterable[Quantizer]) -> int:
    """The fewest elements a tensor needs to be quantized under dynamic shapes: one with a single scale
    group at the traced sizes would have Inductor specialize its codec on that count (a recompile at other
    sizes), so tensors under two of the largest groups stay unquantized."""
    return 2 * max([_ROW_GROUP_MAX, *(q.group_size for q in quantizers)])


def build_problem(
    joint: JointGraph, config: FxmemConfig, cost: CostModel, reference_bytes: int | None
) -> PlanningInputs:
    formats = config.quant_formats
    quantizers = {fmt: get_quantizer(fmt, group_size=config.group_size) for fmt in formats}
    min_quant_numel = dynamic_min_quant_numel(quantizers.values()) if joint.dynamic else MIN_QUANT_NUMEL
    bits = {fmt: q.bits for fmt, q in quantizers.items()}
    bits["int8"] = 8  # normalisation inputs use row-aligned int8 whatever format was asked for
    bits[BITMASK] = 8  # lossless: admitted with the widest tier
    owners_static = {n.name for n in joint.static_inputs}
    required = set(joint.required)
    nodes: list[SolverNode] = []
    node_codecs: dict[tuple[str, str], Codec] = {}
    sign_kept: set[tuple[str, str]] = set()
    # One codec object per variant: a split traces each codec once per tensor layout (see rewrite.py).
    codec = functools.cache(lambda fmt, group=None, keep_sign=False: make_codec(fmt, config, group, keep_sign))
    forward_s = 0.0
    known: set[str] = set()
    for node in joint.forward:
        facts = joint.facts[node]
        if _compat.is_sym_node(node):
            continue
        tensor = facts.tensor
        dtype = tensor.dtype if tensor else None
        own = cost.node_time(facts.flops, facts.bytes_moved, dtype) + cost.draw_time(facts.draws)
        forward_s += own
        # Inductor saves no copy of a parameter (save_inputs_in_place); a value written into one is read back
        static = tensor is None or tensor.storage_owner in owners_static or facts.written_into is not None
        static = static and not facts.overwritten  # (its copy holds bytes of its own)
        held = 0 if static else tensor.nbytes
        # recompute=False still rebuilds what reads nothing (views of a held base, constants, index ranges),
        # leaves backward work (nodes no forward output needs) to the backward, and honours checkpointing.
        free = facts.kind in ("view", "getitem") or all(_compat.is_sym_node(a) for a in node.all_input_nodes)
        asked = facts.user_policy in ("MUST_RECOMPUTE", "PREFER_RECOMPUTE")
        can_recompute = facts.can_recompute and (config.recompute or free or facts.backward_only or asked)
        options: list[QuantOption] = []
        held_as_is = facts.kind in ("view", "param") or facts.overwritten  # (an overwritten input: a plain copy)
        if tensor is not None and held > 0 and tensor.dense and not held_as_is:
            numel = tensor.nbytes // tensor.dtype.itemsize
            binary = tensor.dtype == torch.bool or (tensor.dtype.is_floating_point and draws_zeros_and_ones(node))
            if binary and config.codegen == "eager":
                options.append(QuantOption(BITMASK, packed_bool_bytes(numel), cost.quant_time(held, numel // 8)))
            elif tensor.dtype.is_floating_point and numel >= min_quant_numel and quantizers:
                if facts.norm_input == "row":
                    # A layer/RMS norm's input: the backward divides its error by the row's std, so it is
                    # stored only as int8 (whichever format was asked for), in groups within one row.
                    group = _row_group(tensor.shape_hint[-1] if tensor.shape_hint else numel)
                    stored = get_quantizer("int8", group_size=group).stored_bytes(numel, tensor.dtype)
                    options.append(
                        QuantOption("int8", stored, cost.quant_time(held, stored), cost.precision_penalty(held, 8))
                    )
                    node_codecs[(node.name, "int8")] = codec("int8", group)
                for fmt, q in _admitted(facts, quantizers, config).items():
                    stored = q.stored_bytes(numel, tensor.dtype)
                    penalty = cost.precision_penalty(held, q.bits)
                    options.append(QuantOption(fmt, stored, cost.quant_time(held, stored), penalty))
                    if facts.sign_read and isinstance(q, IntegerQuantizer):
                        node_codecs[(node.name, fmt)] = codec(fmt, keep_sign=True)
                        sign_kept.add((node.name, fmt))
        nodes.append(
            SolverNode(
                name=node.name,
                inputs=tuple(a.name for a in node.all_input_nodes if a.name in known),
                save_bytes=held,
                recompute_s=0.0 if facts.backward_only else cost.recompute_time(facts.kind, own),
                can_save=facts.can_save,
                can_recompute=can_recompute,
                required=node in required,
                quant_options=tuple(options),
                kind=facts.kind,
            )
        )
        known.add(node.name)
    step_s = STEP_OVER_FORWARD * forward_s
    problem = Problem(nodes)
    budget = config.memory_budget
    if budget is None:
        problem.max_added_s = unbudgeted_added_s(step_s)
    elif isinstance(budget, float):
        if reference_bytes is None:
            raise ValueError("a fractional memory_budget needs torch.compile's default plan, which failed")
        problem.budget_bytes = budget * reference_bytes
    else:
        problem.budget_bytes = float(budget)
    # Bool masks are bit-packed only on the eager codegen: under Inductor (GPT-2 small, H200) packing and
    # unpacking cost step time (+28% over torch.compile against +13% without).
    lossless = (BITMASK,) if config.codegen == "eager" else ()
    all_formats = tuple(dict.fromkeys((*formats, *(("int8",) if formats else ()), *lossless)))
    codecs = {fmt: codec(fmt) for fmt in all_formats}
    return PlanningInputs(problem, all_formats, bits, codecs, node_codecs, step_s, sign_kept)


def unbudgeted_added_s(step_s: float) -> float:
    """The added time a plan made with no budget may spend to hold fewer bytes."""
    return DEFAULT_MAX_OVERHEAD * step_s


@contextlib.contextmanager
def without_budget(inputs: PlanningInputs) -> Iterator[Problem]:
    """``inputs.problem`` as it is with no budget (its added time bounded instead), within the block."""
    problem = inputs.problem
    kept = problem.budget_bytes, problem.max_added_s
    problem.budget_bytes, problem.max_added_s = None, unbudgeted_added_s(inputs.step_s)
    try:
        yield problem
    finally:
        problem.budget_bytes, problem.max_added_s = kept


def solve_keeping_comparisons_exact(solver: Callable[..., Plan], joint: JointGraph, inputs: PlanningInputs) -> Plan:
    """``solver``'s plan, solved again while it recomputes a comparison it would make inexact
    (``keep_thresholds_exact``, ``keep_equalities_consistent``); each round forbids more, so they end.

    A comparison read off a quantized copy is held exact, and where a lossy copy feeds many (an input
    stored in int8, from which the backward recomputes every sign and mask) holding them all can cost
    more than not quantizing at all: a model held 0.947x of the default at budget 0.1 with int8 allowed,
    0.144x without. So where a round forbade anything for a lossy copy, the plan without lossy formats
    is solved too, and the better of the two taken (feasible first; then the fewer bytes with no byte
    budget, the less added time within one; a tie to the lossless plan)."""
    lossless = tuple(fmt for fmt in inputs.formats if fmt == BITMASK)
    if lossless == inputs.formats:
        return _solve_until_exact(solver, joint, inputs, lossless)[0]
    before = _options_of(inputs)
    plan, lossy_rounds = _solve_until_exact(solver, joint, inputs, inputs.formats)
    if not lossy_rounds:
        return plan
    after = _options_of(inputs)
    _restore_options(inputs, before)
    exact, _ = _solve_until_exact(solver, joint, inputs, lossless)
    if _no_worse(exact, plan, by_time=inputs.problem.budget_bytes is None):
        return exact
    _restore_options(inputs, after)
    return plan


def _solve_until_exact(
    solver: Callable[..., Plan], joint: JointGraph, inputs: PlanningInputs, formats: tuple[str, ...]
) -> tuple[Plan, bool]:
    """The plan once no comparison needs keeping exact, and whether a lossy copy made one need it."""
    lossy_rounds = False
    while True:
        plan = solver(inputs.problem, formats=formats, bits=inputs.bits)
        thresholds = keep_thresholds_exact(joint, plan, inputs)
        if not (keep_equalities_consistent(joint, plan, inputs) or thresholds):
            return plan, lossy_rounds
        lossy_rounds = lossy_rounds or thresholds


def _options_of(inputs: PlanningInputs) -> tuple[list[tuple[bool, bool]], set[str]]:
    return [(node.can_save, node.can_recompute) for node in inputs.problem.nodes], set(inputs.exact)


def _restore_options(inputs: PlanningInputs, options: tuple[list[tuple[bool, bool]], set[str]]) -> None:
    flags, exact = options
    for node, (can_save, can_recompute) in zip(inputs.problem.nodes, flags, strict=True):
        node.can_save, node.can_recompute = can_save, can_recompute
    inputs.exact = set(exact)


def _no_worse(candidate: Plan, other: Plan, *, by_time: bool) -> bool:
    if candidate.feasible != other.feasible:
        return candidate.feasible
    if by_time or not candidate.feasible:
        return candidate.saved_bytes <= other.saved_bytes
    return candidate.added_s <= other.added_s


def keep_equalities_consistent(joint: JointGraph, plan: Plan, inputs: PlanningInputs) -> bool:
    """Make consistent the comparisons of two floating tensors (``x == amax(x)`` in the backward of a
    max, or of ``scatter_reduce``'s "amax") that ``plan`` recomputes from one side recomputed through
    arithmetic and one taken from the forward. A recomputed matmul or fused kernel need not round as the
    forward's did, so no element may equal the max any more, and the backward divides by that count: NaN
    gradients (a message-passing net's ``scatter_reduce`` under Inductor at budget 0.1, on 2 CPU threads).
    The saved values the forward's side comes from are recomputed instead (the max, from the recomputed
    ``x``: little time, fewer bytes); where one cannot be, the comparison is made in the forward (a bool,
    a quarter of a float's bytes). Returns whether any option was forbidden."""
    recomputed = set(plan.recomputed)
    fresh: set[str] = set()  # recomputed values that may not round as the forward's did
    moved: list[SolverNode] = []  # saved values this round has made recomputed
    found = False
    for node in joint.forward:  # topological: a node's inputs come first
        if node.name not in recomputed:
            continue
        args = node.all_input_nodes
        if node.target in _TENSOR_COMPARISONS and len(args) == 2 and all(_is_floating(joint, a) for a in args):
            if (args[0].name in fresh) != (args[1].name in fresh):
                held_side = args[1] if args[0].name in fresh else args[0]
                found = _recompute_held_side(node, held_side, plan, recomputed, inputs, moved) or found
        if any(a.name in fresh for a in args) or not _reproduces(joint.facts[node].kind, op_name(node)):
            fresh.add(node.name)
    return found


def _recompute_held_side(
    comparison: torch.fx.Node,
    side: torch.fx.Node,
    plan: Plan,
    recomputed: set[str],
    inputs: PlanningInputs,
    moved: list[SolverNode],
) -> bool:
    """Have the held values ``side`` is computed from recomputed, or else ``comparison`` made in the
    forward; nothing where ``side`` is made of graph inputs and constants (a threshold, as ``x > 0`` is).
    Returns whether any option was forbidden."""
    problem = inputs.problem
    sources = [problem.by_name.get(n.name) for n in _saved_sources(side, plan.saved, recomputed)]
    if not sources:
        return False
    if all(s is not None and s.can_recompute and (s.can_save or s in moved) for s in sources):
        for solver_node in sources:
            solver_node.can_save = False
            moved.append(solver_node)
        return True
    return _hold_exact(problem.by_name[comparison.name], inputs)


def _hold_exact(solver_node: SolverNode, inputs: PlanningInputs) -> bool:
    """Forbid recomputing ``solver_node``, where it can be held: it is then computed in the forward.
    Returns whether it was (each round so forbids more, and the rounds end)."""
    if not (solver_node.can_save and solver_node.can_recompute):
        return False
    solver_node.can_recompute = False
    inputs.exact.add(solver_node.name)
    return True


def _saved_sources(node: torch.fx.Node, saved: dict[str, str | None], recomputed: set[str]) -> list[torch.fx.Node]:
    """The saved values, other than graph inputs, a recomputed ``node`` is computed from (itself, if
    saved)."""
    sources, seen, stack = [], set(), [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.name in saved:
            if current.op != "placeholder":
                sources.append(current)
        elif current.name in recomputed:
            stack.extend(current.all_input_nodes)
    return sources


def _is_floating(joint: JointGraph, node: torch.fx.Node) -> bool:
    facts = joint.facts.get(node)
    return facts is not None and facts.tensor is not None and facts.tensor.dtype.is_floating_point


def _reproduces(kind: str, name: str) -> bool:
    """Whether an op gives the forward's bits again from the same inputs whatever kernel runs it: it
    moves, selects or compares values without rounding."""
    return kind in ("view", "getitem") or name in _EXACT_OPS


_TENSOR_COMPARISONS = {
    getattr(torch.ops.aten, op).Tensor for op in ("eq", "ne", "lt", "le", "gt", "ge")
}  # fmt: skip
_EXACT_OPS = frozenset({
    "gather", "index", "index_select", "cat", "clone", "copy", "slice", "select", "expand", "permute",
    "squeeze", "unsqueeze", "view", "reshape", "full", "zeros_like", "ones_like", "full_like", "scalar_tensor",
    "where", "scatter", "constant_pad_nd", "amax", "amin", "max", "min", "maximum", "minimum", "relu", "abs",
    "neg", "eq", "ne", "lt", "le", "gt", "ge", "logical_not", "logical_and", "logical_or", "bitwise_and",
    "bitwise_or", "bitwise_not", "flip", "roll", "repeat", "alias", "lift_fresh_copy", "_to_copy",
    "convert_element_type", "slice_scatter", "select_scatter",
})  # fmt: skip


def keep_thresholds_exact(joint: JointGraph, plan: Plan, inputs: PlanningInputs) -> bool:
    """Forbid recomputing the comparisons, indices and step functions (bool or integer values from
    floating ones, such as a ReLU mask or pooling indices; ``sign``, ``round``) that ``plan`` recomputes
    from a lossy copy: rounding flips some of them, and a flip moves a whole gradient element (a ReLU mask
    recomputed from int8 convolution outputs gave 14% gradient error on resnet tiny, ``abs``'s sign 14% on
    an MLP). Returns whether any was: the problem then needs solving again."""
    lossy = {name for name, fmt in plan.saved.items() if fmt is not None and fmt != BITMASK}
    if not lossy:
        return False
    recomputed = set(plan.recomputed)
    signs = {name for name, fmt in plan.saved.items() if (name, fmt) in inputs.sign_kept}
    reads_lossy = []  # recomputed nodes that read a lossy copy, directly or through other recomputed ones
    for node in joint.forward:  # topological: a node's inputs come first
        if node.name not in recomputed or _tests_kept_sign(joint, node, signs):
            continue
        if any(a.name in lossy for a in node.all_input_nodes):
            reads_lossy.append(node)
            lossy.add(node.name)
    found = False
    for node in reads_lossy:
        tensor = joint.facts[node].tensor
        solver_node = inputs.problem.by_name[node.name]
        stepwise = tensor is not None and (not tensor.dtype.is_floating_point or node.target in _STEP_FUNCTIONS)
        if stepwise:
            found = _hold_exact(solver_node, inputs) or found
    return found


# Floating ops whose value jumps where the input crosses a point: as unsafe to recompute from a lossy
# copy as a comparison.
_STEP_FUNCTIONS = {
    getattr(torch.ops.aten, op).default for op in ("sign", "sgn", "round", "floor", "ceil", "trunc")
}  # fmt: skip

_ZERO_TESTS = {
    getattr(torch.ops.aten, op).Scalar for op in ("le", "lt", "gt", "ge", "eq", "ne")
}  # fmt: skip


def _tests_kept_sign(joint: JointGraph, node: torch.fx.Node, signs: set[str]) -> bool:
    """``node`` compares with 0 a tensor stored in a format that keeps signs, or a view of one (a ReLU's
    backward mask, through an alias): exact on the stored copy."""
    if node.target not in _ZERO_TESTS or node.args[1] != 0:
        return False
    tensor = joint.facts[node.args[0]].tensor if node.args[0] in joint.facts else None
    return tensor is not None and tensor.storage_owner in signs


def _admitted(facts: NodeFacts, quantizers: dict[str, Quantizer], config: FxmemConfig) -> dict[str, Quantizer]:
    """The quantizers a floating tensor may be stored with, by what reads it (row-norm inputs: none here,
    they get their own row-aligned int8)."""
    if facts.quantizable:
        return quantizers
    if facts.norm_input == "batch":
        # Batch/group norm statistics span many rows, which averages stored errors out: 4 bits and up.
        admitted = {"int8": quantizers.get("int8") or get_quantizer("int8", group_size=config.group_size)}
        admitted.update((fmt, q) for fmt, q in quantizers.items() if q.bits >= 4)
        return admitted
    return {}


def _row_group(row: int) -> int:
    """The quantization group for rows of ``row`` elements: 256 when it divides the row, else the row."""
    return 256 if row % 256 == 0 else max(16, min(row, _ROW_GROUP_MAX))
