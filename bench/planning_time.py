"""Planning time on one joint graph: fxmem's partitioner against PyTorch's budget partitioner.

The model is built on the CPU and traced, never run (tracing works on fake tensors): a recording backend
captures AOTAutograd's joint graph (with Inductor's decompositions, as fxmem's eager codegen and Inductor
see it) and stops the compile, and both partitioners then split private copies of it:

* ``torch``: ``min_cut_rematerialization_partition`` with ``activation_memory_budget = B`` (1.0, its
  default, for ``none``);
* ``fxmem``: fxmem's whole partition pass (PyTorch's min-cut for the reference, then capture, cost,
  solve, rewrite and simulate), planning for the ``--device`` profile, ``quantize="none"``, for the
  eager codegen unless ``--codegen inductor``.

Times are the median of ``--repeats`` runs per budget, each on a fresh copy of the graph (not timed), after a
full garbage collection and with lazy graph modules, as inside ``torch.compile``. Each run is charged its
work and the collection of what it allocated: the collector is off while a partitioner runs and collects
the young generation (everything the run allocated that is still tracked) right after, timed. With the
collector on, a collection fires whenever allocations since the last one cross a threshold, so where they
fall, and which run pays for a garbage graph, would be luck: PyTorch's partitioner leaves its garbage to
whatever runs next, and fxmem's pass, which pauses the collector, collects its own before it returns.

    python bench/planning_time.py                                  # GPT-2 small, 8x1024 (about two minutes)
    python bench/planning_time.py --model gpt:tiny --budgets none 0.5
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.budget_arg import budget_text, fraction_or_none  # noqa: E402
from fxmem import _compat  # noqa: E402
from fxmem.bench.measure import joint_graphs  # noqa: E402
from fxmem.config import FxmemConfig  # noqa: E402
from fxmem.partitioner import FxmemPartitioner, deepcopy_graph_module  # noqa: E402


def capture_joint(spec: str) -> tuple[Any, list, dict]:
    """``(joint graph, joint inputs, partitioner kwargs)`` of one training step of ``name:preset``, traced
    on the CPU and never run. (Not on ``meta``: PyTorch traces cross-entropy there without its backward.)"""
    name, _, preset = spec.partition(":")
    model, inputs = importlib.import_module(f"models.{name}").build(preset or "tiny")
    (joint,) = joint_graphs(model, inputs, run=False)
    gm, _, kwargs = joint
    (output,) = gm.graph.find_nodes(op="output")
    if all(grad is None for grad in output.args[0][kwargs["num_fwd_outputs"] :]):
        raise RuntimeError(f"{spec}: the traced joint graph computes no gradient")
    return joint


def _torch_partition(gm: Any, joint_inputs: list, kwargs: dict, budget: float) -> None:
    with torch._functorch.config.patch(activation_memory_budget=budget):
        _compat.min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)


def _fxmem_partition(gm: Any, joint_inputs: list, kwargs: dict, partitioner: FxmemPartitioner) -> None:
    partitioner(gm, joint_inputs, **kwargs)


def _median_s(repeats: int, fn: Callable[..., None], gm: Any, *args: Any) -> tuple[float, float]:
    """The median time of ``fn(copy of gm, *args)`` with the collection of what it allocated, and the
    median of that collection alone: each run partitions a fresh copy (made untimed)."""
    totals, collections = [], []
    for _ in range(repeats):
        with _compat.lazy_graph_modules():  # as inside torch.compile: modules generate code only when run
            fresh = deepcopy_graph_module(gm)
            gc.collect()
            gc.disable()
            try:
                started = time.perf_counter()
                fn(fresh, *args)
                collecting = time.perf_counter()
                gc.collect(0)  # with the collector off, all the run allocated is in the young generation
                done = time.perf_counter()
            finally:
                gc.enable()
            totals.append(done - started)
            collections.append(done - collecting)
    return statistics.median(totals), statistics.median(collections)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt:gpt2-small", help="name:preset of models/")
    parser.add_argument(
        "--budgets",
        nargs="+",
        type=fraction_or_none,
        default=[0.7, 0.4, 0.1],
        help="fractions, or none (fxmem's default)",
    )
    parser.add_argument("--device", default="h100", help="fxmem's device profile")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--codegen", choices=("eager", "inductor"), default="eager",
        help="fxmem's codegen: under inductor, no budget (and a fraction the fewest bytes meet) also tries "
        "plans holding more for a lower peak",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    gm, joint_inputs, kwargs = capture_joint(args.model)
    nodes = len(gm.graph.nodes)
    print(f"{args.model}: joint graph of {nodes} nodes, traced in {time.perf_counter() - started:.1f} s")
    header = f"{'budget':>6s} {'torch s':>8s} {'fxmem s':>8s} {'ratio':>6s}"
    print(f"{header}   fxmem passes, then each side's collection (s)")
    rows = []
    for budget in args.budgets:
        config = FxmemConfig(memory_budget=budget, device=args.device, codegen=args.codegen)
        partitioner = FxmemPartitioner(config)
        reports: list = []
        partitioner.on_report = reports.append

        torch_budget = 1.0 if budget is None else budget
        torch_s, torch_collect_s = _median_s(args.repeats, _torch_partition, gm, joint_inputs, kwargs, torch_budget)
        fxmem_s, fxmem_collect_s = _median_s(args.repeats, _fxmem_partition, gm, joint_inputs, kwargs, partitioner)
        passes: dict[str, float] = {}
        for record in reports[-1].passes:
            passes[record.name] = passes.get(record.name, 0.0) + record.seconds
        row = {
            "budget": budget, "torch_s": torch_s, "fxmem_s": fxmem_s, "ratio": fxmem_s / torch_s, "passes": passes,
            "torch_collect_s": torch_collect_s, "fxmem_collect_s": fxmem_collect_s,
        }  # fmt: skip
        rows.append(row)
        detail = ", ".join(f"{k} {v:.3f}" for k, v in passes.items())
        print(
            f"{budget_text(budget):>6s} {torch_s:8.3f} {fxmem_s:8.3f} {row['ratio']:6.2f}   {detail}; "
            f"collect torch {torch_collect_s:.3f}, fxmem {fxmem_collect_s:.3f}",
            flush=True,
        )
    if args.json:
        payload = {"model": args.model, "nodes": nodes, "torch": torch.__version__, "rows": rows}
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
