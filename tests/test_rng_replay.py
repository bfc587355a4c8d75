"""The eager codegen replays random draws in the backward from a snapshot of the generator state, instead
of holding the draws (or masks made from them): the same numbers as eager PyTorch, and the generator
left where eager PyTorch leaves it."""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import fxmem
from fxmem.cost import PROFILES
from fxmem.planner import BITMASK, make_codec
from fxmem.rng import draw_from_state, generator_state
from tests.helpers import measure_saved_bytes, params_and_buffers, planned_reports, rel_err

# Decomposed ops round differently from eager's fused kernels.
EAGER_TOL = 1e-5
SEEDS = (1, 2)


class NoisyDropoutNet(torch.nn.Module):
    """Dropout masks, Gaussian noise and Gumbel noise, each of 256 x 256 elements: a bit-packed mask holds
    8,192 bytes, a float draw 262,144, a CPU generator state 5,056."""

    def __init__(self, width: int = 256) -> None:
        super().__init__()
        self.first = torch.nn.Linear(64, width)
        self.second = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, 10)
        self.drop = torch.nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.nn.functional.gelu(self.first(x)))
        h = h + 0.1 * torch.randn_like(h)
        logits = self.second(h)
        gumbel = -torch.empty_like(logits).exponential_().log()
        h = self.drop(torch.softmax((logits + gumbel) / 0.5, dim=-1))
        return self.head(h).square().mean()


class RReLUNet(torch.nn.Module):
    """RReLU in training: one op drawing its noise and returning the output and the noise."""

    def __init__(self, inputs: int = 64, width: int = 256, outputs: int = 10) -> None:
        super().__init__()
        self.first, self.second = torch.nn.Linear(inputs, width), torch.nn.Linear(width, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.nn.functional.rrelu(self.first(x), training=True)).square().mean()


class LayoutDropoutNet(torch.nn.Module):
    """Dropout on a transposed and on a channels-last view: eager draws each mask in the view's memory
    order (into ``empty_like``), not in index order."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = torch.nn.Linear(64, 64), torch.nn.Linear(64, 10)
        self.drop = torch.nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.first(x))
        transposed = self.drop(h.view(256, 8, 8).transpose(1, 2))
        channels_last = self.drop(h.view(16, 8, 8, 16).permute(0, 3, 1, 2))
        return self.second(transposed.reshape(256, 64)).square().mean() + channels_last.square().mean()


class BernoulliMaskNet(torch.nn.Module):
    """Masks drawn as floats of 0s and 1s (``torch.bernoulli``), each of 256 x 4 elements: 4,096 bytes,
    less than a CPU generator state, so held rather than replayed."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = torch.nn.Linear(64, 4), torch.nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.first(x))
        keep = torch.bernoulli(torch.full_like(h, 0.7))
        drop = torch.empty_like(h).bernoulli_(0.6)
        return self.second(h * keep + h * drop).square().mean()


class CheckpointedDropoutNet(torch.nn.Module):
    """A dropout inside a ``torch.utils.checkpoint`` region, on 256 x ``width`` elements."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.first, self.second = torch.nn.Linear(64, width), torch.nn.Linear(width, 10)

    def block(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(torch.tanh(self.first(x)), 0.3, training=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(checkpoint(self.block, x, use_reentrant=False)).square().mean()


def _case(device: str = "cpu", net: type[torch.nn.Module] = NoisyDropoutNet) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return net().to(device), torch.randn(256, 64, device=device)


def _step(model: torch.nn.Module, x: torch.Tensor, fn, seed: int):
    """One step from ``seed``: loss, gradients, saved bytes, the saved tensors, and the next number the
    generator draws after the backward."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    seen: list[torch.Tensor] = []
    loss, saved = measure_saved_bytes(fn, x, exclude=params_and_buffers(model), on_save=seen.append)
    loss.backward()
    after = torch.rand(4, device=x.device)
    return loss.detach(), [p.grad.clone() for p in model.parameters()], saved, seen, after


def _check_against_eager(device: str, options: dict, net=NoisyDropoutNet, **compile_kwargs) -> list:
    model, x = _case(device, net)
    eager = {seed: _step(model, x, model, seed) for seed in SEEDS}
    assert not torch.equal(eager[SEEDS[0]][0], eager[SEEDS[1]][0])  # the seeds give other draws
    backend = fxmem.backend(codegen="eager", **options)
    compiled = torch.compile(model, backend=backend, **compile_kwargs)
    steps = []
    for seed in SEEDS:
        step = _step(model, x, compiled, seed)
        loss_ref, grads_ref, _, _, after_ref = eager[seed]
        assert rel_err(step[0], loss_ref) <= EAGER_TOL
        assert rel_err(step[1], grads_ref) <= EAGER_TOL
        assert torch.equal(step[4], after_ref)  # the backward's replays left the generator as eager does
        steps.append(step)
    (report,) = planned_reports(backend, 1)
    for step in steps:
        assert step[2] == report.predicted_saved_bytes
    return steps


@pytest.mark.parametrize("budget", [None, 0.4, 0.1])
def test_replayed_draws_give_eager_numbers(budget):
    _check_against_eager("cpu", {"memory_budget": budget, "on_infeasible": "best_effort"})


def test_a_tight_budget_holds_generator_states_instead_of_draws():
    _, _, saved, seen, _ = _check_against_eager("cpu", {"memory_budget": 0.1, "on_infeasible": "best_effort"})[0]
    state_bytes = generator_state(torch.device("cpu")).numel()
    activations = [t for t in seen if not isinstance(t, torch.nn.Parameter)]
    states = [t for t in activations if t.dtype == torch.uint8 and t.numel() == state_bytes]
    assert len(states) >= 2
    # Neither float draw is held (262,144 bytes each), nor anything computed from them alone.
    assert not [t for t in activations if t.dtype == torch.float32 and t.shape == (256, 256)]
    assert saved < 2 * 4 * 256 * 256


def test_an_op_of_several_outputs_is_replayed_whole():
    options = {"memory_budget": 0.1, "on_infeasible": "best_effort"}
    _, _, saved, seen, _ = _check_against_eager("cpu", options, net=RReLUNet)[0]
    activations = [t for t in seen if not isinstance(t, torch.nn.Parameter)]
    assert not [t for t in activations if t.shape == (256, 256)]  # neither RReLU's output nor its noise
    assert saved < 4 * 256 * 256


@pytest.mark.parametrize("budget", [None, 0.1])
def test_dropout_on_views_laid_out_otherwise_gives_eager_masks(budget):
    _check_against_eager("cpu", {"memory_budget": budget, "on_infeasible": "best_effort"}, net=LayoutDropoutNet)


def test_dropout_kept_whole_as_on_cuda_is_replayed_whole(monkeypatch):
    # On CUDA dropout stays one op (its fused kernel draws its own numbers); the same path, run on the CPU.
    monkeypatch.setattr(fxmem.decompositions, "_FUSED_DROPOUT_DEVICES", ("cpu",))
    options = {"memory_budget": 0.1, "on_infeasible": "best_effort"}
    seen = _check_against_eager("cpu", options, net=LayoutDropoutNet)[0][3]
    held = [t for t in seen if not isinstance(t, torch.nn.Parameter) and t.dtype in (torch.uint8, torch.bool)]
    state_bytes = generator_state(torch.device("cpu")).numel()
    # Generator states, held to replay each dropout whole; no mask (decomposed, the plan holds bit-packed ones).
    assert held and all(t.dtype == torch.uint8 and t.numel() == state_bytes for t in held)


def test_bernoulli_draws_are_held_as_bitmasks():
    # Each value of a Bernoulli draw is 0 or 1, so a bit per element holds it exactly, whatever its dtype.
    options = {"memory_budget": 0.1, "on_infeasible": "best_effort"}
    seen = _check_against_eager("cpu", options, net=BernoulliMaskNet)[0][3]
    activations = [t for t in seen if not isinstance(t, torch.nn.Parameter)]
    assert not [t for t in activations if t.dtype == torch.float32 and t.numel() == 256 * 4]
    assert len([t for t in activations if t.dtype == torch.uint8 and t.numel() == 256 * 4 // 8]) == 2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16, torch.bool])
def test_the_bitmask_codec_restores_draws_exactly(dtype):
    codec = make_codec(BITMASK, fxmem.FxmemConfig())
    draw = torch.bernoulli(torch.full((6, 10), 0.5)).to(dtype).t()  # a transposed layout
    restored = codec.decode(codec.encode(draw), draw)
    assert restored.dtype == dtype and restored.stride() == draw.stride() and torch.equal(restored, draw)


@pytest.mark.parametrize(("width", "replayed"), [(8, False), (256, True)])
def test_a_checkpointed_draw_is_held_only_where_smaller_than_a_generator_state(width, replayed):
    # The region asks for recomputation: its mask is replayed from a generator state (5,056 bytes on the
    # CPU), unless the mask itself is smaller (256 x 8 booleans), which is then held instead.
    options = {"memory_budget": 0.1, "on_infeasible": "best_effort"}
    seen = _check_against_eager("cpu", options, net=functools.partial(CheckpointedDropoutNet, width))[0][3]
    state_bytes = generator_state(torch.device("cpu")).numel()
    states = [t for t in seen if t.dtype == torch.uint8 and t.numel() == state_bytes]
    assert bool(states) == replayed


def _snapshots_held(options: dict) -> list:
    model, x = _case()
    report = fxmem.inspect(model, x, codegen="eager", on_infeasible="best_effort", **options)
    return [row for row in report.graphs[0].rows if row.op == "fxmem.rng.generator_state"]


def test_without_a_budget_draws_that_cost_time_are_held(monkeypatch):
    """A CPU draws a random number far slower than it writes one (``draws_per_s``): without a budget
    (hold what costs little time to avoid) the plan holds the draws; with a generator as fast as its
    memory it would replay them."""
    assert not _snapshots_held({"memory_budget": None})
    assert _snapshots_held({"memory_budget": 0.1})
    monkeypatch.setitem(PROFILES, "cpu", dataclasses.replace(PROFILES["cpu"], draws_per_s=math.inf))
    assert _snapshots_held({"memory_budget": None})


def test_the_report_names_the_snapshots():
    model, x = _case()
    report = fxmem.inspect(model, x, memory_budget=0.1, codegen="eager", on_infeasible="best_effort")
    snapshots = [row for row in report.graphs[0].rows if row.op == "fxmem.rng.generator_state"]
    assert snapshots and all(row.decision == "keep" and "replay" in row.reason for row in snapshots)


def test_dynamic_shapes_replay_with_the_inputs_they_read():
    # Under dynamic shapes a draw's layout is symbolic: the replay reads the input it was shaped like.
    _check_against_eager("cpu", {"memory_budget": 0.1, "on_infeasible": "best_effort"}, dynamic=True)


def test_a_replay_leaves_the_generator_where_its_draw_does():
    x = torch.empty(1000)
    state = torch.get_rng_state()
    first = torch.ops.aten.bernoulli.p(x, 0.5)
    after = torch.get_rng_state()
    torch.rand(3)
    again = draw_from_state(state, torch.device("cpu"), torch.ops.aten.bernoulli.p, x, 0.5)
    assert torch.equal(first, again)
    assert torch.equal(torch.get_rng_state(), after)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_replayed_draws_give_eager_numbers_on_cuda():
    _check_against_eager("cuda", {"memory_budget": 0.1, "on_infeasible": "best_effort"})
