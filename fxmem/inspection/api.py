"""``inspect(model, *inputs, **options)``: what fxmem would do to a model, without training it.

report = fxmem.inspect(model, x, y, memory_budget=0.4)
print(report.table())
report.plot_timeline("plan.png")
print(report.explain("addmm_1"))
"""

from __future__ import annotations

import copy
import inspect as _pyinspect
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from fxmem import _compat
from fxmem.inspection import dot, explain, plot, schema, table
from fxmem.inspection.timeline import Timeline, build_timeline
from fxmem.partitioner import simulating_reference
from fxmem.report import GraphReport, TensorRow, reports

log = logging.getLogger(__name__)


class UnknownTensorError(ValueError, KeyError):
    """``Report.explain`` was given a name that no graph's rows have (or one that several have)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Report:
    """The plans fxmem made for one or more graphs, with totals and ways to look at them.

    ``Report(fxmem.reports())`` wraps every graph planned so far in this process; ``inspect`` returns the
    graphs of one model.
    """

    def __init__(self, graphs: Iterable[GraphReport] | None = None):
        self.graphs: list[GraphReport] = list(reports() if graphs is None else graphs)

    def __repr__(self) -> str:
        return (
            f"Report({len(self.graphs)} graph(s), predicted_saved_bytes={self.predicted_saved_bytes}, "
            f"reference_saved_bytes={self.reference_saved_bytes})"
        )

    def __len__(self) -> int:
        return len(self.graphs)

    def __iter__(self) -> Iterator[GraphReport]:
        return iter(self.graphs)

    def __getitem__(self, index: int) -> GraphReport:
        return self.graphs[index]

    # ---- totals over the graphs (None where a graph does not know) ----

    @property
    def rows(self) -> list[TensorRow]:
        return [row for graph in self.graphs for row in graph.rows]

    @property
    def predicted_saved_bytes(self) -> int | None:
        return _sum(g.predicted_saved_bytes for g in self.graphs)

    @property
    def reference_saved_bytes(self) -> int | None:
        """What torch.compile's default partitioner would save."""
        return _sum(g.reference_saved_bytes for g in self.graphs)

    @property
    def budget_bytes(self) -> float | None:
        return _sum(g.budget_bytes for g in self.graphs)

    @property
    def predicted_peak_bytes(self) -> int | None:
        """The simulated peak, parameters included. Graphs run their forwards in order and their backwards
        in reverse, so graph ``i`` peaks on top of the other graphs' parameters and what graphs before it
        saved."""
        peaks = [getattr(g, "predicted_peak_bytes", None) for g in self.graphs]
        if not peaks or None in peaks:
            return None
        statics = [getattr(getattr(g, "timeline", None), "static_bytes", 0) or 0 for g in self.graphs]
        below, best = 0, 0
        for graph, peak, static in zip(self.graphs, peaks, statics, strict=True):
            best = max(best, peak + below + sum(statics) - static)
            below += graph.predicted_saved_bytes or 0
        return best

    @property
    def estimated_overhead(self) -> float | None:
        """Added time over the estimated step time, over the graphs fxmem planned."""
        planned = [g for g in self.graphs if g.plan is not None and g.estimated_step_s]
        step = sum(g.estimated_step_s for g in planned)  # type: ignore[misc]
        return sum(g.plan.added_s for g in planned) / step if step else None  # type: ignore[union-attr]

    @property
    def passes(self) -> list[tuple[int, str, float, str]]:
        """``(graph_id, pass name, seconds, summary)`` for every pass over every graph, in order."""
        return [(g.graph_id, p.name, p.seconds, p.summary) for g in self.graphs for p in g.passes]

    # ---- looking at it ----

    def table(self, *, params: bool = False, width: int | None = None, color: bool = False) -> str:
        """A table per graph and the totals, as a string (a rich table when rich is installed)."""
        return table.render(self, params=params, width=width, color=color)

    def summary(self) -> str:
        return table.report_totals(self)

    def to_dict(self) -> dict[str, Any]:
        return schema.report_dict(self.graphs)

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path

    def timeline(self) -> Timeline:
        """Saved activation memory over the forward+backward, fxmem vs torch.compile's default."""
        return build_timeline(self.graphs)

    def plot_timeline(self, path: str | Path, *, title: str | None = None) -> Path:
        """Draw ``timeline()`` to a PNG or SVG file (by suffix); needs matplotlib."""
        return plot.plot_timeline(self.timeline(), path, title=title)

    def to_dot(self, *, params: bool = False) -> str:
        """Graphviz DOT text: keep = grey, recompute = blue, quantize = orange."""
        return dot.to_dot(self.graphs, params=params)

    def explain(self, name: str, *, graph: int | None = None) -> str:
        """A paragraph on tensor ``name``; pass ``graph`` (a graph id) when several graphs have the name."""
        found = [(g, r) for g in self.graphs if graph is None or g.graph_id == graph for r in g.rows if r.name == name]
        if not found:
            where = f"graph {graph}" if graph is not None else "any graph"
            known = [r.name for g in self.graphs if graph is None or g.graph_id == graph for r in g.rows]
            hint = f"; known names include {', '.join(known[-8:])}" if known else ""
            raise UnknownTensorError(f"no tensor named {name!r} in {where}{hint}")
        if len(found) > 1:
            ids = ", ".join(str(g.graph_id) for g, _ in found)
            raise UnknownTensorError(f"{name!r} is in graphs {ids}; pass graph=<id> to pick one")
        return explain.explain_row(*found[0])


def _sum(values: Iterable[float | int | None]) -> Any:
    values = list(values)
    return None if not values or None in values else sum(values)  # type: ignore[arg-type]


def _compile_kwargs() -> dict[str, Any]:
    """Keep inspect's compilations out of the user's recompile budget where torch allows it."""
    if "isolate_recompiles" in _pyinspect.signature(torch.compile).parameters:
        return {"isolate_recompiles": True}
    return {}


def inspect(model: torch.nn.Module, *example_inputs: Any, **options: Any) -> Report:
    """Trace ``model(*example_inputs)`` and plan it as ``torch.compile(model, backend="fxmem",
    options=options)`` would, without training: a copy of the model runs one forward and no backward, so
    the model's parameters, buffers and ``.grad`` and the random state are left as they were.

    ``options`` are fxmem's (``memory_budget``, ``quantize``, ...); ``codegen`` defaults to ``"eager"``,
    which plans the same and compiles faster (pass ``codegen="inductor"`` for a reference that counts the
    channels-last copies torch.compile's default makes of convolution weights).
    """
    from fxmem.compiler import FxmemCompiler  # here: fxmem/__init__ imports this package

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"inspect: expected a torch.nn.Module, got {type(model).__name__}")
    compiler = FxmemCompiler(**{"codegen": "eager", **options})
    original = getattr(model, "_orig_mod", model)  # an already torch.compile'd module
    _check_not_on_meta(original, example_inputs)
    try:
        work = copy.deepcopy(original)
    except Exception as err:
        raise TypeError(f"inspect: cannot copy the model ({type(err).__name__}: {err}); it must deep-copy") from err
    compiled = torch.compile(work, backend=compiler, **_compile_kwargs())
    log.debug("fxmem.inspect: tracing %s with options %s", type(original).__name__, compiler.config.as_dict())
    try:
        with (
            _compat.compile_caches_off(),  # a compile served from a cache would leave no report
            torch.random.fork_rng(device_type=_device_type(original, example_inputs)),
            torch.enable_grad(),
            simulating_reference(),  # for the timeline picture
        ):
            output = compiled(*example_inputs)
    except Exception as err:
        inner = getattr(err, "inner_exception", None)  # torch.compile wraps what a backend raises
        if isinstance(inner, Exception) and type(inner).__module__.startswith("fxmem."):
            raise inner from err  # fxmem's own error (an unmeetable budget, ...), not torch's wrapper
        raise
    del output, compiled, work
    if not compiler.reports:
        raise RuntimeError(
            "inspect: fxmem planned no graph. The forward must need a backward (a parameter or an input with "
            "requires_grad=True), and torch.compile must not have fallen back to eager (see the warnings, "
            "e.g. a hit recompile limit)"
        )
    return Report(compiler.reports)


def _tensors(model: torch.nn.Module, inputs: tuple[Any, ...]) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers(), *(x for x in inputs if isinstance(x, torch.Tensor))]


def _check_not_on_meta(model: torch.nn.Module, inputs: tuple[Any, ...]) -> None:
    if any(t.device.type == "meta" for t in _tensors(model, inputs)):
        raise ValueError(
            "inspect: the model or its inputs are on the meta device, which fxmem cannot plan: PyTorch traces "
            "some ops there without their backward (nll_loss, so cross_entropy; broadcast_tensors, so "
            "mse_loss), leaving an empty or partial plan. Build the model on the CPU (inspect traces it and "
            "runs one forward) and pass device='h100' (or another profile) to plan for that GPU"
        )


def _device_type(model: torch.nn.Module, inputs: tuple[Any, ...]) -> str:
    devices = {t.device.type for t in _tensors(model, inputs)} - {"cpu"}
    return next(iter(sorted(devices)), "cuda")
