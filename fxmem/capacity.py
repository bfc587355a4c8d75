"""How large a batch fits in memory: ``max_batch_size(model, example_inputs, "8GiB")``.

The model is traced and planned once, with the batch dimension of its inputs marked dynamic, so every
tensor in fxmem's forward and backward graphs has a size that is a formula in the batch symbol. The
memory simulator is then run again over those graphs with the formulas in place of the traced sizes:
the result is the predicted peak as a function of the batch size ``B`` (``PeakModel``), exact at every
``B`` for the plan the trace produced. ``max_batch_size`` bisects it for the largest ``B`` that fits.

That plan is the one ``torch.compile(..., dynamic=True)`` training would run at every batch size: its
decisions are made at the traced size. Planned statically at another size, fxmem may decide differently
(the cost of recomputing a tensor against holding it changes with the size), so trace at a batch near the
one you expect. The peak is what fxmem's simulator predicts (parameters, saved activations, gradients and
the temporaries of one forward and backward); optimizer state and allocator overheads are not in it.

    import fxmem.capacity
    model, inputs = ...                                # inputs at any batch size >= 2
    fxmem.capacity.max_batch_size(model, inputs, "8GiB")
    peak = fxmem.capacity.peak_model(model, inputs)    # peak(B) in bytes, and its formula
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx

from fxmem import _compat
from fxmem.compiler import _eager
from fxmem.config import FxmemConfig, parse_bytes
from fxmem.inspection.api import Report, _compile_kwargs, _device_type
from fxmem.memory import saved_nodes, saved_storages, static_vals, storage_key
from fxmem.partitioner import FxmemPartitioner, _copy
from fxmem.report import GraphReport
from fxmem.simulate import Timeline, _Memory, walk_step

__all__ = ["PeakModel", "largest_fitting", "max_batch_size", "peak_model"]


DEFAULT_MAX_BATCH = 1 << 20
BATCH = sympy.Symbol("B", integer=True, positive=True)


# ---- arguments ----


def _budget_bytes(value: Any) -> int:
    if isinstance(value, str):
        return parse_bytes(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"memory_budget: bytes must be >= 0, got {value}")
        return value
    raise ValueError(
        f"memory_budget: expected bytes (an int) or a size string such as '8GiB', got {value!r}; "
        "max_batch_size bounds the predicted peak, so a fraction has no meaning here"
    )


def _batch_dim(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"batch_dim: expected an int, got {value!r}")
    return value


def _marked_inputs(example_inputs: Sequence[Any], batch_dim: int) -> tuple[list[Any], int]:
    """New tensor objects (sharing storage) with ``batch_dim`` marked dynamic, and the batch size: the
    caller's tensors are left unmarked."""
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    if not tensors:
        raise ValueError("max_batch_size: the example inputs have no tensor to take a batch dimension from")
    sizes = set()
    for i, x in enumerate(tensors):
        if not -x.dim() <= batch_dim < x.dim():
            raise ValueError(f"batch_dim: {batch_dim} is out of range for input {i} of shape {tuple(x.shape)}")
        sizes.add(int(x.shape[batch_dim]))
    if len(sizes) != 1:
        raise ValueError(f"batch_dim: the inputs disagree on the batch size along dim {batch_dim}: {sorted(sizes)}")
    (batch,) = sizes
    if batch < 2:
        raise ValueError(
            f"max_batch_size: the example batch has size {batch}; pass inputs with a batch of at least 2 "
            "(torch.compile specializes a dimension of size 0 or 1, so it cannot be traced as dynamic)"
        )
    marked = []
    for x in example_inputs:
        if isinstance(x, torch.Tensor):
            x = x.detach().requires_grad_(x.requires_grad)
            torch._dynamo.mark_dynamic(x, batch_dim % x.dim())
        marked.append(x)
    return marked, batch


# ---- the trace ----


@dataclass
class _Traced:
    fw: fx.GraphModule
    bw: fx.GraphModule
    num_fwd_outputs: int
    static: list[Any]
    report: GraphReport


class _RecordingPartitioner(FxmemPartitioner):
    """fxmem's partitioner that also keeps the forward and backward graphs it returns."""

    def __init__(self, config: FxmemConfig) -> None:
        self.reports: list[GraphReport] = []
        self.traced: list[_Traced] = []
        self._nonce = uuid.uuid4().hex
        super().__init__(config, on_report=self.reports.append)

    def __call__(self, gm: fx.GraphModule, joint_inputs: Sequence[object], **kwargs: Any):
        given = kwargs.get("static_lifetime_input_indices") or []
        static = static_vals(gm, _compat.static_input_positions(gm, given))
        fw, bw = super().__call__(gm, joint_inputs, **kwargs)
        # Copies of the graphs as planned (Inductor rewrites the ones it compiles); they share the fake values.
        self.traced.append(_Traced(_copy(fw), _copy(bw), kwargs["num_fwd_outputs"], static, self.reports[-1]))
        return fw, bw

    def uuid(self) -> str:
        # Unique, so that Inductor's caches never serve this trace: the graphs must be partitioned here to be
        # recorded. (None would not do: torch 2.13 keys a None uuid like no custom partitioner at all.)
        return f"fxmem-capacity-{self._nonce}"

    def __deepcopy__(self, memo: dict[int, Any]) -> _RecordingPartitioner:
        return self  # Inductor deep-copies its config (this included) to key its caches: share the records


def _backend(partitioner: _RecordingPartitioner) -> Callable[..., Any]:
    def compile_graph(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
        if partitioner.config.codegen == "inductor":
            patches = {"custom_partitioner_fn": partitioner}
            return _compat.compile_fx(gm, example_inputs, config_patches=patches)
        return _eager(gm, example_inputs, partitioner)

    return compile_graph


# ---- the simulator over formulas ----


class _FormulaMemory(_Memory):
    """The simulator's live-bytes ledger with each storage's size as a formula in ``BATCH``."""

    def __init__(self, formulas: dict[Any, Any]) -> None:
        super().__init__(0)
        self.formulas = formulas

    def hold(self, key: Any, nbytes: int) -> None:
        super().hold(key, self.formulas[key])


def _storage_formula(val: torch.Tensor, batch: int) -> Any:
    """The bytes of ``val``'s storage as a formula in ``BATCH``. Only the batch dimension was marked
    dynamic, so every symbol in a size stands for it: at ``B = batch`` the formula must give the traced
    size, else some other dimension is dynamic."""
    nbytes = val.untyped_storage().nbytes()
    expr = sympy.sympify(_compat.symbolic_expr(nbytes))
    formula = expr.xreplace(dict.fromkeys(expr.free_symbols, BATCH))
    try:
        traced = _compat.hint(nbytes)
    except Exception as err:  # a data-dependent size has no traced value
        raise ValueError(
            f"max_batch_size: a tensor of shape {tuple(val.shape)} has a data-dependent size; only the batch "
            "dimension may vary"
        ) from err
    if _at(formula, batch) != traced:
        raise ValueError(
            f"max_batch_size: a tensor of shape {tuple(val.shape)} has a dynamic size other than the batch "
            f"({batch}); only the batch dimension may be dynamic"
        )
    return formula


def _formulas(gms: Sequence[fx.GraphModule], batch: int) -> dict[Any, Any]:
    formulas: dict[Any, Any] = {}
    for gm in gms:
        for node in gm.graph.nodes:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and storage_key(val) not in formulas:
                formulas[storage_key(val)] = _storage_formula(val, batch)
    return formulas


@dataclass
class _GraphPeak:
    points: list[Any]  # distinct live-bytes formulas over the forward and backward
    saved: Any  # formula of the bytes the forward saves for the backward
    static_bytes: int
    report: GraphReport


def _simulate_formulas(t: _Traced, batch: int, fused: bool) -> _GraphPeak:
    """``fxmem.simulate.simulate`` over ``t``'s graphs, with sizes as formulas."""
    formulas = _formulas((t.fw, t.bw), batch)
    static_list = [v for v in t.static if isinstance(v, torch.Tensor)]
    static_keys = {storage_key(v) for v in static_list}
    distinct_static = {storage_key(v): v for v in static_list}.values()
    timeline = Timeline(static_bytes=sum(_compat.hint(v.untyped_storage().nbytes()) for v in distinct_static))
    walk_step(t.fw, t.bw, static_keys, fused, timeline, lambda: _FormulaMemory(formulas))
    points = list(dict.fromkeys(sympy.expand(b) for _, _, b in timeline.points)) or [
        sympy.Integer(timeline.static_bytes)
    ]
    # What the forward saves (parameters excluded; fxmem's forward saves no copy of one, see
    # fxmem.rewrite.save_inputs_in_place): fxmem.memory.predicted_saved_bytes over formulas.
    saved_list = saved_nodes(t.fw, t.num_fwd_outputs)
    saved: Any = sum(formulas[storage_key(val)] for val in saved_storages(saved_list, static_list))
    return _GraphPeak(_prune(points), sympy.expand(saved), timeline.static_bytes, t.report)


def _prune(points: list[Any]) -> list[Any]:
    """Drop formulas another formula bounds for every batch size (same or larger coefficients)."""
    polys = []
    for expr in points:
        try:
            poly = sympy.Poly(expr, BATCH)
        except sympy.PolynomialError:
            return points
        if not all(c.is_Integer for c in poly.all_coeffs()):
            return points
        polys.append((expr, poly.as_dict()))
    kept: list[tuple[Any, dict[Any, Any]]] = []
    for expr, coeffs in sorted(polys, key=lambda p: -sum(p[1].values())):
        dominated = any(all(other.get(k, 0) >= coeffs.get(k, 0) for k in {*coeffs, *other}) for _, other in kept)
        if not dominated:
            kept.append((expr, coeffs))
    return [expr for expr, _ in kept]


def _at(expr: Any, batch: int) -> int:
    value = expr.xreplace({BATCH: sympy.Integer(batch)}) if isinstance(expr, sympy.Basic) else expr
    return int(value)


# ---- the model ----


@dataclass
class PeakModel:
    """The predicted peak (bytes, parameters included) as a function of the batch size, for the plan
    fxmem made in one trace with the batch dimension dynamic. ``peak(B)`` evaluates it; graphs combine as
    in ``Report.predicted_peak_bytes`` (graph ``i`` peaks on top of the other graphs' parameters and what
    the graphs before it saved)."""

    traced_batch: int
    batch_dim: int
    graphs: list[_GraphPeak] = field(repr=False)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def reports(self) -> list[GraphReport]:
        return [g.report for g in self.graphs]

    def report(self) -> Report:
        """The trace's plans, as ``fxmem.inspect`` returns them (sizes at ``traced_batch``)."""
        return Report(self.reports)

    def __call__(self, batch: int) -> int:
        return self.peak(batch)

    def peak(self, batch: int) -> int:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch size: expected a positive int, got {batch!r}")
        statics = [g.static_bytes for g in self.graphs]
        below, best = 0, 0
        for graph, static in zip(self.graphs, statics, strict=True):
            peak = max(_at(p, batch) for p in graph.points)
            best = max(best, peak + below + sum(statics) - static)
            below += _at(graph.saved, batch)
        return best

    def saved(self, batch: int) -> int:
        """Bytes the forwards save for the backwards, over all graphs (parameters excluded)."""
        return sum(_at(g.saved, batch) for g in self.graphs)

    @property
    def formula(self) -> str:
        """The peak of each graph as ``Max(...)`` of its live-bytes formulas, in the batch size ``B``."""
        parts = [str(sympy.Max(*g.points)) for g in self.graphs]
        return parts[0] if len(parts) == 1 else " ; ".join(f"graph {i}: {p}" for i, p in enumerate(parts))


def peak_model(
    model: torch.nn.Module, example_inputs: Sequence[Any], *, batch_dim: int = 0, **options: Any
) -> PeakModel:
    """Trace ``model(*example_inputs)`` once with dimension ``batch_dim`` of every input tensor dynamic,
    plan it with fxmem ``options`` (``codegen`` defaults to ``"eager"``), and return the predicted peak as a
    function of the batch size. Like ``fxmem.inspect``, a deep copy of the model runs one forward and no
    backward: the model, its gradients and the random state are left as they were.

    Raises ``ValueError`` for bad arguments or when a size depends on anything but the batch dimension.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"max_batch_size: expected a torch.nn.Module, got {type(model).__name__}")
    batch_dim = _batch_dim(batch_dim)
    if "memory_budget" in options:
        raise ValueError("peak_model: memory_budget is max_batch_size's memory bound, not a planning option here")
    config = FxmemConfig.from_options({"codegen": "eager", **options})
    inputs, batch = _marked_inputs(example_inputs, batch_dim)
    partitioner = _RecordingPartitioner(config)
    original = getattr(model, "_orig_mod", model)
    try:
        work = copy.deepcopy(original)
    except Exception as err:
        raise TypeError(
            f"max_batch_size: cannot copy the model ({type(err).__name__}: {err}); it must deep-copy"
        ) from err
    compiled = torch.compile(work, backend=_backend(partitioner), **_compile_kwargs())
    try:
        with torch.random.fork_rng(device_type=_device_type(original, tuple(inputs))), torch.enable_grad():
            output = compiled(*inputs)
    except Exception as err:
        inner = getattr(err, "inner_exception", None)
        if isinstance(inner, Exception) and type(inner).__module__.startswith("fxmem."):
            raise inner from err
        raise
    del output, compiled, work
    if not partitioner.traced:
        raise RuntimeError(
            "max_batch_size: fxmem planned no graph; the forward must need a backward (a parameter or an "
            "input with requires_grad=True)"
        )
    fused = config.codegen == "inductor"
    graphs = [_simulate_formulas(t, batch, fused) for t in partitioner.traced]
    result = PeakModel(batch, batch_dim, graphs, config.as_dict())
    _check_against_reports(result)
    return result


def _check_against_reports(result: PeakModel) -> None:
    """At the traced size the formulas must give what the simulator gave when fxmem planned."""
    for graph in result.graphs:
        expected = graph.report.predicted_peak_bytes
        got = max(_at(p, result.traced_batch) for p in graph.points)
        if expected is not None and got != expected:
            raise RuntimeError(
                f"max_batch_size: the peak formula of graph {graph.report.graph_id} gives {got} bytes at the "
                f"traced batch {result.traced_batch}, the simulator {expected}"
            )


def max_batch_size(
    model: torch.nn.Module,
    example_inputs: Sequence[Any],
    memory_budget: int | str = "8GiB",
    *,
    batch_dim: int = 0,
    max_batch: int = DEFAULT_MAX_BATCH,
    **options: Any,
) -> int:
    """The largest batch size ``B <= max_batch`` whose predicted peak memory (parameters, activations and
    gradients of one forward+backward under fxmem's plan; not optimizer state) fits ``memory_budget``
    (bytes, or a size string such as ``"8GiB"``); 0 when not even ``B = 1`` fits.

    ``example_inputs`` are inputs at any batch size of at least 2, batched along ``batch_dim`` (every
    input tensor). The model is traced and planned once, with that dimension dynamic (see ``peak_model``);
    ``options`` are fxmem's planning options (``quantize``, ``recompute``, ``codegen``...). The answer holds
    for the plan of that trace, quantized payloads included: ``peak(B) <= memory_budget < peak(B + 1)``.
    """
    budget = _budget_bytes(memory_budget)
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch: expected a positive int, got {max_batch!r}")
    peak = peak_model(model, example_inputs, batch_dim=batch_dim, **options)
    return largest_fitting(peak, budget, max_batch)


def largest_fitting(peak: Callable[[int], int], budget: int, max_batch: int = DEFAULT_MAX_BATCH) -> int:
    """Bisect for the largest ``B`` in ``[0, max_batch]`` with ``peak(B) <= budget`` (``peak`` nondecreasing;
    whatever it is, the answer ``B`` has ``peak(B) <= budget < peak(B + 1)`` unless ``B`` is ``max_batch``)."""
    if peak(1) > budget:
        return 0
    if peak(max_batch) <= budget:
        return max_batch
    lo, hi = 1, max_batch  # peak(lo) fits, peak(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if peak(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo
