"""An absolute-budget sweep: does fxmem keep its promise on the peak, and how close is its prediction?

Two runs of the benchmark harness (each configuration in a fresh process, AdamW's state created before
the compile, so every plan sees the memory it trains with):

1. fxmem with its least-time plan (a budget above any plan, 1 TiB) and with the smallest plan it can
   make (a 1 KiB budget, best effort): their predicted peaks span what absolute budgets can reach (the
   plan made with no budget already looks for a low peak, so its own can be the smallest);
2. fxmem at ``--points`` budgets spread over that span (Inductor codegen unless ``--codegen eager``).

Each sweep row is then checked: a plan fxmem predicted to fit (predicted peak <= budget) must measure a
peak (``torch.cuda.max_memory_allocated`` over a step) at or under its budget; the prediction's error
against the measured peak is reported (the issue's aim: within 5%); and a smaller budget must not
measure a larger peak. CPU rows measure no peak, so on CPU the sweep only exercises the flow.

    python -m fxmem.bench.sweep models/gpt.py:small --device cuda --dtype bfloat16 --json sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Sequence
from typing import Any

from fxmem.bench.launch import resolve_spec, run_matrix
from fxmem.bench.matrix import BenchConfig
from fxmem.bench.results import MIB, mib_text

LARGEST = "1TiB"  # above any plan: the least-time plan, the first fxmem tries under an absolute budget
SMALLEST = "1KiB"  # below any plan: the smallest plan fxmem finds, run best effort
PEAK_TOLERANCE = 0.05  # the prediction's aim, relative to the measured peak


def sweep_budgets(unbounded_peak: int, smallest_peak: int, points: int) -> list[int]:
    """``points`` budgets from the unbounded plan's predicted peak down to the smallest plan's, evenly
    spaced, largest first (one point: the midpoint), each once (runs of one configuration after the first
    would find its compile cached and plan nothing)."""
    if points < 1:
        raise ValueError(f"points must be at least 1, got {points}")
    if smallest_peak > unbounded_peak:
        smallest_peak, unbounded_peak = unbounded_peak, smallest_peak
    if points == 1:
        return [(unbounded_peak + smallest_peak) // 2]
    step = (unbounded_peak - smallest_peak) / (points - 1)
    return list(dict.fromkeys(round(unbounded_peak - k * step) for k in range(points)))


def _config(budget: int | str | None, codegen: str) -> BenchConfig:
    return BenchConfig("fxmem", {"memory_budget": budget, "codegen": codegen, "on_infeasible": "best_effort"})


def check_sweep(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """One verdict per sweep row (largest budget first) and the failures among them."""
    verdicts, failures = [], []
    for row in sorted(rows, key=lambda r: -r["budget"]):
        budget, predicted, measured = row["budget"], row.get("predicted_peak_bytes"), row.get("peak_bytes")
        verdict = {"budget": budget, "predicted": predicted, "measured": measured, "error": None}
        if row.get("error"):
            verdict["verdict"] = "error: " + row["error"].splitlines()[0][:100]
            failures.append(f"{budget / MIB:.0f} MiB: {verdict['verdict']}")
        elif predicted is None:
            verdict["verdict"] = "no prediction"
        elif predicted > budget:
            verdict["verdict"] = "infeasible (best effort)"
        elif measured is None:
            verdict["verdict"] = "fits (no measured peak)"
        else:
            verdict["error"] = (predicted - measured) / measured
            verdict["verdict"] = "MET" if measured <= budget else "EXCEEDED"
            if measured > budget:
                failures.append(f"{budget / MIB:.0f} MiB: measured peak {measured / MIB:.0f} MiB is over it")
        verdicts.append(verdict)
    measured = [(v["budget"], v["measured"]) for v in verdicts if v["measured"] is not None]
    for (larger, high), (smaller, low) in itertools.pairwise(measured):
        if low > high:
            failures.append(
                f"not monotonic: {smaller / MIB:.0f} MiB measured {low / MIB:.0f} MiB, more than "
                f"{high / MIB:.0f} MiB under {larger / MIB:.0f} MiB"
            )
    return verdicts, failures


def format_verdicts(verdicts: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'budget MiB':>10s} {'predicted':>10s} {'measured':>10s} {'pred err':>9s}  verdict"]
    for v in verdicts:
        error = "-" if v["error"] is None else f"{v['error'] * 100:+.1f}%"
        flag = "" if v["error"] is None or abs(v["error"]) <= PEAK_TOLERANCE else "  (outside ±5%)"
        lines.append(
            f"{mib_text(v['budget']):>10s} {mib_text(v['predicted']):>10s} {mib_text(v['measured']):>10s} {error:>9s}  "
            f"{v['verdict']}{flag}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fxmem.bench.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("spec", metavar="SPEC", help="FILE.py:FACTORY, e.g. models/gpt.py:small")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--points", type=int, default=5, help="budgets in the sweep (default 5)")
    parser.add_argument("--codegen", choices=("inductor", "eager"), default="inductor")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row (default 3)")
    parser.add_argument("--jobs", type=int, default=1, help="rows compiling at once (default 1)")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds for each of the two runs")
    parser.add_argument("--json", help="write the rows and verdicts here")
    parser.add_argument("--trace", help="a folder for each row's allocation trace (fxmem.bench.trace)")
    args = parser.parse_args(argv)
    spec = resolve_spec(args.spec)
    run = dict(steps=args.steps, warmup=1, device=args.device, dtype=args.dtype, jobs=args.jobs, trace=args.trace,
               time_budget=args.time_budget, progress=lambda m: print(m, file=sys.stderr, flush=True))  # fmt: skip

    unbounded, smallest = run_matrix(spec, [_config(b, args.codegen) for b in (LARGEST, SMALLEST)], **run)
    peaks = [r.get("predicted_peak_bytes") for r in (unbounded, smallest)]
    if None in peaks:
        print(f"no predicted peaks to sweep between: {unbounded.get('error')} / {smallest.get('error')}")
        return 1
    budgets = sweep_budgets(peaks[0], peaks[1], args.points)
    rows = run_matrix(spec, [_config(b, args.codegen) for b in budgets], **run)
    for row in rows:
        row["budget"] = row["options"]["memory_budget"]
    verdicts, failures = check_sweep(rows)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"spec": args.spec, "bounds": [unbounded, smallest], "rows": rows, "verdicts": verdicts}, out)
    print(f"{args.spec} ({args.device}, {args.dtype}, {args.codegen}): predicted peaks {peaks[0] / MIB:.1f} MiB "
          f"at the least-time plan, {peaks[1] / MIB:.1f} MiB at the smallest plan")  # fmt: skip
    print(format_verdicts(verdicts))
    print("sweep: " + ("; ".join(failures) if failures else "every budget kept, peaks monotonic"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
