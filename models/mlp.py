"""A multi-layer perceptron classifier whose ``forward`` returns the cross-entropy loss.

Each hidden layer is Linear -> (LayerNorm) -> GELU or ReLU -> Dropout; a final Linear maps
to class logits.

    model, inputs = build("tiny")
    loss = model(*inputs)          # inputs == (x (B, in_features), labels (B,) int64)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models._common import check, is_pos_int, is_prob, labelled_batch, preset_fields, seeded_model

__all__ = ["MLPConfig", "MLP", "PRESETS", "build"]

_TINY = dict(in_features=32, hidden=(64, 64), num_classes=10, batch_size=16)

PRESETS: dict[str, dict] = {
    "tiny": dict(_TINY),
    "tiny-dropout": dict(_TINY, dropout=0.1),
    "small": dict(in_features=784, hidden=(1024,) * 3, num_classes=10, layernorm=True, batch_size=128),
    "large": dict(in_features=1024, hidden=(4096,) * 4, num_classes=1000, layernorm=True, batch_size=256),
}

_check = functools.partial(check, "MLPConfig")


@dataclass(frozen=True)
class MLPConfig:
    """Layer widths, activation and regularisation, plus the factory's default batch size."""

    in_features: int = 784
    hidden: tuple[int, ...] = (1024, 1024)
    num_classes: int = 10
    activation: str = "gelu"  # "gelu" or "relu"
    layernorm: bool = False  # LayerNorm after each hidden Linear
    dropout: float = 0.0
    batch_size: int = 128

    def __post_init__(self) -> None:
        for name in ("in_features", "num_classes", "batch_size"):
            _check(is_pos_int(getattr(self, name)), name, getattr(self, name), "a positive int")
        ok = isinstance(self.hidden, (tuple, list)) and all(map(is_pos_int, self.hidden))
        _check(ok, "hidden", self.hidden, "a sequence of positive ints")
        object.__setattr__(self, "hidden", tuple(self.hidden))
        _check(self.activation in ("gelu", "relu"), "activation", self.activation, "'gelu' or 'relu'")
        _check(isinstance(self.layernorm, bool), "layernorm", self.layernorm, "a bool")
        _check(is_prob(self.dropout), "dropout", self.dropout, "a float in [0, 1)")

    @classmethod
    def from_name(cls, name: str) -> MLPConfig:
        """The preset called ``name`` (see ``PRESETS``)."""
        return cls(**preset_fields(PRESETS, name, "MLP"))


class MLP(nn.Module):
    """``forward(x, labels)`` returns the mean cross-entropy of the class logits."""

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        width = config.in_features
        for h in config.hidden:
            layers.append(nn.Linear(width, h))
            if config.layernorm:
                layers.append(nn.LayerNorm(h))
            layers.append(nn.GELU() if config.activation == "gelu" else nn.ReLU())
            layers.append(nn.Dropout(config.dropout))
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, config.num_classes)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.body(x)  # (B, hidden[-1])
        logits = self.head(h)  # (B, num_classes)
        return F.cross_entropy(logits, labels)


def build(
    preset: str = "tiny",
    *,
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """``(model, (x, labels))`` for a preset; the same ``seed`` gives the same weights and data."""
    config = MLPConfig.from_name(preset)
    model, B, g = seeded_model(lambda: MLP(config), config.batch_size, batch_size, seed, device, dtype)
    # x (B, in_features), labels (B,) int64
    return model, labelled_batch((B, config.in_features), config.num_classes, g, device, dtype)


def tiny() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return build("tiny")


def tiny_dropout() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return build("tiny-dropout")


def small() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return build("small")


def large() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return build("large")
