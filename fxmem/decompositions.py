"""The decompositions the eager codegen traces the joint graph with: Inductor's, so that it plans the graph
Inductor would partition, but for a few ops kept as eager runs them.

Batch and group norm's backward stay one op where that leaves PyTorch's default plan, the reference for
fractional budgets, as it is on Inductor's graph: decomposing them was the largest part of the added
first-call time of a ResNet and of a GroupNorm UNet. The ops of their decompositions that read the forward's
tensors are pointwise, which PyTorch's partitioner counts as fusible; the whole op is not, and a forward
value a non-fusible backward op reads may not be recomputed. So the reference counts these ops as fusible
(``KEPT_WHOLE``): without that, PyTorch's default on a residual GroupNorm stack saved a residual sum
it recomputes on Inductor's graph (+8%).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from fxmem import _compat

aten = torch.ops.aten

# Devices whose dropout kernel draws its mask its own way (CUDA's is fused, from Philox offsets of its
# own), so a ``bernoulli`` mask would not be eager's: there dropout stays one op, held or replayed whole.
_FUSED_DROPOUT_DEVICES = ("cuda",)
# A norm's backward stays one op only where each of its statistics covers at least this many elements
# (a channel for batch norm, a group of a sample for group norm): they are then at most 2/128 of its input.
_WHOLE_NORM_MIN_ELEMENTS = 128


def eager_decompositions() -> dict[Any, Any]:
    """Inductor's decompositions, except those of random ops (these draw as in eager mode, so a seed gives
    eager's random numbers) and of batch and group norm's backward (kept whole where they can be)."""
    table = {
        op: fn
        for op, fn in _compat.inductor_decompositions().items()
        if torch.Tag.nondeterministic_seeded not in getattr(op, "tags", ())
    }
    for op, keep_whole in _KEEP_WHOLE.items():
        table[op.default] = functools.partial(keep_whole, table[op.default])
    table[aten.native_dropout.default] = _native_dropout
    return table


def _may_stay_whole(tensors: tuple[torch.Tensor | None, ...], elements_per_statistic: int) -> bool:
    """A norm's backward may stay one op on one dtype (autocast mixes them), and where each of its statistics
    covers at least ``_WHOLE_NORM_MIN_ELEMENTS`` elements."""
    dtypes = {t.dtype for t in tensors if t is not None}
    return len(dtypes) == 1 and elements_per_statistic >= _WHOLE_NORM_MIN_ELEMENTS


def _batch_norm_backward(decomposed: Callable[..., Any], *args: Any) -> Any:
    """Batch norm's backward in training, on one dtype, stays one op. Decomposed, it lets the partitioner
    hold other tensors than the input, its mean and its inverse deviation: PyTorch's default saved a
    channel vector less on a residual stack (0.7% of what it saved at 16 elements per channel). Where each
    channel has few elements such vectors are a large part of what it saves, and a fraction of the whole
    op's default would exceed that fraction of Inductor's; there it is decomposed. The whole op reads the
    batch's statistics, not the running ones (which the forward updates in place), so it is traced
    without them. Elsewhere too (eval mode, autocast's mixed dtypes): ``decomposed``, Inductor's."""
    grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, train, eps, output_mask = args
    per_channel = _compat.hint(input.numel()) // max(_compat.hint(input.shape[1]), 1)
    if not train or not _may_stay_whole((grad_out, input, weight, save_mean, save_invstd), per_channel):
        return decomposed(*args)
    if running_mean is None and running_var is None:
        return NotImplemented  # make_fx traces it as is
    return aten.native_batch_norm_backward.default(
        grad_out, input, weight, None, None, save_mean, save_invstd, train, eps, output_mask
    )


def _group_norm_backward(decomposed: Callable[..., Any], *args: Any) -> Any:
    """Group norm's backward, on one dtype, stays one op where each group of a sample has at least
    ``_WHOLE_NORM_MIN_ELEMENTS`` elements, batch norm's bound (on groups of 1 to 64 elements PyTorch's
    default saved the same either way); elsewhere, ``decomposed``."""
    grad_out, input, mean, rstd, weight, _n, channels, hw, groups, _mask = args
    per_group = _compat.hint(channels) // max(_compat.hint(groups), 1) * _compat.hint(hw)
    if not _may_stay_whole((grad_out, input, mean, rstd, weight), per_group):
        return decomposed(*args)
    return NotImplemented  # make_fx traces it as is


# The backward ops the eager codegen may keep whole, each with what decides where. The reference counts
# them as fusible, as their decompositions are.
_KEEP_WHOLE = {
    aten.native_batch_norm_backward: _batch_norm_backward,
    aten.native_group_norm_backward: _group_norm_backward,
}
KEPT_WHOLE = tuple(_KEEP_WHOLE)


def _native_dropout(input: torch.Tensor, p: float, train: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dropout as a random mask and a pointwise product: the backward can then recompute the output from
    the saved mask. Draws and rounds as the CPU kernel does (``bernoulli_`` with the keep probability on a
    tensor laid out like the input, scaled, then multiplied). On devices whose kernel is fused, the op as
    it is."""
    if input.device.type in _FUSED_DROPOUT_DEVICES:
        return NotImplemented  # make_fx traces it as is
    if train is not None and not train:
        return input.clone(), torch.ones_like(input, dtype=torch.bool)
    keep = 1.0 - p
    if keep == 0:  # eager zeroes the input without drawing
        return input * 0.0, torch.zeros_like(input, dtype=torch.bool)
    # Eager draws into ``empty_like(input)``, and a CPU draw fills memory in order, not index order: the
    # mask is drawn contiguous in the input's memory order, then permuted to its dims. It is drawn into a
    # new tensor, not from the input, as Inductor's ``rand`` is: a draw that reads the input made PyTorch's
    # default partition save more (the dropout's output beside its input and mask), and the reference with it.
    order = _compat.memory_order(input)
    noise = torch.empty([input.shape[d] for d in order], dtype=input.dtype, device=input.device)
    mask = torch.bernoulli(noise, keep)
    if order != list(range(input.dim())):
        mask = mask.permute([order.index(d) for d in range(input.dim())])
    mask = mask.to(torch.bool)
    # Scaled in the input's dtype before the product, as eager scales its mask: bf16 rounds the same way.
    return input * (mask.to(input.dtype) * (1.0 / keep)), mask
