"""The ``fxmem`` command line (also ``python -m fxmem``).

    fxmem inspect models/gpt.py:tiny --budget 0.4 --json plan.json --plot plan.png --dot plan.dot
    fxmem bench models/gpt.py:tiny

Exit status: 0 on success, 1 when planning failed, 2 on a bad spec or option.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import logging
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

log = logging.getLogger("fxmem")


class UsageError(Exception):
    """A bad spec or option: reported in one line, exit status 2."""


# ---- progress ----


@contextlib.contextmanager
def progress(message: str, *, delay: float = 0.5, stream: Any = None) -> Iterator[None]:
    """A spinner with the elapsed time on ``stream`` (stderr) after ``delay`` seconds; nothing when the
    stream is not a terminal."""
    stream = sys.stderr if stream is None else stream
    if not getattr(stream, "isatty", lambda: False)():
        yield
        return
    done = threading.Event()
    started = time.monotonic()

    def spin() -> None:
        if done.wait(delay):
            return
        for frame in itertools.cycle("|/-\\"):
            stream.write(f"\r{frame} {message} {time.monotonic() - started:.0f}s")
            stream.flush()
            if done.wait(0.1):
                break
        stream.write("\r\033[K")
        stream.flush()

    thread = threading.Thread(target=spin, name="fxmem-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


# ---- inspect ----


def parse_budget(text: str) -> float | int | str:
    """``"0.4"`` → 0.4 (a fraction of torch.compile's activation memory), ``"123456"`` → 123456 bytes,
    ``"6GiB"`` → ``"6GiB"`` (read by ``FxmemConfig``)."""
    text = text.strip()
    with contextlib.suppress(ValueError):
        return int(text)
    with contextlib.suppress(ValueError):
        return float(text)
    return text


def _add_inspect(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "inspect",
        parents=[common],
        help="show the plan fxmem makes for a model, without training it",
        description="Trace a model, plan it and print, for each tensor the backward needs, whether fxmem keeps, "
        "recomputes or quantizes it.",
    )
    parser.add_argument("spec", metavar="FILE.py:FACTORY", help="FACTORY() returns (model, example_inputs)")
    parser.add_argument(
        "--budget", type=parse_budget, default=None, metavar="B", help="0.4 (a fraction), 123456 (bytes) or 6GiB"
    )
    parser.add_argument(
        "--quantize", default=None, metavar="Q", help="none, auto, int8, fp8, int4, int2, or a list: int8,fp8"
    )
    parser.add_argument("--codegen", choices=("eager", "inductor"), default="eager", help="default: eager (faster)")
    parser.add_argument(
        "-o", "--option", action="append", default=[], metavar="KEY=VALUE",
        help="any other fxmem option, e.g. -o solver=ilp -o on_infeasible=best_effort (repeatable)",
    )  # fmt: skip
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON")
    parser.add_argument("--plot", metavar="PATH", help="draw the memory timeline (.png or .svg; needs matplotlib)")
    parser.add_argument("--dot", metavar="PATH", help="write the tensors as Graphviz DOT")
    parser.add_argument("--all", action="store_true", help="also list parameters and buffers")
    parser.set_defaults(handler=run_inspect)


def _option_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    return parse_budget(text)


def inspect_options(args: argparse.Namespace) -> dict[str, Any]:
    """The fxmem options the flags name, validated (``UsageError`` on a bad one)."""
    from fxmem.config import FxmemConfig

    options: dict[str, Any] = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--option: expected KEY=VALUE, got {item!r}")
        options[key.strip()] = _option_value(value.strip())
    if args.budget is not None:
        options["memory_budget"] = args.budget
    if args.quantize is not None:
        modes = [m.strip() for m in args.quantize.split(",") if m.strip()]
        options["quantize"] = modes[0] if len(modes) == 1 else modes
    options["codegen"] = args.codegen
    try:
        FxmemConfig.from_options(options)
    except ValueError as err:
        raise UsageError(str(err)) from err
    return options


def _check_outputs(args: argparse.Namespace) -> None:
    """Fail before the slow part on an output that cannot be written."""
    if args.plot:
        from fxmem.inspection.plot import check_plot_path

        try:
            check_plot_path(args.plot)
        except (ValueError, ImportError) as err:
            raise UsageError(f"--plot: {err}") from err


def _planning_error(err: BaseException) -> BaseException:
    """The error fxmem raised, from inside torch.compile's wrapper of backend errors."""
    inner = getattr(err, "inner_exception", None)
    return inner if isinstance(inner, BaseException) else err


def run_inspect(args: argparse.Namespace) -> int:
    from fxmem.factory import build_from_spec
    from fxmem.inspection import inspect

    options = inspect_options(args)
    _check_outputs(args)
    with progress(f"building {args.spec}"):
        try:
            model, example_inputs = build_from_spec(args.spec)
        except ValueError as err:
            raise UsageError(str(err)) from err
        except Exception as err:
            if args.verbose:
                traceback.print_exc()
            raise UsageError(f"{args.spec}: the factory failed: {type(err).__name__}: {err}") from err
    with progress(f"tracing and planning {args.spec}"):
        try:
            report = inspect(model, *example_inputs, **options)
        except Exception as err:
            inner = _planning_error(err)
            if args.verbose:
                traceback.print_exc()
            hint = " (on the command line: -o on_infeasible=best_effort)" if "on_infeasible" in str(inner) else ""
            print(f"fxmem inspect: planning failed: {type(inner).__name__}: {inner}{hint}", file=sys.stderr)
            return 1
    print(report.table(params=args.all, color=sys.stdout.isatty()), end="")
    if args.json:
        print(f"wrote {report.save_json(args.json)}")
    if args.plot:
        print(f"wrote {report.plot_timeline(args.plot)}")
    if args.dot:
        from pathlib import Path

        path = Path(args.dot)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report.to_dot(params=args.all))
        print(f"wrote {path}")
    return 0


# ---- bench: the subcommand lives in fxmem/bench/cli.py (add_arguments(parser), run(args) -> int) ----


def _add_bench(subparsers: Any, common: argparse.ArgumentParser) -> None:
    try:
        bench_cli = importlib.import_module("fxmem.bench.cli")
    except ImportError as err:
        reason = str(err)
        parser = subparsers.add_parser("bench", parents=[common], help="benchmark a model (unavailable)")
        parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

        def unavailable(_args: argparse.Namespace) -> int:
            print(f"fxmem bench is unavailable in this installation: {reason}", file=sys.stderr)
            return 2

        parser.set_defaults(handler=unavailable)
        return
    parser = subparsers.add_parser("bench", parents=[common], help="benchmark memory and step time of a model")
    bench_cli.add_arguments(parser)
    parser.set_defaults(handler=bench_cli.run)


# ---- entry point ----


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging for fxmem"
    )
    parser = argparse.ArgumentParser(
        prog="fxmem",
        parents=[common],
        description="fxmem: a torch.compile backend that cuts training activation memory.",
        epilog="Set FXMEM_LOG=debug (or info) in the environment for fxmem's log output.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_inspect(subparsers, common)
    _add_bench(subparsers, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.verbose = getattr(args, "verbose", False)
    from fxmem.inspection.logs import configure_logging

    if args.verbose:  # (importing fxmem has honoured FXMEM_LOG already)
        configure_logging(logging.DEBUG)
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.handler(args) or 0)
    except UsageError as err:
        print(f"fxmem {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
