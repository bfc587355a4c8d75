"""A model of Inductor's scheduler fusion: the order in which fxmem's fused memory walk runs a graph.

Inductor's scheduler fuses kernels across the graph, so it computes some results earlier, and keeps
some buffers alive longer, than the graph's order says (on GPT and ViT, one kernel at the start of the
backward recomputes the residual stream of every layer). ``fxmem.simulate`` walks each graph in the
order this model gives. ``python -m fxmem.bench.replay`` sets it against recorded GPU traces. The model
follows ``Scheduler.fuse_nodes`` (torch 2.11):

* kernels are the nodes Inductor writes to memory. A loop kernel (not a matmul, extern or fallback op)
  joins an earlier group of loop kernels whose loop it fits (Triton's ``can_fuse``: reductions over the
  same elements, a pointwise kernel over a reduction's input or output, pointwise kernels of the same
  size) when it reads a buffer the group writes (vertical fusion), or when both read a buffer and it is
  within 64 kernels of the group's first (horizontal fusion; ``are_long_distant_nodes``);
* it does not join when a kernel it needs, after the group's first, needs the group (a cycle), nor past
  64 kernels in a group; of several groups it joins the one it shares the most bytes with;
* the groups run in the order of their first kernel, each after the groups it needs
  (``topological_sort_schedule``), unless Inductor's reordering for peak memory estimates another order
  lower (``fxmem.reorder``); an op's several results follow it.

Matmuls, convolutions, fallbacks and the ops whose inputs Inductor realizes run as kernels of their own,
except the max-pool gradient: Inductor lowers it to a loop that gathers the output's gradient through
indices it computes inline, unless dilated or over 25 windows per element.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from fxmem import _compat
from fxmem.capture import op_kind
from fxmem.memory import argument, result_items, returns_view, storage_bytes
from fxmem.reorder import kernel_graph, reorder_for_peak_memory

HORIZONTAL_WINDOW = 64  # Inductor's are_long_distant_nodes
MAX_FUSION_SIZE = 64  # torch._inductor.config.max_fusion_size


def node_kind(node: fx.Node) -> str:
    """The op's kind (``fxmem.capture.op_kind``), as capture recorded it where it did."""
    facts = node.meta.get("fxmem")
    kind = getattr(facts, "kind", None)
    return kind if kind is not None else op_kind(node, returns_view(node.target))


def is_extern_kernel(node: fx.Node) -> bool:
    """Whether Inductor runs a call node as a matmul, an extern or a fallback kernel, not a loop."""
    if node.target is operator.getitem or _max_pool_gradient_in_loops(node):
        return False
    return node_kind(node) == "matmul" or _compat.inductor_reads_realized_inputs(node.target)


def _max_pool_gradient_in_loops(node: fx.Node) -> bool:
    """Whether Inductor lowers a max-pool gradient to a loop that gathers the output's gradient through
    the indices (inlining their computation), as it does unless dilated or over 25 windows per element."""
    if node.target is not torch.ops.aten.max_pool2d_with_indices_backward.default:
        return False
    kernel, stride, dilation = (argument(node, name) for name in ("kernel_size", "stride", "dilation"))
    stride = stride or kernel
    if any(d != 1 for d in ([dilation] * 2 if isinstance(dilation, int) else dilation)):
        return False
    return math.prod(_windows(k, s) for k, s in zip(kernel, stride, strict=False)) <= 25


def _windows(kernel: int, stride: int) -> int:
    """The most pooling windows along one dimension that an input element falls in (Inductor's count)."""
    return max(max(h // stride - max(0, (h - kernel) // stride), 1) for h in range(kernel * 2))


def graph_order(gm: fx.GraphModule, stored: set[fx.Node]) -> list[fx.Node]:
    """The graph's own order: the walk without the fusion model (``fxmem.bench.replay`` compares them)."""
    return list(gm.graph.nodes)


@dataclass
class _Group:
    first: int  # index of its first kernel
    loop: tuple[int, int] | None  # (numel, rnumel) of its loop (``_loop``); None for an extern kernel
    members: list[fx.Node] = field(default_factory=list)
    mask: int = 0  # its kernels, one bit each
    buffers: set[fx.Node] = field(default_factory=set)  # what its kernels read and write


def unreordered_schedule(gm: fx.GraphModule, stored: set[fx.Node]) -> list[fx.Node]:
    """The fusion model's order without Inductor's reordering for peak memory (``fxmem.bench.replay``
    compares them)."""
    return fused_schedule(gm, stored, reorder=False)


def fused_schedule(gm: fx.GraphModule, stored: set[fx.Node], *, reorder: bool = True) -> list[fx.Node]:
    """``gm``'s nodes in the order the modelled scheduler runs them; ``stored``: the nodes it writes."""
    nodes = list(gm.graph.nodes)
    reads: dict[fx.Node, set[fx.Node]] = {}  # the written buffers a node reads, through inlined nodes
    for node in nodes:
        reads[node] = set().union(*({a} if a in stored else reads[a] for a in node.all_input_nodes))
    kernels = [n for n in nodes if n.op == "call_function" and n in stored]
    index = {n: i for i, n in enumerate(kernels)}
    ancestors: dict[fx.Node, int] = {}  # the kernels each kernel needs, one bit each
    for kernel in kernels:
        ancestors[kernel] = 0
        for r in reads[kernel]:
            if r in index:
                ancestors[kernel] |= (1 << index[r]) | ancestors[r]
    groups: list[_Group] = []
    by_numel: dict[int, dict[int, _Group]] = {}  # loop kernels' groups (by id) by the sizes of what fits
    for kernel in kernels:
        loop = None if is_extern_kernel(kernel) else _loop(kernel)
        touched = reads[kernel] | {kernel}
        best: tuple[int, int, _Group] | None = None
        for group in _candidates(by_numel, loop):
            if len(group.members) >= MAX_FUSION_SIZE or not _fits(group.loop, loop):
                continue
            shared = touched & group.buffers
            vertical = any(r in index and group.mask >> index[r] & 1 for r in reads[kernel])
            if not shared or (not vertical and index[kernel] - group.first > HORIZONTAL_WINDOW):
                continue
            if _creates_cycle(ancestors[kernel], group, kernels, ancestors):
                continue
            score = (sum(storage_bytes(b.meta.get("val")) for b in shared), group.first)
            if best is None or score > best[:2]:
                best = (*score, group)
        group = best[2] if best is not None else _Group(index[kernel], loop)
        if best is None:
            groups.append(group)
        if loop is not None and loop[1] > 1 and group.loop[1] == 1:
            group.loop = loop  # a reduction sets the loop of the kernel it joins
        for numel in _numels(group.loop):
            by_numel.setdefault(numel, {})[id(group)] = group
        group.members.append(kernel)
        group.mask |= 1 << index[kernel]
        group.buffers |= touched
    graph = kernel_graph(gm, [g.members for g in groups], stored, is_extern_kernel)
    chosen = reorder_for_peak_memory(graph, reorder=reorder)
    if chosen is not None:
        groups = [groups[i] for i in chosen]
    order: list[fx.Node] = []
    done: set[fx.Node] = set()
    for node in [*gm.graph.find_nodes(op="placeholder"), *(m for g in groups for m in g.members), *nodes]:
        _visit(node, done, order)
    return order


def _loop(node: fx.Node) -> tuple[int, int]:
    """(numel, rnumel) at the traced sizes (no guard on a dynamic one): a reduction's output elements and
    how many it reduces into each; a loop kernel's output elements and 1."""
    out = node.meta.get("val")
    if not isinstance(out, torch.Tensor):  # several results (var_mean): those its items take
        out = next((item.meta["val"] for item in result_items(node)), None)
    numel = _compat.hint(out.numel()) if isinstance(out, torch.Tensor) else 1
    if node_kind(node) == "reduction" and numel:
        inputs = [a.meta.get("val") for a in node.all_input_nodes]
        largest = max((_compat.hint(v.numel()) for v in inputs if isinstance(v, torch.Tensor)), default=0)
        if largest > numel:
            return numel, largest // numel
    return numel, 1


def _numels(loop: tuple[int, int] | None) -> tuple[int, ...]:
    """The sizes of the pointwise kernels that fit ``loop``: the whole of a reduction's input, or its output."""
    if loop is None:
        return ()
    numel, rnumel = loop
    return (numel,) if rnumel == 1 else (numel * rnumel, numel)


def _candidates(by_numel: dict[int, dict[int, _Group]], loop: tuple[int, int] | None) -> list[_Group]:
    """The groups a kernel of ``loop`` may fit, each once."""
    found: dict[int, _Group] = {}
    for numel in _numels(loop):
        found.update(by_numel.get(numel, {}))
    return list(found.values())


def _fits(group_loop: tuple[int, int] | None, loop: tuple[int, int] | None) -> bool:
    """Whether a loop kernel can join a group (Triton's ``can_fuse``): reductions over the same elements
    into the same outputs; a pointwise kernel over a reduction's whole input or over its outputs;
    pointwise kernels of the same size."""
    if group_loop is None or loop is None:
        return False
    (group_numel, group_rnumel), (numel, rnumel) = group_loop, loop
    if group_rnumel > 1 and rnumel > 1:
        return group_loop == loop
    if group_rnumel > 1:
        return numel in (group_numel * group_rnumel, group_numel)
    if rnumel > 1:
        return group_numel in (numel * rnumel, numel)
    return group_numel == numel


def _creates_cycle(needs: int, group: _Group, kernels: list[fx.Node], ancestors: dict[fx.Node, int]) -> bool:
    """Whether a kernel that needs the kernels in ``needs`` would need ``group`` through one of them that
    runs after the group's first and is not in it."""
    between = needs & ~group.mask & ~((1 << (group.first + 1)) - 1)
    while between:
        low = between & -between
        if ancestors[kernels[low.bit_length() - 1]] & group.mask:
            return True
        between ^= low
    return False


def _visit(node: fx.Node, done: set[fx.Node], order: list[fx.Node]) -> None:
    """Append ``node`` to ``order`` after whatever it needs that is not there yet."""
    stack: list[tuple[fx.Node, bool]] = [(node, False)]
    while stack:
        current, ready = stack.pop()
        if current in done:
            continue
        if ready:
            # An op of several results allocates them all: its items follow it.
            for taken in [current, *(i for i in result_items(current) if i not in done)]:
                done.add(taken)
                order.append(taken)
            continue
        stack.append((current, True))
        stack.extend((a, False) for a in reversed(current.all_input_nodes) if a not in done)
