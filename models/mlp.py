"""A multi-layer perceptron classifier whose ``forward`` returns the cross-entropy loss.

Each hidden layer is Linear -> (LayerNorm) -> GELU or ReLU -> Dropout; a final Linear maps
to class logits.

    model, inputs = build("tiny")
    loss = model(*inputs)          # inputs == (x (B, in_features), labels (B,) int64)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MLPConfig", "MLP", "PRESETS", "build"]

_TINY = dict(in_features=32, hidden=(64, 64), num_classes=10, batch_size=16)

PRESETS: dict[str, dict] = {
    "tiny": dict(_TINY),
    "tiny-dropout": dict(_TINY, dropout=0.1),
    "small": dict(in_features=784, hidden=(1024,) * 3, num_classes=10, layernorm=True, batch_size=128),
    "large": dict(in_features=1024, hidden=(4096,) * 4, num_classes=1000, layernorm=True, batch_size=256),
}


def _check(ok: bool, field: str, value: object, need: str) -> None:
    if not ok:
        raise ValueError(f"MLPConfig.{field} must be {need}, got {value!r}")


def _is_pos_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_prob(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1.0


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
            _check(_is_pos_int(getattr(self, name)), name, getattr(self, name), "a positive int")
        ok = isinstance(self.hidden, (tuple, list)) and all(map(_is_pos_int, self.hidden))
        _check(ok, "hidden", self.hidden, "a sequence of positive ints")
        object.__setattr__(self, "hidden", tuple(self.hidden))
        _check(self.activation in ("gelu", "relu"), "activation", self.activation, "'gelu' or 'relu'")
        _check(isinstance(self.layernorm, bool), "layernorm", self.layernorm, "a bool")
        _check(_is_prob(self.dropout), "dropout", self.dropout, "a float in [0, 1)")

    @classmethod
    def from_name(cls, name: str) -> MLPConfig:
        """The preset called ``name`` (see ``PRESETS``)."""
        if name not in PRESETS:
            raise ValueError(f"unknown MLP preset {name!r}; known presets: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])


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
    B = config.batch_size if batch_size is None else batch_size
    if B <= 0:
        raise ValueError(f"batch_size must be positive, got {B}")
    torch.manual_seed(seed)
    model = MLP(config).to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, config.in_features, generator=g).to(device=device, dtype=dtype)  # (B, in_features)
    labels = torch.randint(0, config.num_classes, (B,), generator=g).to(device)  # (B,) int64
    return model, (x, labels)


def tiny() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return build("tiny")


def tiny_dropout() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return build("tiny-dropout")


def small() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return build("small")


def large() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return build("large")
