"""The benchmark matrix: which configurations run, and how a configuration is written on a command line.

A configuration is a system plus its options::

    eager                                   plain eager PyTorch
    checkpoint                              eager, torch.utils.checkpoint around every block
    compile                                 torch.compile, default partitioner
    compile:budget=0.5                      torch._functorch.config.activation_memory_budget = 0.5
    compile:fp8                             Inductor's fp8 activation quantization pass
    fxmem                                   backend="fxmem" with no options
    fxmem:memory_budget=0.25,quantize=fp8   fxmem options as key=value pairs ...
    fxmem:{"memory_budget": "3000MiB"}      ... or as a JSON object

Values in ``key=value`` pairs are read as JSON when they parse (``0.5``, ``true``) and as strings otherwise
(``int8``, ``3000MiB``). fxmem's own options are validated in the process that runs them, so a bad one
becomes a row with an ``error`` rather than a failed command.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "SYSTEMS",
    "BenchConfig",
    "default_configs",
    "fp8_pass_options",
    "parse_config",
    "parse_configs",
]

SYSTEMS = ("eager", "eager+checkpoint", "torch.compile", "fxmem")
_ALIASES = {
    "eager": "eager",
    "checkpoint": "eager+checkpoint",
    "eager+checkpoint": "eager+checkpoint",
    "compile": "torch.compile",
    "torch.compile": "torch.compile",
    "fxmem": "fxmem",
}
# What a torch.compile configuration may set (anything else is a typo worth failing on early).
COMPILE_OPTIONS = ("activation_memory_budget", "activation_quantization_aten_pass", "mode", "backend")
FP8_PASS = "activation_quantization_aten_pass"

COMPILE_BUDGETS = (0.75, 0.5, 0.25, 0.1, 0.0)
FXMEM_OPTIONS: tuple[dict[str, Any], ...] = (
    {},
    {"memory_budget": 0.5},
    {"memory_budget": 0.25},
    {"memory_budget": 0.1},
    {"memory_budget": 0.5, "quantize": "int8"},
    {"memory_budget": 0.25, "quantize": "fp8"},
    {"memory_budget": 0.1, "quantize": "auto", "on_infeasible": "best_effort"},
)
# Absolute budgets bound the measured peak, which only CUDA reports.
FXMEM_CUDA_OPTIONS: tuple[dict[str, Any], ...] = (
    {"memory_budget": "3000MiB", "on_infeasible": "best_effort"},
    {"memory_budget": "3000MiB", "quantize": "auto", "on_infeasible": "best_effort"},
)


@dataclass(frozen=True)
class BenchConfig:
    """One row of the matrix: a system and its options (JSON-serialisable)."""

    system: str
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.system not in SYSTEMS:
            raise ValueError(f"unknown system {self.system!r}; valid systems: {', '.join(SYSTEMS)}")
        if not isinstance(self.options, dict):
            raise ValueError(f"{self.system}: options must be a dict, got {type(self.options).__name__}")
        if self.system == "torch.compile":
            unknown = sorted(set(self.options) - set(COMPILE_OPTIONS))
            if unknown:
                raise ValueError(
                    f"torch.compile: unknown option(s) {', '.join(unknown)}; valid: {', '.join(COMPILE_OPTIONS)}"
                )
        elif self.system in ("eager", "eager+checkpoint") and self.options:
            raise ValueError(f"{self.system} takes no options, got {self.options}")

    @property
    def label(self) -> str:
        """A short human-readable description of the options."""
        if self.system == "eager+checkpoint":
            return "every block"
        if not self.options:
            return "default"
        parts = []
        for key, value in self.options.items():
            if key == FP8_PASS:
                parts.append("fp8 activation pass")
            elif key == "activation_memory_budget":
                parts.append(f"budget={value}")
            elif key == "on_infeasible":
                continue
            else:
                parts.append(f"{key}={value}")
        return " ".join(parts) or "default"

    def as_dict(self) -> dict[str, Any]:
        return {"system": self.system, "options": self.options}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchConfig:
        return cls(system=data["system"], options=dict(data.get("options") or {}))


def fp8_pass_options(device: str, dtype: str) -> dict[str, Any]:
    """The options of Inductor's fp8 activation pass (``torch/_functorch/partitioners.py``), all set
    explicitly. ``use_scaling`` is read by both halves but defaults to True in the forward and False in
    the backward, which would leave the scale in the gradients: set once, it holds for both."""
    allowed = "torch.bfloat16" if dtype == "bfloat16" else "torch.bfloat16;torch.float32"
    return {
        "quant_type": "torch.float8_e5m2",
        "use_scaling": True,
        "allowed_dtypes": allowed,
        # Inductor's default threshold (100 MB) on CUDA; on CPU the bundled models are tiny.
        "size_in_mb": 100 if device == "cuda" else 0,
        "exclude_primals": False,
        "skip_dynamo_guards": False,
        "quantize_dynamic_shape": False,
    }


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_config(text: str, *, device: str = "cpu", dtype: str = "float32") -> BenchConfig:
    """``"fxmem:memory_budget=0.5,quantize=int8"`` → ``BenchConfig("fxmem", {...})`` (see the module doc)."""
    name, _, rest = text.strip().partition(":")
    system = _ALIASES.get(name.strip().lower())
    if system is None:
        raise ValueError(f"config {text!r}: unknown system {name!r}; valid: {', '.join(sorted(_ALIASES))}")
    rest = rest.strip()
    options: dict[str, Any] = {}
    if rest.startswith("{"):
        try:
            options = json.loads(rest)
        except json.JSONDecodeError as err:
            raise ValueError(f"config {text!r}: the options are not valid JSON ({err})") from None
        if not isinstance(options, dict):
            raise ValueError(f"config {text!r}: the options must be a JSON object")
    elif rest:
        for item in rest.split(","):
            key, sep, value = item.partition("=")
            key = key.strip()
            if system == "torch.compile" and not sep and key == "fp8":
                options[FP8_PASS] = fp8_pass_options(device, dtype)
                continue
            if not sep or not key:
                raise ValueError(f"config {text!r}: expected key=value, got {item!r}")
            if system == "torch.compile" and key == "budget":
                key = "activation_memory_budget"
            options[key] = _value(value.strip())
    try:
        return BenchConfig(system, options)
    except ValueError as err:
        raise ValueError(f"config {text!r}: {err}") from None


def default_configs(device: str = "cpu", dtype: str = "float32", *, quick: bool = False) -> list[BenchConfig]:
    """The full matrix, or with ``quick`` a reduced one (one configuration of each kind, plus the budgets
    the targets are checked at)."""
    fp8 = {FP8_PASS: fp8_pass_options(device, dtype)}
    configs = [BenchConfig("eager"), BenchConfig("eager+checkpoint"), BenchConfig("torch.compile")]
    budgets = (0.5, 0.1) if quick else COMPILE_BUDGETS
    configs += [BenchConfig("torch.compile", {"activation_memory_budget": b}) for b in budgets]
    configs.append(BenchConfig("torch.compile", fp8))
    if quick:
        fxmem = [{}, {"memory_budget": 0.25}, {"memory_budget": 0.25, "quantize": "fp8"}]
    else:
        fxmem = [dict(o) for o in FXMEM_OPTIONS]
    if device == "cuda":
        fxmem += [dict(o) for o in FXMEM_CUDA_OPTIONS]
    configs += [BenchConfig("fxmem", o) for o in fxmem]
    return configs


def parse_configs(
    texts: list[str] | None, *, device: str = "cpu", dtype: str = "float32", quick: bool = False
) -> list[BenchConfig]:
    """The configurations named on a command line; ``default`` and ``quick`` expand to the matrices."""
    if not texts:
        return default_configs(device, dtype, quick=quick)
    configs: list[BenchConfig] = []
    for text in texts:
        if text in ("default", "quick"):
            configs += default_configs(device, dtype, quick=quick or text == "quick")
        else:
            configs.append(parse_config(text, device=device, dtype=dtype))
    return configs
