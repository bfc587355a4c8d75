"""A Vision Transformer whose ``forward`` returns the classification loss.

Conv patch embedding, a learned class token and position embeddings, pre-LN blocks
(self-attention + GELU MLP) with dropout, and a linear head on the final class token.
Attention is matmul + softmax by default; ``sdpa=True`` uses ``F.scaled_dot_product_attention``.

    model, inputs = build("tiny")
    loss = model(*inputs)          # inputs == (images (B, 3, H, W), labels (B,) int64)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models._common import check, is_pos_int, is_prob, labelled_batch, preset_fields, seeded_model

__all__ = ["ViTConfig", "ViT", "PRESETS", "build"]

_TINY = dict(image_size=32, patch_size=8, dim=64, depth=2, n_head=4, num_classes=10, batch_size=8)
_IN1K = dict(image_size=224, patch_size=16, depth=12, num_classes=1000)  # ImageNet-1k, 16x16 patches

PRESETS: dict[str, dict] = {
    "tiny": dict(_TINY),
    "tiny-dropout": dict(_TINY, dropout=0.1),
    "vit-small": dict(_IN1K, dim=384, n_head=6, batch_size=64),  # ViT-S/16
    "vit-base": dict(_IN1K, dim=768, n_head=12, batch_size=32),  # ViT-B/16
}

_check = functools.partial(check, "ViTConfig")


@dataclass(frozen=True)
class ViTConfig:
    """Model shape plus the factory's default batch size (the image size is part of the model)."""

    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    dim: int = 768
    depth: int = 12
    n_head: int = 12
    mlp_ratio: int = 4
    num_classes: int = 1000
    dropout: float = 0.0
    sdpa: bool = False  # fused F.scaled_dot_product_attention instead of matmul + softmax
    batch_size: int = 32

    def __post_init__(self) -> None:
        ints = ("image_size", "patch_size", "in_chans", "dim", "depth", "n_head", "mlp_ratio", "num_classes")
        for name in (*ints, "batch_size"):
            value = getattr(self, name)
            _check(is_pos_int(value), name, value, "a positive int")
        need = f"divisible by patch_size={self.patch_size}"
        _check(self.image_size % self.patch_size == 0, "image_size", self.image_size, need)
        _check(self.dim % self.n_head == 0, "dim", self.dim, f"divisible by n_head={self.n_head}")
        _check(is_prob(self.dropout), "dropout", self.dropout, "a float in [0, 1)")
        _check(isinstance(self.sdpa, bool), "sdpa", self.sdpa, "a bool")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_name(cls, name: str) -> ViTConfig:
        """The preset called ``name`` (see ``PRESETS``)."""
        return cls(**preset_fields(PRESETS, name, "ViT"))


class Attention(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_size = config.dim // config.n_head
        self.dropout = config.dropout
        self.sdpa = config.sdpa
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)
        self.attn_drop = nn.Dropout(config.dropout)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.n_head, self.head_size)  # (B, N, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, nh, N, hs)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_size))  # (B, nh, N, N)
            att = self.attn_drop(F.softmax(att, dim=-1))
            y = att @ v  # (B, nh, N, hs)
        y = y.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        hidden = config.mlp_ratio * config.dim
        self.ln1 = nn.LayerNorm(config.dim, eps=1e-6)
        self.attn = Attention(config)
        self.ln2 = nn.LayerNorm(config.dim, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(config.dim, hidden),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(hidden, config.dim),
            nn.Dropout(config.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    """``forward(images, labels)`` returns the mean cross-entropy of the class-token logits."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        p = config.patch_size
        self.patch_embed = nn.Conv2d(config.in_chans, config.dim, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.n_patches + 1, config.dim))
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim, eps=1e-6)
        self.head = nn.Linear(config.dim, config.num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        B = images.shape[0]
        x = self.patch_embed(images)  # (B, C, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        cls = self.cls_token.expand(B, -1, -1)  # (B, 1, C)
        x = self.drop(torch.cat([cls, x], dim=1) + self.pos_embed)  # (B, N+1, C)
        for block in self.blocks:
            x = block(x)  # (B, N+1, C)
        logits = self.head(self.norm(x[:, 0]))  # (B, num_classes)
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
    config = ViTConfig.from_name(preset)
    model, B, g = seeded_model(lambda: ViT(config), config.batch_size, batch_size, seed, device, dtype)
    S = config.image_size
    # images (B, 3, S, S), labels (B,) int64
    return model, labelled_batch((B, config.in_chans, S, S), config.num_classes, g, device, dtype)


def tiny() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return build("tiny")


def tiny_dropout() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return build("tiny-dropout")


def vit_small() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return build("vit-small")


def vit_base() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return build("vit-base")
