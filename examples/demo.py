"""Train a bundled tiny GPT a few steps with torch.compile's default and with fxmem, side by side.

    python examples/demo.py [--steps 20] [--preset tiny] [--codegen inductor|eager]

Prints, per configuration, the bytes the forward saves for the backward (measured with saved-tensor
hooks, parameters excluded), the median step time and the final loss.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fxmem  # noqa: E402
from models import gpt  # noqa: E402


def saved_bytes(model: torch.nn.Module, step_fn) -> int:
    """Bytes of the distinct non-parameter storages the forward saves for the backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step_fn()
    return sum(storages.values())


def train(label: str, backend, preset: str, steps: int) -> dict:
    torch._dynamo.reset()
    model, (idx, targets) = gpt.build(preset)
    compiled = torch.compile(model, backend=backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    times, loss = [], None
    for step in range(steps):
        started = time.perf_counter()
        loss = compiled(idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step > 0:  # the first step compiles
            times.append(time.perf_counter() - started)
    held = saved_bytes(model, lambda: compiled(idx, targets))
    return {"config": label, "saved": held, "step_ms": 1e3 * statistics.median(times), "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--preset", default="tiny", choices=sorted(gpt.PRESETS))
    parser.add_argument("--codegen", default="inductor", choices=["inductor", "eager"])
    args = parser.parse_args()
    configs = [
        ("torch.compile default", "inductor"),
        ("fxmem (no budget: lossless)", fxmem.backend(codegen=args.codegen)),
        ("fxmem memory_budget=0.15", fxmem.backend(codegen=args.codegen, memory_budget=0.15)),
        (
            "fxmem memory_budget=0.1 quantize=int8",
            fxmem.backend(codegen=args.codegen, memory_budget=0.1, quantize="int8"),
        ),
    ]
    print(f"GPT preset {args.preset!r}, {args.steps} AdamW steps on {torch.device('cpu')}, torch {torch.__version__}")
    rows = []
    for label, backend in configs:
        print(f"  compiling and training: {label} ...", flush=True)
        rows.append(train(label, backend, args.preset, args.steps))
    base = rows[0]["saved"]
    print()
    print(f"{'configuration':40} {'saved for backward':>20} {'vs default':>11} {'step ms':>9} {'final loss':>11}")
    for row in rows:
        print(
            f"{row['config']:40} {row['saved']:>14,} bytes {row['saved'] / base:>10.0%} "
            f"{row['step_ms']:>9.2f} {row['loss']:>11.4f}"
        )
    print(
        "\nWith no budget fxmem recomputes what it estimates at no more than about 2% of the step, holding the\n"
        "fewest bytes that allows (under Inductor, more where that lowers the predicted peak). A fractional\n"
        "budget caps what fxmem holds at that share of torch.compile's default: where the plan made with no\n"
        "budget fits, fxmem takes it, and otherwise recomputes as little as the budget allows. int8 storage\n"
        "is lossy, within the error bounds in docs/quantization.md. The first step compiles and is left out\n"
        "of the step time; on the CPU, step times of a tiny model are mostly noise."
    )


if __name__ == "__main__":
    main()
