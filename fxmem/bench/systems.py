"""How each system of the matrix is set up on a model: eager, eager with every block checkpointed,
torch.compile (with its activation-memory knobs) and fxmem; and what a row learns from fxmem afterwards."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from fxmem.bench.measure import SavedTensors, add_note

__all__ = ["BLOCK_NAMES", "checkpoint_blocks", "find_blocks", "fp8_note", "fxmem_predictions", "prepare"]

BLOCK_NAMES = ("blocks", "layers", "h", "stages")


def find_blocks(model: Any) -> tuple[str | None, list[Any]]:
    """The repeated blocks of a model: the children of the first ``nn.ModuleList``/``nn.Sequential`` named
    ``blocks``, ``layers``, ``h`` or ``stages``; a container of containers (ResNet's stages) is opened one
    level, so that each block, not each stage, is a unit."""
    import torch.nn as nn

    containers = (nn.ModuleList, nn.Sequential)
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in BLOCK_NAMES and isinstance(module, containers) and len(module) > 0:
            children = list(module)
            if all(isinstance(c, containers) for c in children):
                children = [block for c in children for block in c]
            return name, children
    return None, []


def checkpoint_blocks(model: Any, tracker: SavedTensors) -> str | None:
    from torch.utils.checkpoint import checkpoint

    name, blocks = find_blocks(model)
    for block in blocks:

        def forward(*args: Any, _inner: Callable[..., Any] = block.forward, **kwargs: Any) -> Any:
            for arg in args:  # checkpoint keeps its inputs alive for the backward, out of the hooks' sight
                tracker.add(arg)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = functools.update_wrapper(forward, block.forward)
    return None if name is None else f"checkpointed {len(blocks)} blocks under {name!r}"


def prepare(config: dict[str, Any], model: Any, tracker: SavedTensors, row: dict[str, Any]) -> Any:
    """The callable a step runs, set up for the configuration's system."""
    import torch

    system, options = config["system"], dict(config.get("options") or {})
    if system == "eager":
        return model
    if system == "eager+checkpoint":
        note = checkpoint_blocks(model, tracker)
        if note is None:
            row["skipped"] = "the model has no ModuleList/Sequential named blocks, layers, h or stages"
            return None
        add_note(row, note)
        return model
    if system == "torch.compile":
        if "activation_memory_budget" in options:
            torch._functorch.config.activation_memory_budget = float(options["activation_memory_budget"])
        if "activation_quantization_aten_pass" in options:
            fusion = dict(torch._inductor.config.post_grad_fusion_options)
            fusion["activation_quantization_aten_pass"] = dict(options["activation_quantization_aten_pass"])
            torch._inductor.config.post_grad_fusion_options = fusion
        return torch.compile(model, backend=options.get("backend", "inductor"), mode=options.get("mode"))
    if system == "fxmem":
        from fxmem.compiler import FxmemCompiler

        row["_compiler"] = FxmemCompiler(**options)
        return torch.compile(model, backend=row["_compiler"])
    raise ValueError(f"unknown system {system!r}")


def fxmem_predictions(row: dict[str, Any]) -> None:
    compiler = row.pop("_compiler", None)
    if compiler is None:
        return
    reports = list(compiler.reports)
    row["graphs"] = len(reports)
    for field in ("predicted_saved_bytes", "predicted_peak_bytes"):
        values = [getattr(r, field, None) for r in reports]
        row[field] = sum(values) if values and all(v is not None for v in values) else None
    fallbacks = [r.fallback_reason for r in reports if getattr(r, "fallback_reason", None)]
    if fallbacks:
        add_note(row, f"{len(fallbacks)} graph(s) fell back to PyTorch's partitioner: {fallbacks[0]}")


def fp8_note(config: dict[str, Any], row: dict[str, Any]) -> None:
    """Whether Inductor's fp8 pass left any fp8 tensor among the saved ones (it skips tensors under its
    size threshold and of other dtypes)."""
    if "activation_quantization_aten_pass" not in (config.get("options") or {}):
        return
    if not any(dtype.startswith("float8") for dtype in row.get("saved_by_dtype") or {}):
        add_note(row, "the fp8 pass quantized nothing (no saved tensor passed its dtype and size filters)")
