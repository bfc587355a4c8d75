"""Capture: fxmem's view of an AOTAutograd joint forward+backward graph.

Which nodes are forward (computable from the primal inputs alone) and which are backward (they read a
tangent, or are tagged to run there); which forward values the backward reads (the *required* nodes);
and, per forward tensor, its shape (sympy under dynamic shapes), dtype, bytes, storage owner, op kind and
FLOPs. Facts are also written to ``node.meta["fxmem"]``. Nothing here changes the graph.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch.utils.flop_counter import flop_registry

from fxmem import _compat
from fxmem.memory import argument, storage_key, view_source
from fxmem.mutation import mark_mutated_inputs

RANDOM_TAG = torch.Tag.nondeterministic_seeded
# Set in a node's meta by ``fxmem.rng`` on a draw it made replayable: the random numbers it draws.
REPLAYED_DRAW = "fxmem_replayed_draw"
_MATMUL_OPS = {
    "mm", "bmm", "addmm", "baddbmm", "convolution", "convolution_backward", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward", "_efficient_attention_forward",
}  # fmt: skip
# Batch norm in training also updates running statistics, which are buffers mutated after the graph:
# recomputing it would have the backward read a buffer the step has already changed.
_NEVER_RECOMPUTE_OPS = {"native_batch_norm", "_native_batch_norm_legit_functional", "_native_batch_norm_legit"}
# Normalisations divide by a statistic of their input: an error in a stored input is amplified by
# 1/std in the backward, so such inputs are never quantized.
_NORMALIZATION_OPS = {
    "native_layer_norm", "native_batch_norm", "_native_batch_norm_legit_functional", "_native_batch_norm_legit",
    "native_group_norm", "var_mean", "var", "std", "_fused_rms_norm",
}  # fmt: skip
_ROW_NORMALIZATION_OPS = {"native_layer_norm", "_fused_rms_norm"}
_REDUCTION_OPS = {
    "sum", "mean", "amax", "amin", "max", "min", "var", "var_mean", "std", "prod", "argmax", "argmin",
    "native_layer_norm", "native_batch_norm", "_native_batch_norm_legit_functional", "_softmax",
    "_log_softmax", "logsumexp", "native_group_norm", "_fused_rms_norm", "nll_loss_forward", "cumsum",
}  # fmt: skip


class UnsupportedGraph(Exception):
    """The graph has something fxmem does not plan; the caller falls back to PyTorch's partitioner."""


@dataclass
class TensorFacts:
    """What fxmem knows of one forward node's value."""

    shape: tuple[Any, ...]  # ints or sympy expressions
    shape_hint: tuple[int, ...]
    stride_hint: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int  # at the traced sizes
    nbytes_expr: Any  # sympy expression (or int) in the symbolic sizes
    storage_owner: str  # the node that owns the storage (itself unless it is a view)
    dense: bool  # non-overlapping and dense: safe to quantize through reshape


@dataclass
class NodeFacts:
    name: str
    kind: str  # input | param | view | getitem | pointwise | reduction | matmul | random | collective | other
    tensor: TensorFacts | None
    flops: float
    bytes_moved: float
    can_recompute: bool
    can_save: bool
    quantizable: bool  # False for a normalisation's input, whose stored error the backward amplifies by 1/std
    norm_input: str | None  # "row" (layer/RMS norm: statistics of one row) or "batch" (over many rows)
    sign_read: bool  # a ReLU's output: its backward reads the sign, which quantization must keep
    user_policy: str | None  # a torch.utils.checkpoint policy name, when the user annotated the node
    backward_only: bool = False  # no forward output depends on it: only the backward reads it
    draws: int = 0  # random numbers a replayed draw makes (``REPLAYED_DRAW``), which cost time of their own
    # The parameter the forward copies this value into (``copy_``, same shape, dtype and strides): the
    # backward can read it back from there, at no cost of its own (see ``fxmem.mutation``).
    written_into: fx.Node | None = None
    # An input the forward overwrites (a buffer updated in place): held, the forward saves a copy of the
    # value it had, from which the backward may recompute what read it (see ``fxmem.mutation``).
    overwritten: bool = False


@dataclass
class JointGraph:
    gm: fx.GraphModule
    num_fwd_outputs: int
    forward: list[fx.Node]  # forward-computable nodes, graph order
    backward: set[fx.Node]
    required: list[fx.Node]  # forward nodes the backward reads
    static_inputs: set[fx.Node]  # parameters and buffers
    facts: dict[fx.Node, NodeFacts] = field(default_factory=dict)

    @property
    def device(self) -> torch.device | None:
        for node in self.forward:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                return val.device
        return None

    @property
    def dynamic(self) -> bool:
        return any(not isinstance(d, int) for f in self.facts.values() if f.tensor for d in f.tensor.shape)


def _val(node: fx.Node) -> Any:
    return node.meta.get("val", node.meta.get("tensor_meta"))


def _is_multi_output(node: fx.Node) -> bool:
    return bool(node.users) and all(u.target is operator.getitem for u in node.users)


def op_name(node: fx.Node) -> str:
    return _target_name(node.target)


@functools.lru_cache(maxsize=4096)  # looked up several times per node, for a few hundred distinct ops
def _target_name(target: Any) -> str:
    packet = getattr(target, "overloadpacket", None)
    return getattr(packet, "__name__", getattr(target, "__name__", str(target)))


@functools.lru_cache(maxsize=4096)
def _is_collective(target: Any) -> bool:
    return "_c10d_functional" in str(target)


def _tensor_facts(node: fx.Node, val: torch.Tensor, owner: str) -> TensorFacts:
    size, stride = tuple(val.shape), val.stride()
    if all(type(d) is int for d in (*size, *stride)):  # static sizes: no symbols to read (most graphs)
        shape = shape_hint = size
        stride_hint = stride
    else:
        shape = tuple(_compat.symbolic_expr(d) for d in size)
        shape_hint = tuple(_compat.hint(d) for d in size)
        stride_hint = tuple(_compat.hint(s) for s in stride)
    # Dense: some permutation of the dims is contiguous (covers channels-last and transposes).
    order = sorted(range(len(shape_hint)), key=lambda i: (stride_hint[i], shape_hint[i]))
    expected, dense = 1, True
    for i in order:
        if shape_hint[i] != 1 and stride_hint[i] != expected:
            dense = False
        expected *= shape_hint[i]
    # The elements its storage spans: its numel when dense; more for a strided layout (e.g. a copy into
    # a slice, which keeps the slice's strides).
    if 0 in shape_hint:
        span, span_expr = 0, 0
    elif dense:
        span, span_expr = math.prod(shape_hint), math.prod(shape)
    else:
        strides = [_compat.symbolic_expr(s) for s in stride]
        span = 1 + sum((d - 1) * s for d, s in zip(shape_hint, stride_hint, strict=True))
        span_expr = 1 + sum((d - 1) * s for d, s in zip(shape, strides, strict=True))
    itemsize = val.dtype.itemsize
    return TensorFacts(
        shape=shape,
        shape_hint=shape_hint,
        stride_hint=stride_hint,
        dtype=val.dtype,
        nbytes=span * itemsize,
        nbytes_expr=span_expr * itemsize if isinstance(span_expr, int) else sympy.simplify(span_expr * itemsize),
        storage_owner=owner,
        dense=dense,
    )


def _flops(node: fx.Node) -> float:
    packet = getattr(node.target, "overloadpacket", None)
    counter = flop_registry.get(packet)
    if counter is None:
        return 0.0
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
    try:
        return float(_compat.hint(counter(*args, **kwargs, out_val=node.meta.get("val"))))
    except Exception:  # a counter that cannot read these arguments: count no FLOPs, keep going
        return 0.0


def _bytes_of(val: Any) -> float:
    if isinstance(val, torch.Tensor):
        numel = 1
        for d in val.shape:
            numel *= _compat.hint(d)
        return float(numel * val.dtype.itemsize)
    if isinstance(val, (list, tuple)):
        return sum(_bytes_of(v) for v in val)
    return 0.0


def _zero_dropout(node: fx.Node) -> bool:
    """Whether a seeded op's only randomness is a ``dropout_p`` argument set to 0 (attention kernels):
    then it is deterministic and may be recomputed."""
    return argument(node, "dropout_p") == 0


def _classify(node: fx.Node, is_view: bool, static_inputs: set[fx.Node]) -> str:
    if node.op == "placeholder":
        return "param" if node in static_inputs else "input"
    if node.op != "call_function":
        return "other"
    if node.target is operator.getitem:
        return "getitem"
    tags = getattr(node.target, "tags", ())
    if RANDOM_TAG in tags and not _zero_dropout(node):
        return "random"
    name = op_name(node)
    if is_view:
        return "view"
    if name in _MATMUL_OPS:
        return "matmul"
    if _is_collective(node.target):
        return "collective"
    if name in _REDUCTION_OPS:
        return "reduction"
    if torch.Tag.pointwise in tags or name in {
        "clone",
        "_to_copy",
        "where",
        "copy",
        "fill",
        "full",
        "zeros_like",
        "ones_like",
        "empty",
        "full_like",
        "scalar_tensor",
        "lift_fresh_copy",
    }:
        return "pointwise"
    return "other"


def op_kind(node: fx.Node, is_view: bool) -> str:
    """The kind of a graph node outside the joint graph's forward (which ``capture`` classifies): a
    backward node, or one a graph pass made."""
    return _classify(node, is_view, set())


def capture(gm: fx.GraphModule, num_fwd_outputs: int, static_lifetime_input_indices: list[int]) -> JointGraph:
    graph = gm.graph
    primals = [n for n in graph.nodes if n.op == "placeholder" and _compat.is_primal(n)]
    static_inputs = {p for i, p in enumerate(primals) if i in set(static_lifetime_input_indices)}

    backward: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "output":
            continue
        if node.op == "placeholder":
            if not (_compat.is_primal(node) or "fwd_seed" in node.name or "fwd_base_offset" in node.name):
                backward.add(node)
        elif _compat.must_be_in_backward(node) or any(a in backward for a in node.all_input_nodes):
            backward.add(node)
    forward = [n for n in graph.nodes if n.op != "output" and n not in backward]
    forward_set = set(forward)

    fwd_outputs, bwd_outputs = _compat.fwd_bwd_outputs(gm, num_fwd_outputs)
    required: dict[fx.Node, None] = {}
    for node in graph.nodes:
        if node in backward:
            for arg in node.all_input_nodes:
                if arg in forward_set:
                    required[arg] = None
    for out in bwd_outputs:
        if isinstance(out, fx.Node) and out in forward_set:
            required[out] = None

    joint = JointGraph(gm, num_fwd_outputs, forward, backward, list(required), static_inputs)
    owners: dict[Any, str] = {}
    value_bytes: dict[fx.Node, float] = {}
    for node in forward:
        joint.facts[node] = _node_facts(node, static_inputs, owners, joint.facts, value_bytes)
        node.meta["fxmem"] = joint.facts[node]
    _mark_normalisation_inputs(joint)
    _mark_extreme_values(joint)
    mark_mutated_inputs(joint, gm, primals, bwd_outputs)
    _mark_backward_only(joint, [o for o in fwd_outputs if isinstance(o, fx.Node)])
    return joint


# A constant at least this large (float16's largest, which fp16 attention masks use; bf16 and fp32 masks
# use their own minimum or -inf) marks a tensor as holding extreme values.
_EXTREME = 65504.0
# Ops that map extreme inputs to ordinary values (exp(-inf) is 0): marks stop there.
_SATURATING_OPS = {"exp", "exp2", "expm1", "sigmoid", "tanh", "erf", "atan", "reciprocal", "_softmax", "softmax"}


def _mark_extreme_values(joint: JointGraph) -> None:
    """Mark the tensors that hold extreme values by construction: an attention mask of -inf (or of the
    dtype's minimum), scores filled with it. A quantization group scales to its largest magnitude, so
    such a value poisons its group (it comes back NaN, or every other value comes back 0): they are not
    quantized. Marks follow views and pointwise ops, and stop at reductions and saturating ops (a
    softmax's output is ordinary again)."""
    marked: set[fx.Node] = set()
    for node in joint.forward:
        facts = joint.facts[node]
        extreme = any(not abs(c) < _EXTREME for c in _float_constants(node))  # (nan too)
        follows = facts.kind in ("view", "pointwise", "getitem") and op_name(node) not in _SATURATING_OPS
        inherited = follows and not marked.isdisjoint(node.all_input_nodes)
        if extreme or inherited:
            marked.add(node)
            facts.quantizable = False


def _float_constants(node: fx.Node) -> list[float]:
    found: list[float] = []
    fx.node.map_aggregate((node.args, node.kwargs), lambda a: found.append(a) if isinstance(a, float) else a)
    return found


def _mark_backward_only(joint: JointGraph, fwd_outputs: list[fx.Node]) -> None:
    """Mark the forward-computable nodes no forward output depends on (e.g. the one-hot of a loss's
    backward): computing them in the backward instead of the forward costs nothing extra."""
    needed = set(fwd_outputs)
    for node in reversed(joint.forward):
        if node in needed:
            needed.update(node.all_input_nodes)
        else:
            joint.facts[node].backward_only = True


def _norm_kind(user: fx.Node) -> str | None:
    """Whether ``user`` normalises by the statistics of single rows (its last dim) or of many rows."""
    name = op_name(user)
    if name not in _NORMALIZATION_OPS:
        return None
    if name in _ROW_NORMALIZATION_OPS:
        return "row"
    if name in ("var_mean", "var", "std"):
        dims = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim")
        val = user.args[0].meta.get("val") if isinstance(user.args[0], fx.Node) else None
        last = val.dim() - 1 if isinstance(val, torch.Tensor) else None
        if isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] in (-1, last):
            return "row"
    return "batch"


def _mark_normalisation_inputs(joint: JointGraph) -> None:
    """Mark the tensors a normalisation reads, directly or through views: the planner stores them only in
    formats whose error the normalisation's backward does not blow up. A log-softmax output (the loss's
    saved log-probabilities, whose gradient is exp of it) is treated like a row normalisation's input,
    and the probabilities rebuilt from it with ``exp`` are not quantized at all."""
    log_softmaxes = [n for n in joint.forward if _is_log_softmax(n)]
    kinds: dict[fx.Node, str] = dict.fromkeys(log_softmaxes, "row")
    # Inductor's form reads its input twice: the log-probabilities it rebuilds from a stored input carry
    # that input's errors, as if stored themselves.
    kinds.update((n.args[0], "row") for n in log_softmaxes if op_name(n) == "sub" and n.args[0] in joint.facts)
    for node in reversed(joint.forward):
        for user in node.users:
            user_facts = joint.facts.get(user)
            is_view = user_facts is not None and user_facts.kind == "view"
            kind = _norm_kind(user) or (kinds.get(user) if is_view else None)
            if kind is not None and kinds.get(node) != "row":
                kinds[node] = kind
        if node in kinds:
            joint.facts[node].quantizable = False
            joint.facts[node].norm_input = kinds[node]
    for log_probs in log_softmaxes:
        for user in log_probs.users:
            if user in joint.facts and op_name(user) == "exp":
                # The loss's gradient is each probability itself, and the many tiny ones would come back as
                # whole quantization steps (int8 gave 63% gradient error).
                joint.facts[user].quantizable = False


def _is_log_softmax(node: fx.Node) -> bool:
    """``_log_softmax``, or the form Inductor's graph has it in: ``x - log(sum(exp(x), dim, keepdim))``."""
    if op_name(node) == "_log_softmax":
        return True
    log = node.args[1] if op_name(node) == "sub" and len(node.args) == 2 else None
    total = log.args[0] if isinstance(log, fx.Node) and op_name(log) == "log" else None
    exp = total.args[0] if isinstance(total, fx.Node) and op_name(total) == "sum" else None
    return isinstance(exp, fx.Node) and op_name(exp) == "exp" and exp.args[0] is node.args[0]


def _view_base(node: fx.Node) -> fx.Node | None:
    """The input a node's value aliases by its op's schema: a view op's input (also for the getitems of
    one that returns several views, like ``split``: past the list, to the op's input)."""
    source = view_source(node)
    return view_source(source) if source is not None and node.target is operator.getitem else source


def _smaller_than_its_generator_state(node: fx.Node, val: Any) -> bool:
    """Whether ``node`` is a replayed draw, or a value made from that draw alone (at most two ops away: a
    dropout's mask is a conversion of it, or of its view), that takes fewer bytes than the generator state
    its replay needs: then holding it, in a region the user prefers recomputed, holds less than
    recomputing it would."""
    source = node
    for _ in range(3):  # the node itself, then up its only tensor input, twice
        if REPLAYED_DRAW in source.meta:
            state = _val(source.args[0])
            return isinstance(val, torch.Tensor) and _bytes_of(val) < _bytes_of(state)
        tensors = [a for a in source.all_input_nodes if isinstance(_val(a), torch.Tensor)]
        if len(tensors) != 1:
            return False
        source = tensors[0]
    return False


def _node_facts(
    node: fx.Node,
    static_inputs: set[fx.Node],
    owners: dict[Any, str],
    known: dict[fx.Node, NodeFacts],
    value_bytes: dict[fx.Node, float],
) -> NodeFacts:
    """``known``, ``owners`` and ``value_bytes`` hold what the forward nodes before this one found (its
    inputs among them: a forward node reads only forward nodes); this adds its own."""
    val = _val(node)
    tensor = None
    is_view = False
    if isinstance(val, torch.Tensor) and node.op in ("placeholder", "call_function", "get_attr"):
        try:
            key = storage_key(val)
        except Exception:  # tensors without storage (compressed sparse layouts): treat as owning themselves
            key = node.name
        base = known.get(_view_base(node))
        if base is not None and base.tensor is not None:
            # A view by its schema, even where the fake values do not share storage (graph passes that
            # re-create metadata): at run time it aliases its base, so it must never be saved beside it.
            is_view, owner = True, base.tensor.storage_owner
            owners.setdefault(key, owner)
        else:
            is_view = key in owners and node.op == "call_function"
            owner = owners.setdefault(key, node.name)
        tensor = _tensor_facts(node, val, owner)
    elif _view_base(node) in known:  # an op returning several views (split, unbind): as free as a view
        is_view = True
    kind = _classify(node, is_view, static_inputs)
    policy = node.meta.get("recompute")
    policy_name = getattr(policy, "name", None)
    is_sym = _compat.is_sym_node(node)
    # fx calls seeded ops impure; their randomness is handled by ``kind`` (zero-dropout attention is not)
    impure = node.op == "call_function" and node.is_impure() and RANDOM_TAG not in getattr(node.target, "tags", ())
    can_recompute = node.op in ("call_function", "get_attr") and kind not in ("random", "collective") and not impure
    can_recompute = can_recompute and op_name(node) not in _NEVER_RECOMPUTE_OPS
    if policy_name == "MUST_SAVE":
        can_recompute = False
    # Views (a split's getitems too) are recomputed from their base: saving one holds the base's whole
    # storage anyway, more than the view's own bytes the plan would count.
    can_save = tensor is not None and not _is_multi_output(node) and not is_sym and (not is_view or not can_recompute)
    if policy_name in ("MUST_RECOMPUTE", "PREFER_RECOMPUTE") and can_recompute:  # user checkpoint regions
        can_save = can_save and policy_name == "PREFER_RECOMPUTE" and _smaller_than_its_generator_state(node, val)
    if node.op == "call_function" and not is_sym and tensor is None and not isinstance(val, (list, tuple)):
        if node.users:
            raise UnsupportedGraph(f"node {node.name} ({op_name(node)}) has no tensor metadata")
    value_bytes[node] = _bytes_of(val)
    return NodeFacts(
        name=node.name,
        kind=kind,
        tensor=tensor,
        flops=_flops(node) if node.op == "call_function" else 0.0,
        bytes_moved=value_bytes[node] + sum(value_bytes[a] for a in node.all_input_nodes),
        can_recompute=can_recompute,
        can_save=can_save,
        quantizable=True,  # this and norm_input are set by _mark_normalisation_inputs once users are known
        norm_input=None,
        sign_read=op_name(node) in ("relu", "threshold"),
        user_policy=policy_name,
        draws=node.meta.get(REPLAYED_DRAW, 0),
    )
