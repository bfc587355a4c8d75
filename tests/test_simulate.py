"""The simulator's model of what Inductor writes to memory: which nodes of a graph get a buffer, and the
channels-last copies it makes of saved convolution weights."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import fxmem
from fxmem import _compat
from fxmem.memory import channels_last_copies
from fxmem.schedule import fused_schedule, graph_order
from fxmem.simulate import _FUSED_ALLOWANCE, Timeline, _Memory, _stored_nodes, _walk
from tests.helpers import measure_saved_bytes


def _stored(fn, *inputs: torch.Tensor, device: str = "meta") -> set[str]:
    """The call nodes of ``fn``'s graph that Inductor would write, traced on ``device`` (meta: a GPU's
    limits; the CPU's can be larger)."""
    gm = make_fx(fn)(*(x.to(device) for x in inputs))
    return {n.name for n in _stored_nodes(gm) if n.op == "call_function"}


def test_reused_pointwise_is_inlined_into_each_consumer_unless_a_matmul_reads_it():
    """A cast read by a reduction and by a pointwise op is computed inside both kernels (the fp32 copy of
    a large logits gradient is never written); the same cast feeding a matmul is written for it."""

    def reused(x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        return (y.sum(dim=1, keepdim=True) * y).exp()

    assert _stored(reused, torch.ones(4, 8, dtype=torch.bfloat16)) == {"sum_1", "exp"}

    def into_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (x * 2) @ w

    assert _stored(into_matmul, torch.ones(4, 8), torch.ones(8, 3)) == {"mul", "mm"}


def test_a_reused_result_that_reads_many_buffers_is_written_once():
    """Inductor writes a reused loop body that reads more than four buffers rather than redo it per
    consumer; read once, it stays inlined."""

    def sum_of(*xs: torch.Tensor) -> torch.Tensor:
        total = xs[0]
        for x in xs[1:]:
            total = total + x
        return total

    def reused(*xs: torch.Tensor) -> torch.Tensor:
        y = sum_of(*xs)
        return y.amax(dim=0) + y.amin(dim=0)

    five, four = [torch.ones(4, 8) for _ in range(5)], [torch.ones(4, 8) for _ in range(4)]
    assert "add_3" in _stored(reused, *five)
    assert _stored(reused, *four) == {"amax", "amin", "add_3"}
    assert "add_3" not in _stored(lambda *xs: sum_of(*xs).amax(dim=0), *five)


def test_heavy_reused_results_are_written_on_the_cpu_only():
    """On the CPU, Inductor writes a reused result that calls exp, log, sigmoid or tanh."""

    def reused_exp(x: torch.Tensor) -> torch.Tensor:
        y = x.exp()
        return y.sum() + y.amax()

    assert "exp" in _stored(reused_exp, torch.ones(4, 8), device="cpu")
    assert "exp" not in _stored(reused_exp, torch.ones(4, 8))


def test_a_long_or_wide_loop_body_is_written_even_with_one_reader():
    """Past about 30 ops, or more than eight buffers read, Inductor writes a result however few read it."""

    def chain(x: torch.Tensor, n: int) -> torch.Tensor:
        for _ in range(n):
            x = x * 1.5
        return x.sum()

    short, long = _stored(lambda x: chain(x, 10), torch.ones(8)), _stored(lambda x: chain(x, 40), torch.ones(8))
    assert short == {"sum_1"}
    assert len(long) > 1 and "sum_1" in long

    def wide(*xs: torch.Tensor) -> torch.Tensor:
        return sum(xs[1:], xs[0]).sum()

    assert _stored(wide, *[torch.ones(8) for _ in range(8)]) == {"sum_1"}
    assert len(_stored(wide, *[torch.ones(8) for _ in range(10)])) > 1


def test_the_limits_are_inductors_for_the_device():
    """The limits come from Inductor's config on this torch; where it sets larger ones for the CPU, a
    loop body the GPU would store stays inlined on the CPU."""
    gpu, cpu = _compat.inductor_realize_thresholds(False), _compat.inductor_realize_thresholds(True)
    assert gpu == (4, 8, 30) and all(c >= g for c, g in zip(cpu, gpu, strict=True))

    def chain(x: torch.Tensor) -> torch.Tensor:
        for _ in range(40):  # 40 ops and one read
            x = x * 1.5
        return x.sum()

    assert len(_stored(chain, torch.ones(8))) > 1
    assert (len(_stored(chain, torch.ones(8), device="cpu")) > 1) == (41 > cpu[2])


def _fused_walk(fn, *inputs: torch.Tensor) -> Timeline:
    gm = make_fx(fn)(*inputs)
    timeline = Timeline()
    _walk(gm, _Memory(0), "forward", set(), set(), True, timeline, graph_order)
    return timeline


def test_an_inlined_nodes_input_lives_until_the_kernel_that_computes_it():
    """``y = t * 2`` is computed inside the kernel of ``y + big.sum()``, after the matmul ``big``: ``t``
    (64 KiB) is still live once ``big`` (256 KiB) is written, though the graph's last reader of ``t``
    comes before it. A matmul's output is allocated while its inputs are live (``w``; ``a`` and ``b`` are
    gone); a loop kernel's point is taken once the inputs it reads last are freed (``big`` at its sum).
    The fused walk counts graph memory with its allowance."""

    def f(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        t = a @ b
        y = t * 2
        big = w @ w
        return y + big.sum()

    t_bytes, big_bytes = 128 * 128 * 4, 256 * 256 * 4
    points = {
        name: live
        for _, name, live in _fused_walk(f, torch.ones(128, 64), torch.ones(64, 128), torch.ones(256, 256)).points
    }
    numerator, denominator = _FUSED_ALLOWANCE
    assert points["mm_1"] == (t_bytes + 2 * big_bytes) * numerator // denominator
    assert points["sum_1"] == (t_bytes + 4) * numerator // denominator


class _ConvNet(torch.nn.Module):
    """Two 3x3 convolutions and a 1x1 one: Inductor's layout optimization (on for the CPU's convolutions)
    copies a saved 3x3 weight to channels-last; a 1x1 weight is channels-last already."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.c3 = torch.nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))).square().mean()


def test_copied_weights_follow_a_cast_to_the_convolution():
    """Under autocast a weight reaches its convolution through a cast; Inductor still copies the saved
    weight. 1x1 weights, and weights no convolution reads, are left alone."""

    def f(x: torch.Tensor, w3: torch.Tensor, w1: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.conv2d(x, w3.to(torch.bfloat16), padding=1)
        y = torch.nn.functional.conv2d(y, w1.to(torch.bfloat16))
        return y.sum() + m.sum()

    gm = make_fx(f)(torch.ones(2, 4, 8, 8, dtype=torch.bfloat16), torch.ones(8, 4, 3, 3), torch.ones(8, 8, 1, 1),
                    torch.ones(2, 2, 3, 3))  # fmt: skip
    assert {n.name for n in channels_last_copies(gm)} == {"x_1", "w3_1"}


def _input_copies_saved(model: torch.nn.Module, x: torch.Tensor, backend: object) -> tuple[int, int]:
    """One step of ``model(x)`` compiled with ``backend``: how many saved tensors are fp32 copies of a
    4-d parameter or of ``x`` (their shape, another storage), and the bytes saved."""
    originals = [p for p in model.parameters() if p.dim() == 4] + [x]
    shapes = {tuple(t.shape) for t in originals}
    storages = {t.untyped_storage().data_ptr() for t in originals}
    copies = []

    def on_save(t: torch.Tensor) -> None:
        if tuple(t.shape) in shapes and t.dtype == torch.float32 and t.untyped_storage().data_ptr() not in storages:
            copies.append(t)

    torch._dynamo.reset()
    step = torch.compile(model, backend=backend)
    loss, saved = measure_saved_bytes(step, x, exclude=model.parameters(), on_save=on_save)
    loss.backward()
    return len(copies), saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("budget", [None, 0.3])
def test_saved_inputs_are_the_inputs_not_channels_last_copies(dtype, budget, inductor_cache):
    """torch.compile's default saves Inductor's channels-last copies of the 3x3 weights and of the batch;
    fxmem's forward saves the inputs themselves (under autocast too, where a weight reaches its
    convolution through a cast). Saved bytes, as hooks see them, equal the prediction (before the copies
    were modelled through the cast, bf16 was 10944 bytes off), and the fused walk holds them."""
    torch.manual_seed(0)
    model, x = _ConvNet(), torch.randn(4, 3, 16, 16)
    backend = fxmem.backend(memory_budget=budget, quantize="none")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        default_copies, _ = _input_copies_saved(model, x, "inductor")
        copies, saved = _input_copies_saved(model, x, backend)
    (report,) = backend.reports
    assert copies == 0 and (default_copies == 3 or dtype == torch.bfloat16)
    assert saved == report.predicted_saved_bytes
    assert report.timeline.peak_bytes - report.timeline.static_bytes > report.predicted_saved_bytes


def test_modelled_fusion_moves_a_consumer_up_to_its_producer_with_what_it_needs():
    """In the scheduler model (``fxmem.schedule``), ``g`` reads ``h``'s buffer and joins its kernel
    (vertical fusion): the fused kernel runs after the matmul ``g`` needs, ``m2``, and before ``m``; ``g2``
    needs ``m``, which needs ``h``: joining would make a cycle, so it stays after ``m``."""

    def f(x: torch.Tensor, w: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = x.cos()
        m = h @ w
        s = m.sum()
        m2 = x @ w2
        g = (h * m2).exp()
        g2 = (h + m).exp()
        return s, g, g2

    gm = make_fx(f)(*(torch.ones(64, 64, device="meta") for _ in range(3)))
    stored = _stored_nodes(gm)
    names = [n.name for n in gm.graph.nodes]
    assert names.index("exp") > names.index("mm") and names.index("mm_1") > names.index("mm")
    order = [n.name for n in fused_schedule(gm, stored)]
    assert sorted(order) == sorted(names) and order[-1] == "output"
    assert order.index("mm_1") < order.index("cos") < order.index("exp") < order.index("mm")
    assert order.index("exp_1") > order.index("mm")
    timeline = Timeline()  # the fused walk runs the graph in the model's order
    _walk(gm, _Memory(0), "forward", set(), set(), True, timeline)
    walked = [n.name for n in fused_schedule(gm, stored) if n.op not in ("placeholder", "output")]
    assert [name for _, name, _ in timeline.points] == walked != names[3:-1]


def test_modelled_fusion_follows_the_loops_triton_fuses():
    """A kernel's loop is (numel, rnumel). Reductions fuse only over the same elements into the same
    outputs, so a row sum and a column sum of one tensor stay apart; a pointwise kernel fuses with a
    reduction over its whole input or over its outputs, and with a pointwise kernel of its size."""
    from fxmem.schedule import _fits, _loop

    def f(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mean, var = torch.var_mean(x, 1)
        return x.sum(1), x.sum(0), x.exp(), mean, var

    gm = make_fx(f)(torch.ones(64, 32, device="meta"))
    loops = {n.name: _loop(n) for n in gm.graph.nodes if n.op == "call_function"}
    assert loops["sum_1"] == loops["var_mean"] == (64, 32) and loops["sum_2"] == (32, 64)
    assert loops["exp"] == (2048, 1)
    rows, columns = (64, 32), (32, 64)
    assert _fits(rows, rows) and not _fits(rows, columns)
    assert _fits(rows, (2048, 1)) and _fits(rows, (64, 1)) and not _fits(rows, (32, 1))
    assert _fits((2048, 1), rows) and _fits((64, 1), rows) and not _fits((32, 1), rows)
    assert _fits((8, 1), (8, 1)) and not _fits((8, 1), (16, 1))
    assert not _fits(None, (8, 1)) and not _fits((8, 1), None)


def test_a_dead_buffer_is_held_for_the_next_allocation_of_its_size_while_the_peak_allows():
    """Inductor's buffer pool: a buffer that dies is kept until a later allocation of the same dtype and
    size takes it, the one freed last first, unless holding it would raise the graph's peak: then it is
    freed, and the allocation is a new one."""
    from fxmem.simulate import _hold_for_reuse

    f32, f16 = torch.float32, torch.float16
    # A (10 B) dies at 1; 4 allocates one of A's kind: A is held over 2 and 3, under the peak (20).
    assert _hold_for_reuse([10, 0, 5, 5, 20], [(0, (f32, 10)), (4, (f32, 10))], [(1, (f32, 10))]) == [
        10, 0, 15, 15, 20,
    ]  # fmt: skip
    # Another dtype or size, or nothing allocated later: nothing held.
    assert _hold_for_reuse([10, 0, 5, 5, 20], [(4, (f16, 10)), (4, (f32, 8))], [(1, (f32, 10))]) == [
        10, 0, 5, 5, 20,
    ]  # fmt: skip
    assert _hold_for_reuse([10, 0, 5], [], [(1, (f32, 10))]) == [10, 0, 5]
    # Holding A over 2 would make 12 + 10 > 20: it is freed; C, which dies at 5, is held for 8.
    live = [20, 0, 12, 0, 3, 0, 3, 0, 10]
    deaths = [(1, (f32, 10)), (5, (f32, 10))]
    assert _hold_for_reuse(live, [(4, (f32, 10))], deaths) == live
    assert _hold_for_reuse(live, [(4, (f32, 10)), (8, (f32, 10))], deaths) == [20, 0, 12, 0, 3, 0, 13, 10, 10]
    # The one freed last is taken first: B (dies at 2) is held over 3 for 4, then A (dies at 1) over 2
    # to 5 for 6.
    two, live = [(1, (f32, 4)), (2, (f32, 4))], [8, 4, 0, 0, 0, 0, 8]
    assert _hold_for_reuse(live, [(4, (f32, 4)), (6, (f32, 4))], two) == [8, 4, 4, 8, 4, 4, 8]
    # An allocation where a buffer dies comes before that death: at 2 it takes A, B goes to 4.
    assert _hold_for_reuse(live, [(2, (f32, 4)), (4, (f32, 4)), (6, (f32, 4))], two) == [8, 4, 0, 4, 0, 0, 8]


def test_the_buffer_pool_raises_the_timeline_before_the_peak_not_the_peak():
    """On a real plan the pool only adds to the fused walk's points, and never to its peak: planning
    does not change, the timeline (``fxmem.inspect``) holds what Inductor's code holds."""
    from fxmem.bench.trace import load_simulation, recorded_simulations
    from fxmem.compiler import FxmemCompiler
    from fxmem.memory import storage_key
    from fxmem.simulate import simulate, walk_step
    from tests.helpers import build, run_step

    model, inputs = build("gpt")
    recorded: list = []
    with recorded_simulations(recorded):
        run_step(torch.compile(model, backend=FxmemCompiler(memory_budget=0.4, codegen="eager")), inputs)
    fw, bw, kwargs = load_simulation(recorded[-1])
    pooled = simulate(fw, bw, **{**kwargs, "fused": True})
    plain = Timeline(static_bytes=pooled.static_bytes)
    static_keys = {storage_key(v) for v in kwargs["static"] if isinstance(v, torch.Tensor)}
    walk_step(fw, bw, static_keys, True, plain, lambda: _Memory(0))
    assert [p[:2] for p in pooled.points] == [p[:2] for p in plain.points]
    raised = [a[2] - b[2] for a, b in zip(pooled.points, plain.points, strict=True)]
    assert min(raised) == 0 < max(raised) and pooled.peak_bytes == plain.peak_bytes


def test_a_view_that_returns_a_list_is_walked_with_the_pool():
    """Bicubic upsampling decomposes into ``unbind``, a view whose value is a list, which the fused walk
    may hold: the plan is made, not dropped for PyTorch's partitioner."""
    import torch.nn.functional as F

    from fxmem.bench.measure import joint_graphs
    from fxmem.config import FxmemConfig
    from fxmem.partitioner import FxmemPartitioner, deepcopy_graph_module

    class Upsample(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            up = F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)
            return (self.conv(x).repeat(1, 1, 2, 2) + up).square().mean()

    ((gm, joint_inputs, kwargs),) = joint_graphs(Upsample(), (torch.randn(1, 3, 8, 8),))
    assert any(n.target is torch.ops.aten.unbind.int for n in gm.graph.nodes)
    partitioner = FxmemPartitioner(FxmemConfig(memory_budget=0.4, codegen="inductor"))
    reports: list = []
    partitioner.on_report = reports.append
    partitioner(deepcopy_graph_module(gm), joint_inputs, **kwargs)
    assert [r.fallback_reason for r in reports] == [None]
