"""Random draws the backward can replay instead of holding (the eager codegen).

A random op cannot be recomputed as it stands: it would draw other numbers. Here each random draw of the
forward becomes two nodes: a snapshot of its device's generator state, taken right before it, and the
draw made from that state. Given the snapshot the draw is deterministic, so the planner may recompute it
in the backward, holding the snapshot (5,056 bytes for the CPU generator, 16 for a CUDA device's) instead
of the draw or a mask made from it. The forward draws exactly as eager PyTorch does; the backward's
replays move the generator on, so the backward sets it back (``restoring_generators``). Inductor's
codegen needs none of this: it recomputes its own draws from seeds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from fxmem import _compat
from fxmem.capture import REPLAYED_DRAW, JointGraph
from fxmem.memory import argument

aten = torch.ops.aten
_DEVICE_TYPES = ("cpu", "cuda")
# Random ops whose first argument gives only the shape, strides, dtype and device of the draw, not its
# values (each draws into an empty tensor laid out like it): a replay draws into an empty tensor laid out
# like the draw, so it does not need that input held.
_LAYOUT_ONLY_INPUT = {
    getattr(getattr(aten, op, None), overload, None)
    for op, overload in (
        ("bernoulli", "p"), ("rand_like", "default"), ("randn_like", "default"), ("randint_like", "default"),
        ("randint_like", "low_dtype"), ("exponential", "default"), ("uniform", "default"),
        ("normal_functional", "default"), ("geometric", "default"), ("log_normal", "default"),
        ("cauchy", "default"), ("random", "default"), ("random", "from"), ("random", "to"),
    )
} - {None}  # fmt: skip
# Random ops whose every value is 0 or 1 (in whatever dtype they draw): lossless as a bitmask.
_BINARY_DRAWS = (aten.bernoulli.default, aten.bernoulli.p, aten.bernoulli.Tensor)


def generator_state(device: torch.device) -> torch.Tensor:
    """A copy of the state of ``device``'s default generator."""
    return torch.get_rng_state() if device.type == "cpu" else torch.cuda.get_rng_state(device)


# Tagged as torch tags its random ops, so that a snapshot is held and never recomputed (a recomputed
# one would be taken in the backward, after every draw of the forward).
generator_state.tags = (torch.Tag.nondeterministic_seeded,)  # type: ignore[attr-defined]


def _set_generator_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        torch.cuda.set_rng_state(state, device)


def draw_from_state(state: torch.Tensor, device: torch.device, op: Any, /, *args: Any, **kwargs: Any) -> Any:
    """``op(*args, **kwargs)`` drawn from the generator ``state``, which is left where the draw leaves it."""
    _set_generator_state(device, state)
    return op(*args, **kwargs)


def draw_like_from_state(
    state: torch.Tensor, device: torch.device, op: Any, size: list[int], stride: list[int], dtype: torch.dtype, /,
    *args: Any, **kwargs: Any,
) -> Any:  # fmt: skip
    """``draw_from_state`` of an op whose first input gives only the layout of the draw: an empty tensor of
    that layout stands for it, so that a replay reads no tensor but the state."""
    like = torch.empty_strided(size, stride, dtype=dtype, device=device)
    return draw_from_state(state, device, op, like, *args, **kwargs)


def make_draws_replayable(joint: JointGraph) -> bool:
    """Rewrite each random draw of ``joint``'s forward that a forward output depends on (so that the
    forward still draws it, in its place, and the draws after it get eager's numbers) as a snapshot and
    a draw from it. Whether anything changed: the graph then needs capturing again."""
    graph = joint.gm.graph
    changed = False
    for node in joint.forward:
        facts = joint.facts[node]
        if facts.kind != "random" or facts.backward_only or node.target is generator_state:
            continue
        val = node.meta.get("val")
        values = list(val) if isinstance(val, (list, tuple)) else [val]  # (an op of several outputs: RReLU's)
        if not values or not all(isinstance(v, torch.Tensor) and v.device == values[0].device for v in values):
            continue
        device = values[0].device
        if device.type not in _DEVICE_TYPES or argument(node, "generator") is not None:
            continue
        with graph.inserting_before(node):
            state = graph.call_function(generator_state, (device,))
            state.meta["val"] = _fake_state(values[0])
            layout = _static_layout(val) if node.target in _LAYOUT_ONLY_INPUT else None
            if layout is None:
                draw = graph.call_function(draw_from_state, (state, device, node.target, *node.args), node.kwargs)
            else:
                args = (state, device, node.target, *layout, *node.args[1:])
                draw = graph.call_function(draw_like_from_state, args, node.kwargs)
        draw.meta = {**node.meta, REPLAYED_DRAW: sum(_compat.hint(v.numel()) for v in values)}
        node.replace_all_uses_with(draw)
        graph.erase_node(node)
        changed = True
    return changed


def _fake_state(like: torch.Tensor) -> torch.Tensor:
    """A value standing for a generator state in the graph, made in the fake mode of ``like`` (the draw's
    value): the real state's size, on the CPU, where ``torch.get_rng_state`` keeps it for every device."""
    nbytes = generator_state(like.device).numel()
    with _compat.detect_fake_mode([like]) or contextlib.nullcontext():
        return torch.empty(nbytes, dtype=torch.uint8)


def _static_layout(val: torch.Tensor) -> tuple[list[int], list[int], torch.dtype] | None:
    """The sizes, strides and dtype of a draw's value (those its op gave the empty tensor it drew into),
    where they are plain integers: under dynamic shapes a replay reads the op's input itself."""
    if not all(isinstance(d, int) for d in (*val.shape, *val.stride())):
        return None
    return list(val.shape), list(val.stride()), val.dtype


def draws_zeros_and_ones(node: fx.Node) -> bool:
    """Whether ``node`` is a Bernoulli draw, as it stands or replayed: each of its values is 0 or 1."""
    replayed = node.target in (draw_from_state, draw_like_from_state)
    return (node.args[2] if replayed else node.target) in _BINARY_DRAWS


def replayed_devices(gm: fx.GraphModule) -> list[torch.device]:
    """The devices whose generators ``gm``'s replayed draws set."""
    graph = gm.graph
    draws = (n for f in (draw_from_state, draw_like_from_state) for n in graph.find_nodes(op="call_function", target=f))
    return list(dict.fromkeys(node.args[1] for node in draws))


def restoring_generators(run: Callable[[list[Any]], Any], devices: Sequence[torch.device]) -> Callable[..., Any]:
    """``run`` (a boxed function), leaving the CPU generator and those of ``devices`` as it found them."""
    cuda = [d.index if d.index is not None else torch.cuda.current_device() for d in devices if d.type == "cuda"]

    def restoring(args: list[Any]) -> Any:
        with torch.random.fork_rng(devices=cuda, device_type="cuda"):
            return run(args)

    restoring._boxed_call = True  # type: ignore[attr-defined]
    return restoring
