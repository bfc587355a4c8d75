"""The backend: ``torch.compile(model, backend="fxmem", options={...})``.

``FxmemCompiler`` takes the options once and compiles each Dynamo graph: AOTAutograd builds the joint
forward+backward graph, fxmem's partitioner splits it by its plan, and Inductor (or, with
``codegen="eager"``, a plain FX interpreter) runs the two halves. ``torch.compile``'s ``mode=`` reaches
Inductor as it would with the ``"inductor"`` backend.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx

from fxmem import _compat
from fxmem.config import FxmemConfig
from fxmem.decompositions import eager_decompositions
from fxmem.eager_ops import use_faster_ops
from fxmem.partitioner import FxmemPartitioner
from fxmem.report import GraphReport
from fxmem.rng import replayed_devices, restoring_generators

log = logging.getLogger(__name__)


class FxmemCompiler:
    """A Dynamo backend. ``reports`` collects one ``GraphReport`` per graph it planned."""

    def __init__(self, config: FxmemConfig | None = None, **options: Any):
        if config is not None and options:
            raise ValueError("pass either a FxmemConfig or keyword options, not both")
        self.config = config if config is not None else FxmemConfig.from_options(options)
        self.reports: list[GraphReport] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Any:
        options = kwargs.pop("options", None)
        mode = kwargs.pop("mode", None)
        if kwargs:
            raise ValueError(
                f"fxmem backend: unexpected arguments {sorted(kwargs)}; pass fxmem options as options={{...}}"
            )
        config = self.config
        if options:
            config = FxmemConfig.from_options({**self.config.as_dict(), **options})
        _warn_if_torch_budget_set(_compat.torch_budget())
        partitioner = FxmemPartitioner(config, on_report=self.reports.append)
        if config.codegen == "inductor":
            # The backward compiles at the first backward call and reads Inductor's config then; its graph
            # was split under the forward's fallback_random (whether random ops were kept as eager's), so
            # it compiles under that value too, as set inside a `with config.patch(...)` around the call.
            patches = {
                **_mode_config(mode), "custom_partitioner_fn": partitioner,
                "fallback_random": _compat.inductor_fallback_random(),
            }  # fmt: skip
            return _compat.compile_fx(gm, example_inputs, config_patches=patches)
        if mode is not None:
            raise ValueError(f"fxmem backend: mode={mode!r} sets Inductor's config and needs codegen='inductor'")
        return _eager(gm, example_inputs, partitioner)


@functools.cache  # once per value a process sets
def _warn_if_torch_budget_set(budget: float) -> None:
    if budget != 1.0:
        log.warning(
            "fxmem: torch._functorch.config.activation_memory_budget=%s is ignored: fxmem replaces the "
            "partitioner that reads it; set fxmem's memory_budget instead (fractions are of what "
            "torch.compile saves with no budget)", budget,
        )  # fmt: skip


def _mode_config(mode: str | None) -> dict[str, Any]:
    """The Inductor config ``torch.compile(mode=...)`` sets, as it would for the ``"inductor"`` backend."""
    if mode is None:
        return {}
    modes = _compat.inductor_modes()
    if mode not in modes:
        raise ValueError(f"fxmem backend: mode must be one of {', '.join(map(repr, modes))}; got {mode!r}")
    return dict(modes[mode])


def _eager(gm: fx.GraphModule, example_inputs: Sequence[Any], partitioner: FxmemPartitioner) -> Any:
    def run_graph(graph_module: fx.GraphModule, _inputs: Any) -> Any:
        use_faster_ops(graph_module)
        return _compat.boxed_graph_function(graph_module)

    def run_backward(graph_module: fx.GraphModule, _inputs: Any) -> Any:
        use_faster_ops(graph_module)
        run = _compat.boxed_graph_function(graph_module)
        devices = replayed_devices(graph_module)
        return restoring_generators(run, devices) if devices else run

    def partition(joint: fx.GraphModule, joint_inputs: Any, **kwargs: Any) -> Any:
        return partitioner(_compat.inductor_joint_graph_passes(joint), joint_inputs, **kwargs)

    return _compat.aot_autograd(
        fw_compiler=run_graph,
        bw_compiler=run_backward,
        partition_fn=partition,
        decompositions=eager_decompositions(),
        # as Inductor asks: the forward's buffer updates stay in the graph (in training too), so that
        # PyTorch's default, the reference, reads a value written into a buffer from the buffer
        keep_inference_input_mutations=True,
    )(gm, example_inputs)


def fxmem_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Any:
    """The entry point ``backend="fxmem"`` resolves to (options arrive as ``options={...}``)."""
    return FxmemCompiler()(gm, example_inputs, **kwargs)


def backend(config: FxmemConfig | None = None, **options: Any) -> FxmemCompiler:
    """``torch.compile(model, backend=fxmem.backend(memory_budget=0.4))``: options validated now."""
    return FxmemCompiler(config, **options)


def compile(model: torch.nn.Module, options: Mapping[str, Any] | None = None, **compile_kwargs: Any) -> Any:
    """``torch.compile(model, backend=fxmem.backend(**options), **compile_kwargs)``."""
    return torch.compile(model, backend=backend(**dict(options or {})), **compile_kwargs)
