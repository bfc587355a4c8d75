"""What the bundled models share: checks of a config's fields, the lookup of a preset, and the seeded
start of every ``build`` (the weights drawn first, then the data from a generator of its own)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn as nn


def check(config: str, ok: bool, field: str, value: object, need: str) -> None:
    """Unless ``ok``: a ``ValueError`` naming ``config.field``, what it must be and what it got (each model
    binds ``config``, its config class's name)."""
    if not ok:
        raise ValueError(f"{config}.{field} must be {need}, got {value!r}")


def is_pos_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def is_prob(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1.0


def preset_fields(presets: Mapping[str, dict], name: str, model: str) -> dict:
    """The fields of the preset called ``name``, or a ``ValueError`` listing the known ones."""
    if name not in presets:
        raise ValueError(f"unknown {model} preset {name!r}; known presets: {', '.join(presets)}")
    return presets[name]


def seeded_model(
    make: Callable[[], nn.Module],
    preset_batch: int,
    batch_size: int | None,
    seed: int,
    device: str | torch.device,
    dtype: torch.dtype,
) -> tuple[nn.Module, int, torch.Generator]:
    """``make()`` on ``device`` in ``dtype``, its weights drawn after ``torch.manual_seed(seed)``; the batch
    size (``batch_size``, else the preset's); and a generator seeded with ``seed`` for the data."""
    batch = preset_batch if batch_size is None else batch_size
    if batch <= 0:
        raise ValueError(f"batch_size must be positive, got {batch}")
    torch.manual_seed(seed)
    model = make().to(device=device, dtype=dtype)
    return model, batch, torch.Generator().manual_seed(seed)


def labelled_batch(
    shape: Sequence[int], num_classes: int, generator: torch.Generator, device: str | torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard-normal inputs of ``shape`` and one int64 class label per row (the first dimension)."""
    x = torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)
    labels = torch.randint(0, num_classes, (shape[0],), generator=generator).to(device)
    return x, labels
