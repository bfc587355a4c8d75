"""A model of Inductor's reordering for peak memory: the order its fused kernels run in.

After fusion Inductor's scheduler (``torch._inductor.memory.reorder_for_peak_memory``, on by default)
estimates the peak of its own order and of three other topological orders of the fused kernels, and runs
the lowest; on a tie, its own. The estimate holds each buffer a kernel writes from that kernel to the last
kernel that reads it (the graph's outputs to the end), and the graph's inputs other than parameters and
tangents from the start to their last reader. The three orders:

* least peak memory first: of the kernels that can run, one that allocates nothing beyond the peak so
  far and then frees the most (net), else the one that allocates least;
* breadth first: the kernel whose inputs were computed earliest;
* depth first: the kernels by the bytes they write and read, smallest first, each after what it needs.

An op of several results (a fallback such as ``convolution_backward``) allocates them all, and each item
is a kernel of its own that writes nothing and frees its result after its last reader. Depth first, those
items come first (nothing is smaller), so the backward runs in about the graph's order and then whatever
only the output reads, smallest first: on ResNet-18's backward under bf16 autocast (H200, torch 2.11) the
fp32 casts of the weights' gradients ran last, holding their bf16 gradients instead until then.
``fxmem.schedule`` hands its fused groups here; a buffer is a node that Inductor writes to memory. The
model takes another order than the scheduler's own only where it is estimated clearly lower
(``_REORDER_MARGIN``).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch.fx as fx

from fxmem.memory import is_result_item, result_items, storage_bytes, storage_node

__all__ = ["KernelGraph", "estimate_peak", "kernel_graph", "reorder_for_peak_memory"]

# Inputs Inductor's estimate leaves out as outliving the graph (torch._inductor.utils.is_nonfreeable_buffers).
_NONFREEABLE_PREFIXES = ("primals_", "arg", "fwd_rng_state", "bwd_rng_state", "tangents")


@dataclass
class KernelGraph:
    """A graph's kernels as Inductor's estimate sees them, in the scheduler's own order."""

    group_of: list[int | None]  # each kernel's group (None for an item of several results)
    writes: list[list[fx.Node]]  # the buffers each kernel writes
    reads: list[set[fx.Node]]  # the buffers each kernel reads, its own left out
    allocated: dict[fx.Node, int]  # bytes each buffer allocates when written (an item: none, its op does)
    freed: dict[fx.Node, int]  # bytes each frees after its last reader (an op of several results: none)
    outputs: set[fx.Node]  # buffers the graph returns: never freed
    inputs: list[fx.Node]  # freeable inputs: live from the start to their last reader
    readers: dict[fx.Node, list[int]] = field(default_factory=dict)
    producer: dict[fx.Node, int] = field(default_factory=dict)
    sizes: list[int] = field(default_factory=list)  # bytes each kernel allocates
    _preds: list[set[int]] = field(default_factory=list)  # the kernels each kernel needs, and needed by
    _succs: list[set[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for kernel, written in enumerate(self.writes):
            self.producer.update(dict.fromkeys(written, kernel))
            self.sizes.append(sum(self.allocated[b] for b in written))
        for kernel, read in enumerate(self.reads):
            for buffer in read:
                self.readers.setdefault(buffer, []).append(kernel)
        # (each of the four orders walks them: computed once)
        self._preds = [{self.producer[b] for b in read if b in self.producer} for read in self.reads]
        self._succs = [{r for b in written for r in self.readers.get(b, ())} for written in self.writes]

    def preds(self, kernel: int) -> set[int]:
        return self._preds[kernel]

    def succs(self, kernel: int) -> set[int]:
        return self._succs[kernel]


def kernel_graph(
    gm: fx.GraphModule, groups: Sequence[Sequence[fx.Node]], stored: set[fx.Node], extern: Callable[[fx.Node], bool]
) -> KernelGraph:
    """``groups``: the fused kernels, each the nodes of ``gm`` it writes; ``stored``: every node Inductor
    writes to memory; ``extern``: whether a node runs as an extern or fallback kernel. A view reads its
    base's buffer; a loop kernel of several results (``var_mean``) writes each as a buffer."""
    reads: dict[fx.Node, set[fx.Node]] = {}  # the buffers each node reads, through the nodes it inlines
    for node in gm.graph.nodes:
        reads[node] = {node} if is_result_item(node) else set()
        for arg in node.all_input_nodes if not reads[node] else ():
            base = storage_node(arg)
            reads[node] |= {base} if _holds_buffer(base, stored) else reads[base]
    group_of: list[int | None] = []
    writes: list[list[fx.Node]] = []
    kernel_reads: list[set[fx.Node]] = []
    for index, members in enumerate(groups):
        items = {m: result_items(m) for m in members if storage_node(m) is m and not is_result_item(m)}
        written = [b for m, taken in items.items() for b in (taken if taken and not extern(m) else [m])]
        group_of.append(index)
        writes.append(written)
        kernel_reads.append(set().union(*(reads[m] for m in members)) - set(written))
        for item in (i for m, taken in items.items() if extern(m) for i in taken):
            group_of.append(None)
            writes.append([item])
            kernel_reads.append({item.args[0]})
    buffers = {b for written in writes for b in written}
    # An extern op of several results allocates them all and frees none; each item frees its own.
    allocated = {b: 0 if is_result_item(b) and b.args[0] in buffers else _bytes(b) for b in buffers}
    freed = {b: 0 if result_items(b) else _bytes(b) for b in buffers}
    read = set().union(*kernel_reads)
    placeholders = gm.graph.find_nodes(op="placeholder")
    inputs = [p for p in placeholders if p in read and not p.name.startswith(_NONFREEABLE_PREFIXES)]
    for p in inputs:
        allocated[p] = freed[p] = _bytes(p)
    kernel_reads = [{b for b in read if b in freed} for read in kernel_reads]
    (output,) = gm.graph.find_nodes(op="output")
    return KernelGraph(group_of, writes, kernel_reads, allocated, freed, reads[output] & freed.keys(), inputs)


def _holds_buffer(node: fx.Node, stored: set[fx.Node]) -> bool:
    """Whether ``node`` (not a view) has a buffer: a placeholder, a stored node, an item of several results."""
    return is_result_item(node) or node.op == "placeholder" or (node in stored and not result_items(node))


def _bytes(node: fx.Node) -> int:
    """A buffer's bytes; an op's of several results, those of its items."""
    items = result_items(node)
    return sum(_bytes(i) for i in items) if items else storage_bytes(node.meta.get("val"))


# Another order is taken only where estimated this much lower than the scheduler's own. Inductor takes any
# lower one, but by its own estimate, on its own kernels: where the two estimates are that close, they may
# rank the orders differently, and the scheduler's own order, the higher peak, is the safer prediction.
# (ResNet-18's backward on an H200: depth first estimated 4.5% lower here, and run by Inductor.)
_REORDER_MARGIN = 0.02


def reorder_for_peak_memory(graph: KernelGraph, *, reorder: bool = True) -> list[int] | None:
    """The groups' indices in the order Inductor runs them: of the scheduler's own order (the kernels in
    index order, each after what it needs) and the three others, the one with the lowest estimated peak
    where it is lower than the scheduler's own by ``_REORDER_MARGIN``, the first on a tie; the scheduler's
    own without ``reorder``. ``None`` if the kernels need each other (a fusion Inductor would not make)."""
    own = _own_order(graph)
    if own is None:
        return None
    best = own
    if reorder:
        others = [_least_peak_first(graph), _breadth_first(graph), _depth_first(graph)]
        estimates = [estimate_peak(graph, order) for order in others]
        lowest = min(range(len(others)), key=estimates.__getitem__)
        if estimates[lowest] < (1 - _REORDER_MARGIN) * estimate_peak(graph, own):
            best = others[lowest]
    return [graph.group_of[k] for k in best if graph.group_of[k] is not None]


def estimate_peak(graph: KernelGraph, order: Sequence[int]) -> int:
    """Inductor's estimate of the peak of running the kernels in ``order`` (``estimate_peak_memory``)."""
    step = {kernel: i for i, kernel in enumerate(order)}
    change = [0] * (len(order) + 1)
    for buffer in graph.inputs:
        change[0] += graph.allocated[buffer]
    for kernel in order:
        for buffer in graph.writes[kernel]:
            change[step[kernel]] += graph.allocated[buffer]
    for buffer in graph.freed.keys() - graph.outputs:
        born = step[graph.producer[buffer]] if buffer in graph.producer else 0
        change[max((step[r] for r in graph.readers.get(buffer, ())), default=born) + 1] -= graph.freed[buffer]
    peak = live = 0
    for delta in change:
        live += delta
        peak = max(peak, live)
    return peak


def _own_order(graph: KernelGraph) -> list[int] | None:
    """The kernels in index order, each after the kernels it needs (``topological_sort_schedule``)."""
    state = [0] * len(graph.writes)  # 0 unseen, 1 what it needs being placed, 2 placed
    order = []
    for start in range(len(graph.writes)):
        stack = [(start, False)]
        while stack:
            kernel, ready = stack.pop()
            if ready:
                state[kernel] = 2
                order.append(kernel)
            elif state[kernel] == 1:
                return None
            elif state[kernel] == 0:
                state[kernel] = 1
                stack.append((kernel, True))
                stack.extend((p, False) for p in sorted(graph.preds(kernel), reverse=True) if state[p] != 2)
    return order


def _least_peak_first(graph: KernelGraph) -> list[int]:
    """Inductor's ``topological_sort_lpmf``."""
    n = len(graph.writes)
    waiting = [len(graph.preds(k)) for k in range(n)]
    unread = {b: len(graph.readers.get(b, ())) + (b in graph.outputs) for b in graph.freed}
    to_free = [0] * n
    for kernel in range(n):
        to_free[kernel] += sum(graph.freed[b] for b in graph.reads[kernel] if unread[b] == 1)
        to_free[kernel] += sum(graph.freed[b] for b in graph.writes[kernel] if unread[b] == 0)
    live = sum(graph.freed[b] for b in graph.inputs)
    peak = max(live, sum(graph.freed[b] for b in graph.outputs))
    ready = {k for k in range(n) if waiting[k] == 0}
    order = []
    while ready:
        gap = peak - live
        kernel = min(ready, key=lambda k: (graph.sizes[k] * (graph.sizes[k] > gap), graph.sizes[k] - to_free[k], k))
        ready.remove(kernel)
        order.append(kernel)
        live += graph.sizes[kernel]
        peak = max(peak, live)
        live -= to_free[kernel]
        for succ in graph.succs(kernel):
            waiting[succ] -= 1
            if waiting[succ] == 0:
                ready.add(succ)
        for buffer in graph.reads[kernel]:
            unread[buffer] -= 1
            if unread[buffer] == 1:
                for reader in graph.readers[buffer]:
                    to_free[reader] += graph.freed[buffer]
    return order


def _breadth_first(graph: KernelGraph) -> list[int]:
    """Inductor's ``topological_sort_bfs``: next, the kernel whose inputs' kernels ran earliest."""
    n = len(graph.writes)
    preds = [graph.preds(k) for k in range(n)]
    waiting = [len(p) for p in preds]
    ran_at: dict[int, int] = {}
    heap: list[tuple[list[int], int]] = [([], k) for k in range(n) if waiting[k] == 0]
    heapq.heapify(heap)
    order = []
    while heap:
        _, kernel = heapq.heappop(heap)
        ran_at[kernel] = len(order)
        order.append(kernel)
        for succ in graph.succs(kernel):
            waiting[succ] -= 1
            if waiting[succ] == 0:
                heapq.heappush(heap, (sorted(ran_at[p] for p in preds[succ]), succ))
    return order


def _depth_first(graph: KernelGraph) -> list[int]:
    """Inductor's ``topological_sort_dfs``: the kernels by the bytes they allocate and read, smallest
    first, each after what it needs (taken in the same order)."""
    n = len(graph.writes)
    weight = [graph.sizes[k] + sum(graph.freed[b] for b in graph.reads[k]) for k in range(n)]
    preds = [sorted(graph.preds(k), key=lambda p: (weight[p], p)) for k in range(n)]
    seen: set[int] = set()
    order = []
    for start in sorted(range(n), key=lambda k: (weight[k], k)):
        stack = [(start, False)]
        while stack:
            kernel, ready = stack.pop()
            if ready:
                order.append(kernel)
            elif kernel not in seen:
                seen.add(kernel)
                stack.append((kernel, True))
                stack.extend((p, False) for p in reversed(preds[kernel]) if p not in seen)
    return order
