"""The memory simulator: live bytes over the forward and the backward as they will run.

It walks the forward graph, then the backward, allocating each node's storage when the node runs and
freeing it after its last reader (a view shares its base's storage; an op of several results allocates
them all). What the forward saves stays live into the backward; gradients stay live to the end;
parameters and buffers are a constant floor. With ``fused=True`` it follows Inductor: only the nodes
Inductor writes to memory hold any (most pointwise and view nodes are computed inside the kernels that
read them), kernels run in the order of a model of Inductor's scheduler fusion and reordering
(``fxmem.schedule``, ``fxmem.reorder``), an input an inlined node reads stays live until the last kernel
that computes it, the graph's memory gets an allowance for what that model misses, and a dead buffer
waits for the next allocation of its size as in Inductor's buffer pool.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from fxmem import _compat
from fxmem.capture import op_name
from fxmem.memory import channels_last_copies, is_result_item, result_items, storage_bytes, storage_key, view_source
from fxmem.schedule import fused_schedule, is_extern_kernel, node_kind


@dataclass
class Timeline:
    """Live bytes (parameters included) at each node, forward then backward: while it runs (its result
    and its inputs) unfused, after it (its dead inputs freed) under Inductor."""

    points: list[tuple[str, str, int]] = field(default_factory=list)  # (phase, node name, live bytes)
    static_bytes: int = 0  # parameters and buffers, plus device memory held outside the graph

    @property
    def peak_bytes(self) -> int:
        return max((b for _, _, b in self.points), default=self.static_bytes)

    @property
    def peak_at(self) -> tuple[str, str] | None:
        if not self.points:
            return None
        phase, name, _ = max(self.points, key=lambda p: p[2])
        return phase, name


# How Inductor lowers a graph (``torch._inductor.graph.GraphLowering.run_node``): a pointwise or view
# node becomes a loop body that its consumers inline, unless something makes it write a buffer: being
# an output, feeding a kernel that reads memory (a matmul, an extern or fallback op), or, with several
# consumers, reading many buffers or computing much (each consumer would redo it).
_INLINED_KINDS = ("pointwise", "view", "getitem")
# Lowered to loads and index arithmetic that a loop body inlines (the max-pool gradient's indices among them).
_INDEXING_OPS = {"embedding", "gather", "index", "iota", "arange", "_low_memory_max_pool_offsets_to_indices"}
# Inductor's scheduler then fuses kernels across the graph: the fused walk runs each graph in the order of
# fxmem.schedule's model of it, and counts graph memory 16/15. On 17 steps traced on an H200 (torch 2.11,
# 2026-11-29; GPT small, GPT-2 small, ResNet-18, ViT small) that model alone was 4.3% under to 0.6% over
# the measured peak; with 16/15 it was above every one, by 0.0-6.2%, so that an absolute budget holds there.
_FUSED_ALLOWANCE = (16, 15)
# On the CPU, a reused result of these is stored (Inductor's StorageBox.should_realize_on_reuse).
_CPU_HEAVY_OPS = {"exp", "log", "log10", "log1p", "log2", "sigmoid", "tanh"}


def _stored_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes whose result Inductor writes to memory (placeholders included); the others are inlined
    into the kernels of their consumers."""
    on_cpu = any(_is_cpu(p) for p in gm.graph.find_nodes(op="placeholder"))
    # A loop body is stored past reading more buffers than the first when reused, the second in any case,
    # or computing more ops than the third (Inductor's realize_* thresholds for the device).
    reused_reads, max_reads, max_ops = _compat.inductor_realize_thresholds(on_cpu)
    stored: set[fx.Node] = set()
    reads: dict[fx.Node, set[Any]] = {}  # the buffers an inlined loop body reads
    body: dict[fx.Node, set[fx.Node]] = {}  # and the ops it computes, each once (Inductor counts them so)
    heavy: set[fx.Node] = set()  # on the CPU, those that compute a heavy op
    for node in gm.graph.nodes:
        if node.op == "output":
            break
        kind, name = node_kind(node), op_name(node)
        if node.op != "call_function" or (kind not in _INLINED_KINDS and name not in _INDEXING_OPS):
            stored.add(node)
            continue
        inputs = node.all_input_nodes
        reads[node] = set().union(*(reads[a] if a in reads else {a} for a in inputs))
        body[node] = set().union(*(body.get(a, ()) for a in inputs))
        if kind not in ("view", "getitem"):
            body[node].add(node)
        ops = len(body[node]) + len(reads[node])
        if on_cpu and (name in _CPU_HEAVY_OPS or not heavy.isdisjoint(inputs)):
            heavy.add(node)
        users = list(node.users)
        large = ops > max_ops or len(reads[node]) > max_reads
        reused = len(users) > 1 and (len(reads[node]) > reused_reads or node in heavy)
        if large or reused or any(_reads_memory(u) for u in users):
            stored.add(node)
            del reads[node], body[node]
            heavy.discard(node)
    return stored


def _reads_memory(consumer: fx.Node) -> bool:
    """Whether a consumer needs its inputs written to memory: the graph's output, a matmul (Inductor's
    templates and extern calls read buffers), or an op Inductor does not lower into loops."""
    return consumer.op != "call_function" or is_extern_kernel(consumer)


def _writes_out_of_place(node: fx.Node) -> bool:
    """Whether Inductor gives a node's result a buffer of its own while all its inputs are still live: a
    matmul or convolution (an extern kernel's ``out=``) or a fallback op. A loop kernel may instead write
    into an input it is the last reader of."""
    if node.op != "call_function" or node.target is operator.getitem:
        return False
    return node_kind(node) == "matmul" or not _compat.inductor_lowers(node.target)


def _is_cpu(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.device.type == "cpu"


class _Memory:
    def __init__(self, start: int) -> None:
        self.live = start
        self.sizes: dict[Any, int] = {}
        self.refs: dict[Any, int] = {}

    def hold(self, key: Any, nbytes: int) -> None:
        if key not in self.sizes:
            self.sizes[key] = nbytes
            self.refs[key] = 0
            self.live += nbytes
        self.refs[key] += 1

    def release(self, key: Any) -> None:
        if key not in self.refs:
            return
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= self.sizes.pop(key)
            del self.refs[key]


def _aliased_key(node: fx.Node, keys: dict[fx.Node, Any]) -> Any:
    """The storage key of the input a view node aliases; ``None`` for any other node."""
    source = view_source(node)
    return None if source is None else keys.get(source)


# A model of Inductor's scheduler: the order to run a graph's nodes in, given the nodes it writes.
Schedule = Callable[[fx.GraphModule, set[fx.Node]], list[fx.Node]]


def _walk(
    gm: fx.GraphModule,
    memory: _Memory,
    phase: str,
    keep: set[str],
    static_keys: set[Any],
    fused: bool,
    timeline: Timeline,
    schedule: Schedule = fused_schedule,
    allowance: tuple[int, int] = _FUSED_ALLOWANCE,
    buffer_pool: bool = False,
) -> None:
    """Run ``gm`` through ``memory``: inputs are held on entry; nodes named in ``keep`` outlive it.
    ``buffer_pool`` (fused, sizes known): follow Inductor's reuse of dead buffers (``_hold_for_reuse``)."""
    stored = _stored_nodes(gm) if fused else set(gm.graph.nodes)
    nodes = schedule(gm, stored) if fused else list(gm.graph.nodes)
    # An inlined node is computed by each kernel it is inlined into: its inputs are read that late.
    read_at: dict[fx.Node, int] = {}
    for i, node in reversed(list(enumerate(nodes))):
        inlined = node.op == "call_function" and node not in stored
        read_at[node] = max((read_at[u] for u in node.users), default=i) if inlined else i
    last_use: dict[fx.Node, int] = {}
    for node in nodes:
        for arg in node.all_input_nodes:
            last_use[arg] = max(last_use.get(arg, -1), read_at[node])
    dying: dict[int, list[fx.Node]] = {}
    for arg, i in last_use.items():
        dying.setdefault(i, []).append(arg)
    held: dict[fx.Node, Any] = {}
    keys: dict[fx.Node, Any] = {}
    live: list[Any] = []  # the graph's live bytes at each position (a node's point)
    pool_keys: dict[Any, tuple[Any, int]] = {}  # each storage's (dtype, bytes), as Inductor's pool keys it
    allocations: list[tuple[int, tuple[Any, int]]] = []  # (position, pool key): storages the graph allocates
    deaths: list[tuple[int, tuple[Any, int]]] = []  # and those whose last holder lets go

    def release(node: fx.Node, position: int) -> None:
        key = held.pop(node)
        memory.release(key)
        if buffer_pool and key not in memory.sizes:
            deaths.append((position, pool_keys[key]))

    def take(node: fx.Node, position: int) -> None:
        val = node.meta.get("val")
        key = keys[node] = _aliased_key(node, keys) or storage_key(val)
        if key is None or key in static_keys:
            return
        if node in stored or key in memory.sizes or is_result_item(node):
            if buffer_pool and key not in memory.sizes:
                pool_keys[key] = (getattr(val, "dtype", None), storage_bytes(val))  # a view may return a list
                if node.op != "placeholder":
                    allocations.append((position, pool_keys[key]))
            memory.hold(key, storage_bytes(val))
            held[node] = key

    for i, node in enumerate(nodes):
        if node.op == "output":
            break
        if node not in keys:
            take(node, i)
        # An op of several results allocates them all while its inputs are alive; each is freed after its
        # own last reader (fused, though the kernels that read an item compute it inline).
        for item in result_items(node):
            take(item, i)
        # Inputs are all live on entry: one point once the first op runs. Unfused, an op's result is
        # allocated while the inputs it is the last reader of are still alive: the point is taken then.
        # Fused, so is an out-of-place kernel's; a loop kernel's is taken once they are freed, since
        # Inductor writes its result into such an input's buffer where it can.
        allocated = memory.live
        for arg in dying.get(i, ()):
            if arg in held and arg.name not in keep:
                release(arg, i)
        if node not in last_use and node in held and node.name not in keep:
            release(node, i)
        live.append(allocated if not fused or (node in stored and _writes_out_of_place(node)) else memory.live)
    if buffer_pool:
        live = _hold_for_reuse(live, allocations, deaths)
    timeline.points.extend(
        (phase, node.name, (b * allowance[0] // allowance[1] if fused else b) + timeline.static_bytes)
        for node, b in zip(nodes, live, strict=False)
        if node.op != "placeholder"
    )


def _hold_for_reuse(
    live: list[int], allocations: list[tuple[int, tuple[Any, int]]], deaths: list[tuple[int, tuple[Any, int]]]
) -> list[int]:
    """``live`` with Inductor's buffer pool (``PythonWrapperCodegen.memory_plan_reuse``). Generated code
    does not free a dead buffer that a later allocation of the same dtype and size takes: it stays
    allocated until then. Inductor takes the buffer freed last, and only where holding it keeps its own
    estimate of the graph's peak (``AllocateLine.should_reuse_buffer``), here the walk's: the peak never
    moves, the memory before it does. Allocations at a position come before the frees there."""
    held = np.array(live, dtype=np.int64)
    peak = int(held.max(initial=0))
    pool: dict[tuple[Any, int], list[int]] = {}
    events = sorted([(i, 0, key) for i, key in allocations] + [(i, 1, key) for i, key in deaths], key=lambda e: e[:2])
    for position, is_death, key in events:
        freed = pool.setdefault(key, [])
        if is_death:
            freed.append(position)
        elif freed:
            between = held[freed[-1] + 1 : position]
            if between.size == 0 or int(between.max()) + key[1] <= peak:
                between += key[1]
                freed.pop()
    return [int(b) for b in held]


def simulate(
    fw: fx.GraphModule,
    bw: fx.GraphModule,
    num_fwd_outputs: int,
    static: Iterable[Any],
    *,
    fused: bool,
    outside_bytes: int = 0,
    schedule: Schedule = fused_schedule,
    allowance: tuple[int, int] = _FUSED_ALLOWANCE,
) -> Timeline:
    """``outside_bytes``: device memory live outside the graph (e.g. optimizer state), a constant floor.
    Fused only: ``schedule`` gives the order to run each graph's nodes in (``fxmem.schedule.graph_order``
    walks the graph's own, to compare with the fusion model), and ``allowance`` is the factor on graph
    memory."""
    static_list = [v for v in static if isinstance(v, torch.Tensor)]
    static_keys = {storage_key(v) for v in static_list}
    params = sum(storage_bytes(v) for v in {storage_key(v): v for v in static_list}.values())
    timeline = Timeline(static_bytes=params + outside_bytes)
    walk_step(
        fw, bw, static_keys, fused, timeline, lambda: _Memory(0),
        schedule=schedule, allowance=allowance, buffer_pool=fused,
    )  # fmt: skip
    return timeline


def walk_step(
    fw: fx.GraphModule,
    bw: fx.GraphModule,
    static_keys: set[Any],
    fused: bool,
    timeline: Timeline,
    new_memory: Callable[[], _Memory],
    *,
    schedule: Schedule = fused_schedule,
    allowance: tuple[int, int] = _FUSED_ALLOWANCE,
    buffer_pool: bool = False,
) -> None:
    """Walk the forward, then the backward, each through a ledger from ``new_memory``. What the forward
    saves enters the backward as its inputs. The forward's own inputs that are not static (the batch)
    stay live the whole step: their caller holds them. Fused, a saved parameter that Inductor copies to
    channels-last holds its copy from the forward to its last reader in the backward. ``buffer_pool``
    needs sizes as numbers (``_hold_for_reuse``)."""
    (fw_out,) = fw.graph.find_nodes(op="output")
    fw_results = {n.name for n in fw_out.args[0] if isinstance(n, fx.Node)}
    inputs = [
        p for p in fw.graph.find_nodes(op="placeholder")
        if isinstance(p.meta.get("val"), torch.Tensor) and storage_key(p.meta["val"]) not in static_keys
    ]  # fmt: skip
    if fused:
        copies = {n for n in channels_last_copies(fw) if n.name in fw_results}
        static_keys = static_keys - {storage_key(n.meta["val"]) for n in copies}
    kept = fw_results | {p.name for p in inputs}
    _walk(fw, new_memory(), "forward", kept, static_keys, fused, timeline, schedule, allowance, buffer_pool)
    memory = new_memory()
    for placeholder in inputs:
        memory.hold(storage_key(placeholder.meta["val"]), storage_bytes(placeholder.meta["val"]))
    (bw_out,) = bw.graph.find_nodes(op="output")
    grads = {n.name for n in bw_out.args[0] if isinstance(n, fx.Node)}
    _walk(bw, memory, "backward", grads, static_keys, fused, timeline, schedule, allowance, buffer_pool)
