"""Solve time and objective of the solvers on synthetic graphs of growing size, and the min-cut solver's
gap to the exact ILP. No GPU, no torch model: plain numbers from ``fxmem.solve.synthetic``.

    python bench/solver_bench.py                      # scaling table, 10..2000 nodes (about a minute)
    python bench/solver_bench.py --parity             # gap distribution on the small families (about 30 s)
    python bench/solver_bench.py --json out.json      # also write every row as JSON
    python bench/solver_bench.py --sizes 10 100 --families transformer --fractions 0.3

With a byte budget (a fraction of what saving every required node holds) the objective is what the
solvers minimise: the added time plus the precision penalty of quantized formats, in µs. ``gap`` is each
solver's excess over the ILP's optimum (a ``*`` marks an ILP that stopped at its time limit).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fxmem.solve import Problem, get_solver  # noqa: E402
from fxmem.solve import greedy as _greedy  # noqa: E402, F401  (registers "greedy")
from fxmem.solve import ilp as _ilp  # noqa: E402, F401  (registers "ilp")
from fxmem.solve.synthetic import (  # noqa: E402
    ALL_FORMATS,
    BITS,
    chain,
    families,
    long_skips,
    objective_s,
    random_dag,
    transformer_like,
    with_budget,
)

FAMILIES: dict[str, Callable[[int], Problem]] = {
    "chain": lambda n: chain(n, seed=n),
    "unet": lambda n: long_skips(n),
    "transformer": lambda n: transformer_like(max(1, round((n - 1) / 9))),  # 9 nodes a layer
    "random": lambda n: random_dag(n, seed=n),
}
SOLVERS = {
    "mincut-raw": lambda p, t: get_solver("mincut")(p, formats=ALL_FORMATS, bits=BITS, refine=False),
    "mincut": lambda p, t: get_solver("mincut")(p, formats=ALL_FORMATS, bits=BITS),
    "greedy": lambda p, t: get_solver("greedy")(p, formats=ALL_FORMATS, bits=BITS),
    "ilp": lambda p, t: get_solver("ilp")(p, formats=ALL_FORMATS, bits=BITS, time_limit_s=t),
}


def scaling(args: argparse.Namespace) -> list[dict]:
    rows = []
    print(f"{'family':12s} {'nodes':>5s} {'budget':>6s} " + " ".join(f"{s:>26s}" for s in args.solvers))
    print(f"{'':12s} {'':>5s} {'':>6s} " + " ".join(f"{'time s / obj µs / gap':>26s}" for _ in args.solvers))
    for family in args.families:
        for size in args.sizes:
            problem = FAMILIES[family](size)
            for fraction in args.fractions:
                budgeted = with_budget(problem, fraction=fraction)
                plans = {}
                for solver in args.solvers:
                    if solver == "greedy" and len(problem.nodes) > args.greedy_max_nodes:
                        continue
                    started = time.perf_counter()
                    plans[solver] = SOLVERS[solver](budgeted, args.time_limit)
                    plans[solver].solve_time_s = time.perf_counter() - started
                best = objective_s(budgeted, plans["ilp"]) if "ilp" in plans else None
                cells = []
                for solver, plan in plans.items():
                    value = objective_s(budgeted, plan)
                    gap = None if best is None or not plan.feasible else (value - best) / max(best, 1e-15)
                    proven = solver != "ilp" or not any("not proven" in n or "no plan" in n for n in plan.notes)
                    rows.append(
                        {
                            "family": family,
                            "nodes": len(problem.nodes),
                            "budget_fraction": fraction,
                            "solver": solver,
                            "solve_time_s": plan.solve_time_s,
                            "added_us": plan.added_s * 1e6,
                            "objective_us": value * 1e6,
                            "saved_mb": plan.saved_bytes / 2**20,
                            "feasible": plan.feasible,
                            "gap_to_ilp": gap,
                            "proven_optimal": proven if solver == "ilp" else None,
                        }
                    )
                    mark = "" if plan.feasible else " INF"
                    mark += "" if proven else " *"
                    gap_s = "" if gap is None else f"{100 * gap:+.1f}%"
                    cells.append(f"{plan.solve_time_s:7.3f} {value * 1e6:9.1f} {gap_s:>7s}{mark:3s}")
                cells = [cells[list(plans).index(s)] if s in plans else "-" for s in args.solvers]
                print(f"{family:12s} {len(problem.nodes):5d} {fraction:6.2f} " + " ".join(f"{c:>26s}" for c in cells))
                sys.stdout.flush()
    print("gap: excess objective over the ILP; INF: budget not met; *: ILP stopped at its time limit")
    return rows


def parity(args: argparse.Namespace) -> list[dict]:
    """The min-cut solver (with and without its refinement) and the greedy baseline against the ILP on
    every small family, both format sets, a dozen budgets each."""
    zoo = families()
    for seed in range(4, 10):
        zoo[f"random{30 + 4 * seed}_s{seed}"] = random_dag(30 + 4 * seed, seed=seed)
    fractions = (0.9, 0.75, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.06, 0.03)
    rows = []
    for name, problem in zoo.items():
        scale = sum(n.recompute_s for n in problem.nodes)
        for fraction in fractions:
            for formats in ((), ALL_FORMATS):
                budgeted = with_budget(problem, fraction=fraction)
                exact = get_solver("ilp")(budgeted, formats=formats, bits=BITS, time_limit_s=args.time_limit)
                if not exact.feasible:
                    continue
                best = objective_s(budgeted, exact)
                row = {"family": name, "fraction": fraction, "formats": bool(formats), "ilp_us": best * 1e6}
                for solver, kwargs in (("mincut-raw", {"refine": False}), ("mincut", {}), ("greedy", {})):
                    plan = get_solver(solver.split("-")[0])(budgeted, formats=formats, bits=BITS, **kwargs)
                    value = objective_s(budgeted, plan)
                    row[f"{solver}_us"] = value * 1e6 if plan.feasible else None
                    row[f"{solver}_gap"] = (value - best) / max(best, 1e-15)
                    row[f"{solver}_within"] = plan.feasible and value <= best * 1.02 + 0.005 * scale
                rows.append(row)
    print(f"{len(rows)} feasible (graph, budget, formats) cases on {len(zoo)} graphs of 12..66 nodes")
    header = ("mean gap", "median", "p90", "max", ">2%", ">2%+eps", "unmet")
    print(f"{'solver':12s} " + " ".join(f"{h:>8s}" for h in header))
    for solver in ("mincut-raw", "mincut", "greedy"):
        met = [r for r in rows if r[f"{solver}_us"] is not None]
        gaps = sorted(r[f"{solver}_gap"] for r in met)
        over = sum(g > 0.02 for g in gaps)
        over_eps = sum(not r[f"{solver}_within"] for r in met)
        p90 = gaps[int(0.9 * (len(gaps) - 1))]
        print(
            f"{solver:12s} {100 * statistics.mean(gaps):7.2f}% {100 * statistics.median(gaps):7.2f}% "
            f"{100 * p90:7.2f}% {100 * gaps[-1]:7.1f}% {over:8d} {over_eps:8d} {len(rows) - len(met):8d}"
        )
    print("gap: excess objective (added time + precision penalty) over the ILP optimum;")
    print("eps: 0.5% of the time to recompute every node;")
    print("unmet: budgets the ILP meets and the solver does not")
    worst = sorted(rows, key=lambda r: -r["mincut_gap"])[:5]
    cases = [f"{r['family']} {r['fraction']} {100 * r['mincut_gap']:.1f}%" for r in worst]
    print("worst for mincut:", "; ".join(cases))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 30, 100, 300, 1000, 2000])
    parser.add_argument("--families", nargs="+", default=["transformer", "unet", "random"], choices=list(FAMILIES))
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.3])
    parser.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=list(SOLVERS))
    parser.add_argument("--time-limit", type=float, default=10.0, help="the ILP's time limit per solve, seconds")
    parser.add_argument("--greedy-max-nodes", type=int, default=1000, help="skip the greedy baseline above this")
    parser.add_argument("--parity", action="store_true", help="gap distribution on the small families instead")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    rows = parity(args) if args.parity else scaling(args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
