"""The options contract: what a user may pass to ``backend="fxmem"`` and how it is validated.

``FxmemConfig`` is frozen and hashable; ``FxmemConfig.from_options(dict)`` is the single entry point
for user options, so every path (``options={...}``, ``fxmem.backend(**opts)``, the CLI) gives the same
errors.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

QUANTIZE_MODES = ("none", "auto", "int8", "fp8", "int4", "int2")
CODEGENS = ("inductor", "eager")
DEVICE_PROFILES = ("auto", "h100", "h200", "a100", "cpu")
_INTEGER_LADDER = ("int8", "int4", "int2")
ON_INFEASIBLE = ("auto", "error", "best_effort")

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str) -> int:
    """``"6GiB"`` → 6442450944; ``"1.5GB"`` → 1500000000; ``"512"`` → 512."""
    match = _SIZE_RE.match(text)
    unit = match.group(2).lower() if match else ""
    if not match or (unit and unit not in _UNITS):
        raise ValueError(
            f"memory_budget: cannot read {text!r} as a size; use a number with one of the units "
            f"{', '.join(sorted({'B', 'KB', 'MB', 'GB', 'TB', 'KiB', 'MiB', 'GiB', 'TiB'}))}, e.g. '6GiB'"
        )
    size = float(match.group(1)) * _UNITS[unit or "b"]
    if unit in ("", "b") and not size.is_integer():  # "0.4" would silently be a 0-byte budget
        raise ValueError(
            f"memory_budget: {text!r} is not a whole number of bytes; a fraction is a float (0.4), "
            f"not a string, and a size is whole bytes or has a unit, e.g. '6GiB'"
        )
    return int(size)


def _normalise_budget(value: Any) -> float | int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"memory_budget: expected None, a fraction in [0, 1], bytes or a size string, got {value!r}")
    if isinstance(value, str):
        return parse_bytes(value)
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"memory_budget: bytes must be >= 0, got {value}")
        # 0 and 1 as ints read as fractions: nobody means a 1-byte budget.
        return float(value) if value in (0, 1) else value
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise ValueError(
                f"memory_budget: a float is a fraction of torch.compile's activation memory and must be "
                f"in [0, 1], got {value}; pass an int or a string such as '6GiB' for an absolute budget"
            )
        return value
    raise ValueError(
        f"memory_budget: expected None, a fraction in [0, 1], int bytes or a string like '6GiB', "
        f"got {type(value).__name__}"
    )


def _normalise_quantize(value: Any) -> tuple[str, ...]:
    from fxmem.quant import available_quantizers  # registered quantizers are valid values too

    valid = tuple(dict.fromkeys((*QUANTIZE_MODES, *available_quantizers())))
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"quantize: expected one of {', '.join(valid)} or a list of them, got {value!r}")
    modes = []
    for item in values:
        if not isinstance(item, str) or item.lower() not in valid:
            raise ValueError(f"quantize: unknown value {item!r}; valid values: {', '.join(valid)}")
        modes.append(item.lower())
    if "none" in modes and len(modes) > 1:
        raise ValueError("quantize: 'none' cannot be combined with other formats")
    if "auto" in modes and len(modes) > 1:
        raise ValueError("quantize: 'auto' cannot be combined with other formats")
    return tuple(dict.fromkeys(modes))


def _choice(option: str, value: Any, valid: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.lower() not in valid:
        raise ValueError(f"{option}: unknown value {value!r}; valid values: {', '.join(valid)}")
    return value.lower()


@dataclass(frozen=True)
class FxmemConfig:
    """Validated fxmem options. Build it with ``FxmemConfig.from_options`` or directly by keyword."""

    memory_budget: float | int | str | None = None
    quantize: str | tuple[str, ...] | list[str] = "none"
    recompute: bool = True
    solver: str = "auto"
    codegen: str = "inductor"
    device: str = "auto"
    cost_model: str = "roofline"
    group_size: int | None = None
    stochastic_rounding: bool = False
    on_infeasible: str = "auto"
    calibrate: bool = False

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 - frozen dataclass
        set_("memory_budget", _normalise_budget(self.memory_budget))
        set_("quantize", _normalise_quantize(self.quantize))
        if not isinstance(self.recompute, bool):
            raise ValueError(f"recompute: expected True or False, got {self.recompute!r}")
        if not isinstance(self.stochastic_rounding, bool):
            raise ValueError(f"stochastic_rounding: expected True or False, got {self.stochastic_rounding!r}")
        if not isinstance(self.calibrate, bool):
            raise ValueError(f"calibrate: expected True or False, got {self.calibrate!r}")
        set_("codegen", _choice("codegen", self.codegen, CODEGENS))
        set_("device", _choice("device", self.device, DEVICE_PROFILES))
        if self.calibrate and self.device != "auto":
            raise ValueError(
                f"calibrate: measures the device the graph runs on, so it needs device='auto', "
                f"got device={self.device!r}"
            )
        set_("on_infeasible", _choice("on_infeasible", self.on_infeasible, ON_INFEASIBLE))
        if self.group_size is not None and (
            isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size <= 0
        ):
            raise ValueError(f"group_size: expected None or a positive int, got {self.group_size!r}")
        # Solver and cost-model names are checked against their registries, which users may extend.
        from fxmem.cost import available_cost_models
        from fxmem.solve import available_solvers

        set_("solver", _choice("solver", self.solver, ("auto", *available_solvers())))
        set_("cost_model", _choice("cost_model", self.cost_model, available_cost_models()))

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None, **kwargs: Any) -> FxmemConfig:
        merged = {**(options or {}), **kwargs}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ValueError(
                f"unknown fxmem option(s) {', '.join(map(repr, unknown))}; valid options: {', '.join(sorted(known))}"
            )
        return cls(**merged)

    @property
    def budget_is_fraction(self) -> bool:
        return isinstance(self.memory_budget, float)

    @property
    def strict_budget(self) -> bool:
        """Whether an unmeetable budget is an error: ``auto`` makes absolute budgets (a promise about the
        peak) strict and fractions (a target, as in PyTorch's ``activation_memory_budget``) best-effort."""
        if self.on_infeasible == "auto":
            return not self.budget_is_fraction and self.memory_budget is not None
        return self.on_infeasible == "error"

    @property
    def quant_formats(self) -> tuple[str, ...]:
        """The formats the solver may choose from. A single integer format is the *narrowest* allowed:
        ``"int2"`` admits int8, int4 and int2, and the solver takes the widest that meets the budget.
        ``"auto"`` admits every format; a list admits exactly its members."""
        if self.quantize == ("none",):
            return ()
        if self.quantize == ("auto",):
            return ("int8", "fp8", "int4", "int2")
        if len(self.quantize) == 1 and self.quantize[0] in _INTEGER_LADDER:
            ladder = _INTEGER_LADDER
            return ladder[: ladder.index(self.quantize[0]) + 1]
        return self.quantize

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def cache_key(self) -> str:
        """A stable string of every option: enters Inductor's cache key through the partitioner."""
        from fxmem import __version__

        items = sorted(self.as_dict().items())
        return f"fxmem-{__version__}:" + ";".join(f"{k}={v!r}" for k, v in items)
