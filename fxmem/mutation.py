"""Inputs the forward mutates in the graph (a buffer's step count, a weight clipped under ``no_grad``):
what the plan may hold of them and recompute from them. AOTAutograd applies each update right after the
forward, before the backward runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from fxmem import _compat

if TYPE_CHECKING:
    from fxmem.capture import JointGraph, TensorFacts


def mark_mutated_inputs(joint: JointGraph, gm: fx.GraphModule, primals: list[fx.Node], gradients: list[Any]) -> None:
    """Set the facts of the forward nodes an input mutation concerns; ``gradients`` are the joint graph's
    backward outputs, one per primal input."""
    _mark_overwritten(joint, _compat.mutated_inputs(gm) | _copied_into(joint.forward))
    _mark_written_into_parameters(joint, _trained(primals, gradients))


def _copied_into(forward: list[fx.Node]) -> set[fx.Node]:
    """The inputs the forward mutates in the graph (``copy_`` into a placeholder)."""
    targets = (n.args[0] for n in forward if n.target is torch.ops.aten.copy_.default)
    return {t for t in targets if isinstance(t, fx.Node) and t.op == "placeholder"}


def _mark_overwritten(joint: JointGraph, mutated: set[fx.Node]) -> None:
    """An input the forward mutates (a buffer updated in place) holds its new data by the time the backward
    runs: no view of it may be saved, and the input itself only as a copy of its value before the update
    (``NodeFacts.overwritten``), which is what every reader in the functionalized forward sees. What reads
    it may then be recomputed from that copy: a Transformer-XL memory's concatenation with the batch, or
    batch renormalisation's use of the running statistics, instead of holding what they made."""
    owners = {n.name for n in mutated}
    for node in joint.forward:
        facts = joint.facts[node]
        if facts.tensor is not None and facts.tensor.storage_owner in owners:
            facts.can_save = facts.can_recompute = False
            if node in mutated:
                facts.can_save = facts.overwritten = True


def _trained(primals: list[fx.Node], gradients: list[Any]) -> set[fx.Node]:
    """The inputs whose gradient the joint graph computes (it returns one gradient or None per input)."""
    if len(primals) != len(gradients):
        return set()
    return {p for p, grad in zip(primals, gradients, strict=True) if grad is not None}


def _mark_written_into_parameters(joint: JointGraph, trainable: set[fx.Node]) -> None:
    """A value the forward writes into a parameter it trains (weights clipped or decayed in place under
    no_grad, as a WGAN critic's) is what the parameter holds once the forward has run: the backward may
    read it from there, as eager's backward reads the parameter its ops saved, instead of the forward
    holding a copy. Autograd's version check guards the parameter until the backward, as in eager (a
    second forward before the backward raises in both). Not buffers: eager code reads those through
    clones (spectral norm's vectors) so that two forwards may run before one backward (a GAN's real and
    fake batches). Only a value laid out as the parameter is: ``copy_`` converts the layout, and the
    backward's views expect the value's strides."""
    parameters = trainable & joint.static_inputs
    copies: dict[fx.Node, list[fx.Node]] = {}
    for node in joint.forward:
        if node.target is torch.ops.aten.copy_.default and node.args[0] in parameters:
            copies.setdefault(node.args[0], []).append(node)
    for target, writes in copies.items():
        source = writes[0].args[1]
        if len(writes) != 1 or not isinstance(source, fx.Node) or source not in joint.facts:
            continue
        facts, into = joint.facts[source], joint.facts[target].tensor
        if facts.kind in ("view", "param", "input") or not facts.can_save or facts.tensor is None or into is None:
            continue
        if _layout(facts.tensor) == _layout(into):
            facts.written_into = target


def _layout(tensor: TensorFacts) -> tuple[Any, ...]:
    return tensor.shape, tensor.stride_hint, tensor.dtype
