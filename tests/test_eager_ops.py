"""The eager codegen's faster max-pool prims give exactly what Inductor's reference implementations give,
and the eager codegen runs them in place of the prims."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import fxmem
from fxmem._compat import inductor_decompositions
from fxmem.eager_ops import max_pool_offsets_to_indices, max_pool_with_offsets, use_faster_ops
from models.resnet import ResNet, ResNetConfig
from tests.helpers import rel_err, run_step

inductor_decompositions()  # defines Inductor's prims
prims = torch.ops.prims

# (input size of one plane, kernel, stride, padding, dilation, ceil_mode)
POOLS_2D = [
    ((16, 16), (3, 3), (2, 2), (1, 1), (1, 1), False),  # a ResNet's stem
    ((15, 17), (3, 3), (2, 2), (1, 1), (1, 1), True),
    ((9, 11), (2, 3), (1, 2), (0, 1), (1, 1), False),
    ((12, 12), (3, 2), (3, 1), (1, 0), (2, 3), True),
    ((7, 5), (5, 5), (2, 2), (2, 2), (1, 1), False),
    ((2, 2), (3, 3), (1, 1), (1, 1), (1, 1), False),  # windows wider than the plane: steps collide
    ((1, 6), (1, 4), (1, 1), (0, 2), (1, 1), True),
]
POOLS_3D = [
    ((6, 7, 8), (2, 3, 3), (2, 2, 1), (1, 1, 0), (1, 1, 1), False),
    ((5, 5, 5), (3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 2, 1), True),
    ((2, 3, 2), (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), False),
]


def _inputs(plane: tuple[int, ...]) -> list[torch.Tensor]:
    """Batched and unbatched, channels-last, a strided view, ties, NaN and infinities, three dtypes."""
    g = torch.Generator().manual_seed(len(plane) * 100 + sum(plane))
    x = torch.randn(2, 3, *plane, generator=g)
    ties = torch.randint(0, 3, x.shape, generator=g).float()
    special = x.clone()
    special.view(-1)[::7] = float("nan")
    special.view(-1)[1::5] = float("-inf")
    special.view(-1)[2::11] = float("inf")
    layouts = [x, x[0], ties, special, x.double(), x.bfloat16(), torch.cat([x, x], 1)[:, ::2]]
    if len(plane) == 2:
        layouts.append(x.contiguous(memory_format=torch.channels_last))
    return layouts


@pytest.mark.parametrize("pool", POOLS_2D + POOLS_3D, ids=lambda p: "x".join(map(str, p[0])) + f"-k{p[1]}")
def test_faster_max_pool_prims_equal_inductors(pool):
    plane, kernel, stride, padding, dilation, ceil_mode = pool
    for x in _inputs(plane):
        want = prims._low_memory_max_pool_with_offsets(x, kernel, stride, padding, dilation, ceil_mode)
        got = max_pool_with_offsets(x, kernel, stride, padding, dilation, ceil_mode)
        assert torch.allclose(got[0], want[0], rtol=0, atol=0, equal_nan=True)  # the same pool's values
        assert got[1].dtype == want[1].dtype == torch.int8 and torch.equal(got[1], want[1])
        want_indices = prims._low_memory_max_pool_offsets_to_indices(want[1], kernel, plane, stride, padding, dilation)
        got_indices = max_pool_offsets_to_indices(want[1], kernel, plane, stride, padding, dilation)
        assert got_indices.dtype == torch.int64 and torch.equal(got_indices, want_indices)


def test_every_offset_converts_as_inductors():
    """Offsets not only at each window's maximum: every value a window can have, at every position."""
    kernel, plane, stride, padding, dilation = (3, 2), (10, 9), (2, 3), (1, 1), (2, 1)
    out = [(plane[d] + 2 * padding[d] - dilation[d] * (kernel[d] - 1) - 1) // stride[d] + 1 for d in range(2)]
    offsets = torch.tensor(list(itertools.islice(itertools.cycle(range(6)), 2 * out[0] * out[1])))
    offsets = offsets.to(torch.int8).view(2, *out)
    want = prims._low_memory_max_pool_offsets_to_indices(offsets, kernel, plane, stride, padding, dilation)
    assert torch.equal(max_pool_offsets_to_indices(offsets, kernel, plane, stride, padding, dilation), want)


class _Pools(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv3d = torch.nn.Conv3d(2, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(torch.relu(self.conv(x)), 3, stride=2, padding=1)
        w = F.max_pool3d(torch.tanh(self.conv3d(v)), 2, ceil_mode=True)
        return h.square().mean() + w.square().mean() + F.max_pool1d(x.flatten(2), 4).mean()


@pytest.mark.parametrize("budget", [None, 0.1])
def test_eager_codegen_runs_the_faster_prims_and_matches_eager(budget, monkeypatch):
    """Both graphs call the faster functions, not the prims, and the step matches eager's (the pooled
    values and the gradient routed to each maximum are exact; 1e-6 covers the convolutions)."""
    called = []
    original = use_faster_ops

    def recorded(gm):
        original(gm)
        called.append({getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes})

    monkeypatch.setattr(fxmem.compiler, "use_faster_ops", recorded)
    torch.manual_seed(0)
    model = _Pools()
    inputs = (torch.randn(2, 3, 12, 12), torch.randn(2, 2, 5, 6, 7))
    loss_ref, grads_ref, _ = run_step(model, inputs)
    loss, grads, _ = run_step(model, inputs, fxmem.backend(codegen="eager", memory_budget=budget))
    assert rel_err(loss, loss_ref) <= 1e-6
    assert rel_err(grads, grads_ref) <= 1e-6
    forward, backward = called
    assert "max_pool_with_offsets" in forward and "max_pool_offsets_to_indices" in backward
    assert not any(name.startswith("prims._low_memory") for name in forward | backward)


def test_imagenet_stem_resnet_step_matches_eager():
    """A small ResNet with the ImageNet stem (7x7 convolution, then a 3x3 max pool of stride 2), the stem
    whose pooling was the slow part of a ResNet-18 step."""
    config = ResNetConfig(layers=(1, 1), widths=(8, 16), num_classes=10)
    torch.manual_seed(0)
    model = ResNet(config)
    inputs = (torch.randn(2, 3, 48, 48), torch.randint(0, 10, (2,)))
    loss_ref, grads_ref, _ = run_step(model, inputs)
    loss, grads, _ = run_step(model, inputs, fxmem.backend(codegen="eager"))
    assert rel_err(loss, loss_ref) <= 1e-5 and rel_err(grads, grads_ref) <= 1e-5
