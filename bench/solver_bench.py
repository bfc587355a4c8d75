"""Solve time and objective of the solvers on synthetic graphs of growing size, and the min-cut solver's
gap to the exact ILP. No GPU, no torch model: plain numbers from ``fxmem.solve.synthetic``.

    python bench/solver_bench.py                      # scaling table, 10..2000 nodes (about 20 s)
    python bench/solver_bench.py --parity             # gaps to the ILP on small graphs (about a minute)
    python bench/solver_bench.py --monotone           # inversions over a fine sweep of budgets (about 3 min)
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

from fxmem.solve import Plan, Problem, get_solver  # noqa: E402
from fxmem.solve import greedy as _greedy  # noqa: E402, F401  (registers "greedy")
from fxmem.solve import ilp as _ilp  # noqa: E402, F401  (registers "ilp")
from fxmem.solve.synthetic import (  # noqa: E402
    ALL_FORMATS,
    BITS,
    chain,
    diamond,
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


def _tuning_zoo() -> dict[str, Problem]:
    """The 9 ``families()`` and 6 more random DAGs: the graphs the min-cut refinement was tuned on."""
    zoo = families()
    for seed in range(4, 10):
        zoo[f"random{30 + 4 * seed}_s{seed}"] = random_dag(30 + 4 * seed, seed=seed)
    return zoo


def _held_out_zoo() -> dict[str, Problem]:
    """Graphs (and, in ``parity``, budgets) the refinement was not tuned on: 20 random DAGs of 50 to 107
    nodes and 3 of each other family with other shapes."""
    zoo = {f"random{20 + 3 * seed}_s{seed}": random_dag(20 + 3 * seed, seed=seed) for seed in range(10, 30)}
    for k in range(3):
        zoo[f"chain{30 + 10 * k}_s{100 + k}"] = chain(30 + 10 * k, seed=100 + k, matmul_every=2 + k)
        zoo[f"transformer{2 + k}_pw{3 - k}"] = transformer_like(2 + k, pointwise=3 - k)
        zoo[f"diamond{2 + k}_w{2 + k}"] = diamond(2 + k, width=2 + k)
        zoo[f"unet{30 + 12 * k}"] = long_skips(30 + 12 * k)
    return zoo


COMPARED = (("mincut-raw", {"refine": False}), ("mincut", {}), ("greedy", {}))


def _byte_parity(zoo: dict[str, Problem], fractions: tuple[float, ...], args: argparse.Namespace) -> list[dict]:
    rows = []
    for name, problem in zoo.items():
        for fraction in fractions:
            for formats in ((), ALL_FORMATS):
                budgeted = with_budget(problem, fraction=fraction)
                exact = get_solver("ilp")(budgeted, formats=formats, bits=BITS, time_limit_s=args.time_limit)
                if not exact.feasible:
                    continue
                best = objective_s(budgeted, exact)
                row = {"family": name, "fraction": fraction, "formats": bool(formats), "ilp_us": best * 1e6}
                for solver, kwargs in COMPARED:
                    started = time.perf_counter()
                    plan = get_solver(solver.split("-")[0])(budgeted, formats=formats, bits=BITS, **kwargs)
                    row[f"{solver}_s"] = time.perf_counter() - started
                    value = objective_s(budgeted, plan)
                    row[f"{solver}_us"] = value * 1e6 if plan.feasible else None
                    row[f"{solver}_gap"] = (value - best) / max(best, 1e-15)
                rows.append(row)
    return rows


def _print_gaps(rows: list[dict], what: str) -> None:
    print(f"{'solver':12s} " + " ".join(f"{h:>8s}" for h in ("mean", "median", "p90", "max", ">0.1%", ">2%", "unmet")))
    for solver, _ in COMPARED:
        met = [r for r in rows if r[f"{solver}_{what}"] is not None]
        gaps = sorted(r[f"{solver}_gap"] for r in met)
        p90 = gaps[int(0.9 * (len(gaps) - 1))]
        times = [r[f"{solver}_s"] for r in rows]
        print(
            f"{solver:12s} {100 * statistics.mean(gaps):7.3f}% {100 * statistics.median(gaps):7.3f}% "
            f"{100 * p90:7.3f}% {100 * gaps[-1]:7.2f}% {sum(g > 0.001 for g in gaps):8d} "
            f"{sum(g > 0.02 for g in gaps):8d} {len(rows) - len(met):8d}   "
            f"solve {1e3 * statistics.mean(times):.0f} ms mean, {1e3 * max(times):.0f} ms max"
        )


def parity(args: argparse.Namespace) -> list[dict]:
    """The min-cut solver (with and without its refinement) and the greedy baseline against the ILP on
    small graphs: byte budgets on the graphs the refinement was tuned on and on held-out ones, then
    time budgets."""
    rows = []
    for title, zoo, fractions in (
        ("tuning set", _tuning_zoo(), (0.9, 0.75, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.06, 0.03)),
        ("held-out set", _held_out_zoo(), (0.8, 0.55, 0.35, 0.22, 0.12, 0.05)),
    ):
        cases = _byte_parity(zoo, fractions, args)
        sizes = [len(p.nodes) for p in zoo.values()]
        print(
            f"byte budgets, {title}: {len(cases)} feasible (graph, budget, formats) cases on {len(zoo)} graphs "
            f"of {min(sizes)}..{max(sizes)} nodes; gap: excess objective over the ILP optimum"
        )
        _print_gaps(cases, "us")
        worst = sorted(cases, key=lambda r: -r["mincut_gap"])[:5]
        print(
            "worst for mincut:", "; ".join(f"{r['family']} {r['fraction']} {100 * r['mincut_gap']:.2f}%" for r in worst)
        )
        rows += [{**r, "set": title} for r in cases]
    # Time budgets: the fewest bytes with the added time at most a share of recomputing everything.
    timed = []
    for name, problem in _tuning_zoo().items():
        scale = sum(n.recompute_s for n in problem.nodes)
        for share in (0.001, 0.01, 0.03, 0.1, 0.3):
            for formats in ((), ALL_FORMATS):
                budgeted = with_budget(problem, max_added_s=share * scale)
                exact = get_solver("ilp")(budgeted, formats=formats, bits=BITS, time_limit_s=args.time_limit)
                row = {"family": name, "share": share, "formats": bool(formats), "ilp_mb": exact.saved_bytes / 2**20}
                for solver, kwargs in COMPARED:
                    started = time.perf_counter()
                    plan = get_solver(solver.split("-")[0])(budgeted, formats=formats, bits=BITS, **kwargs)
                    row[f"{solver}_s"] = time.perf_counter() - started
                    row[f"{solver}_mb"] = plan.saved_bytes / 2**20 if plan.feasible else None
                    row[f"{solver}_gap"] = plan.saved_bytes / max(exact.saved_bytes, 1) - 1
                timed.append(row)
    print(f"time budgets, tuning set: {len(timed)} cases; gap: excess held bytes over the ILP optimum")
    _print_gaps(timed, "mb")
    print("unmet: budgets the ILP meets and the solver does not")
    return rows + [{**r, "set": "time budgets"} for r in timed]


def _tier(plan: Plan) -> int:
    """The tier a plan comes from: the fewest bits among its formats (8 with none)."""
    return min((BITS[fmt] for fmt in plan.quantized.values()), default=8)


def monotone(args: argparse.Namespace) -> list[dict]:
    """Sweep the byte budget down in steps of 1.15% of keep-all on the tuning set, both format sets, until
    it cannot be met; count the neighbouring budgets where the smaller gives a better objective or holds
    more bytes, and say which of those are tier switches (where the exact ILP inverts too)."""
    zoo = _tuning_zoo()
    inversions: list[dict] = []
    pairs = 0
    for name, problem in zoo.items():
        for formats in ((), ALL_FORMATS):
            previous = None
            for k in range(87):
                fraction = 1.0 - 0.0115 * k
                budgeted = with_budget(problem, fraction=fraction)
                plans = {
                    s: get_solver(s.split("-")[0])(budgeted, formats=formats, bits=BITS, **kw) for s, kw in COMPARED[:2]
                }
                if not all(plan.feasible for plan in plans.values()):
                    break
                if previous is not None:
                    pairs += 1
                    for solver, plan in plans.items():
                        larger = previous[0][solver]
                        case = {
                            "solver": solver,
                            "family": name,
                            "formats": formats,
                            "fractions": (previous[1], fraction),
                        }
                        case["objective_us"] = (objective_s(budgeted, larger) * 1e6, objective_s(budgeted, plan) * 1e6)
                        case["saved_mb"] = (larger.saved_bytes / 2**20, plan.saved_bytes / 2**20)
                        case["tier_switch"] = _tier(plan) != _tier(larger)
                        if case["objective_us"][1] < case["objective_us"][0] * (1 - 1e-6):
                            inversions.append({**case, "what": "objective"})
                        if plan.saved_bytes > larger.saved_bytes:
                            inversions.append({**case, "what": "bytes"})
                previous = plans, fraction
    print(f"{pairs} pairs of neighbouring byte budgets (steps of 1.15% of keep-all) on {len(zoo)} graphs")
    print(f"{'solver':12s} {'objective':>10s} {'bytes':>6s}   (inversions; of which at a tier switch)")
    for solver, _ in COMPARED[:2]:
        counts = []
        for what in ("objective", "bytes"):
            found = [i for i in inversions if i["solver"] == solver and i["what"] == what]
            counts.append(f"{len(found)} ({sum(i['tier_switch'] for i in found)})")
        print(f"{solver:12s} {counts[0]:>10s} {counts[1]:>6s}")
    for i in inversions:
        if i["solver"] != "mincut":
            continue
        problem = zoo[i["family"]]
        exact = [
            get_solver("ilp")(with_budget(problem, fraction=f), formats=i["formats"], bits=BITS) for f in i["fractions"]
        ]
        if i["what"] == "objective":
            unit, mincut = "µs", i["objective_us"]
            ilp = [objective_s(problem, plan) * 1e6 for plan in exact]
        else:
            unit, mincut = "MB", i["saved_mb"]
            ilp = [plan.saved_bytes / 2**20 for plan in exact]
        print(
            f"  mincut {i['what']}: {i['family']} formats={bool(i['formats'])} budget {i['fractions'][0]:.4f} -> "
            f"{i['fractions'][1]:.4f}: {mincut[0]:.2f} -> {mincut[1]:.2f} {unit} (ILP {ilp[0]:.2f} -> {ilp[1]:.2f}), "
            f"tier switch: {i['tier_switch']}"
        )
    return inversions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 30, 100, 300, 1000, 2000])
    parser.add_argument("--families", nargs="+", default=["transformer", "unet", "random"], choices=list(FAMILIES))
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.3])
    parser.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=list(SOLVERS))
    parser.add_argument("--time-limit", type=float, default=10.0, help="the ILP's time limit per solve, seconds")
    parser.add_argument("--greedy-max-nodes", type=int, default=1000, help="skip the greedy baseline above this")
    parser.add_argument("--parity", action="store_true", help="gap distribution on the small families instead")
    parser.add_argument("--monotone", action="store_true", help="inversions on a fine sweep of byte budgets instead")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    rows = parity(args) if args.parity else monotone(args) if args.monotone else scaling(args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
