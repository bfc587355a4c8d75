"""Synthetic solver problems for tests, benchmarks and research.

Numbers follow the default roofline cost model on an H100-like device (2.5 TB/s, 740 TFLOP/s bf16):
activations are bf16 tensors of a few MB; a pointwise op costs the bytes it moves over the bandwidth,
and recomputing it in the backward only 5% of that (it fuses into its consumer); a reduction costs half
its own time again; a matmul costs its FLOPs over the peak, in full. Quantized formats follow the
registered quantizers with groups of 128 elements (an fp32 scale and zero point per group), and their
added time is the bytes quantize and dequantize move.

Build a problem by hand with :class:`ProblemBuilder`, or take a family::

    from fxmem.solve.synthetic import ALL_FORMATS, BITS, transformer_like
    problem = transformer_like(4, budget_fraction=0.5)
    plan = get_solver("mincut")(problem, formats=ALL_FORMATS, bits=BITS)
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable, Sequence

from fxmem.solve.problem import Plan, Problem, QuantOption, SolverNode

MB = 1 << 20
BANDWIDTH = 2.5e12  # bytes/s
PEAK_FLOPS = 740e12  # bf16 FLOP/s
DTYPE_BYTES = 2  # bf16 activations
GROUP = 128  # elements per quantization group
QUANT_FUSION_FACTOR = 0.25
PRECISION_PENALTY = 4.0  # seconds of penalty per full-tensor pass, times the bits dropped below 8, over 8

# How much of an op's own time recomputing it adds, by kind (as the default cost model).
RECOMPUTE_FACTOR = {"view": 0.0, "getitem": 0.0, "pointwise": 0.05, "reduction": 0.5, "matmul": 1.0, "other": 1.0}

# The quantized formats of the registered quantizers: bits per element and bytes per group of scales.
# ``bitmask`` (a bool tensor at 1 bit per element) is lossless and admitted with the widest tier.
BITS = {"fp8": 8, "int8": 8, "int4": 4, "int2": 2, "bitmask": 8}
_GROUP_OVERHEAD = {"fp8": 4, "int8": 8, "int4": 8, "int2": 8}
FORMATS: tuple[str, ...] = ("int8", "int4", "int2")
# What a solver is offered in tests and benchmarks: the lossy formats plus the lossless bitmask.
ALL_FORMATS: tuple[str, ...] = (*FORMATS, "bitmask")


# ---------------------------------------------------------------------------------------------------------
# Cost helpers
# ---------------------------------------------------------------------------------------------------------


def stored_bytes(fmt: str, full_bytes: int, dtype_bytes: int = DTYPE_BYTES) -> int:
    """Bytes a ``full_bytes`` tensor of ``dtype_bytes``-byte elements holds in ``fmt``."""
    numel = full_bytes // dtype_bytes
    codes = -(-numel * BITS[fmt] // 8)
    return codes + _GROUP_OVERHEAD[fmt] * -(-numel // GROUP)


def quant_time(full_bytes: int, stored: int, bandwidth: float = BANDWIDTH) -> float:
    """Quantize (fused into the producer) plus dequantize (fused into the consumer)."""
    return (2 * stored + QUANT_FUSION_FACTOR * 2 * full_bytes) / bandwidth


def precision_penalty(full_bytes: int, bits: int, bandwidth: float = BANDWIDTH) -> float:
    """The price on lost precision that the default cost model puts on storing a tensor in ``bits``
    bits: nothing at 8 bits, growing as bits shrink, so a solver narrows a tensor only when it must."""
    return PRECISION_PENALTY * (8 - min(bits, 8)) / 8 * full_bytes / bandwidth


def quant_options(full_bytes: int, formats: Iterable[str] = FORMATS) -> tuple[QuantOption, ...]:
    """The quantized options of a bf16 tensor of ``full_bytes`` in each of ``formats``."""
    options = []
    for fmt in formats:
        stored = stored_bytes(fmt, full_bytes)
        penalty = precision_penalty(full_bytes, BITS[fmt])
        options.append(QuantOption(fmt, stored, quant_time(full_bytes, stored), penalty))
    return tuple(options)


def objective_s(problem: Problem, plan: Plan) -> float:
    """What the solvers minimise under a byte budget: the added time plus the precision penalty of
    the quantized formats the plan uses."""
    penalty = 0.0
    for name, fmt in plan.quantized.items():
        penalty += next(o.penalty_s for o in problem.by_name[name].quant_options if o.fmt == fmt)
    return plan.added_s + penalty


def pointwise_time(bytes_moved: float) -> float:
    return bytes_moved / BANDWIDTH


def matmul_time(m: int, n: int, k: int) -> float:
    """``[m, k] @ [k, n]`` at the peak, or its bytes over the bandwidth if that is longer."""
    return max(2.0 * m * n * k / PEAK_FLOPS, DTYPE_BYTES * (m * k + k * n + m * n) / BANDWIDTH)


def recompute_time(kind: str, own_s: float) -> float:
    return RECOMPUTE_FACTOR.get(kind, 1.0) * own_s


def keep_all_bytes(problem: Problem) -> int:
    """Bytes held when every required node that can be saved is saved at full precision (the
    ``torch.compile`` default without recomputation): the reference for fractional budgets."""
    return sum(n.save_bytes for n in problem.nodes if n.required and n.can_save)


def with_budget(
    problem: Problem,
    budget_bytes: float | None = None,
    max_added_s: float | None = None,
    *,
    fraction: float | None = None,
) -> Problem:
    """A copy of ``problem`` with a byte budget (absolute, or ``fraction`` of :func:`keep_all_bytes`)
    and/or a time budget. Nodes are shared, not copied."""
    if fraction is not None:
        budget_bytes = fraction * keep_all_bytes(problem)
    return dataclasses.replace(problem, budget_bytes=budget_bytes, max_added_s=max_added_s)


# ---------------------------------------------------------------------------------------------------------
# Builder
# ---------------------------------------------------------------------------------------------------------


class ProblemBuilder:
    """Build a ``Problem`` node by node::

        p = (ProblemBuilder()
             .input("x", 8 * MB)
             .op("h", ["x"], bytes=32 * MB, kind="matmul", recompute_s=40e-6).quantizable("int8", 16 * MB, 8e-6)
             .op("g", ["h"], bytes=32 * MB).require("h").require()
             .build(budget_bytes=40 * MB))

    ``op`` without ``recompute_s`` estimates it from the kind and the bytes moved. ``quantizable`` and
    ``require()`` without a name apply to the last node added.
    """

    def __init__(self) -> None:
        self._nodes: list[SolverNode] = []
        self._index: dict[str, int] = {}

    def _add(self, node: SolverNode) -> ProblemBuilder:
        if node.name in self._index:
            raise ValueError(f"node {node.name!r} is defined twice")
        missing = [i for i in node.inputs if i not in self._index]
        if missing:
            raise ValueError(f"node {node.name!r} reads undefined {missing}")
        self._index[node.name] = len(self._nodes)
        self._nodes.append(node)
        return self

    def _get(self, name: str | None) -> SolverNode:
        if not self._nodes:
            raise ValueError("no node defined yet")
        if name is None:
            return self._nodes[-1]
        if name not in self._index:
            raise ValueError(f"no node named {name!r}")
        return self._nodes[self._index[name]]

    def input(self, name: str, bytes: int, *, required: bool = False) -> ProblemBuilder:  # noqa: A002
        """A graph input: it can be saved but not recomputed."""
        node = SolverNode(name, (), save_bytes=int(bytes), can_recompute=False, required=required, kind="input")
        return self._add(node)

    def op(
        self,
        name: str,
        inputs: Sequence[str],
        *,
        bytes: int,  # noqa: A002
        recompute_s: float | None = None,
        kind: str = "pointwise",
        can_save: bool = True,
        can_recompute: bool = True,
        required: bool = False,
    ) -> ProblemBuilder:
        """An op reading ``inputs``; ``recompute_s`` defaults to the roofline estimate for a pointwise or
        reduction op moving its inputs and output once (pass it for matmuls)."""
        missing = [i for i in inputs if i not in self._index]
        if missing:
            raise ValueError(f"node {name!r} reads undefined {missing}")
        if recompute_s is None:
            moved = bytes + sum(self._get(i).save_bytes for i in inputs)
            recompute_s = recompute_time(kind, pointwise_time(moved))
        node = SolverNode(
            name,
            tuple(inputs),
            save_bytes=int(bytes),
            recompute_s=float(recompute_s),
            can_save=can_save,
            can_recompute=can_recompute,
            required=required,
            kind=kind,
        )
        return self._add(node)

    def quantizable(
        self, fmt: str, stored_bytes: int, added_s: float, *, penalty_s: float = 0.0, node: str | None = None
    ) -> ProblemBuilder:
        """Let ``node`` (default: the last one) be saved in ``fmt``, holding ``stored_bytes`` and adding
        ``added_s``; ``penalty_s`` prices the lost precision (minimised with the time, never reported)."""
        target = self._get(node)
        option = QuantOption(fmt, int(stored_bytes), float(added_s), float(penalty_s))
        target.quant_options = (*target.quant_options, option)
        return self

    def quantizable_as(self, formats: Iterable[str] = FORMATS, *, node: str | None = None) -> ProblemBuilder:
        """Let ``node`` (default: the last one) be saved in each of the standard ``formats``."""
        target = self._get(node)
        target.quant_options = (*target.quant_options, *quant_options(target.save_bytes, formats))
        return self

    def require(self, name: str | None = None) -> ProblemBuilder:
        """Mark ``name`` (default: the last node) as read by the backward."""
        self._get(name).required = True
        return self

    def build(self, *, budget_bytes: float | None = None, max_added_s: float | None = None) -> Problem:
        nodes = [dataclasses.replace(n) for n in self._nodes]
        return Problem(nodes, budget_bytes=budget_bytes, max_added_s=max_added_s)


# ---------------------------------------------------------------------------------------------------------
# Families
# ---------------------------------------------------------------------------------------------------------


def _finish(
    b: ProblemBuilder, budget_bytes: float | None, max_added_s: float | None, budget_fraction: float | None
) -> Problem:
    problem = b.build(budget_bytes=budget_bytes, max_added_s=max_added_s)
    if budget_fraction is not None:
        problem.budget_bytes = budget_fraction * keep_all_bytes(problem)
    return problem


def _pointwise(b: ProblemBuilder, name: str, inputs: Sequence[str], nbytes: int, formats: Sequence[str]) -> None:
    b.op(name, inputs, bytes=nbytes, kind="pointwise").quantizable_as(formats)


def chain(
    n: int,
    *,
    mb: float = 16.0,
    matmul_every: int = 4,
    seed: int | None = 0,
    formats: Sequence[str] = FORMATS,
    budget_bytes: float | None = None,
    max_added_s: float | None = None,
    budget_fraction: float | None = None,
) -> Problem:
    """An input and ``n - 1`` ops in a line, all read by the backward. Every ``matmul_every``-th op is a
    matmul (expensive to recompute), the rest pointwise (nearly free). Sizes vary ±50% with ``seed``
    (``None``: all equal to ``mb`` MB)."""
    rng = random.Random(seed)
    tokens = 8192

    def size() -> int:
        scale = 1.0 if seed is None else rng.uniform(0.5, 1.5)
        return int(mb * scale * MB) // 256 * 256

    b = ProblemBuilder().input("x", size(), required=True)
    prev = "x"
    for i in range(1, n):
        nbytes = size()
        name = f"n{i}"
        if matmul_every and i % matmul_every == 0:
            width = nbytes // (tokens * DTYPE_BYTES)
            t = matmul_time(tokens, width, width)
            b.op(name, [prev], bytes=nbytes, kind="matmul", recompute_s=t).quantizable_as(formats)
        else:
            _pointwise(b, name, [prev], nbytes, formats)
        b.require()
        prev = name
    return _finish(b, budget_bytes, max_added_s, budget_fraction)


def diamond(
    count: int = 1,
    *,
    width: int = 2,
    mb: float = 16.0,
    formats: Sequence[str] = FORMATS,
    budget_bytes: float | None = None,
    max_added_s: float | None = None,
    budget_fraction: float | None = None,
) -> Problem:
    """``count`` diamonds in a row: a matmul fans out to ``width`` branches (a pointwise op then a
    reduction each) that an add joins. Every op is read by the backward."""
    tokens = 8192
    nbytes = int(mb * MB)
    hidden = nbytes // (tokens * DTYPE_BYTES)
    b = ProblemBuilder().input("x", nbytes, required=True)
    prev = "x"
    for d in range(count):
        top = f"d{d}_top"
        b.op(top, [prev], bytes=nbytes, kind="matmul", recompute_s=matmul_time(tokens, hidden, hidden))
        b.quantizable_as(formats).require()
        ends = []
        for w in range(width):
            branch = f"d{d}_b{w}"
            _pointwise(b, branch, [top], nbytes, formats)
            b.require()
            b.op(f"{branch}_red", [branch], bytes=nbytes, kind="reduction").quantizable_as(formats).require()
            ends.append(f"{branch}_red")
        prev = f"d{d}_join"
        b.op(prev, ends, bytes=nbytes, kind="pointwise").quantizable_as(formats).require()
    return _finish(b, budget_bytes, max_added_s, budget_fraction)


def long_skips(
    n: int,
    *,
    levels: int | None = None,
    mb: float = 32.0,
    formats: Sequence[str] = FORMATS,
    budget_bytes: float | None = None,
    max_added_s: float | None = None,
    budget_fraction: float | None = None,
) -> Problem:
    """A U-Net of about ``n`` nodes. The encoder has ``levels`` levels (default: up to 5) of conv
    (matmul-like) + activation blocks, the activations halving in size (and channels doubling) from one
    level to the next; a bottleneck conv; then a decoder whose first block at each level reads the level
    below and the encoder's output at the same level (a long skip connection, live for most of the
    backward). Larger ``n`` gives more blocks per level."""
    if levels is None:
        levels = min(5, max(1, (n - 2) // 4))
    blocks = max(1, round((n - 2) / (4 * levels)))
    top = int(mb * MB)
    b = ProblemBuilder().input("img", top, required=True)
    prev, skips = "img", []
    pixels0 = top // (64 * DTYPE_BYTES)  # 64 channels at the top level

    def block(name: str, inputs: list[str], size: int, pixels: int, channels: int, fan_in: int) -> str:
        conv = matmul_time(pixels, channels, 9 * fan_in)
        b.op(f"{name}_conv", inputs, bytes=size, kind="matmul", recompute_s=conv).quantizable_as(formats).require()
        _pointwise(b, f"{name}_act", [f"{name}_conv"], size, formats)
        b.require()
        return f"{name}_act"

    shapes = []
    for lvl in range(levels):
        size, channels = top >> lvl, 64 << lvl
        pixels = max(1, pixels0 >> (2 * lvl))
        shapes.append((size, pixels, channels))
        for k in range(blocks):
            prev = block(f"enc{lvl}_{k}", [prev], size, pixels, channels, channels)
        skips.append(prev)
    size, pixels, channels = shapes[-1]
    conv = matmul_time(pixels, channels, 9 * channels)
    b.op("mid_conv", [prev], bytes=size, kind="matmul", recompute_s=conv).quantizable_as(formats).require()
    prev = "mid_conv"
    for lvl in reversed(range(levels)):
        size, pixels, channels = shapes[lvl]
        for k in range(blocks):
            inputs = [prev, skips[lvl]] if k == 0 else [prev]
            prev = block(f"dec{lvl}_{k}", inputs, size, pixels, channels, channels * len(inputs))
    return _finish(b, budget_bytes, max_added_s, budget_fraction)


def transformer_like(
    layers: int,
    *,
    tokens: int = 8192,
    hidden: int = 1024,
    pointwise: int = 2,
    dropout: bool = True,
    formats: Sequence[str] = FORMATS,
    budget_bytes: float | None = None,
    max_added_s: float | None = None,
    budget_fraction: float | None = None,
) -> Problem:
    """Per layer: an up-projection matmul, a chain of ``pointwise`` ops (an activation, a scale), a
    dropout mask (random: not recomputable; a bool tensor stored as a bitmask), a reduction (a norm),
    a down-projection matmul and the residual add."""
    act = tokens * hidden * DTYPE_BYTES
    wide = 4 * act
    b = ProblemBuilder().input("x0", act, required=True).quantizable_as(formats)  # the embeddings
    x = "x0"
    for layer in range(layers):
        p = f"l{layer}_"
        b.op(p + "up", [x], bytes=wide, kind="matmul", recompute_s=matmul_time(tokens, 4 * hidden, hidden))
        b.quantizable_as(formats).require()
        prev = p + "up"
        for k in range(pointwise):
            _pointwise(b, f"{p}pw{k}", [prev], wide, formats)
            b.require()
            prev = f"{p}pw{k}"
        if dropout:
            mask_bytes = wide // DTYPE_BYTES
            b.op(p + "mask", [prev], bytes=mask_bytes, kind="random", recompute_s=0.0, can_recompute=False)
            b.quantizable("bitmask", mask_bytes // 8, quant_time(mask_bytes, mask_bytes // 8)).require()
            _pointwise(b, p + "drop", [prev, p + "mask"], wide, formats)
            prev = p + "drop"
        b.op(p + "norm", [prev], bytes=wide, kind="reduction").quantizable_as(formats).require()
        down = matmul_time(tokens, hidden, 4 * hidden)
        b.op(p + "down", [p + "norm"], bytes=act, kind="matmul", recompute_s=down).quantizable_as(formats)
        # A view of the down-projection: free to recompute, never saved on its own.
        b.op(p + "view", [p + "down"], bytes=act, kind="view", recompute_s=0.0, can_save=False).require()
        b.op(p + "res", [x, p + "view"], bytes=act, kind="pointwise").quantizable_as(formats).require()
        x = p + "res"
    return _finish(b, budget_bytes, max_added_s, budget_fraction)


_KINDS = ("pointwise", "pointwise", "pointwise", "reduction", "matmul", "view", "random")


def random_dag(
    n: int,
    seed: int = 0,
    *,
    inputs: int = 2,
    required_p: float = 0.6,
    formats: Sequence[str] = FORMATS,
    budget_bytes: float | None = None,
    max_added_s: float | None = None,
    budget_fraction: float | None = None,
) -> Problem:
    """``n`` nodes, the first ``inputs`` of them graph inputs; each op reads 1 to 3 earlier nodes,
    mostly recent ones. Sizes are log-uniform in 1..64 MB; kinds are mostly pointwise, with
    reductions, matmuls, views (recomputable, never saved) and random ops (saved, never recomputed).
    About ``required_p`` of the ops are read by the backward, and always the last one."""
    rng = random.Random(seed)
    b = ProblemBuilder()
    names: list[str] = []
    for i in range(min(inputs, n)):
        b.input(f"in{i}", int(2 ** rng.uniform(0, 6) * MB), required=rng.random() < 0.5)
        names.append(f"in{i}")
    for i in range(len(names), n):
        fan_in = min(len(names), rng.choice((1, 1, 1, 2, 2, 3)))
        srcs: list[str] = []
        while len(srcs) < fan_in:
            back = min(len(names), 1 + int(rng.expovariate(1 / 4)))
            cand = names[-back]
            if cand not in srcs:
                srcs.append(cand)
        kind = rng.choice(_KINDS)
        name = f"v{i}"
        nbytes = int(2 ** rng.uniform(0, 6) * MB) // 256 * 256
        required = i == n - 1 or rng.random() < required_p
        if kind == "matmul":
            k = max(64, int(2 ** rng.uniform(9, 13)))
            m = nbytes // (DTYPE_BYTES * k) or 1
            b.op(name, srcs, bytes=nbytes, kind=kind, recompute_s=matmul_time(m, k, k), required=required)
            b.quantizable_as(formats)
        elif kind == "view":
            src_bytes = b._get(srcs[0]).save_bytes
            b.op(name, srcs[:1], bytes=src_bytes, kind=kind, recompute_s=0.0, can_save=False, required=required)
        elif kind == "random":  # a dropout mask: one byte per element, stored as a bitmask
            own = pointwise_time(nbytes)
            b.op(name, srcs, bytes=nbytes, kind=kind, recompute_s=own, can_recompute=False, required=required)
            b.quantizable("bitmask", nbytes // 8, quant_time(nbytes, nbytes // 8))
        else:
            b.op(name, srcs, bytes=nbytes, kind=kind, required=required).quantizable_as(formats)
        names.append(name)
    return _finish(b, budget_bytes, max_added_s, budget_fraction)


def families() -> dict[str, Problem]:
    """A small zoo of problems (≤ 60 nodes) with no budget, one of each family and shape."""
    return {
        "chain12": chain(12),
        "chain40": chain(40, seed=3, matmul_every=3),
        "diamond3": diamond(3, width=3),
        "unet": long_skips(22),
        "transformer2": transformer_like(2),
        "transformer4": transformer_like(4, pointwise=1),
        "random20": random_dag(20, seed=1),
        "random40": random_dag(40, seed=2),
        "random60": random_dag(60, seed=3),
    }
