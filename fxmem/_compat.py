"""Every private-torch import fxmem uses, in one place.

These APIs move between releases. Supported: torch 2.11 to 2.14. When a release renames something,
fix it here and nowhere else.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from unittest import mock

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._functorch import config as _functorch_config
from torch._functorch import partitioners as _partitioners
from torch._functorch._aot_autograd.descriptors import ForwardTokenAOTInput, InputMutationAOTOutput
from torch._functorch._aot_autograd.utils import _is_primal, _is_tangent
from torch._functorch.aot_autograd import make_boxed_func
from torch._functorch.partitioners import (
    _extract_fwd_bwd_outputs,
    _must_be_in_backward,
    force_save_bw_mutation_src,
    force_save_collectives,
    force_save_effectful_ops,
    min_cut_rematerialization_partition,
)
from torch._guards import detect_fake_mode
from torch._inductor.custom_graph_pass import CustomPartitionerFn
from torch._prims_common import compute_elementwise_output_logical_to_physical_perm
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.fx._lazy_graph_module import _LazyGraphModule, _use_lazy_graph_module
from torch.fx.experimental.proxy_tensor import is_sym_node, make_fx
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.multiprocessing.reductions import StorageWeakRef

log = logging.getLogger(__name__)

__all__ = [
    "CustomPartitionerFn",
    "FakeTensorMode",
    "StorageWeakRef",
    "allocation_events",
    "aot_autograd",
    "boxed_graph_function",
    "compile_caches_off",
    "compile_fx",
    "counted_as_fusible",
    "default_saved_values",
    "detect_fake_mode",
    "extract_fwd_bwd_modules",
    "fwd_bwd_outputs",
    "force_save",
    "hint",
    "inductor_decompositions",
    "inductor_fallback_random",
    "inductor_joint_graph_passes",
    "inductor_layout_opt",
    "inductor_reads_realized_inputs",
    "inductor_realize_thresholds",
    "is_primal",
    "is_sym_node",
    "is_tangent",
    "make_boxed_func",
    "min_cut_rematerialization_partition",
    "must_be_in_backward",
    "mutated_inputs",
    "recorded_cuda_allocations",
    "size_oblivious",
    "static_input_positions",
    "symbolic_expr",
    "tensor_metadata",
    "torch_budget",
    "trace_with_decompositions",
    "unset_fake_temporarily",
    "without_torch_budget",
]

is_primal = _is_primal
is_tangent = _is_tangent
must_be_in_backward = _must_be_in_backward


def aot_autograd(**kwargs: Any) -> Any:
    from torch._dynamo.backends.common import aot_autograd as _aot_autograd

    return _aot_autograd(**kwargs)


def compile_fx(gm: fx.GraphModule, example_inputs: Any, config_patches: dict[str, Any]) -> Any:
    from torch._inductor.compile_fx import compile_fx as _compile_fx

    return _compile_fx(gm, example_inputs, config_patches=config_patches)


def inductor_modes() -> dict[str, dict[str, Any]]:
    """Each ``torch.compile(mode=...)`` this torch knows, with the Inductor config it sets."""
    from torch._inductor import list_mode_options

    return list_mode_options()


def inductor_decompositions() -> dict[Any, Any]:
    """The decompositions Inductor applies before partitioning: the eager codegen applies them too, so
    both codegens plan the same decomposed joint graph."""
    import torch._inductor.lowering  # noqa: F401 - some decompositions (max pooling) ask the lowerings
    from torch._inductor.decomposition import select_decomp_table

    return select_decomp_table()


def inductor_fallback_random() -> bool:
    """Inductor's ``fallback_random`` now: whether its graphs draw random numbers with eager's ops."""
    from torch._inductor import config

    return bool(config.fallback_random)


def inductor_joint_graph_passes(gm: fx.GraphModule) -> fx.GraphModule:
    """Inductor's clean-up of the joint graph before it partitions (no-op copies and aliases removed,
    uniform tensors folded), for the eager codegen, so that both codegens plan, and measure
    torch.compile's default on, the same graph. Its pattern rewrites run only on a graph with a batched
    matmul: there they fuse hand-written attention into one attention op, which changes what the default
    saves; elsewhere they changed no default's bytes on the models tried, and matching them is slow.
    Without its swap of random ops for Inductor's (the eager codegen draws eager's numbers). Off where
    Inductor's ``use_joint_graph_passes`` is off. Where a rewrite fails (torch 2.13 on ``x[randperm(n)]``,
    pytorch/pytorch#183988), the graph is planned without the rewrites rather than the compile failing:
    a WARNING says so."""
    from torch._inductor import config
    from torch._inductor.fx_passes import joint_graph
    from torch._inductor.pattern_matcher import stable_topological_sort

    if not getattr(config, "use_joint_graph_passes", True):
        return gm
    kwargs = {}
    if "input_device" in inspect.signature(joint_graph.joint_graph_passes).parameters:  # newer releases take it
        values = (node.meta.get("val") for node in gm.graph.find_nodes(op="placeholder"))
        devices = (v.device for v in values if isinstance(v, torch.Tensor) and v.device.type != "meta")
        kwargs["input_device"] = next(devices, None)
    batched_matmul = bool(gm.graph.find_nodes(op="call_function", target=torch.ops.aten.bmm.default))
    patterns = batched_matmul and config.pattern_matcher
    # Without the rewrites, their pattern tables need not load: 0.3-0.4 s of a first call in a fresh process.
    tables = contextlib.nullcontext() if patterns else mock.patch.object(joint_graph, "lazy_init", lambda *a, **k: None)
    try:
        with config.patch(fallback_random=True, pattern_matcher=patterns), tables:
            out = joint_graph.joint_graph_passes(gm, **kwargs)
    except Exception as err:  # noqa: BLE001 - the rewrites are optional; the plan is not
        if not patterns:
            raise
        log.warning("fxmem: Inductor's joint-graph pattern rewrites failed, planning without them: %s", err)
        with config.patch(fallback_random=True, pattern_matcher=False):
            out = joint_graph.joint_graph_passes(gm, **kwargs)
        stable_topological_sort(gm.graph)  # (rewrites applied before the failure may have left nodes out of order)
        gm.graph.lint()
        gm.recompile()
    return gm if out is None else out


def tensor_metadata(val: torch.Tensor) -> Any:
    """The ``tensor_meta`` that ``make_fx`` records for a node whose value is ``val``."""
    return _extract_tensor_metadata(val)


def memory_order(t: torch.Tensor) -> list[int]:
    """``t``'s dims from outermost to innermost in the layout ``torch.empty_like(t)`` gives (``t``'s own
    where it is dense, else its order of strides), answered for any size under symbolic strides."""
    return compute_elementwise_output_logical_to_physical_perm(t)[0]


def trace_with_decompositions(fn: Any, args: Any) -> fx.GraphModule:
    """``make_fx`` with Inductor's decompositions, so traced code matches the joint graph's op set."""
    with size_oblivious(args):
        return make_fx(fn, decomposition_table=inductor_decompositions())(*args)


def size_oblivious(values: Any) -> Any:
    """Where ``values`` (a tree of tensors and sizes) hold symbolic sizes: shape checks on them (is it
    contiguous? is a size 1?) answered as for any size, without a guard, so code fxmem adds to a graph
    serves every size, as the graph does, with no recompile. Where this release's size-oblivious tracing
    would give a padded tensor's slice a size it cannot name (torch 2.11 does), checks guard as usual: a
    recompile at sizes that fail them, never a lost plan."""
    from torch.fx.experimental import _config as shapes_config

    sizes = (d for v in pytree.tree_leaves(values) for d in (v.shape if isinstance(v, torch.Tensor) else (v,)))
    if not any(isinstance(d, torch.SymInt) for d in sizes) or not _oblivious_slices_stay_backed():
        return contextlib.nullcontext()
    return shapes_config.patch(backed_size_oblivious=True)


@functools.cache
def _oblivious_slices_stay_backed() -> bool:
    """Traced size-obliviously, does ``cat([x, pad])[:n]`` keep a size in ``x``'s symbols? (What every
    codec does: pad to whole groups, quantize, cut back to ``n`` elements.)"""
    from torch.fx.experimental import _config as shapes_config
    from torch.fx.experimental.symbolic_shapes import (
        DimDynamic,
        ShapeEnv,
        StatelessSymbolicContext,
        free_unbacked_symbols,
    )

    with unset_fake_temporarily():
        mode = FakeTensorMode(shape_env=ShapeEnv())
        context = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC])
        x = mode.from_tensor(torch.empty(6), symbolic_context=context)
        with mode, shapes_config.patch(backed_size_oblivious=True):
            n = x.shape[0]
            pad = (-n) % 4
            cut = torch.cat([x, x[-1:].expand(pad)]).view((n + pad) // 4, 4).reshape(-1)[:n]
        return not free_unbacked_symbols(cut.shape)


@contextlib.contextmanager
def compile_caches_off() -> Iterator[None]:
    """No compile served from Inductor's FX graph cache or AOTAutograd's cache, local or remote: a cached
    compile skips the partitioner. (``torch.compiler.config.force_disable_caches`` would also turn off
    Dynamo's profile-guided shapes, with a warning.)"""
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    with (
        inductor_config.patch(fx_graph_cache=False, fx_graph_remote_cache=False),
        functorch_config.patch(enable_autograd_cache=False, enable_remote_autograd_cache=False),
    ):
        yield


def inductor_layout_opt(fw: fx.GraphModule) -> bool:
    """Whether Inductor's heuristic turns on layout optimization (channels-last convs) for ``fw``."""
    from torch._inductor.graph import GraphLowering

    try:
        return bool(GraphLowering.decide_layout_opt(fw, is_inference=False))
    except Exception:  # the heuristic reads metadata a rewritten graph may lack: assume off
        return False


def force_save(joint_module: fx.GraphModule) -> None:
    """Tag the nodes PyTorch's partitioners never recompute (collectives, effectful ops, backward
    mutation sources) with ``MUST_SAVE``; fxmem honours the same tags."""
    from torch._functorch import config as functorch_config

    if not functorch_config.unsafe_allow_optimization_of_collectives:
        force_save_collectives(joint_module)
    force_save_effectful_ops(joint_module)
    force_save_bw_mutation_src(joint_module)


def fwd_bwd_outputs(joint_module: fx.GraphModule, num_fwd_outputs: int) -> tuple[list[Any], list[Any]]:
    fwd_outputs, bwd_outputs, *_ = _extract_fwd_bwd_outputs(joint_module, num_fwd_outputs=num_fwd_outputs)
    return list(fwd_outputs), list(bwd_outputs)


def partitioner_replaces_graph() -> bool:
    """Whether PyTorch's min-cut partitioner builds a new graph (its CSE pass) before it tags or changes any
    node: the graph it was given then stays as it came, but for its dead code, which is removed."""
    from torch._functorch import config as functorch_config

    return bool(functorch_config.cse)


class _SavedValuesChosen(Exception):
    def __init__(self, saved_values: list[fx.Node]):
        super().__init__("PyTorch's partitioner chose its saved values")
        self.saved_values = saved_values


@contextlib.contextmanager
def without_torch_budget() -> Iterator[None]:
    """PyTorch's partitioner, while this holds, runs with ``activation_memory_budget`` at its default
    (1.0: keep what its min-cut chooses), whatever the user set it to."""
    with _functorch_config.patch(activation_memory_budget=1.0):
        yield


def torch_budget() -> float:
    """The ``activation_memory_budget`` PyTorch's partitioner would run with now."""
    return float(_functorch_config.activation_memory_budget)


@contextlib.contextmanager
def counted_as_fusible(ops: Sequence[Any]) -> Iterator[None]:
    """PyTorch's partitioner, while this holds, counts ``ops`` (overload packets) as fusible: it may then
    recompute a forward value they read, as it may one that pointwise ops read."""

    def op_list() -> Any:
        op_types = default_op_list()
        fusible = copy.copy(op_types.fusible_ops)  # (the lists PyTorch returns may one day be shared)
        fusible.update(ops)
        return dataclasses.replace(op_types, fusible_ops=fusible)

    default_op_list = _partitioners.get_default_op_list
    with mock.patch.object(_partitioners, "get_default_op_list", op_list):
        yield


def default_saved_values(
    joint_module: fx.GraphModule, *, num_fwd_outputs: int, static_lifetime_input_indices: list[int]
) -> list[fx.Node]:
    """The values (tensors, then sizes) torch.compile's default partitioner (min-cut) chooses to save for
    ``joint_module``, without the cost of building its forward and backward: the partitioner runs until it
    would extract them. It prepares ``joint_module`` as always (dead code out, CSE, checkpoint tags), so
    partitioning it afterwards gives the same split. The split drops those the backward does not read.
    (It is stopped by patching its module while it runs: Dynamo compiles under one global lock.)

    Its min-cut runs with networkx's Boykov-Kolmogorov max-flow instead of the default preflow-push: the
    cut ``networkx.minimum_cut`` returns is read off the residual network, the same for every maximum
    flow, so the saved values are too (checked on the bundled models' graphs and two dozen others), while
    preflow-push's time on one graph ranged from 26 to 307 ms with the process it ran in, against 30-37 ms."""
    import networkx
    from networkx.algorithms.flow import boykov_kolmogorov

    def stop(_joint: fx.GraphModule, saved_values: list[fx.Node], *args: Any, **kwargs: Any) -> Any:
        saved_sym_nodes = kwargs.get("saved_sym_nodes", args[0] if args else [])
        raise _SavedValuesChosen([*saved_values, *saved_sym_nodes])

    minimum_cut = networkx.minimum_cut

    def cut(graph: Any, source: Any, sink: Any, **kwargs: Any) -> Any:
        return minimum_cut(graph, source, sink, **{"flow_func": boykov_kolmogorov, **kwargs})

    try:
        with (
            mock.patch.object(_partitioners, "_extract_fwd_bwd_modules", stop),
            mock.patch.object(networkx, "minimum_cut", cut),
        ):
            min_cut_rematerialization_partition(
                joint_module, [], compiler="inductor", num_fwd_outputs=num_fwd_outputs,
                static_lifetime_input_indices=static_lifetime_input_indices,
            )  # fmt: skip
    except _SavedValuesChosen as chosen:
        return chosen.saved_values
    raise RuntimeError("PyTorch's partitioner returned without extracting a forward and a backward")


_EXTRACT_PARAMS = inspect.signature(_partitioners._extract_fwd_bwd_modules).parameters


def extract_fwd_bwd_modules(
    joint_module: fx.GraphModule,
    saved_values: list[fx.Node],
    saved_sym_nodes: list[fx.Node],
    *,
    num_fwd_outputs: int,
    static_lifetime_input_nodes: Any,
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Split the joint graph so that the forward saves exactly ``saved_values`` (torch 2.13 added
    ``saved_opaque_nodes``; fxmem never saves opaque objects, so it passes none)."""
    kwargs: dict[str, Any] = dict(
        saved_sym_nodes=saved_sym_nodes,
        num_fwd_outputs=num_fwd_outputs,
        static_lifetime_input_nodes=static_lifetime_input_nodes,
    )
    if "saved_opaque_nodes" in _EXTRACT_PARAMS:
        kwargs["saved_opaque_nodes"] = []
    return _partitioners._extract_fwd_bwd_modules(joint_module, saved_values, **kwargs)


def module_around(root: fx.GraphModule, graph: fx.Graph) -> fx.GraphModule:
    """A graph module for ``graph`` taking its attributes from ``root``, lazy (code generated on first
    use) where ``root`` is."""
    cls = _LazyGraphModule if isinstance(root, _LazyGraphModule) else fx.GraphModule
    return cls(root, graph)


@contextlib.contextmanager
def lazy_graph_modules() -> Iterator[None]:
    """Graph modules made inside generate their Python code only when first run or read, as within
    ``torch.compile`` (where Dynamo turns this on)."""
    with _use_lazy_graph_module(True):
        yield


def generate_code(gm: fx.GraphModule) -> None:
    """Generate a lazy graph module's code now (a no-op for others), so its ``forward`` is the real one."""
    _LazyGraphModule.force_recompile(gm)


def boxed_graph_function(gm: fx.GraphModule) -> Callable[[list[Any]], Any]:
    """``gm``'s generated code as a boxed function (one list of inputs) that empties the list once it has
    read it, so that each input is freed at its last use, as in the code Inductor generates: a backward
    lets go of a saved tensor once it is done with it, not when it returns. (Where torch lacks FX's boxed
    code generator, the inputs stay alive until the function returns.)"""
    try:
        from torch.fx.graph import _BoxedCodeGen
    except ImportError:
        generate_code(gm)
        return make_boxed_func(gm.forward)
    gm.graph.set_codegen(_BoxedCodeGen())
    gm.recompile()
    generate_code(gm)
    forward = gm.forward

    def run(args: list[Any]) -> Any:
        return forward(args)

    run._boxed_call = True  # type: ignore[attr-defined]
    return run


def allocation_events(prof: Any) -> list[tuple[int, int]]:
    """``(time in ns, bytes)`` of every allocation (positive) and free (negative) a finished
    ``torch.profiler.profile(profile_memory=True)`` recorded, in time order, those inside ops included."""
    events = prof.profiler.kineto_results.events()
    return sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")


def inductor_reads_realized_inputs(target: Any) -> bool:
    """Whether Inductor runs an op as a kernel of its own that reads its inputs from memory (a fallback,
    or an op its lowering marks so), rather than as loops that compute their inputs inline."""
    from torch._inductor import lowering

    return target in lowering.needs_realized_inputs or not inductor_lowers(target)


def inductor_lowers(target: Any) -> bool:
    """Whether Inductor lowers an op to its own loops or templates, rather than calling it (a fallback)."""
    from torch._inductor import lowering

    return target in lowering.lowerings


def inductor_realize_thresholds(cpu: bool) -> tuple[int, int, int]:
    """Inductor's limits on inlining a loop body into the kernels that read it, on this torch: the buffers
    a reused one may read, the buffers any may read, and the ops any may compute (larger on the CPU
    where this torch sets CPU limits)."""
    from torch._inductor import config

    def limit(name: str, default: int) -> int:
        value = getattr(config, name, None)  # None on a torch that picks by device
        if value is None and cpu:
            value = getattr(config, name.replace("realize_", "realize_cpu_"), None)
        return int(getattr(config, f"_{name}_default", default) if value is None else value)

    return (
        getattr(config, "realize_reads_threshold", 4),
        limit("realize_acc_reads_threshold", 8),
        limit("realize_opcount_threshold", 30),
    )


@contextlib.contextmanager
def recorded_cuda_allocations(events: list[dict[str, Any]]) -> Iterator[None]:
    """Append to ``events`` the CUDA caching allocator's events on the current device inside the block:
    dicts with ``action`` (``alloc``, ``free_requested``, ``free_completed``, ...), ``addr``, ``size`` and,
    for allocations, the Python ``frames`` that made them (innermost first)."""
    torch.cuda.memory._record_memory_history("all", context="alloc", stacks="python")
    try:
        yield
        torch.cuda.synchronize()
        events.extend(torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()])
    finally:
        torch.cuda.memory._record_memory_history(None)


def static_input_positions(gm: fx.GraphModule, static_indices: Sequence[int]) -> list[int]:
    """Where the inputs AOTAutograd calls static (parameters, buffers) are among the joint graph ``gm``'s
    primal inputs. An effectful op (``aten._linalg_check_errors``, behind ``torch.linalg.solve``) puts
    effect tokens first among them, and AOTAutograd 2.11-2.13 leaves ``static_input_indices`` counting
    the inputs after the tokens for a joint graph (it shifts them for an inference graph only): read as
    positions, as PyTorch's partitioners read them, they are off by the number of tokens."""
    placeholders = gm.graph.find_nodes(op="placeholder")
    tokens = 0
    while tokens < len(placeholders) and isinstance(placeholders[tokens].meta.get("desc"), ForwardTokenAOTInput):
        tokens += 1
    return [i + tokens for i in static_indices]


def mutated_inputs(gm: fx.GraphModule) -> set[fx.Node]:
    """The joint graph's inputs whose data the forward mutates outside the graph: those AOTAutograd
    returns an updated value for, by the descriptors of the graph's inputs and outputs. It writes the
    value into the input right after the forward, before the backward runs."""
    (output,) = gm.graph.find_nodes(op="output")
    mutated = {d.mutated_input for d in output.meta.get("desc", ()) if isinstance(d, InputMutationAOTOutput)}
    return {n for n in gm.graph.find_nodes(op="placeholder") if n.meta.get("desc") in mutated}


def symbolic_expr(value: Any) -> Any:
    """The sympy expression behind an int or SymInt (a plain int stays an int)."""
    if isinstance(value, torch.SymInt):
        return value.node.expr
    return int(value)


def hint(value: Any) -> int:
    """A concrete value for an int or SymInt: the size seen when the graph was traced."""
    if isinstance(value, torch.SymInt):
        node = value.node
        if node.hint is not None:
            return int(node.hint)
        return int(node.shape_env.size_hint(node.expr))
    return int(value)
