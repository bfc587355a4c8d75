"""The eager codegen (``codegen="eager"``) plans the joint graph Inductor would partition: Inductor's
decompositions and its joint-graph clean-ups (not its pattern rewrites), but for an op it keeps whole
where that leaves the plan unchanged (batch norm's backward)."""

from __future__ import annotations

import copy
import functools
import logging

import pytest
import torch

import fxmem
from fxmem.bench.measure import allocated_peak
from tests.helpers import build, fxmem_warnings, planned_reports, rel_err, run_step
from tests.test_architectures import GroupNormConv, HandWrittenAttention, hand_written_attention_inputs

# Decomposed ops round differently from eager's fused kernels.
EAGER_TOL = 1e-5
BUDGET = 0.4
BUDGET_SLACK = 0.02  # the slack fractional budgets are allowed over B x the default


class _NoOps(torch.nn.Module):
    """An explicit clone and a product with ones: Inductor's joint-graph passes remove both before it
    partitions, so torch.compile's default saves the activation once. Without those passes the eager
    codegen's default saved it twice over (and fractional budgets were fractions of that)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(16, 32)
        self.b = torch.nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        h = h.clone() * torch.ones_like(h)
        return self.b(h).square().mean() + h.square().mean()


def _no_ops_case() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    return _NoOps(), (torch.randn(8, 16),)


def _masked_attention_case() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """Inductor's joint-graph pattern rewrites fuse this attention into attention ops, which save less."""
    return HandWrittenAttention(), hand_written_attention_inputs()


def _small_batch_norm_case() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """Batch norms over 6 rows: decomposed, their backward lets PyTorch's default save 11% less than
    the whole op's (two channel vectors fewer per norm), so the eager codegen decomposes it here too."""
    linear = functools.partial(torch.nn.Linear, bias=False)  # (a bias before a norm: grad ~0)
    layers = [linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU()]
    layers += [linear(32, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(), torch.nn.Linear(32, 1)]
    return _Loss(torch.nn.Sequential(*layers)), (torch.randn(6, 16),)


def _residual_group_norm_case() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """Group norm's backward kept whole reads each block's input, a residual sum. PyTorch's partitioner
    may not recompute a value an op it cannot fuse reads; on Inductor's graph the decomposition's readers
    are pointwise and it recomputes the sum. Unless the reference counts the whole op as fusible, it
    saves one sum more (+8%)."""
    return GroupNormConv(), (torch.randn(4, 4, 64),)


def _spectral_norm_case() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """Spectral norm's power iteration updates a buffer in the forward with a vector the backward reads.
    In Inductor's graph the default's backward reads it from the buffer (free, as a buffer); on the
    eager codegen's graph the default must too, or the reference counts a copy Inductor does not hold."""
    spectral = torch.nn.utils.parametrizations.spectral_norm
    layers = [spectral(torch.nn.Linear(16, 32)), torch.nn.ReLU(), spectral(torch.nn.Linear(32, 1))]
    return _Loss(torch.nn.Sequential(*layers)), (torch.randn(4, 16),)


class _SharedDropoutInput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.head = torch.nn.Linear(24, 24), torch.nn.Linear(24, 1)
        self.drop = torch.nn.Dropout(0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.first(x))
        transposed = self.drop(h.view(4, 6, 24).transpose(0, 1)).transpose(0, 1).reshape(24, 24)
        return self.head(self.drop(h) * transposed).square().mean()


def _shared_dropout_input_case() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """Two dropouts of one activation. Inductor draws a mask into a new tensor (``rand``); drawn from the
    activation itself (``bernoulli(h)``), PyTorch's default on the eager codegen's graph saved both
    dropouts' outputs beside the activation and the masks (+56%)."""
    return _SharedDropoutInput(), (torch.randn(24, 24),)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        _no_ops_case, _masked_attention_case, _small_batch_norm_case, _residual_group_norm_case,
        _spectral_norm_case, _shared_dropout_input_case,
    ],
    ids=[
        "no-ops", "masked-attention", "small-batch-norm", "residual-group-norm", "spectral-norm",
        "shared-dropout-input",
    ],
)  # fmt: skip
def test_default_is_measured_on_the_graph_inductor_partitions(case, inductor_cache):
    torch.manual_seed(0)
    model, inputs = case()
    eager, planned = copy.deepcopy(model), copy.deepcopy(model)
    _, eager_grads, _ = run_step(eager, inputs, seed=0)
    _, _, default = run_step(copy.deepcopy(model), inputs, "inductor")
    torch._dynamo.reset()
    backend = fxmem.backend(memory_budget=BUDGET, codegen="eager", quantize="none")
    _, grads, saved = run_step(planned, inputs, backend, seed=0)
    (report,) = backend.reports
    assert report.fallback_reason is None
    assert report.reference_saved_bytes == default
    assert saved <= (BUDGET + BUDGET_SLACK) * default
    assert rel_err(grads, eager_grads) <= EAGER_TOL
    # buffers the forward updates: batch norm's statistics, the power iteration's vectors
    for (name, buffer), (_, updated) in zip(eager.named_buffers(), planned.named_buffers(), strict=True):
        torch.testing.assert_close(updated, buffer, msg=name)


@pytest.mark.parametrize(
    ("case", "loads"), [(_no_ops_case, False), (_masked_attention_case, True)], ids=["no-bmm", "bmm"]
)
def test_pattern_tables_load_only_for_graphs_whose_rewrites_run(case, loads, monkeypatch):
    """Loading Inductor's pattern tables costs 0.3-0.4 s of a fresh process's first call; the
    eager codegen runs the rewrites, and so needs the tables, only on a graph with a batched matmul."""
    from torch._inductor.fx_passes import joint_graph

    calls = []
    monkeypatch.setattr(joint_graph, "lazy_init", lambda *args, **kwargs: calls.append(args))
    model, inputs = case()
    run_step(model, inputs, fxmem.backend(memory_budget=BUDGET, codegen="eager"))
    assert bool(calls) == loads


class _ShuffledAttention(torch.nn.Module):
    """Attention over a batch mixed with a shuffled copy of itself (``x[randperm(n)]``): on torch 2.13
    Inductor's joint-graph rewrites fail on the indexing (pytorch/pytorch#183988)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = torch.nn.Linear(16, 48), torch.nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = 0.7 * x + 0.3 * x[torch.randperm(x.shape[0])]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attended = torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v
        return self.out(attended).square().mean()


def _matches_eager_under_a_seed(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], backend) -> None:
    expected = run_step(copy.deepcopy(model), inputs, seed=3)
    got = run_step(model, inputs, backend, seed=3)
    assert rel_err(got[0], expected[0]) <= EAGER_TOL
    assert rel_err(got[1], expected[1]) <= EAGER_TOL


def test_a_model_whose_rewrites_fail_is_planned_without_them():
    torch.manual_seed(0)
    backend = fxmem.backend(memory_budget=BUDGET, codegen="eager")
    _matches_eager_under_a_seed(_ShuffledAttention(), (torch.randn(6, 5, 16),), backend)
    (report,) = planned_reports(backend, 1)
    assert report.fallback_reason is None


def test_a_failing_rewrite_warns_and_the_graph_is_planned_without_the_rewrites(monkeypatch, caplog):
    """Any failure of Inductor's pattern rewrites, on any torch: the passes run again without them."""
    from torch._inductor import config
    from torch._inductor.fx_passes import joint_graph

    passes = joint_graph.joint_graph_passes

    def failing_with_patterns(gm, *args, **kwargs):
        if config.pattern_matcher:
            raise RuntimeError("a rewrite failed")
        return passes(gm, *args, **kwargs)

    monkeypatch.setattr(joint_graph, "joint_graph_passes", failing_with_patterns)
    torch.manual_seed(0)
    backend = fxmem.backend(memory_budget=BUDGET, codegen="eager")
    with caplog.at_level(logging.WARNING, logger="fxmem"):
        _matches_eager_under_a_seed(HandWrittenAttention(), hand_written_attention_inputs(), backend)
    (warning,) = fxmem_warnings(caplog.records)
    assert "pattern rewrites failed, planning without them: a rewrite failed" in warning.getMessage()
    (report,) = planned_reports(backend, 1)
    assert report.fallback_reason is None


@pytest.mark.parametrize("variant", ["affine", "no-affine", "no-running-stats", "batchnorm1d", "eval", "channels-last"])
def test_batch_norm_backward_kept_whole_matches_eager(variant):
    """The eager codegen keeps batch norm's backward as one op in training (traced without the running
    statistics the forward updates in place); every variant gives eager's gradients and running stats."""
    torch.manual_seed(0)
    one_d = variant == "batchnorm1d"
    norm = (torch.nn.BatchNorm1d if one_d else torch.nn.BatchNorm2d)(
        6, affine=variant != "no-affine", track_running_stats=variant != "no-running-stats"
    )
    conv = (torch.nn.Conv1d if one_d else torch.nn.Conv2d)(3, 6, 3, bias=False)  # (a bias before a norm: grad ~0)
    head = torch.nn.Linear(48 if one_d else 384, 2)
    model = torch.nn.Sequential(conv, norm, torch.nn.ReLU(), torch.nn.Flatten(), head)
    # at least 128 elements per channel, where the backward stays whole (16 x 8 and 4 x 8 x 8)
    x = torch.randn(16, 3, 10) if one_d else torch.randn(4, 3, 10, 10)
    if variant == "channels-last":
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    if variant == "eval":
        model.eval()
    twin = copy.deepcopy(model)
    eager_loss, eager_grads, _ = run_step(_Loss(model), (x,))
    torch._dynamo.reset()
    loss, grads, _ = run_step(_Loss(twin), (x,), fxmem.backend(codegen="eager"))
    assert rel_err(loss, eager_loss) < EAGER_TOL
    assert rel_err(grads, eager_grads) < EAGER_TOL
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(dict(twin.named_buffers())[name], buffer)


@pytest.mark.parametrize(
    ("variant", "whole"),
    [("affine", True), ("no-affine", True), ("conv1d", True), ("channels-last", True), ("small-groups", False)],
)
def test_group_norm_backward_kept_whole_matches_eager(variant, whole, monkeypatch):
    """The eager codegen keeps group norm's backward as one op where each group of a sample has at least
    128 elements, and decomposes it on smaller groups; either way it gives eager's gradients."""
    torch.manual_seed(0)
    one_d = variant == "conv1d"
    conv = (torch.nn.Conv1d if one_d else torch.nn.Conv2d)(3, 8, 3, bias=False)  # (one group per channel: grad ~0)
    # groups of 4 channels x 64 (8 x 8) or 32 positions; of 1 channel x 64 for small groups
    norm = torch.nn.GroupNorm(8 if variant == "small-groups" else 2, 8, affine=variant != "no-affine")
    model = torch.nn.Sequential(
        conv, norm, torch.nn.SiLU(), torch.nn.Flatten(), torch.nn.Linear(256 if one_d else 512, 2)
    )
    x = torch.randn(4, 3, 34) if one_d else torch.randn(4, 3, 10, 10)
    if variant == "channels-last":
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    twin = copy.deepcopy(model)
    eager_loss, eager_grads, _ = run_step(_Loss(model), (x,))

    traced_ops = []
    partition = fxmem.partitioner.partition

    def recording(gm, *args, **kwargs):  # the joint graph fxmem plans
        traced_ops.extend(node.target for node in gm.graph.nodes)
        return partition(gm, *args, **kwargs)

    monkeypatch.setattr(fxmem.partitioner, "partition", recording)
    torch._dynamo.reset()
    loss, grads, _ = run_step(_Loss(twin), (x,), fxmem.backend(codegen="eager"))
    assert (torch.ops.aten.native_group_norm_backward.default in traced_ops) == whole
    assert rel_err(loss, eager_loss) < EAGER_TOL
    assert rel_err(grads, eager_grads) < EAGER_TOL


_DROPOUT_LAYOUTS = {
    "contiguous": lambda h: h,
    "transposed": lambda h: h.transpose(1, 2),
    "channels-last": lambda h: h.reshape(2, 4, 3, 8).permute(0, 3, 1, 2),
}


@pytest.mark.parametrize(
    ("layout", "dtype", "p"),
    [
        ("transposed", torch.float32, 0.3),
        ("channels-last", torch.float32, 0.3),
        ("transposed", torch.bfloat16, 0.3),
        ("contiguous", torch.float32, 1.0),
    ],
    ids=["transposed", "channels-last", "bf16", "p1"],
)
def test_dropout_draws_and_rounds_as_eager(layout, dtype, p):
    """The eager codegen's dropout is a mask and a product; under a seed it gives eager's output exactly:
    the mask drawn in the input's memory order, scaled in its dtype, and nothing drawn where p = 1 (the
    draw after it shows where the generator was left)."""
    weight = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(2, 12, 8)

    def step(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = _DROPOUT_LAYOUTS[layout]((x @ weight).to(dtype))
        out = torch.nn.functional.dropout(h, p, training=True)
        return out.float() + torch.rand_like(out, dtype=torch.float32)

    results = []
    for fn in (step, torch.compile(step, backend=fxmem.backend(codegen="eager"))):
        torch.manual_seed(0)
        out = fn(x, weight)
        (grad,) = torch.autograd.grad(out.square().sum(), weight)
        results.append((out, grad))
    (out_ref, grad_ref), (out, grad) = results
    assert torch.equal(out, out_ref)
    assert rel_err(grad, grad_ref) < EAGER_TOL


class _Loss(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).square().mean()


@pytest.mark.parametrize(
    "options",
    [{}, {"memory_budget": 0.4}, {"memory_budget": 0.4, "quantize": "int8"}, {"memory_budget": 0.1}],
    ids=["lossless", "0.4", "0.4-int8", "0.1"],
)
@pytest.mark.parametrize("name", ["gpt", "vit"])
def test_predicted_peak_matches_the_allocations_measured(name, options):
    """The eager codegen runs one op at a time and frees each input after its last reader (saved tensors
    included), so the simulated peak is what the step allocates: within 1% of the CPU allocations the
    profiler records. Those leave out the weights and the batch, allocated before the step (the
    simulator holds them throughout), and count the workspaces inside ops, which these models' ops barely
    use (unlike convolutions' backward on the CPU, which the simulator does not model)."""
    model, inputs = build(name)
    backend = fxmem.backend(codegen="eager", **{"quantize": "none", **options})
    step = torch.compile(model, backend=backend)
    step(*inputs).backward()  # compile first: the measured step only runs
    model.zero_grad(set_to_none=True)  # so that the step allocates the gradients, as the simulator assumes
    _, allocated = allocated_peak(lambda: step(*inputs).backward())
    report = planned_reports(backend, 1)[0]
    before = report.timeline.static_bytes + sum(x.untyped_storage().nbytes() for x in inputs)
    predicted = report.predicted_peak_bytes - before
    assert abs(allocated - predicted) <= 0.01 * predicted, (allocated, predicted)
