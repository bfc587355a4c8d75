"""The backend: ``torch.compile(model, backend="fxmem", options={...})``.

``FxmemCompiler`` takes the options once and compiles each Dynamo graph: AOTAutograd builds the joint
forward+backward graph, fxmem's partitioner splits it by its plan, and Inductor (or, with
``codegen="eager"``, a plain FX interpreter) runs the two halves. ``torch.compile``'s ``mode=`` reaches
Inductor as it would with the ``"inductor"`` backend.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
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
        mode = kwargs.pop("mode", None)
        if kwargs:
            raise ValueError(
                f"fxmem backend: unexpected arguments {sorted(kwargs)}; pass fxmem options as options={{...}}"
            )
        config = self.config
        if options:
            config = FxmemConfig.from_options({**self.config.as_dict(), **options})
        partitioner = FxmemPartitioner(config, on_report=self.reports.append)
        if config.codegen == "inductor":
            patches = {**_mode_config(mode), "custom_partitioner_fn": partitioner}
            return _compat.compile_fx(gm, example_inputs, config_patches=patches)
        if mode is not None:
            raise ValueError(f"fxmem backend: mode={mode!r} sets Inductor's config and needs codegen='inductor'")
        return _eager(gm, example_inputs, partitioner)


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
        return _compat.boxed_graph_function(graph_module)

    def partition(joint: fx.GraphModule, joint_inputs: Any, **kwargs: Any) -> Any:
        return partitioner(_compat.inductor_joint_graph_passes(joint), joint_inputs, **kwargs)

    return _compat.aot_autograd(
        fw_compiler=run_graph,
        bw_compiler=run_graph,
        partition_fn=partition,
        decompositions=_eager_decompositions(),
        # as Inductor asks: the forward's buffer updates stay in the graph (in training too), so that
        # PyTorch's default, the reference, reads a value written into a buffer from the buffer
        keep_inference_input_mutations=True,
    )(gm, example_inputs)


def _eager_decompositions() -> dict[Any, Any]:
    """Inductor's decompositions, so the eager codegen plans the joint graph Inductor would, except those
    of random ops (these draw as in eager mode, so a seed gives eager's random numbers) and of batch
    norm's backward (see ``_batch_norm_backward``)."""
    table = {
        op: fn
        for op, fn in _compat.inductor_decompositions().items()
        if torch.Tag.nondeterministic_seeded not in getattr(op, "tags", ())
    }
    batch_norm_backward = torch.ops.aten.native_batch_norm_backward.default
    table[batch_norm_backward] = functools.partial(_batch_norm_backward, table[batch_norm_backward])
    table[torch.ops.aten.native_dropout.default] = _native_dropout
    return table


# Batch norm's backward stays one op only where each channel has at least this many elements: its two
# statistics per channel are then at most 2/128 of its input (see _batch_norm_backward).
_WHOLE_BATCH_NORM_MIN_ELEMENTS = 128


def _batch_norm_backward(decomposed: Callable[..., Any], *args: Any) -> Any:
    """Batch norm's backward in training, on one dtype, stays one op: it reads the same forward tensors as
    its decomposition but for its statistics per channel, so the plan is Inductor's, while decomposing
    it was the largest part of a ResNet's first call. Decomposed, it lets the partitioner hold other
    tensors than the input, its mean and its inverse deviation: PyTorch's default then saves up to two
    channel vectors less. Where each channel has few elements (a BatchNorm1d on a small batch), those
    are a large part of what it saves (11% on a 4-row batch), and a fraction of the whole op's default
    would exceed that fraction of Inductor's; there it is decomposed. The whole op reads the batch's
    statistics, not the running ones (which the forward updates in place), so it is traced without
    them. Elsewhere too (eval mode, autocast's mixed dtypes): ``decomposed``, Inductor's decomposition."""
    grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, train, eps, output_mask = args
    dtypes = {t.dtype for t in (grad_out, input, weight, save_mean, save_invstd) if t is not None}
    per_channel = _compat.hint(input.numel()) // max(_compat.hint(input.shape[1]), 1)
    if not train or len(dtypes) > 1 or per_channel < _WHOLE_BATCH_NORM_MIN_ELEMENTS:
        return decomposed(*args)
    if running_mean is None and running_var is None:
        return NotImplemented  # make_fx traces it as is
    return torch.ops.aten.native_batch_norm_backward.default(
        grad_out, input, weight, None, None, save_mean, save_invstd, train, eps, output_mask
    )


def _native_dropout(input: torch.Tensor, p: float, train: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dropout as a random mask and a pointwise product: the backward can then recompute the output from
    the saved mask. Draws the same numbers as the eager kernel (``bernoulli_`` with the keep probability
    on a tensor shaped like the input)."""
    if train is not None and not train:
        return input.clone(), torch.ones_like(input, dtype=torch.bool)
    keep = 1.0 - p
    mask = torch.bernoulli(input, keep).to(torch.bool)
    return input * mask * (1.0 / keep if keep > 0 else 0.0), mask


def fxmem_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Any:
    """The entry point ``backend="fxmem"`` resolves to (options arrive as ``options={...}``)."""
    return FxmemCompiler()(gm, example_inputs, **kwargs)


def backend(config: FxmemConfig | None = None, **options: Any) -> FxmemCompiler:
    """``torch.compile(model, backend=fxmem.backend(memory_budget=0.4))``: options validated now."""
    return FxmemCompiler(config, **options)


def compile(model: torch.nn.Module, options: Mapping[str, Any] | None = None, **compile_kwargs: Any) -> Any:
    """``torch.compile(model, backend=fxmem.backend(**options), **compile_kwargs)``."""
    return torch.compile(model, backend=backend(**dict(options or {})), **compile_kwargs)
