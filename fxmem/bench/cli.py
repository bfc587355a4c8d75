"""``fxmem bench SPEC``: run the benchmark matrix on a model and compare memory and step time.

SPEC is ``FILE.py:FACTORY`` (``models/gpt.py:tiny`` or any file whose ``FACTORY()`` returns
``(model, example_inputs)`` with ``model(*example_inputs)`` the loss). Every configuration runs in a
fresh process; the table goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

__all__ = ["add_arguments", "run"]

_DESCRIPTION = """\
Run the benchmark matrix on a model: eager, eager with every block checkpointed, torch.compile (default,
activation-memory budgets, the fp8 activation pass) and fxmem (budgets x quantization). Each configuration
runs in a fresh process. SPEC is FILE.py:FACTORY, where FACTORY() returns (model, example_inputs) and
model(*example_inputs) is the loss. The table goes to stdout, progress to stderr."""

_EPILOG = """\
configurations (--configs):
  eager | checkpoint | compile | compile:budget=0.5 | compile:fp8 | fxmem | fxmem:memory_budget=0.25,quantize=fp8
  fxmem:{"memory_budget": "3000MiB"} | default | quick   (see fxmem/bench/matrix.py)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's arguments."""
    parser.description = _DESCRIPTION
    parser.epilog = _EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("spec", metavar="SPEC", help="FILE.py:FACTORY, e.g. models/gpt.py:tiny")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first, the compile included (default 3)")
    parser.add_argument("--configs", nargs="+", metavar="CONFIG", help="the configurations to run (default: all)")
    parser.add_argument("--extra", nargs="+", default=[], metavar="CONFIG", help="configurations to add")
    parser.add_argument("--quick", action="store_true", help="a reduced matrix (one row of each kind)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="bfloat16: autocast")
    parser.add_argument("--json", metavar="PATH", help="write {'rows': [...], 'machine': {...}} here")
    parser.add_argument("--plot", metavar="PATH", help="write the Pareto plot here (needs matplotlib)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration (default 900)")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds for the whole matrix")
    parser.add_argument(
        "--jobs", type=int, default=1, help="configurations compiling at once; the timed steps still take turns"
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per configuration (torch default)")
    parser.add_argument("--cold", action="store_true", help="disable Inductor's caches: time real compiles")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")


def _device(requested: str | None) -> str:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available")
    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


def run(args: argparse.Namespace) -> int:
    """Run the matrix; 0 when at least one configuration ran, 1 when all failed, 2 on bad arguments."""
    from fxmem.bench.launch import resolve_spec, run_matrix
    from fxmem.bench.matrix import parse_configs
    from fxmem.bench.results import format_table, machine_info, sort_rows, write_results

    def progress(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    try:
        if args.steps < 1 or args.warmup < 1 or args.jobs < 1:
            raise ValueError("--steps, --warmup and --jobs must be at least 1")
        device = _device(args.device)
        spec = resolve_spec(args.spec)
        configs = parse_configs(args.configs, device=device, dtype=args.dtype, quick=args.quick)
        configs += parse_configs(args.extra, device=device, dtype=args.dtype) if args.extra else []
    except ValueError as err:
        print(f"fxmem bench: {err}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    _exit_on_sigterm()
    rows = run_matrix(
        spec,
        configs,
        steps=args.steps,
        warmup=args.warmup,
        device=device,
        dtype=args.dtype,
        timeout=args.timeout,
        time_budget=args.time_budget,
        jobs=args.jobs,
        threads=args.threads,
        cold=args.cold,
        progress=progress,
    )
    rows = sort_rows(rows)
    meta: dict[str, Any] = {
        "spec": args.spec,
        "device": device,
        "dtype": args.dtype,
        "steps": args.steps,
        "warmup": args.warmup,
        "jobs": args.jobs,
        "threads": args.threads,
        "cold": args.cold,
        "wall_s": round(time.perf_counter() - started, 1),
        "machine": machine_info(device),
    }
    if args.json:
        write_results(args.json, rows, meta)
        progress(f"wrote {args.json}")
    if args.plot:
        try:
            from fxmem.bench.plot import plot_pareto

            plot_pareto(rows, args.plot, title=f"{args.spec} ({device}, {args.dtype})")
            progress(f"wrote {args.plot}")
        except ImportError as err:
            progress(f"no plot: {err}")
    print(format_table(rows, markdown=args.markdown))
    return 0 if any(not r.get("error") for r in rows) else 1


def _exit_on_sigterm() -> None:
    """``timeout`` and job schedulers send SIGTERM: unwind, so that the running configurations end too."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fxmem.bench.cli")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
