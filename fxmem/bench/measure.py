"""Measuring a training step: what it saves for the backward, and how far its gradients are from eager's."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = [
    "SavedTensors", "add_note", "allocated_peak", "grad_error", "has_dropout", "joint_graphs", "reference_grads",
]  # fmt: skip


class SavedTensors:
    """Saved-tensor hooks that add up the distinct storages a step saves for the backward, leaving out
    parameters and buffers. ``add`` also counts tensors held by other means (checkpointed block inputs)."""

    def __init__(self, exclude: Any = ()):
        self.exclude = {self._key(t) for t in exclude}
        self.seen: set[tuple[str, int]] = set()
        self.bytes = 0
        self.by_dtype: dict[str, int] = {}
        self.active = False

    @staticmethod
    def _key(t: Any) -> tuple[str, int]:
        return str(t.device), t.untyped_storage().data_ptr()

    def add(self, t: Any) -> None:
        import torch

        if not self.active or not isinstance(t, torch.Tensor):
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse or an exotic subclass: no plain storage
            return
        key = (str(t.device), storage.data_ptr())
        if storage.nbytes() == 0 or key in self.exclude or key in self.seen:
            return
        self.seen.add(key)
        self.bytes += storage.nbytes()
        dtype = str(t.dtype).removeprefix("torch.")
        self.by_dtype[dtype] = self.by_dtype.get(dtype, 0) + storage.nbytes()

    def pack(self, t: Any) -> Any:
        self.add(t)
        return t

    @contextlib.contextmanager
    def recording(self) -> Iterator[SavedTensors]:
        import torch

        self.seen.clear()
        self.bytes = 0
        self.by_dtype = {}
        self.active = True
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
                yield self
        finally:
            self.active = False


def add_note(row: dict[str, Any], text: str) -> None:
    """Notes accumulate: a row may have several remarks."""
    row["note"] = f"{row['note']}; {text}" if row.get("note") else text


def has_dropout(model: Any) -> bool:
    import torch.nn as nn

    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())


def reference_grads(model: Any, inputs: tuple[Any, ...], autocast: Any) -> dict[str, Any]:
    """The gradients one eager forward + backward gives on a copy of ``model``: what a system's first step
    is compared with. The copy goes before the system touches the model; ``model`` is left as it was. The
    gradients are kept in host memory: on the device they would count as memory the compiled step trains
    with (fxmem's absolute budgets read how much is allocated when they compile)."""
    import copy

    import torch

    twin = copy.deepcopy(model)
    torch.manual_seed(0)
    with autocast:
        loss = twin(*inputs)
    loss.backward()
    grads = {name: None if p.grad is None else p.grad.cpu() for name, p in twin.named_parameters()}
    del twin, loss
    return grads


def grad_error(model: Any, reference: dict[str, Any]) -> float:
    """The largest, over parameters, of max|g - g_ref| / max|g_ref|: about 1e-6 for a lossless plan in fp32,
    1e-2 under bf16 autocast or with quantized activations, and about 1 when a gradient is wrong."""
    worst = 0.0
    for name, p in model.named_parameters():
        ref = reference.get(name)
        if p.grad is None and ref is None:
            continue
        if p.grad is None or ref is None:
            return float("inf")
        scale = ref.detach().abs().max().float().item()
        diff = (p.grad.detach().float().cpu() - ref.detach().float()).abs().max().item()
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def allocated_peak(fn: Any) -> tuple[Any, int]:
    """``(fn(), the most CPU memory allocated at once while it ran, over what was allocated before)``, from
    the profiler's memory events: allocations inside ops (workspaces) count, memory allocated before (the
    model, its inputs) does not. CPU only: on a GPU, ``torch.cuda.max_memory_allocated`` says the same."""
    from torch.profiler import ProfilerActivity, profile

    from fxmem import _compat

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    live = peak = 0
    for _, nbytes in _compat.allocation_events(prof):
        live += nbytes
        peak = max(peak, live)
    return result, peak


class _Captured(Exception):
    """Raised once a joint graph is copied, so that the step it belongs to never runs."""


def joint_graphs(model: Any, inputs: Any, *, run: bool = True) -> list[tuple[Any, list, dict]]:
    """The joint graphs of one training step of ``model(*inputs)`` as a partitioner receives them, with
    Inductor's decompositions (the graphs fxmem plans): ``(graph, joint inputs, partitioner kwargs)`` each,
    the graph a copy taken before PyTorch's partitioner splits it (the step runs without fxmem).

    ``run=False``: stop once the first joint graph is copied, so nothing is computed (tracing works on
    fake tensors): a full-size model on the CPU costs its weights and the tracing, not a step. Use it
    rather than the ``meta`` device, on which PyTorch traces ``nll_loss`` (so ``cross_entropy``) without
    its backward: the joint graph then computes no gradient."""
    import torch

    from fxmem import _compat
    from fxmem.partitioner import deepcopy_graph_module

    captured: list[tuple[Any, list, dict]] = []

    def record(gm: Any, joint_inputs: Any, **kwargs: Any) -> Any:
        # Outside the fake mode the partitioner runs in: under it, copying a real tensor constant of the
        # graph would make its copy a fake one, on the meta device, which fails.
        with _compat.unset_fake_temporarily():
            captured.append((deepcopy_graph_module(gm), list(joint_inputs), dict(kwargs)))
        if not run:
            raise _Captured
        return _compat.min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)

    def nop(gm: Any, _inputs: Any) -> Any:
        return _compat.make_boxed_func(gm.forward)

    backend = _compat.aot_autograd(
        fw_compiler=nop, bw_compiler=nop, partition_fn=record, decompositions=_compat.inductor_decompositions()
    )
    torch._dynamo.reset()
    try:
        torch.compile(model, backend=backend)(*inputs)
    except Exception as err:
        if run or not _raised_by(err, _Captured):
            raise
    finally:
        if not run:
            torch._dynamo.reset()  # the compile was cut short: nothing of it should be reused
    return captured


def _raised_by(err: BaseException | None, kind: type[BaseException]) -> bool:
    """Whether ``err`` is ``kind`` or was raised from one (Dynamo wraps a backend's exceptions)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return True
        seen.add(id(err))
        err = getattr(err, "inner_exception", None) or err.__cause__ or err.__context__
    return False
