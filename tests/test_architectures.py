"""Budgets on architectures beyond the bundled models: saved-for-backward bytes under a fractional budget
B stay within (B + 0.02) x what torch.compile's default (Inductor) saves, fall as B falls, and gradients
stay within 1e-5 of eager, all with ``codegen="eager"`` (CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.torch_version import TorchVersion

import fxmem
from tests.helpers import assert_fractions_within_default, assert_planned_within, fresh_step, rel_err

SLACK = 0.02  # the allowance over B x the default
GRAD_TOL = 1e-5  # decomposed ops round differently from eager's fused kernels


class GroupNormConv(nn.Module):
    """1-d convolutions with group norm, SiLU and Mish, a depthwise layer."""

    def __init__(self, depth: int = 4):
        super().__init__()
        self.inp = nn.Conv1d(4, 16, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.GroupNorm(4, 16), nn.SiLU(), nn.Conv1d(16, 16, 3, padding=1, groups=4), nn.Mish())
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return h.pow(2).mean()


class Encoder(nn.Module):
    """PyTorch's TransformerEncoderLayer (scaled-dot-product attention), pre- and post-norm."""

    def __init__(self, depth: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=i % 2 == 0)
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x.square().mean()


class UNet(nn.Module):
    """Encoder / decoder with a skip connection: pooling, batch norm, nearest upsampling, concatenation."""

    def __init__(self):
        super().__init__()
        self.down1 = nn.Conv2d(3, 8, 3, padding=1)
        self.down2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)  # a bias before batch norm has no gradient
        self.norm = nn.BatchNorm2d(16)
        self.mid = nn.Conv2d(16, 16, 3, padding=1)
        self.up = nn.Conv2d(24, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.down1(x))
        b = F.relu(self.norm(self.down2(F.max_pool2d(a, 2))))
        b = F.gelu(self.mid(b))
        c = F.interpolate(b, scale_factor=2, mode="nearest")
        return self.out(F.leaky_relu(self.up(torch.cat([a, c], 1)))).abs().mean()


class MixtureOfExperts(nn.Module):
    """Top-2 routing over four experts (softmax, topk, masks)."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(32, 4)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, index = F.softmax(self.gate(x), -1).topk(2, -1)
        out = torch.zeros_like(x)
        for k, expert in enumerate(self.experts):
            chosen = (index == k).to(x.dtype)
            out = out + expert(x) * (weights * chosen).sum(-1, keepdim=True)
        return out.abs().mean()


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class LlamaStyle(nn.Module):
    """A decoder block as in Llama: RMS norm, rotary embeddings, grouped-query causal attention, a SwiGLU
    MLP, and a head tied to the embedding."""

    def __init__(self, dim: int = 32, heads: int = 4, kv_heads: int = 2, seq: int = 16):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.embed = nn.Embedding(100, dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.gate, self.up, self.down = (
            nn.Linear(dim, 64, bias=False),
            nn.Linear(dim, 64, bias=False),
            nn.Linear(64, dim),
        )
        self.norms = nn.ModuleList(RMSNorm(dim) for _ in range(3))
        angles = torch.arange(seq)[:, None] * 10000 ** (-torch.arange(0, self.head_dim, 2) / self.head_dim)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        even, odd = x[..., ::2], x[..., 1::2]
        return torch.stack([even * self.cos - odd * self.sin, even * self.sin + odd * self.cos], -1).flatten(-2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        batch, seq, dim = x.shape
        h = self.norms[0](x)
        q = self._rotate(self.q(h).view(batch, seq, self.heads, self.head_dim).transpose(1, 2))
        k, v = self.kv(h).view(batch, seq, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        groups = self.heads // self.kv_heads
        k, v = self._rotate(k).repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(attn.transpose(1, 2).reshape(batch, seq, dim))
        h = self.norms[1](x)
        x = x + self.down(F.silu(self.gate(h)) * self.up(h))
        logits = self.norms[2](x) @ self.embed.weight.t()
        return F.cross_entropy(logits[:, :-1].reshape(-1, 100), ids[:, 1:].reshape(-1))


class Recurrence(nn.Module):
    """An unrolled tanh recurrence, a cumulative sum and an ``index_put`` whose index is a tensor made in
    ``forward`` (a constant the joint graph holds)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.cell = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.inp(x)
        h = torch.zeros(x.shape[0], 32)
        for t in range(x.shape[1]):
            h = torch.tanh(self.cell(h) + u[:, t])
        y = u.cumsum(1).index_put((torch.tensor([0]),), h[:1].unsqueeze(1).expand(1, x.shape[1], 32))
        return (y * h.unsqueeze(1)).tanh().mean()


class InPlaceUpdates(nn.Module):
    """A buffer updated in place in ``forward`` (a step count that scales the activations) and an in-place
    update of a slice: the backward must not read the buffer, which holds its new value by then."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 64)
        self.down = nn.Linear(64, 8)
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        h = self.up(x)
        h[:, 0] += 1.0
        return self.down(F.gelu(h) * self.steps).tanh().mean()


class VariationalAutoencoder(nn.Module):
    """The reparameterization trick: noise drawn in ``forward`` (``randn_like``, never recomputed), a
    weighted binary cross-entropy and a KL term."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU())
        self.mu, self.log_var = nn.Linear(128, 4), nn.Linear(128, 4)
        self.decoder = nn.Sequential(nn.Linear(4, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        mu, log_var = self.mu(h), self.log_var(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * log_var)
        target, weight = torch.sigmoid(x), torch.full((32,), 2.0)
        reconstruction = F.binary_cross_entropy_with_logits(self.decoder(z), target, pos_weight=weight)
        return reconstruction - 0.5 * (1 + log_var - mu.pow(2) - log_var.exp()).mean()


class MaskedAttention(nn.Module):
    """``nn.MultiheadAttention`` with a key padding mask, then with a causal mask and its averaged
    attention weights in the loss."""

    def __init__(self):
        super().__init__()
        self.first = nn.MultiheadAttention(32, 4, batch_first=True)
        self.second = nn.MultiheadAttention(32, 4, batch_first=True)
        self.norm = nn.LayerNorm(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        padding = torch.zeros(batch, seq, dtype=torch.bool)
        padding[:, -3:] = True
        causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1)
        h = self.norm(x + self.first(x, x, x, key_padding_mask=padding, need_weights=False)[0])
        out, weights = self.second(h, h, h, attn_mask=causal)
        return out.square().mean() + weights.mean()


class HandWrittenAttention(nn.Module):
    """Attention as BERT writes it: one projection split into queries, keys and values, matmuls, an
    additive padding mask and a softmax. Inductor's joint-graph pattern rewrites fuse it into attention
    ops, whose saved queries, keys and values are views of the one projection."""

    def __init__(self, width: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.ModuleList(nn.Linear(width, 3 * width) for _ in range(2))

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        mask = (1.0 - padding)[:, None, None, :] * torch.finfo(x.dtype).min
        for qkv in self.qkv:
            q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in qkv(x).chunk(3, dim=-1))
            scores = q @ k.transpose(-1, -2) / (width // self.heads) ** 0.5 + mask
            x = x + (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, width)
        return x.square().mean()


def hand_written_attention_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    padding = torch.ones(4, 16)
    padding[1, 10:] = padding[3, 5:] = 0
    return torch.randn(4, 16, 32, generator=generator), padding


class SpatialTransformer(nn.Module):
    """A learned affine warp (``affine_grid``, ``grid_sample``), bilinear upsampling, a 3-d convolution
    and a KL-divergence loss."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.locate = nn.Linear(8, 6)
        self.conv3d = nn.Conv3d(1, 4, 3, padding=1)
        self.register_buffer("identity", torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x))
        theta = self.locate(h.mean((2, 3))).view(-1, 2, 3) * 0.1 + self.identity
        warped = F.grid_sample(x, F.affine_grid(theta, x.shape, align_corners=False), align_corners=False)
        up = F.interpolate(warped, scale_factor=2, mode="bilinear", align_corners=True)
        v = self.conv3d(up.unsqueeze(1))
        target = F.softmax(up.repeat(1, 4, 1, 1).flatten(1), -1)
        return F.kl_div(F.log_softmax(v.flatten(1), -1), target, reduction="batchmean")


def _inputs(name: str) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    if name == "hand-written-attention":
        return hand_written_attention_inputs()
    if name == "llama":
        return (torch.randint(0, 100, (4, 16), generator=generator),)
    shapes = {
        "groupnorm": (4, 4, 64),
        "encoder": (4, 16, 32),
        "unet": (2, 3, 16, 16),
        "moe": (4, 16, 32),
        "recurrence": (4, 6, 8),
        "inplace": (16, 8),
        "vae": (16, 32),
        "attention-masks": (4, 12, 32),
        "spatial-transformer": (2, 3, 8, 8),
    }
    return (torch.randn(*shapes[name], generator=generator),)


MODELS = {
    "groupnorm": GroupNormConv,
    "encoder": Encoder,
    "unet": UNet,
    "moe": MixtureOfExperts,
    "llama": LlamaStyle,
    "recurrence": Recurrence,
    "inplace": InPlaceUpdates,
    "vae": VariationalAutoencoder,
    "attention-masks": MaskedAttention,
    "hand-written-attention": HandWrittenAttention,
    "spatial-transformer": SpatialTransformer,
}


def _step(name: str, backend) -> tuple[list[torch.Tensor], int]:
    return fresh_step(MODELS[name], _inputs(name), backend, seed=1)  # seed: the VAE's noise


# Inductor before 2.13 saves the attention's per-head queries, keys and values each as a buffer of its
# own; the joint graph (and Inductor 2.13) saves views of the one projection they come from. fxmem's
# reference counts that storage, 7% more than Inductor 2.11 was measured to save on this model, so at 0.4
# the plan holds 0.4218x the measured default.
_VIEWS_SAVED_AS_BUFFERS = {"attention-masks"} if TorchVersion(torch.__version__) < "2.13" else set()


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.xfail(reason="Inductor < 2.13 saves views as buffers", strict=False))
        if name in _VIEWS_SAVED_AS_BUFFERS
        else name
        for name in sorted(MODELS)
    ],
)
def test_fractional_budgets_against_torch_compile_default(name):
    # seed: the VAE's noise
    assert_fractions_within_default(MODELS[name], _inputs(name), slack=SLACK, grad_tol=GRAD_TOL, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("budget", [0.7, 0.4])
def test_hand_written_attention_under_inductor(budget, inductor_cache):
    """Under Inductor too, the reference is what torch.compile's default saves: the fused attention's
    queries, keys and values are views of one projection, whose storage counts once (counted three times,
    the reference was twice the default and the plans held 0.8x of it)."""
    _, default = _step("hand-written-attention", "inductor")
    backend = fxmem.backend(memory_budget=budget, quantize="none")
    _, saved = _step("hand-written-attention", backend)
    (report,) = backend.reports
    assert report.reference_saved_bytes == default
    assert saved == report.predicted_saved_bytes <= (budget + SLACK) * default


class SparseEmbedding(nn.Module):
    """An embedding with sparse gradients (``sparse=True``) under a small MLP."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 32, sparse=True)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 4))

    def forward(self, idx: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.mlp(self.embed(idx).mean(1)), labels)


@pytest.mark.parametrize("budget", [0.7, 0.4])
def test_sparse_embedding_gradients_are_planned(budget):
    """The embedding's gradient is a sparse tensor, which has no storage of its own: the simulator counts
    its indices and values. (It asked for the storage, and the graph fell back to PyTorch's partitioner.)"""
    generator = torch.Generator().manual_seed(0)
    inputs = (torch.randint(0, 100, (8, 6), generator=generator), torch.randint(0, 4, (8,), generator=generator))
    assert_planned_within(budget, SparseEmbedding, inputs)


class BagsOfEmbeddings(nn.Module):
    """Bags of embeddings averaged (``nn.EmbeddingBag``, mode ``mean``, the offsets ending with the last
    bag's end) beside a plain embedding, under a small MLP."""

    def __init__(self):
        super().__init__()
        self.bags = nn.EmbeddingBag(100, 24, mode="mean", include_last_offset=True)
        self.embed = nn.Embedding(30, 24)
        self.mlp = nn.Sequential(nn.Linear(48, 64), nn.SiLU(), nn.Linear(64, 2))

    def forward(self, idx, offsets, categories, labels):
        features = torch.cat([self.bags(idx, offsets), self.embed(categories)], -1)
        return F.cross_entropy(self.mlp(features), labels)


@pytest.mark.parametrize("budget", [0.7, 0.4])
def test_embedding_bag_outputs_count_what_their_kernel_allocates(budget):
    """On the CPU, ``_embedding_bag`` allocates its offset2bag and (with the last offset included) its
    bag sizes one element longer than their fake values say: the prediction counts the storage the saved
    tensors hold (it was 16 bytes short)."""
    generator = torch.Generator().manual_seed(0)
    inputs = (
        torch.randint(0, 100, (60,), generator=generator),
        torch.tensor([0, 10, 25, 40, 41, 50, 60]),
        torch.randint(0, 30, (6,), generator=generator),
        torch.randint(0, 2, (6,), generator=generator),
    )
    assert_planned_within(budget, BagsOfEmbeddings, inputs)


class CayleyOrthogonal(nn.Module):
    """A weight kept orthogonal by the Cayley map, through ``torch.linalg.solve``: its error check is an
    effectful op, so the joint graph starts with an effect token."""

    def __init__(self):
        super().__init__()
        self.skew = nn.Parameter(torch.randn(16, 16) * 0.1)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        a = self.skew - self.skew.t()
        eye = torch.eye(16)
        weight = torch.linalg.solve(eye + a, eye - a)
        return F.cross_entropy(self.head(torch.tanh(x @ weight)), labels)


@pytest.mark.parametrize("budget", [0.7, 0.4])
def test_static_inputs_are_found_behind_an_effect_token(budget):
    """AOTAutograd's static input indices do not count the effect token in front of the joint graph's
    inputs. Read as positions, they took the batch for a parameter (free to hold): here the plan saved
    4,804 bytes at 0.7 where it predicted 2,756 (the batch's 2,048 bytes)."""
    generator = torch.Generator().manual_seed(0)
    inputs = (torch.randn(32, 16, generator=generator), torch.randint(0, 3, (32,), generator=generator))
    assert_planned_within(budget, CayleyOrthogonal, inputs)


class ChannelSplit(nn.Module):
    """ShuffleNet v2's unit: half the channels pass through, the other half (a strided view of the whole)
    feeds a convolution branch, and the halves are then shuffled."""

    def __init__(self, channels: int = 16, depth: int = 3):
        super().__init__()
        half = channels // 2
        self.inp = nn.Conv2d(3, channels, 3, padding=1)
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(half, half, 1),
                nn.ReLU(),
                nn.Conv2d(half, half, 3, padding=1, groups=half),
                nn.Conv2d(half, half, 1),
                nn.ReLU(),
            )
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        n, c, height, width = h.shape
        for branch in self.branches:
            kept, changed = h.chunk(2, dim=1)
            h = torch.cat([kept, branch(changed)], 1)
            h = h.view(n, 2, c // 2, height, width).transpose(1, 2).reshape(n, c, height, width)
        return h.square().mean()


@pytest.mark.parametrize("budget", [0.7, 0.4])
def test_a_saved_half_of_a_split_counts_its_whole_storage(budget):
    """The convolution's input is half of a channel split: saved, it holds the whole storage. The plan
    counted the half's own span (3/4 of it at batch 2) and held more than its budget: at 0.7, 48,768
    bytes against 42,624 counted. Such a half is now recomputed from the whole, which the plan counts."""
    inputs = (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)),)
    grads_ref, _ = fresh_step(ChannelSplit, inputs, None)
    backend = fxmem.backend(memory_budget=budget, codegen="eager", quantize="none")
    grads, saved = fresh_step(ChannelSplit, inputs, backend)
    (report,) = backend.reports
    assert report.fallback_reason is None
    assert saved == report.predicted_saved_bytes == report.plan.saved_bytes
    assert saved <= budget * report.reference_saved_bytes
    assert rel_err(grads, grads_ref) <= GRAD_TOL


class BatchHalves(nn.Module):
    """A convolution's output split in two along the batch: the half a second convolution reads is saved."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(3, 16, 3, padding=1)
        self.second = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        read, summed = self.first(x).chunk(2, dim=0)
        return self.second(read).square().mean() + summed.mean()


@pytest.mark.slow
@pytest.mark.parametrize("make", [ChannelSplit, BatchHalves], ids=["channel-halves", "batch-halves"])
def test_the_reference_counts_the_views_inductor_copies(make, inductor_cache):
    """Under layout optimization a convolution's output is channels-last. Inductor's forward saves a
    channel half of it (a ``chunk`` along dim 1) as a contiguous buffer of its own, and a batch half as a
    view of the whole output. The reference counted the whole output for both: on the channel split it
    was 6.9% over the default, and at 0.7 the plan held 0.740x of the default. Under Inductor the
    reference is now what the default holds; with the eager codegen it leaves out Inductor's copies of
    the weights, as the plans hold none."""
    inputs = (torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)),)
    grads_ref, _ = fresh_step(make, inputs, None)
    _, default = fresh_step(make, inputs, "inductor")
    weights = [p for p in make().parameters() if p.dim() == 4]
    weight_copies = sum(
        w.numel() * w.element_size() for w in weights if not w.is_contiguous(memory_format=torch.channels_last)
    )
    for codegen, reference in (("eager", default - weight_copies), ("inductor", default)):
        backend = fxmem.backend(memory_budget=0.7, codegen=codegen, quantize="none")
        grads, saved = fresh_step(make, inputs, backend)
        (report,) = backend.reports
        assert report.fallback_reason is None
        assert report.reference_saved_bytes == reference, codegen
        assert saved <= (0.7 + SLACK) * default, codegen
        assert rel_err(grads, grads_ref) <= GRAD_TOL, codegen
