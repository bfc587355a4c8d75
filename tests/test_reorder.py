"""The model of Inductor's reordering for peak memory (``fxmem.reorder``) and of the max-pool gradient's
loop, on small graphs traced with fake tensors."""

from __future__ import annotations

import torch
import torch._inductor.inductor_prims  # noqa: F401  (registers the max-pool prims)
from torch.fx.experimental.proxy_tensor import make_fx

from fxmem.reorder import (
    KernelGraph,
    _depth_first,
    _least_peak_first,
    _own_order,
    estimate_peak,
    kernel_graph,
    reorder_for_peak_memory,
)
from fxmem.schedule import _max_pool_gradient_in_loops, fused_schedule, graph_order, is_extern_kernel
from fxmem.simulate import _stored_nodes, simulate

aten, prims = torch.ops.aten, torch.ops.prims
_CONV = ([0], [1, 1], [1, 1], [1, 1], False, [0, 0], 1)  # bias sizes, stride, padding, dilation, ...


def _two_convolution_gradients(grad, x, w1, w2):
    """The backward of two 3x3 convolutions under bf16 autocast: each weight's gradient is cast to fp32
    for the output, and only the output reads the cast."""
    grad_x, grad_w2, _ = aten.convolution_backward(grad, x, w2, *_CONV, [True, True, False])
    grad_w2 = prims.convert_element_type(grad_w2, torch.float32)
    _, grad_w1, _ = aten.convolution_backward(grad_x.relu(), x, w1, *_CONV, [True, True, False])
    return grad_w2, prims.convert_element_type(grad_w1, torch.float32)


def _traced_gradients(side: int = 16):
    images, weights = (8, 64, side, side), (64, 64, 3, 3)
    inputs = [torch.ones(size, dtype=torch.bfloat16) for size in (images, images, weights, weights)]
    return make_fx(_two_convolution_gradients, tracing_mode="fake")(*inputs)


def _graph_of(gm):
    stored = _stored_nodes(gm)
    kernels = [n for n in gm.graph.nodes if n.op == "call_function" and n in stored]
    return kernel_graph(gm, [[k] for k in kernels], stored, is_extern_kernel), kernels


def _names(graph, kernels, order):
    """The stored nodes in the order of ``order``'s kernels (items left out)."""
    return [kernels[graph.group_of[k]].name for k in order if graph.group_of[k] is not None]


def test_each_result_of_a_fallback_is_a_kernel_that_frees_it_on_its_own():
    """``convolution_backward`` allocates all its results; each item is a kernel of its own that writes
    nothing (Inductor's MultiOutput), so that the input gradient is freed apart from the weight's."""
    graph, kernels = _graph_of(_traced_gradients())
    first = kernels[0]
    assert first.target is aten.convolution_backward.default
    items = [k for k, group in enumerate(graph.group_of) if group is None]
    assert len(items) == 4  # two results of each
    assert graph.sizes[0] == graph.allocated[first] > 0 and graph.freed[first] == 0
    assert all(graph.sizes[k] == 0 and graph.preds(k) for k in items)
    grad_x = graph.writes[items[0]][0]
    assert graph.freed[grad_x] == 8 * 64 * 16 * 16 * 2


def test_depth_first_runs_what_only_the_output_reads_last_and_is_taken_when_estimated_lower():
    """Depth first, the items (nothing smaller) pull the backward through in about the graph's order,
    then the fp32 casts run last: their bf16 gradients are held instead of the casts, which lowers the
    estimate at the second convolution's gradient. The scheduler's own order casts each one right away."""
    gm = _traced_gradients()
    graph, kernels = _graph_of(gm)
    own, deep = _names(graph, kernels, _own_order(graph)), _names(graph, kernels, _depth_first(graph))
    assert own.index("convert_element_type") < own.index("convolution_backward_1")
    assert deep[-2:] == ["convert_element_type", "convert_element_type_1"]
    assert estimate_peak(graph, _depth_first(graph)) < estimate_peak(graph, _own_order(graph))
    chosen = [kernels[i].name for i in reorder_for_peak_memory(graph)]
    assert chosen.index("convert_element_type") > chosen.index("convolution_backward_1")
    order = [n.name for n in fused_schedule(gm, _stored_nodes(gm))]
    assert order.index("convert_element_type") > order.index("convolution_backward_1")


def test_an_order_estimated_barely_lower_is_not_taken():
    """With images 16 times larger, deferring the casts still lowers the estimate, but by under 2%: the
    model keeps the scheduler's own order, whose higher peak is the safer prediction."""
    graph, kernels = _graph_of(_traced_gradients(side=64))
    own, deep = estimate_peak(graph, _own_order(graph)), estimate_peak(graph, _depth_first(graph))
    assert 0.98 * own <= deep < own
    chosen = [kernels[i].name for i in reorder_for_peak_memory(graph)]
    assert chosen.index("convert_element_type") < chosen.index("convolution_backward_1")


def test_the_fused_walk_holds_what_a_fallback_returns_from_the_op_on():
    """The walk holds each result of ``convolution_backward`` while the op runs (with its inputs), and
    each until its own last reader: with its cast deferred, the first weight's bf16 gradient is live at
    the second op instead of the fp32 cast that the graph's order holds there."""
    gm = _traced_gradients()
    images, weight = 8 * 64 * 16 * 16 * 2, 64 * 64 * 9 * 2

    def points(**options):
        timeline = simulate(make_fx(lambda: ())(), gm, num_fwd_outputs=0, static=(), fused=True, **options)
        return {name: live for _, name, live in timeline.points}

    fused, in_order = points(allowance=(1, 1)), points(allowance=(1, 1), schedule=graph_order)
    # x, w1 and relu, the first weight's bf16 gradient, and both results of the second op.
    assert fused["convolution_backward_1"] == images + weight + images + weight + images + weight
    assert in_order["convolution_backward_1"] - fused["convolution_backward_1"] == weight
    # At the first op: its four inputs and its two results.
    assert fused["convolution_backward"] == 3 * images + 3 * weight


def test_least_peak_first_defers_a_kernel_that_only_allocates():
    """Of two kernels that can run, the one that frees (net) goes first; one that only allocates waits."""

    def f(a, b):
        return prims.convert_element_type(a, torch.float32), (b * 2).sum()

    gm = make_fx(f, tracing_mode="fake")(torch.ones(1024, dtype=torch.bfloat16), torch.ones(4096))
    graph, kernels = _graph_of(gm)
    order = _names(graph, kernels, _least_peak_first(graph))
    assert order[0] == "sum_1" and order[-1] == "convert_element_type"


def test_a_tie_keeps_the_schedulers_own_order_and_a_cycle_gives_none():
    def f(a):
        return a.exp(), a.sin()

    gm = make_fx(f, tracing_mode="fake")(torch.ones(64))
    graph, kernels = _graph_of(gm)
    assert reorder_for_peak_memory(graph) == [0, 1]
    exp, sin = kernels
    cyclic = KernelGraph([0, 1], [[exp], [sin]], [{sin}, {exp}], graph.allocated, graph.freed, set(), [])
    assert reorder_for_peak_memory(cyclic) is None


def _max_pool_gradient(kernel: list[int], stride: list[int], dilation: list[int]):
    def f(grad, x, offsets):
        indices = prims._low_memory_max_pool_offsets_to_indices(offsets, kernel, [16, 16], stride, [1, 1], dilation)
        return aten.max_pool2d_with_indices_backward(grad, x, kernel, stride, [1, 1], dilation, False, indices)

    side = (16 + 2 - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    pooled = torch.ones(2, 4, side, side)
    return make_fx(f, tracing_mode="fake")(pooled, torch.ones(2, 4, 16, 16), pooled.to(torch.int8))


def test_the_max_pool_gradient_is_a_loop_that_inlines_its_indices():
    """Inductor lowers the max-pool gradient to a loop gathering through the indices (computed inline)
    unless dilated or over 25 windows per element; then it falls back, reading the indices' buffer."""
    gm = _max_pool_gradient([3, 3], [2, 2], [1, 1])
    (pool,) = gm.graph.find_nodes(op="call_function", target=aten.max_pool2d_with_indices_backward.default)
    assert _max_pool_gradient_in_loops(pool) and not is_extern_kernel(pool)
    stored = {n.name for n in _stored_nodes(gm) if n.op == "call_function"}
    assert stored == {"max_pool2d_with_indices_backward"}
    for kernel, stride, dilation in (([3, 3], [2, 2], [2, 2]), ([7, 7], [1, 1], [1, 1])):
        gm = _max_pool_gradient(kernel, stride, dilation)
        (pool,) = gm.graph.find_nodes(op="call_function", target=aten.max_pool2d_with_indices_backward.default)
        assert not _max_pool_gradient_in_loops(pool) and is_extern_kernel(pool)
        assert len([n for n in _stored_nodes(gm) if n.op == "call_function"]) == 2
