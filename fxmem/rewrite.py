"""Rewrite: from a Plan, the forward and backward graphs.

The forward saves exactly the plan's saved nodes; a quantized node is replaced, for its backward readers
only, by quantize nodes in the forward (whose payload is saved) and dequantize nodes in the backward;
an input the forward overwrites, by a copy the forward makes first. Every node the backward recomputes,
and every dequantize, is placed right before its first use, so the backward's transient memory stays
small. The joint graph passed in is fxmem's own: this module mutates it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from fxmem import _compat
from fxmem.capture import JointGraph, UnsupportedGraph
from fxmem.memory import channels_last_copies
from fxmem.solve import Plan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Codec:
    """A storage format as graph code: ``encode(x) -> payload``, ``decode(payload, like) -> x``."""

    name: str
    encode: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
    decode: Callable[[tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor]


def _layout(t: torch.Tensor) -> tuple:
    sizes = (*t.shape, *t.stride(), t.storage_offset())
    return tuple(_compat.symbolic_expr(s) for s in sizes), t.dtype, t.device


class _CodecTraces:
    """The codec graphs traced for one split, by codec and tensor layout. A codec is traced as one round
    trip from the tensor (quantize, then dequantize to the tensor's shape and strides), so the dequantize
    takes its sizes from the tensor: under dynamic shapes they are symbolic, and the graph serves every
    size. Tracing (``make_fx`` with Inductor's decompositions) costs far more than copying a graph, and
    tensors of one layout recur (a dropout mask per layer), so each layout is traced once and copied where
    it recurs."""

    def __init__(self) -> None:
        self._graphs: dict[tuple, fx.GraphModule] = {}

    def round_trip(self, codec: Codec, val: torch.Tensor, fake_mode: Any) -> tuple[fx.GraphModule, bool]:
        """The graph from ``val`` to ``(*payload, dequantized)``, and whether it was traced before (its
        values are another copy's)."""
        key = (codec, _layout(val))
        if key in self._graphs:
            return self._graphs[key], True

        def round_trip(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            payload = tuple(codec.encode(x))
            return (*payload, codec.decode(payload, x))

        with fake_mode:
            traced = self._graphs[key] = _compat.trace_with_decompositions(round_trip, [val])
        return traced, False


def _value(node: fx.Node) -> object:
    return node.meta["val"]


def _inline(
    graph: fx.Graph, traced: fx.GraphModule, inputs: Sequence[fx.Node], after: fx.Node, revalue_in: Any = None
) -> list[fx.Node]:
    """Copy ``traced``'s nodes into ``graph`` after ``after``; returns the nodes standing for its outputs.
    ``revalue_in``: a fake mode to compute the copies' values in, when ``traced`` was inlined before (its
    values are taken: simulation tells tensors apart by their storages)."""
    env: dict[fx.Node, fx.Node] = {}
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    env.update(zip(placeholders, inputs, strict=True))
    anchor = after
    for node in traced.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            outputs = fx.node.map_arg(node.args[0], env.__getitem__)
            return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        if node.op != "call_function":
            raise UnsupportedGraph(f"codec graph has a {node.op} node ({node.name}); codecs must use plain ops")
        with graph.inserting_after(anchor):
            new = graph.node_copy(node, env.__getitem__)
        new.meta = dict(node.meta)
        if revalue_in is not None:
            args, kwargs = fx.node.map_arg((new.args, new.kwargs), _value)
            with revalue_in, _compat.size_oblivious((args, kwargs)):
                val = new.target(*args, **kwargs)
                if "tensor_meta" in new.meta:
                    new.meta["tensor_meta"] = _compat.tensor_metadata(val)
            new.meta["val"] = val
        env[node] = anchor = new
    raise AssertionError("traced codec graph has no output")


def _insert_codec(
    joint: JointGraph, node: fx.Node, codec: Codec, traces: _CodecTraces
) -> tuple[list[fx.Node], fx.Node, list[fx.Node]]:
    """Quantize ``node`` right after it is computed; returns the payload nodes, the dequantized copy and
    the symbolic sizes the backward needs to dequantize (see ``_forward_sizes``)."""
    graph = joint.gm.graph
    val = node.meta["val"]
    fake_mode = _compat.detect_fake_mode([val])
    if fake_mode is None:
        raise UnsupportedGraph("a quantized tensor has no fake value to trace its codec with")
    traced, seen = traces.round_trip(codec, val, fake_mode)
    *payload, restored = _inline(graph, traced, [node], node, fake_mode if seen else None)
    return payload, restored, _forward_sizes(node, payload, restored)


def _forward_sizes(node: fx.Node, payload: Sequence[fx.Node], restored: fx.Node) -> list[fx.Node]:
    """The symbolic sizes the dequantize reads that the forward computes: ``node``'s, and those the trace
    took from the quantize's own steps (a SymInt is traced once, where it is first met). The backward
    gets them as saved SymInts; the rest of what it reads must be the payload or constants."""
    driven: dict[fx.Node, bool] = {p: True for p in payload}
    driven[node] = False

    def from_payload(n: fx.Node) -> bool:
        if n not in driven:
            driven[n] = any(from_payload(a) for a in n.all_input_nodes)
        return driven[n]

    sizes, seen, stack = [], set(), [restored]
    while stack:
        n = stack.pop()
        if n in seen or n in payload:
            continue
        seen.add(n)
        if n is node:
            raise UnsupportedGraph(f"the dequantize of {node.name} reads the tensor it replaces")
        if _compat.is_sym_node(n) and not from_payload(n):
            sizes.append(n)
        else:
            stack.extend(n.all_input_nodes)
    return sizes


def _rewire_backward(joint: JointGraph, restored: dict[fx.Node, fx.Node], recomputed: set[fx.Node]) -> None:
    """Let the backward read dequantized copies. A recomputed node that reads one, directly or through
    other recomputed nodes, may also run in the forward, which must keep full precision: the backward
    gets its own copy of such a node."""
    graph = joint.gm.graph
    replacement = dict(restored)
    for node in joint.forward:  # topological: a node's inputs are replaced before it is looked at
        if node in recomputed and any(arg in replacement for arg in node.all_input_nodes):
            # Inputs (dequantize nodes, earlier copies) sit between the quantized node and this one.
            with graph.inserting_after(node):
                replacement[node] = graph.node_copy(node, lambda arg: replacement.get(arg, arg))
    for original, substitute in replacement.items():
        for user in list(original.users):
            if user in joint.backward:
                user.replace_input_with(original, substitute)


def split(
    joint: JointGraph,
    plan: Plan,
    codecs: dict[str, Codec],
    node_codecs: dict[tuple[str, str], Codec] | None = None,
) -> tuple[fx.GraphModule, fx.GraphModule, list[fx.Node]]:
    """The forward and backward modules for ``plan``, and the tensors the forward saves."""
    by_name = {n.name: n for n in joint.forward}
    recomputed = {by_name[name] for name in plan.recomputed}
    saved: list[fx.Node] = []
    restored: dict[fx.Node, fx.Node] = {}
    sizes: list[fx.Node] = []
    traces = _CodecTraces()
    for node in joint.forward:  # graph order keeps the saved list stable
        if node.name not in plan.saved:
            continue
        fmt = plan.saved[node.name]
        written_into = joint.facts[node].written_into
        if written_into is not None:  # the backward reads it back from the parameter it was written into
            restored[node] = written_into
            saved.append(written_into)
        elif joint.facts[node].overwritten:  # a copy of its value before the forward updates it
            with joint.gm.graph.inserting_after(node):
                restored[node] = joint.gm.graph.call_function(torch.ops.aten.clone.default, (node,))
            with _compat.detect_fake_mode([node.meta["val"]]) or contextlib.nullcontext():
                restored[node].meta["val"] = node.meta["val"].clone()
            saved.append(restored[node])
        elif fmt is None:
            saved.append(node)
        else:
            codec = (node_codecs or {}).get((node.name, fmt)) or codecs[fmt]
            payload, restored[node], node_sizes = _insert_codec(joint, node, codec, traces)
            sizes += node_sizes
            saved.extend(payload)
    _rewire_backward(joint, restored, recomputed)

    forward = set(joint.forward)
    readers = joint.backward | recomputed
    saved_sym = list(
        dict.fromkeys(
            arg for reader in joint.gm.graph.nodes if reader in readers
            for arg in reader.all_input_nodes if arg in forward and _compat.is_sym_node(arg)
        )
    )  # fmt: skip
    saved_sym += [n for n in (*joint.required, *sizes) if _compat.is_sym_node(n) and n not in saved_sym]
    fw, bw = _compat.extract_fwd_bwd_modules(
        joint.gm,
        saved,
        saved_sym,
        num_fwd_outputs=joint.num_fwd_outputs,
        static_lifetime_input_nodes=joint.static_inputs,
    )
    # The extraction copies into the backward every forward node whose inputs it has there, and keeps
    # the unused ones that count as impure: under Inductor's fallback_random, a random op the plan holds
    # but whose input it recomputes. There it would draw again, moving eager's generator on (the next
    # step's masks would then differ from eager's); PyTorch's partitioner removes such ops too.
    bw.graph.eliminate_dead_code(is_impure_node=lambda node: node.is_impure(impure_random=False))
    _check_backward_inputs(bw, saved, saved_sym)
    # PyTorch's extraction linted both graphs. The reordering rebuilds the backward (copying only what its
    # outputs and impure nodes need), so that graph is linted again.
    bw = place_recompute_late(bw)
    bw.graph.lint()
    return fw, bw, saved


def save_inputs_in_place(fw: fx.GraphModule, num_fwd_outputs: int) -> None:
    """Have Inductor's forward save its inputs themselves, not channels-last copies of them.

    Under layout optimization Inductor saves a channels-last copy of each saved input that reaches a
    convolution (``channels_last_copies``), held from the forward to the backward: for a parameter, bytes
    the parameter holds already; for the batch, bytes its caller holds. Inductor lays out channels-last
    the nodes that lead to a convolution and the direct users of those that come before the last one. A
    view of a view of the input, placed at the end of the forward, is neither: it keeps the input's
    strides, and a same-shape ``expand`` lowers to the input itself. The backward makes a transient copy
    where a convolution reads it, as it does for any input not channels-last.
    """
    (out,) = fw.graph.find_nodes(op="output")
    results = list(out.args[0])
    copied = channels_last_copies(fw)
    if copied.isdisjoint(results[num_fwd_outputs:]):
        return
    with fw.graph.inserting_before(out):
        for i in range(num_fwd_outputs, len(results)):
            if results[i] in copied:
                results[i] = _same_shape_view(fw.graph, _same_shape_view(fw.graph, results[i]))
    out.args = (tuple(results),)
    fw.recompile()


def _same_shape_view(graph: fx.Graph, node: fx.Node) -> fx.Node:
    keep = [-1] * node.meta["val"].dim()  # each size as it is, symbolic or not
    view = graph.call_function(torch.ops.aten.expand.default, (node, keep))
    view.meta["val"] = node.meta["val"].expand(keep)
    return view


def _check_backward_inputs(bw: fx.GraphModule, saved: list[fx.Node], saved_sym: list[fx.Node]) -> None:
    allowed = {n.name for n in saved} | {n.name for n in saved_sym}
    for node in bw.graph.find_nodes(op="placeholder"):
        if node.name in allowed or _compat.is_tangent(node) or "seed" in node.name or "offset" in node.name:
            continue
        if node.name.startswith("primals"):  # a primal the backward reads must have been saved
            raise UnsupportedGraph(f"the backward reads input {node.name} that the plan does not save")
        if "backward_state" in node.name:
            continue
        raise UnsupportedGraph(f"the backward reads {node.name}, which the plan neither saves nor recomputes")


def place_recompute_late(gm: fx.GraphModule) -> fx.GraphModule:
    """Reorder a backward graph so that every node not reading a tangent (recomputation, dequantize)
    runs right before its first user, instead of all at the start."""
    graph = gm.graph
    driven: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            if _compat.is_tangent(node):
                driven.add(node)
        elif any(a in driven for a in node.all_input_nodes):
            driven.add(node)
    new_graph = fx.Graph(owning_module=gm)
    new_graph._codegen = graph._codegen
    env: dict[fx.Node, fx.Node] = {}

    def emit(root: fx.Node) -> None:
        stack = [root]
        while stack:
            node = stack[-1]
            if node in env:
                stack.pop()
                continue
            pending = [a for a in node.all_input_nodes if a not in env]
            if pending:
                stack.extend(reversed(pending))
                continue
            env[node] = new_graph.node_copy(node, env.__getitem__)
            stack.pop()

    for node in graph.find_nodes(op="placeholder"):
        emit(node)
    for node in graph.nodes:
        if node in driven or node.op == "output" or (node.op == "call_function" and node.is_impure()):
            emit(node)
    gm.graph = new_graph
    return gm
