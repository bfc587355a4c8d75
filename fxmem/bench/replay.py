"""Replay allocation traces against the simulator's fused model, as it is and with variants.

    python -m fxmem.bench.replay out/traces              # every trace in a folder
    python -m fxmem.bench.replay out/traces/a.json b.json

For each trace of a one-graph step (``fxmem.bench.trace``), the plan the step ran is rebuilt on fake
tensors and simulated again: in the graph's order with no allowance and with 7/6 on graph memory (how
fxmem planned before 2026-11-28), in the order of the model of Inductor's scheduler fusion
(``fxmem.schedule``) with no allowance, without and with Inductor's reordering for peak memory
(``fxmem.reorder``, since 2026-11-30), and as fxmem plans (that model, with the allowance that
``fxmem.simulate`` uses). Each prediction is set against the peak the step allocated; the table shows
the error in %. With ``--kernels``, it shows where: each generated kernel's measured bytes beside the
prediction there (``fxmem.bench.kernels``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["VARIANTS", "replay"]

# (name, graph-memory allowance or None for fxmem's own, the order to walk each graph in: the graph's,
# the fusion model's without the reordering, or fxmem's)
VARIANTS: tuple[tuple[str, tuple[int, int] | None, str], ...] = (
    ("walk", (1, 1), "graph"),
    ("walk, 7/6", (7, 6), "graph"),
    ("fusion, no reorder", (1, 1), "unreordered"),
    ("fusion", (1, 1), "fxmem"),
    ("fxmem", None, "fxmem"),
)


def replay(trace: dict[str, Any]) -> dict[str, Any]:
    """``{"label", "measured", "recorded", "predicted": {variant: bytes}}`` for one trace, or with
    ``"skipped"`` (why) instead of predictions."""
    from fxmem.bench.trace import load_simulation, ran_simulation
    from fxmem.schedule import graph_order, unreordered_schedule
    from fxmem.simulate import simulate

    schedules = {"graph": graph_order, "unreordered": unreordered_schedule}

    row: dict[str, Any] = {"label": trace.get("label"), "measured": trace.get("peak_bytes")}
    graphs = trace.get("graphs", [])
    if len(graphs) != 1 or row["measured"] is None:
        return {**row, "skipped": f"{len(graphs)} graphs" if len(graphs) != 1 else "no measured peak"}
    row["recorded"] = graphs[0]["predicted_peak_bytes"]
    chosen = ran_simulation(trace)
    if chosen is None:
        return {**row, "skipped": "the plan the step ran was not recorded"}
    fw, bw, kwargs = load_simulation(chosen)
    row["predicted"] = {}
    for name, allowance, order in VARIANTS:
        options: dict[str, Any] = {} if allowance is None else {"allowance": allowance}
        if order in schedules:
            options["schedule"] = schedules[order]
        row["predicted"][name] = simulate(fw, bw, **kwargs, **options).peak_bytes
    return row


def _percent(predicted: int, measured: int) -> str:
    return f"{(predicted - measured) / measured * 100:+.1f}%"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fxmem.bench.replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="trace files (JSON), or folders of them")
    parser.add_argument("--kernels", action="store_true", help="per generated kernel, measured against predicted")
    parser.add_argument("--top", type=int, default=15, help="with --kernels: the kernels that held most (default 15)")
    args = parser.parse_args(argv)
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        parser.error(f"no such file or folder: {', '.join(missing)}")
    files = [f for p in map(Path, args.paths) for f in (sorted(p.glob("*.json")) if p.is_dir() else [p])]
    if not files:
        parser.error("no trace files (*.json) in " + ", ".join(args.paths))
    if args.kernels:
        return _print_kernels(files, args.top)
    names = [name for name, *_ in VARIANTS]
    print(f"{'trace':40s} {'measured MiB':>12s} " + " ".join(f"{n:>18s}" for n in names))
    for file in files:
        row = replay(json.loads(file.read_text()))
        head = f"{file.stem[:40]:40s} "
        if "skipped" in row:
            print(head + f"skipped: {row['skipped']}")
            continue
        errors = " ".join(f"{_percent(row['predicted'][n], row['measured']):>18s}" for n in names)
        print(head + f"{row['measured'] / 2**20:12.1f} " + errors)
    return 0


def _print_kernels(files: list[Path], top: int) -> int:
    from fxmem.bench.kernels import format_kernel_table, kernel_table

    for file in files:
        print(f"== {file.stem}")
        try:
            print(format_kernel_table(kernel_table(json.loads(file.read_text())), top))
        except ValueError as err:
            print(f"skipped: {err}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
