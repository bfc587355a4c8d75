"""Memory accounting: the bytes a forward saves for the backward, as saved-tensor hooks would see them."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx

from fxmem import _compat

aten = torch.ops.aten


def _held_in(val: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The strided tensors that hold ``val``'s data: ``val``, or a sparse COO tensor's indices and values
    (an embedding's sparse gradient), which has no storage of its own."""
    return (val._indices(), val._values()) if val.layout == torch.sparse_coo else (val,)


def storage_key(val: Any) -> Any:
    """What identifies a tensor's storage (views share it); ``None`` for a non-tensor."""
    return _compat.StorageWeakRef(_held_in(val)[-1].untyped_storage()) if isinstance(val, torch.Tensor) else None


def storage_bytes(val: Any) -> int:
    """Bytes of a tensor's whole storage at the traced sizes; 0 for a non-tensor."""
    if not isinstance(val, torch.Tensor):
        return 0
    return sum(_compat.hint(t.untyped_storage().nbytes()) for t in _held_in(val))


def returns_view(target: Any) -> bool:
    """Whether an op's result aliases its first input (a view, or a list of views), by its schema."""
    if not isinstance(target, torch._ops.OpOverload):
        return False
    returns = target._schema.returns
    return len(returns) == 1 and returns[0].alias_info is not None and not returns[0].alias_info.is_write


def argument(node: fx.Node, name: str) -> Any:
    """What ``node`` passes its op's argument ``name`` (the schema's default where it passes nothing); None
    where the op has no such argument."""
    schema = getattr(node.target, "_schema", None)
    for i, arg in enumerate(schema.arguments if schema is not None else ()):
        if arg.name == name:
            return node.args[i] if i < len(node.args) else node.kwargs.get(name, arg.default_value)
    return None


def view_source(node: fx.Node) -> fx.Node | None:
    """The input a view node aliases (an item of a list of views included), by the op's schema rather
    than the fake values: graph passes that replace a node (Inductor's pattern rewrites) give it a value
    of its own, which no longer shares storage with the views taken of it. ``None`` for any other node."""
    source = node.args[0] if node.op == "call_function" and node.args else None
    if not isinstance(source, fx.Node):
        return None
    return source if returns_view(source.target if node.target is operator.getitem else node.target) else None


def view_chain(node: fx.Node) -> tuple[list[fx.Node], fx.Node]:
    """The views from ``node`` back towards the node whose value owns its storage (empty unless ``node``
    is a view), and that node."""
    chain = []
    while (source := view_source(node)) is not None:
        chain.append(node)
        node = source
    return chain, node


def is_result_item(node: fx.Node) -> bool:
    """Whether ``node`` takes one of an op's several results that owns its storage (not an item of a list
    of views, nor a result the op did not compute)."""
    source = node.args[0] if node.target is operator.getitem and node.args else None
    if not isinstance(source, fx.Node) or source.op != "call_function":
        return False
    return isinstance(node.meta.get("val"), torch.Tensor) and view_source(node) is None


def result_items(node: fx.Node) -> list[fx.Node]:
    """The items of an op's several results that own their storage (``is_result_item``): the op allocates
    them all, and each is freed after its own last reader. A recorded graph keeps their values only."""
    return [u for u in node.users if is_result_item(u)]


def storage_node(node: fx.Node) -> fx.Node:
    """The node whose value owns ``node``'s storage: ``node`` itself unless it is a view."""
    return view_chain(node)[1]


def distinct_storages(vals: Iterable[Any], static_vals: Iterable[Any]) -> list[torch.Tensor]:
    """One tensor per distinct storage among ``vals``, leaving out those of parameters and buffers."""
    seen = {storage_key(v) for v in static_vals if isinstance(v, torch.Tensor)}
    distinct = []
    for val in vals:
        if isinstance(val, torch.Tensor) and storage_key(val) not in seen:
            seen.add(storage_key(val))
            distinct.append(val)
    return distinct


def held_bytes(vals: Iterable[Any], static_vals: Iterable[Any]) -> int:
    """Bytes of the distinct storages among ``vals``, leaving out those of parameters and buffers:
    what ``torch.autograd.graph.saved_tensors_hooks`` sees the forward save."""
    return sum(storage_bytes(val) for val in distinct_storages(vals, static_vals))


def saved_storages(saved: Iterable[fx.Node], static_vals: Iterable[Any]) -> list[torch.Tensor]:
    """The storages that saving the nodes ``saved`` holds, parameters and buffers left out: a saved view
    holds its base's."""
    return distinct_storages([storage_node(node).meta.get("val") for node in saved], static_vals)


def static_vals(gm: fx.GraphModule, static_indices: Sequence[int]) -> list[Any]:
    """The fake values of the parameters and buffers among the graph's primal inputs."""
    primals = [n for n in gm.graph.find_nodes(op="placeholder") if _compat.is_primal(n)]
    wanted = set(static_indices)
    return [p.meta.get("val") for i, p in enumerate(primals) if i in wanted]


def saved_nodes(fw: fx.GraphModule, num_fwd_outputs: int) -> list[fx.Node]:
    (out,) = fw.graph.find_nodes(op="output")
    return [n for n in out.args[0][num_fwd_outputs:] if isinstance(n, fx.Node)]


_CONVOLUTION = torch.ops.aten.convolution.default


def _prefer_channels_last(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes Inductor's layout optimization lays out channels-last
    (``GraphLowering.find_nodes_prefer_channels_last``): convolutions, the nodes that reach one through any
    chain of ops but ``bmm``, and the nodes downstream of those up to the last convolution."""
    prefers: set[fx.Node] = set()
    last_convolution = None
    for node in reversed(gm.graph.nodes):
        if node.target is _CONVOLUTION:
            prefers.add(node)
            last_convolution = last_convolution or node
        elif node.target is not torch.ops.aten.bmm.default and not prefers.isdisjoint(node.users):
            prefers.add(node)
    for node in gm.graph.nodes:
        if node is last_convolution:
            break
        if node in prefers:
            prefers.update(user for user in node.users if user.target is not torch.ops.aten.bmm.default)
    return prefers


def channels_last_copies(gm: fx.GraphModule) -> set[fx.Node]:
    """The inputs of ``gm`` (a forward or joint graph) that Inductor's layout optimization copies to
    channels-last when the forward saves them: 4-d inputs that reach a convolution (a convolution weight's
    cast under autocast included), unless channels-last already. A saved parameter then holds a copy that
    counts, though the parameter itself does not. None when the optimization is off for ``gm``."""
    if not _compat.inductor_layout_opt(gm):
        return set()
    prefers = _prefer_channels_last(gm)
    copied = set()
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if node in prefers and isinstance(val, torch.Tensor) and val.dim() == 4:
            if not val.is_contiguous(memory_format=torch.channels_last):
                copied.add(node)
    return copied


def _stride_order(sizes: Sequence[int], strides: Sequence[int]) -> tuple[int, ...]:
    """The dims of more than one element, innermost first."""
    return tuple(sorted((d for d, size in enumerate(sizes) if size != 1), key=lambda d: (strides[d], d)))


def _dense(sizes: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether the elements fill their span exactly, in some order of the dims."""
    expected = 1
    for d in _stride_order(sizes, strides):
        if strides[d] != expected:
            return False
        expected *= sizes[d]
    return True


def _as_laid_out_by_inductor(chain: list[fx.Node], base: torch.Tensor) -> torch.Tensor:
    """A saved view as Inductor lays it out: the view ops of ``chain`` (from the view back towards the
    convolution whose output is ``base``) replayed on a channels-last tensor of ``base``'s sizes."""
    val = torch.empty([_compat.hint(s) for s in base.shape], dtype=base.dtype, device="meta")
    val = val.contiguous(memory_format=torch.channels_last)

    def hinted(arg: Any) -> Any:
        return _compat.hint(arg.meta["val"]) if isinstance(arg, fx.Node) else arg  # a size, if a node

    for node in reversed(chain):
        if node.target is operator.getitem:
            val = val[node.args[1]]
        else:
            args, kwargs = fx.node.map_aggregate((node.args[1:], node.kwargs), hinted)
            val = node.target(val, *args, **kwargs)
    return val


def inductor_copied_views(gm: fx.GraphModule, saved: Iterable[fx.Node]) -> set[fx.Node]:
    """The saved views of a convolution's output that Inductor's forward holds as buffers of their own.

    Under layout optimization a 2-d convolution's output is channels-last, while Inductor gives each
    forward output the stride order of its traced value (channels-last for a dense 4-d value it lays out
    channels-last) and copies a view whose order differs (``GraphLowering.run_node``). A channel slice of
    the output (half of a ``chunk``) then holds its own bytes, not the whole output's; a batch slice stays
    a view."""
    views = [(node, *view_chain(node)) for node in saved if isinstance(node.meta.get("val"), torch.Tensor)]
    views = [(node, chain, base) for node, chain, base in views if chain and base.target is _CONVOLUTION]
    if not views or not _compat.inductor_layout_opt(gm):  # most graphs save no such view: skip the heuristic
        return set()
    prefers = _prefer_channels_last(gm)
    copied = set()
    for node, chain, base in views:
        base_val, val = base.meta["val"], node.meta["val"]
        if base_val.dim() != 4:
            continue
        try:
            laid_out = _as_laid_out_by_inductor(chain, base_val)
        except Exception:  # a view op that does not replay on plain sizes: count the view as it is traced
            continue
        sizes = [_compat.hint(s) for s in val.shape]
        wanted = [_compat.hint(s) for s in val.stride()]
        if val.dim() == 4 and node in prefers and _dense(sizes, wanted):
            wanted = list(torch.empty(sizes, device="meta", memory_format=torch.channels_last).stride())
        if _stride_order(sizes, wanted) != _stride_order(sizes, laid_out.stride()):
            copied.add(node)
    return copied


def layout_copy_bytes(gm: fx.GraphModule, saved: list[fx.Node], static: list[Any]) -> int:
    """Bytes of the copies Inductor makes of saved parameters (a saved batch input counts once anyway)."""
    static_keys = {storage_key(v) for v in static if isinstance(v, torch.Tensor)}
    copied = channels_last_copies(gm)
    vals = [node.meta["val"] for node in saved if node in copied and storage_key(node.meta["val"]) in static_keys]
    return sum(_own_bytes(val) for val in vals)


def _own_bytes(val: torch.Tensor) -> int:
    return _compat.hint(val.numel()) * val.dtype.itemsize


# The outputs of ``_embedding_bag`` whose CPU kernel allocates one element more than their size, which their
# fake values do not show: offset2bag (output 1, where it is not empty) and, with include_last_offset, bag_size
# (output 2).
_EMBEDDING_BAGS = (aten._embedding_bag.default, aten._embedding_bag_forward_only.default)


def _overallocated_bytes(node: fx.Node) -> int:
    """Bytes ``node``'s kernel allocates beyond its value's size."""
    bag = node.args[0] if node.target is operator.getitem else None
    val = node.meta.get("val")
    if not (isinstance(bag, fx.Node) and bag.target in _EMBEDDING_BAGS and isinstance(val, torch.Tensor)):
        return 0
    output = node.args[1]
    over = (output == 1 and _compat.hint(val.numel()) > 0) or (output == 2 and argument(bag, "include_last_offset"))
    return val.dtype.itemsize if over and val.device.type == "cpu" else 0


def _stored_bytes(saved: list[fx.Node], static: list[Any]) -> int:
    """Bytes of the distinct storages that saving ``saved`` holds, parameters and buffers left out."""
    owners = {storage_node(node) for node in saved}
    return sum(storage_bytes(val) for val in saved_storages(saved, static)) + sum(map(_overallocated_bytes, owners))


def saved_bytes(
    gm: fx.GraphModule, saved: list[fx.Node], static: list[Any], *, codegen: str, parameter_copies: bool = True
) -> int:
    """What saved-tensor hooks will measure when ``saved`` (nodes of ``gm``, a forward or joint graph) are
    saved for the backward, parameters excluded. Under Inductor that counts the copies it makes of
    convolution outputs' views and, with ``parameter_copies``, of parameters."""
    if codegen != "inductor":
        return _stored_bytes(saved, static)
    copied = inductor_copied_views(gm, saved)
    total = _stored_bytes([n for n in saved if n not in copied], static)
    total += sum(_own_bytes(node.meta["val"]) for node in copied)
    if parameter_copies:
        total += layout_copy_bytes(gm, saved, static)
    return total


def predicted_saved_bytes(fw: fx.GraphModule, num_fwd_outputs: int, static: list[Any], *, codegen: str) -> int:
    """What saved-tensor hooks will measure for the forward module ``fw`` (parameters excluded)."""
    return saved_bytes(fw, saved_nodes(fw, num_fwd_outputs), static, codegen=codegen)


def read_by_backward(joint: fx.GraphModule, saved: list[fx.Node], num_fwd_outputs: int) -> list[fx.Node]:
    """Those of ``saved`` (values to save, tensors and sizes) that the backward of ``joint`` reads, when it
    computes everything else from them: PyTorch's split drops the others from what the forward saves."""
    _, bwd_outputs = _compat.fwd_bwd_outputs(joint, num_fwd_outputs)
    inputs, seen = set(saved), set()
    stack = [node for node in bwd_outputs if isinstance(node, fx.Node)]
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            if node not in inputs and node.op != "placeholder":
                stack.extend(node.all_input_nodes)
    return [node for node in saved if node in seen]


def outside_graph_bytes(gm: fx.GraphModule) -> int:
    """CUDA memory allocated now that is not one of the graph's inputs (optimizer state, other models):
    it stays live through the step, so an absolute budget must leave room for it. 0 off CUDA."""
    vals = [n.meta.get("val") for n in gm.graph.find_nodes(op="placeholder") if _compat.is_primal(n)]
    devices = {v.device for v in vals if isinstance(v, torch.Tensor) and v.device.type == "cuda"}
    if len(devices) != 1 or not torch.cuda.is_available():
        return 0
    inputs = held_bytes(vals, [])
    return max(0, torch.cuda.memory_allocated(devices.pop()) - inputs)
