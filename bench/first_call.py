"""First-call time of fxmem's eager codegen against PyTorch's own budget partitioner without Inductor.

The first call of a compiled model traces it (Dynamo, AOTAutograd), partitions the joint graph and runs
one forward and backward. Three ways, each with the same fractional budget and no Inductor:

* ``torch``: the ``aot_eager`` backend (PyTorch's min-cut partitioner with
  ``activation_memory_budget``, no decompositions);
* ``torch-decomp``: ``aot_eager_decomp_partition`` (the same partitioner on Inductor's decomposed
  joint graph, the graph fxmem plans);
* ``fxmem``: ``fxmem.backend(memory_budget=B, codegen="eager", quantize="none")``.

Every backend first compiles a throwaway model, so one-time imports are not charged to the first row.
Times are the median of ``--repeats`` first calls (a fresh model, ``torch._dynamo.reset()`` and a full
garbage collection before each). With ``--cold`` each first call runs in a fresh interpreter instead, and
is charged what the process's first compile imports and warms up (``import fxmem`` included), as a
script that trains one model once would see.

    python bench/first_call.py                         # bundled tiny models and gpt small (a minute or two)
    python bench/first_call.py --models gpt:small --budgets none 0.4 --json out.json
    python bench/first_call.py --cold --models mlp:tiny gpt:tiny --budgets 0.4
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch._functorch.config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.budget_arg import budget_text, fraction_or_none  # noqa: E402

DEFAULT_MODELS = (
    "mlp:tiny", "mlp:tiny-dropout", "gpt:tiny", "gpt:tiny-dropout", "vit:tiny", "resnet:tiny", "gpt:small",
)  # fmt: skip
SYSTEMS = ("torch", "torch-decomp", "fxmem")


def _backend(system: str, budget: float | None) -> tuple[Any, float]:
    """The backend and the ``activation_memory_budget`` to run it under (1.0, PyTorch's default, for
    fxmem's ``None``)."""
    if system == "fxmem":
        import fxmem  # here, so that a cold first call is charged the import

        return fxmem.backend(memory_budget=budget, codegen="eager", quantize="none"), 1.0
    return {"torch": "aot_eager", "torch-decomp": "aot_eager_decomp_partition"}[
        system
    ], 1.0 if budget is None else budget


def first_call_s(build: Callable[[], tuple[torch.nn.Module, tuple]], system: str, budget: float | None) -> float:
    torch._dynamo.reset()
    model, inputs = build()
    gc.collect()  # each first call starts from a collected heap, so when collections fall is not luck
    started = time.perf_counter()
    backend, torch_budget = _backend(system, budget)
    with torch._functorch.config.patch(activation_memory_budget=torch_budget):
        torch.compile(model, backend=backend)(*inputs).backward()
    return time.perf_counter() - started


def cold_first_call_s(spec: str, system: str, budget: float | None) -> float:
    """One first call in a fresh interpreter, which prints its time."""
    command = [sys.executable, __file__, "--one", system, spec, budget_text(budget)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return float(done.stdout.split()[-1])


def _builder(spec: str) -> Callable[[], tuple[torch.nn.Module, tuple]]:
    name, _, preset = spec.partition(":")
    module = importlib.import_module(f"models.{name}")
    return lambda: module.build(preset or "tiny")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="name:preset of models/")
    parser.add_argument(
        "--budgets", nargs="+", type=fraction_or_none, default=[0.7, 0.4, 0.1], help="fractions, or none"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--cold", action="store_true", help="each first call in a fresh interpreter")
    parser.add_argument("--one", nargs=3, metavar=("SYSTEM", "MODEL", "BUDGET"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:  # a child of --cold: one first call, its time printed last
        system, spec, budget = args.one
        print(first_call_s(_builder(spec), system, fraction_or_none(budget)))
        return 0

    if args.cold:
        measure = cold_first_call_s
    else:
        warm = _builder("gpt:tiny")  # its attention loads the pattern tables fxmem uses on such graphs
        for system in SYSTEMS:
            first_call_s(warm, system, 0.5)
        measure = lambda spec, system, budget: first_call_s(_builder(spec), system, budget)
    header = " ".join(f"{s + ' s':>14s}" for s in SYSTEMS)
    print(f"{'model':12s} {'budget':>6s} {header}  fxmem/torch  fxmem/decomp")
    rows = []
    for spec in args.models:
        for budget in args.budgets:
            times = {s: statistics.median(measure(spec, s, budget) for _ in range(args.repeats)) for s in SYSTEMS}
            row = {"model": spec, "budget": budget, "cold": args.cold, **{f"{s}_s": t for s, t in times.items()}}
            row["ratio_torch"] = times["fxmem"] / times["torch"]
            row["ratio_decomp"] = times["fxmem"] / times["torch-decomp"]
            rows.append(row)
            print(
                f"{spec:12s} {budget_text(budget):>6s} " + " ".join(f"{times[s]:14.2f}" for s in SYSTEMS)
                + f"  {row['ratio_torch']:11.2f}  {row['ratio_decomp']:12.2f}",
                flush=True,
            )  # fmt: skip
    worst = max(r["ratio_torch"] for r in rows)
    print(f"\nworst fxmem / aot_eager first-call ratio: {worst:.2f} (target: at most 2)")
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
