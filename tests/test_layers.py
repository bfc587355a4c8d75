"""Fractional budgets on layers no other test's model uses: transposed convolution, pixel shuffle,
instance norm, PReLU, average pooling, 1-d batch norm, dilated 1-d convolution, 1-d max pooling, GLU and
adaptive average pooling. As ``tests/test_architectures.py`` checks its models: saved bytes within
(B + 0.02) x torch.compile's default and falling with B, gradients within 1e-5 of eager's (CPU, eager
codegen); and under Inductor's codegen at one budget, the saved bytes fxmem predicts."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.helpers import assert_fractions_within_default, assert_planned_within


class ImageGenerator(nn.Module):
    """A DCGAN-style generator: a transposed convolution with batch norm, a convolution whose channels a
    pixel shuffle turns into resolution, instance norm and PReLU."""

    def __init__(self):
        super().__init__()
        self.project = nn.Linear(16, 32 * 4 * 4)
        self.up = nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1, bias=False)  # (batch norm follows)
        self.norm = nn.BatchNorm2d(16)
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.instance_norm = nn.InstanceNorm2d(8, affine=True)
        self.act = nn.PReLU()
        self.out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm(self.up(self.project(z).view(-1, 32, 4, 4))))
        h = self.act(self.instance_norm(self.shuffle(self.conv(h))))
        return torch.tanh(self.out(h)).square().mean()


class LeNet(nn.Module):
    """LeNet-5's shape: average pooling after sigmoid and hard-swish convolutions, a log-softmax head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.head = nn.Linear(16 * 5 * 5, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.avg_pool2d(torch.sigmoid(self.conv1(x)), 2)
        h = F.avg_pool2d(F.hardswish(self.conv2(h)), 2)
        return -F.log_softmax(self.head(h.flatten(1)), -1)[:, 0].mean()


class WaveformClassifier(nn.Module):
    """1-d convolutions over a waveform: strided with batch norm and ELU, max pooling, dilated with group
    norm, a GLU over both, adaptive average pooling and a smooth L1 loss."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(1, 16, 9, stride=2, padding=4, bias=False)  # (batch norm follows)
        self.norm1 = nn.BatchNorm1d(16)
        self.conv2 = nn.Conv1d(16, 32, 5, dilation=2, padding=4)
        self.norm2 = nn.GroupNorm(4, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.max_pool1d(F.elu(self.norm1(self.conv1(x))), 2))
        h = F.glu(torch.cat([self.norm2(h), h], 1), 1)
        features = F.adaptive_avg_pool1d(h, 1).squeeze(-1)
        return F.smooth_l1_loss(self.head(features), torch.ones(x.shape[0], 4))


MODELS = {
    "image-generator": (ImageGenerator, (4, 16)),
    "lenet": (LeNet, (8, 1, 28, 28)),
    "waveform": (WaveformClassifier, (4, 1, 256)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_fractional_budgets_against_torch_compile_default(name):
    make, shape = MODELS[name]
    inputs = (torch.randn(*shape, generator=torch.Generator().manual_seed(0)),)
    assert_fractions_within_default(make, inputs)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_under_inductor_the_plan_saves_what_it_predicts(name, inductor_cache):
    """With Inductor's codegen (the default) at 0.4: the forward saves the bytes fxmem predicted (a
    transposed convolution's or a 1-d convolution's saved layout included), at most 0.42x the default."""
    make, shape = MODELS[name]
    inputs = (torch.randn(*shape, generator=torch.Generator().manual_seed(0)),)
    assert_planned_within(0.4, make, inputs, codegen="inductor")
