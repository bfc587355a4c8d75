"""The abstract :class:`Quantizer`, the name registry, and tensor helpers shared by the quantizers.

Everything that runs on tensors here is traced by ``make_fx`` and compiled by Inductor, so it uses only
plain tensor ops: no ``.item()``, no branching on tensor values, and every output shape follows from the
input shape (which may hold SymInts).
"""

from __future__ import annotations

import abc
import logging
import operator
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

#: Elements per scale group unless a quantizer says otherwise; ``integer.py`` explains the choice.
DEFAULT_GROUP_SIZE = 256

_REGISTRY: dict[str, type[Quantizer]] = {}

_Q = TypeVar("_Q", bound="type[Quantizer]")


class Quantizer(abc.ABC):
    """Lossy storage of one saved activation.

    ``quantize(x)`` returns a tuple of payload tensors (codes, scales[, zero points]) on ``x``'s device;
    ``dequantize(payload, shape, dtype, stride)`` rebuilds a tensor of that shape, dtype and (optionally)
    layout. Values are read in logical order (``x.reshape(-1)``) and split into groups of
    ``group_size`` consecutive elements, each with its own fp32 scale. Arithmetic is fp32 whatever the
    input dtype (float64 inputs beyond fp32 range become inf). On CPU, Inductor output matches eager
    bitwise; on CUDA, eager, compiled and CPU results agree to a few ulps (scalar division and FMA
    contraction differ), with rare one-step code flips at near-ties, all within ``error_bound()``.
    """

    name: ClassVar[str]
    bits: ClassVar[int]
    #: True: the group scale comes from absmax; False: from max - min with a stored zero point (the min).
    symmetric: ClassVar[bool]
    default_group_size: ClassVar[int] = DEFAULT_GROUP_SIZE
    supports_stochastic: ClassVar[bool] = True

    def __init__(self, group_size: int | None = None, stochastic: bool = False) -> None:
        if group_size is None:
            group_size = self.default_group_size
        if isinstance(group_size, bool):
            raise ValueError(f"{self.name}: group_size must be a positive int, got {group_size!r}")
        try:
            group_size = operator.index(group_size)
        except TypeError:
            raise ValueError(f"{self.name}: group_size must be a positive int, got {group_size!r}") from None
        if group_size <= 0:
            raise ValueError(f"{self.name}: group_size must be a positive int, got {group_size!r}")
        if not isinstance(stochastic, bool):
            raise ValueError(f"{self.name}: stochastic must be a bool, got {stochastic!r}")
        if stochastic and not self.supports_stochastic:
            raise ValueError(f"{self.name}: stochastic rounding is not supported by this quantizer")
        self.group_size: int = group_size
        self.stochastic: bool = stochastic

    @abc.abstractmethod
    def quantize(self, x: Tensor) -> tuple[Tensor, ...]:
        """Payload tensors for the floating tensor ``x``."""

    @abc.abstractmethod
    def dequantize(
        self,
        payload: tuple[Tensor, ...],
        shape: Sequence[int],
        dtype: torch.dtype,
        stride: Sequence[int] | None = None,
    ) -> Tensor:
        """Rebuild a tensor of ``shape`` and ``dtype`` (with exactly ``stride`` when given)."""

    @abc.abstractmethod
    def stored_bytes(self, numel: int, dtype: torch.dtype) -> int:
        """Exact payload bytes for a tensor of ``numel`` elements (independent of ``dtype``)."""

    @abc.abstractmethod
    def error_bound(self) -> float:
        """Bound on ``max |x - dq(q(x))|`` divided by the group's absmax (symmetric) or range (asymmetric).

        For stochastic rounding it bounds one element of one draw. It covers the fp32 computation; the
        final cast to a narrower output dtype adds at most half an ulp of that dtype on top.
        """

    def num_groups(self, numel: int) -> int:
        return -(-numel // self.group_size)

    def relative_error(self, x: Tensor) -> float:
        """Measured ``||x - dq(q(x))|| / ||x||`` (0.0 for an all-zero ``x``); eager only."""
        with torch.no_grad():
            dq = self.dequantize(self.quantize(x), x.shape, x.dtype)
            xf = x.detach().float()
            err = torch.linalg.vector_norm(xf - dq.float()).item()
            ref = torch.linalg.vector_norm(xf).item()
        if ref == 0.0:
            return 0.0 if err == 0.0 else float("inf")
        return err / ref

    def _payload_arity(self) -> int:
        return 2 if self.symmetric else 3

    def _check_payload(self, payload: tuple[Tensor, ...], dtype: torch.dtype) -> None:
        if len(payload) != self._payload_arity():
            want = self._payload_arity()
            raise ValueError(f"{self.name}: expected {want} payload tensors, got {len(payload)}")
        if not dtype.is_floating_point:
            raise ValueError(f"{self.name}: can only dequantize to a floating dtype, got {dtype}")

    def options(self) -> dict[str, object]:
        """What, besides the class, decides this quantizer's output (equality, hashing and repr use it)."""
        return {"group_size": self.group_size, "stochastic": self.stochastic}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in self.options().items())})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.options() == other.options()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), *self.options().items()))


def register_quantizer(name: str) -> Callable[[_Q], _Q]:
    """Class decorator: make ``get_quantizer(name)`` build this class."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_quantizer: name must be a non-empty str, got {name!r}")

    def decorate(cls: _Q) -> _Q:
        if not (isinstance(cls, type) and issubclass(cls, Quantizer)):
            raise TypeError(f"register_quantizer({name!r}): {cls!r} is not a Quantizer subclass")
        prev = _REGISTRY.get(name)
        # Re-registering the same class (e.g. after a module reload) is fine; a different one is a clash.
        if prev is not None and (prev.__module__, prev.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"register_quantizer: {name!r} is already taken by {prev.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        log.debug("registered quantizer %r -> %s", name, cls.__qualname__)
        return cls

    return decorate


def available_quantizers() -> list[str]:
    return sorted(_REGISTRY)


def get_quantizer(name: str, **kwargs: Any) -> Quantizer:
    """An instance of the quantizer registered as ``name``; ``kwargs`` go to its constructor."""
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"quantize: unknown quantizer {name!r}; known: {', '.join(available_quantizers())}")
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------------
# Tensor helpers (all traceable).


def check_float_input(x: Tensor, who: str) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{who}: expected a tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{who}: quantizers take floating tensors only, got {x.dtype}")


def numel_of(shape: Sequence[Any]) -> Any:
    """Product of a shape that may contain SymInts."""
    n = 1
    for s in shape:
        n = n * s
    return n


def contiguous_strides(shape: Sequence[Any]) -> tuple[Any, ...]:
    strides = []
    acc = 1
    for s in reversed(tuple(shape)):
        strides.append(acc)
        acc = acc * s
    return tuple(reversed(strides))


def to_groups(x: Tensor, group_size: int) -> tuple[Tensor, Any]:
    """``x`` in logical order as fp32 of shape ``(num_groups, group_size)``, plus its numel.

    The tail is padded by repeating the last element rather than with zeros, so padding never widens
    the last group's absmax or range (zeros would, for asymmetric groups). It is padded by ``F.pad``'s
    "replicate": with ``torch.cat`` of the last element, Inductor's CPU code (torch 2.11 and 2.13) wrote
    only the first group's codes of a tensor of two or more groups whose size is not a multiple of the
    group size, and the rest of the buffer was left as it was allocated.
    """
    flat = x.reshape(-1).to(torch.float32)
    n = flat.shape[0]
    pad = (-n) % group_size
    if not (isinstance(pad, int) and pad == 0):
        flat = F.pad(flat[None, None], (0, pad), mode="replicate")[0, 0]
    return flat.view((n + pad) // group_size, group_size), n


def codes_to_groups(q: Tensor, num_groups: Any, group_size: int) -> Tensor:
    """Unpacked fp32 codes of length numel -> ``(num_groups, group_size)`` (zero padded)."""
    pad = num_groups * group_size - q.shape[0]
    if not (isinstance(pad, int) and pad == 0):
        q = F.pad(q, (0, pad))
    return q.view(num_groups, group_size)


def restore_layout(flat: Tensor, shape: Sequence[Any], dtype: torch.dtype, stride: Sequence[Any] | None) -> Tensor:
    """Flat values in logical order -> tensor of ``shape``/``dtype``, with exactly ``stride`` if given."""
    out = flat.to(dtype).reshape(tuple(shape))
    if stride is not None and tuple(stride) != contiguous_strides(shape):
        # Functional copy: the result takes the strides of its first argument.
        target = torch.empty_strided(tuple(shape), tuple(stride), dtype=dtype, device=out.device)
        out = torch.ops.aten.copy.default(target, out)
    return out


def payload_nbytes(payload: Sequence[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in payload)
