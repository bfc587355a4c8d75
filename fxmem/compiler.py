"""The backend: ``torch.compile(model, backend="fxmem", options={...})``.

``FxmemCompiler`` takes the options once and compiles each Dynamo graph: AOTAutograd builds the joint
forward+backward graph, fxmem's partitioner splits it by its plan, and Inductor (or, with
``codegen="eager"``, a plain FX interpreter) runs the two halves.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx

from fxmem import _compat
from fxmem.config import FxmemConfig
from fxmem.partitioner import FxmemPartitioner
from fxmem.report import GraphReport

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
        if kwargs:
            raise ValueError(
                f"fxmem backend: unexpected arguments {sorted(kwargs)}; pass fxmem options as options={{...}}"
            )
        config = self.config
        if options:
            config = FxmemConfig.from_options({**self.config.as_dict(), **options})
        partitioner = FxmemPartitioner(config, on_report=self.reports.append)
        if config.codegen == "inductor":
            return _compat.compile_fx(gm, example_inputs, config_patches={"custom_partitioner_fn": partitioner})
        return _eager(gm, example_inputs, partitioner)


def _eager(gm: fx.GraphModule, example_inputs: Sequence[Any], partitioner: FxmemPartitioner) -> Any:
    def run_graph(graph_module: fx.GraphModule, _inputs: Any) -> Any:
        return _compat.make_boxed_func(graph_module.forward)

    return _compat.aot_autograd(fw_compiler=run_graph, bw_compiler=run_graph, partition_fn=partitioner)(
        gm, example_inputs
    )


def fxmem_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Any:
    """The entry point ``backend="fxmem"`` resolves to (options arrive as ``options={...}``)."""
    return FxmemCompiler()(gm, example_inputs, **kwargs)


def backend(config: FxmemConfig | None = None, **options: Any) -> FxmemCompiler:
    """``torch.compile(model, backend=fxmem.backend(memory_budget=0.4))``: options validated now."""
    return FxmemCompiler(config, **options)


def compile(model: torch.nn.Module, options: Mapping[str, Any] | None = None, **compile_kwargs: Any) -> Any:
    """``torch.compile(model, backend=fxmem.backend(**options), **compile_kwargs)``."""
    return torch.compile(model, backend=backend(**dict(options or {})), **compile_kwargs)
