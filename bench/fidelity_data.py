"""The data of ``bench/fidelity.py``, none of it downloaded: the Python standard library's own sources as
a byte-level text corpus, and scikit-learn's bundled handwritten digits (optional) with shifted copies."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


def stdlib_corpus(max_bytes: int) -> tuple[bytes, list[str]]:
    """The first ``max_bytes`` of the standard library's top-level ``*.py`` files, in name order."""
    root = Path(os.__file__).resolve().parent
    chunks, names, total = [], [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        names.append(path.name)
        total += len(data)
        if total >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes], names


@dataclass
class TextData:
    train: torch.Tensor  # (N_train,) int64 token ids
    val: torch.Tensor  # (N_val,) int64
    vocab: list[int]  # token id -> byte value
    sha256: str
    files: int


def load_text(max_bytes: int, val_fraction: float = 0.1) -> TextData:
    raw, names = stdlib_corpus(max_bytes)
    if len(raw) < 10_000:
        raise RuntimeError(f"the standard library sources gave only {len(raw)} bytes of text")
    vocab = sorted(set(raw))
    lut = torch.full((256,), -1, dtype=torch.int64)
    lut[torch.tensor(vocab)] = torch.arange(len(vocab))
    ids = lut[torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()]
    split = int(len(ids) * (1 - val_fraction))
    return TextData(ids[:split], ids[split:], vocab, hashlib.sha256(raw).hexdigest()[:16], len(names))


def text_batches(data: torch.Tensor, steps: int, batch: int, seq: int, seed: int) -> list[torch.Tensor]:
    """``steps`` batches of random windows, each ``(batch, seq + 1)``: the same for every configuration."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, len(data) - seq - 1, (steps, batch), generator=g)
    window = torch.arange(seq + 1)
    return [data[o[:, None] + window] for o in offsets]


def text_eval_windows(data: torch.Tensor, count: int, seq: int) -> torch.Tensor:
    """``count`` evenly spaced windows ``(count, seq + 1)`` covering the validation split."""
    starts = torch.linspace(0, len(data) - seq - 2, count).long()
    return data[starts[:, None] + torch.arange(seq + 1)]


@dataclass
class ImageData:
    x_train: torch.Tensor  # (N, 1, 8, 8) float32, standardised
    y_train: torch.Tensor  # (N,) int64
    x_val: torch.Tensor
    y_val: torch.Tensor


def load_digits_data(seed: int = 0, val_fraction: float = 0.2) -> ImageData:
    from sklearn.datasets import load_digits  # optional dependency: only this task needs it

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8), values 0..16
    y = torch.tensor(digits.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(y) * val_fraction)
    val, train = perm[:n_val], perm[n_val:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return ImageData(x[train], y[train], x[val], y[val])


def image_batches(data: ImageData, steps: int, batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled epochs (drop-last) with each image shifted by -1..1 pixels in x and y (zero fill)."""
    g = torch.Generator().manual_seed(seed)
    n = len(data.y_train)
    padded = F.pad(data.x_train, (1, 1, 1, 1), value=float(data.x_train.min()))  # (N, 1, 10, 10)
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch + 1, batch):
            if len(out) == steps:
                break
            idx = perm[i : i + batch]
            dy, dx = torch.randint(0, 3, (2, batch), generator=g)
            rows = (dy[:, None] + torch.arange(8))[:, :, None]  # (B, 8, 1)
            cols = (dx[:, None] + torch.arange(8))[:, None, :]  # (B, 1, 8)
            imgs = padded[idx, 0][torch.arange(batch)[:, None, None], rows, cols].unsqueeze(1)  # (B, 1, 8, 8)
            out.append((imgs.contiguous(), data.y_train[idx]))
    return out
