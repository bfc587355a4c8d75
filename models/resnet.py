"""A ResNet (BasicBlock or Bottleneck, BatchNorm, ReLU) whose ``forward`` returns the loss.

The ``"cifar"`` stem is a single 3x3 conv (for 32x32 inputs); the ``"imagenet"`` stem is a
7x7 stride-2 conv followed by a 3x3 stride-2 max-pool (for 224x224 inputs).

    model, inputs = build("tiny")
    loss = model(*inputs)          # inputs == (images (B, 3, H, W), labels (B,) int64)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models._common import check, is_pos_int, labelled_batch, preset_fields, seeded_model

__all__ = ["ResNetConfig", "ResNet", "BasicBlock", "Bottleneck", "PRESETS", "build"]

_CIFAR = dict(stem="cifar", layers=(1, 1), num_classes=10, image_size=32, batch_size=8)
_IN1K = dict(stem="imagenet", widths=(64, 128, 256, 512), num_classes=1000, image_size=224, batch_size=64)

PRESETS: dict[str, dict] = {
    "tiny": dict(_CIFAR, block="basic", widths=(16, 32)),
    "tiny-bottleneck": dict(_CIFAR, block="bottleneck", widths=(8, 16)),
    "resnet18": dict(_IN1K, block="basic", layers=(2, 2, 2, 2)),
    "resnet50": dict(_IN1K, block="bottleneck", layers=(3, 4, 6, 3)),
}

_check = functools.partial(check, "ResNetConfig")


@dataclass(frozen=True)
class ResNetConfig:
    """Network shape plus the factory's default batch size and image size."""

    block: str = "basic"  # "basic" (two 3x3 convs) or "bottleneck" (1x1, 3x3, 1x1; 4x expansion)
    layers: tuple[int, ...] = (2, 2, 2, 2)  # blocks per stage
    widths: tuple[int, ...] = (64, 128, 256, 512)  # inner width of each stage
    stem: str = "imagenet"  # "imagenet" or "cifar"
    in_chans: int = 3
    num_classes: int = 1000
    image_size: int = 224
    batch_size: int = 64

    def __post_init__(self) -> None:
        _check(self.block in ("basic", "bottleneck"), "block", self.block, "'basic' or 'bottleneck'")
        _check(self.stem in ("imagenet", "cifar"), "stem", self.stem, "'imagenet' or 'cifar'")
        for name in ("layers", "widths"):
            value = getattr(self, name)
            ok = isinstance(value, (tuple, list)) and len(value) > 0 and all(map(is_pos_int, value))
            _check(ok, name, value, "a non-empty sequence of positive ints")
            object.__setattr__(self, name, tuple(value))
        need = f"the same length as layers ({len(self.layers)})"
        _check(len(self.widths) == len(self.layers), "widths", self.widths, need)
        for name in ("in_chans", "num_classes", "image_size", "batch_size"):
            _check(is_pos_int(getattr(self, name)), name, getattr(self, name), "a positive int")

    @classmethod
    def from_name(cls, name: str) -> ResNetConfig:
        """The preset called ``name`` (see ``PRESETS``)."""
        return cls(**preset_fields(PRESETS, name, "ResNet"))


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a (projected when the shape changes) shortcut."""

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = _conv_bn(c_in, width, 3, stride)
        self.conv2 = _conv_bn(width, c_out, 3)
        self.shortcut = _conv_bn(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv1(x))  # (B, width, H/s, W/s)
        y = self.conv2(y)  # (B, c_out, H/s, W/s)
        return F.relu(y + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4, plus a shortcut."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = _conv_bn(c_in, width, 1)
        self.conv2 = _conv_bn(width, width, 3, stride)
        self.conv3 = _conv_bn(width, c_out, 1)
        self.shortcut = _conv_bn(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv1(x))  # (B, width, H, W)
        y = F.relu(self.conv2(y))  # (B, width, H/s, W/s)
        y = self.conv3(y)  # (B, 4*width, H/s, W/s)
        return F.relu(y + self.shortcut(x))


class ResNet(nn.Module):
    """``forward(images, labels)`` returns the mean cross-entropy of the class logits."""

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        self.config = config
        block = BasicBlock if config.block == "basic" else Bottleneck
        c = config.widths[0]
        if config.stem == "imagenet":
            self.stem = nn.Sequential(
                _conv_bn(config.in_chans, c, 7, stride=2), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1)
            )
        else:
            self.stem = nn.Sequential(_conv_bn(config.in_chans, c, 3), nn.ReLU())
        stages = []
        for i, (n_blocks, width) in enumerate(zip(config.layers, config.widths, strict=True)):
            blocks = []
            for j in range(n_blocks):
                stride = 2 if i > 0 and j == 0 else 1  # downsample at the start of every stage but the first
                blocks.append(block(c, width, stride))
                c = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c, config.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)  # (B, C0, H', W')
        x = self.stages(x)  # (B, C, h, w)
        x = x.mean(dim=(2, 3))  # (B, C) global average pool
        logits = self.fc(x)  # (B, num_classes)
        return F.cross_entropy(logits, labels)


def build(
    preset: str = "tiny",
    *,
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """``(model, (images, labels))`` for a preset; the same ``seed`` gives the same weights and data."""
    config = ResNetConfig.from_name(preset)
    model, B, g = seeded_model(lambda: ResNet(config), config.batch_size, batch_size, seed, device, dtype)
    S = config.image_size
    # images (B, 3, S, S), labels (B,) int64
    return model, labelled_batch((B, config.in_chans, S, S), config.num_classes, g, device, dtype)


def tiny() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return build("tiny")


def tiny_bottleneck() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return build("tiny-bottleneck")


def resnet18() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return build("resnet18")


def resnet50() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return build("resnet50")
