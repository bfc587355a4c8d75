"""A GPT-2 style decoder-only transformer whose ``forward`` returns the LM loss.

Pre-LN blocks (causal self-attention + GELU MLP), learned token and position embeddings,
dropout, and an output head tied to the token embedding. Attention is written out as
matmul + masked softmax so the training graph has real activations to plan; set
``sdpa=True`` to use ``F.scaled_dot_product_attention`` instead.

    model, inputs = build("tiny")
    loss = model(*inputs)          # inputs == (idx, targets), both (B, T) int64
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models._common import check, is_pos_int, is_prob, preset_fields, seeded_model

__all__ = ["GPTConfig", "GPT", "PRESETS", "build"]

_TINY = dict(vocab_size=128, block_size=32, n_layer=2, n_head=2, n_embd=32, batch_size=4, seq_len=32)

PRESETS: dict[str, dict] = {
    "tiny": dict(_TINY),
    "tiny-dropout": dict(_TINY, dropout=0.1),
    "small": dict(vocab_size=8192, block_size=256, n_layer=4, n_head=4, n_embd=256, batch_size=16, seq_len=256),
    "gpt2-small": dict(
        vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, batch_size=8, seq_len=1024
    ),
}

_check = functools.partial(check, "GPTConfig")


@dataclass(frozen=True)
class GPTConfig:
    """Model shape plus the factory's default batch size and sequence length."""

    vocab_size: int = 50257
    block_size: int = 1024  # maximum sequence length (size of the position table)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # bias in Linear and LayerNorm layers
    sdpa: bool = False  # fused F.scaled_dot_product_attention instead of matmul + softmax
    batch_size: int = 8
    seq_len: int = 1024

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "batch_size", "seq_len"):
            value = getattr(self, name)
            _check(is_pos_int(value), name, value, "a positive int")
        _check(self.n_embd % self.n_head == 0, "n_embd", self.n_embd, f"divisible by n_head={self.n_head}")
        _check(self.seq_len <= self.block_size, "seq_len", self.seq_len, f"<= block_size={self.block_size}")
        _check(is_prob(self.dropout), "dropout", self.dropout, "a float in [0, 1)")
        _check(isinstance(self.bias, bool), "bias", self.bias, "a bool")
        _check(isinstance(self.sdpa, bool), "sdpa", self.sdpa, "a bool")

    @classmethod
    def from_name(cls, name: str) -> GPTConfig:
        """The preset called ``name`` (see ``PRESETS``)."""
        return cls(**preset_fields(PRESETS, name, "GPT"))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_size = config.n_embd // config.n_head
        self.dropout = config.dropout
        self.sdpa = config.sdpa
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_drop = nn.Dropout(config.dropout)
        self.resid_drop = nn.Dropout(config.dropout)
        causal = torch.ones(config.block_size, config.block_size, dtype=torch.bool).tril()
        self.register_buffer("causal", causal[None, None], persistent=False)  # (1, 1, block, block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        if self.sdpa:
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (B, nh, T, hs)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_size))  # (B, nh, T, T)
            att = att.masked_fill(~self.causal[:, :, :T, :T], float("-inf"))
            att = self.attn_drop(F.softmax(att, dim=-1))
            y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.act = nn.GELU(approximate="tanh")
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only transformer; ``forward(idx, targets)`` returns the mean cross-entropy."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # weight tying
        self.apply(self._init_weights)
        # GPT-2: shrink the init of projections that write into the residual stream.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        logits = self.head(self.ln_f(x))  # (B, T, V)
        return F.cross_entropy(logits.view(B * T, -1), targets.view(B * T))


def build(
    preset: str = "tiny",
    *,
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """``(model, (idx, targets))`` for a preset; the same ``seed`` gives the same weights and data."""
    config = GPTConfig.from_name(preset)
    model, B, g = seeded_model(lambda: GPT(config), config.batch_size, batch_size, seed, device, dtype)
    # Random tokens; targets are the inputs shifted by one, as in next-token prediction.
    tokens = torch.randint(0, config.vocab_size, (B, config.seq_len + 1), generator=g)
    idx = tokens[:, :-1].contiguous().to(device)  # (B, T) int64
    targets = tokens[:, 1:].contiguous().to(device)  # (B, T) int64
    return model, (idx, targets)


def tiny() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return build("tiny")


def tiny_dropout() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return build("tiny-dropout")


def small() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return build("small")


def gpt2_small() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return build("gpt2-small")
