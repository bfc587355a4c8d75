"""Run one benchmark configuration in this process and print its row as one line of JSON.

The matrix runs every configuration through ``python -m fxmem.bench.runner`` in a fresh process, so no
compile cache in memory, allocator state or global config patch leaks from one row into the next.

A step is forward + backward + ``AdamW.step()`` + ``zero_grad(set_to_none=True)``; AdamW's state exists
before the first step, so that every system compiles with the memory it trains with. The first step is timed
as ``compile_s``, and its gradients are compared with those of an eager step on a copy of the model taken
before (``grad_error``); after the warm-up, ``steps`` steps are timed one by one. Two more steps follow, untimed:
one under saved-tensor hooks (``saved_bytes``) and, on CUDA, one between ``reset_peak_memory_stats`` and
``max_memory_allocated`` (``peak_bytes``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import statistics
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any

from fxmem.bench.measure import SavedTensors, add_note, grad_error, has_dropout, reference_grads
from fxmem.bench.systems import fp8_note, fxmem_predictions, prepare
from fxmem.bench.trace import recorded_simulations, trace_path, write_trace

__all__ = ["ROW_FIELDS", "empty_row", "main", "run_config"]


ROW_FIELDS = (
    "system",
    "options",
    "label",
    "step_ms",
    "step_ms_min",
    "step_ms_max",
    "saved_bytes",
    "peak_bytes",
    "predicted_saved_bytes",
    "predicted_peak_bytes",
    "loss",
    "grad_error",
    "compile_s",
    "saved_by_dtype",
    "graphs",
    "error",
    "note",
)


def empty_row(config: dict[str, Any], label: str = "") -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(ROW_FIELDS)
    row.update(system=config["system"], options=config.get("options") or {}, label=label)
    return row


def _lock(path: str | None) -> contextlib.AbstractContextManager[Any]:
    """Serialises the timed part of concurrently running configurations (``--jobs``)."""
    if not path:
        return contextlib.nullcontext()
    import fcntl

    @contextlib.contextmanager
    def held() -> Iterator[None]:
        with open(path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    return held()


def run_config(
    spec: str,
    config: dict[str, Any],
    *,
    steps: int = 20,
    warmup: int = 3,
    device: str = "cpu",
    dtype: str = "float32",
    lock: str | None = None,
    label: str = "",
    threads: int | None = None,
    trace: str | None = None,
) -> dict[str, Any]:
    """Run one configuration; the row records an ``error`` instead of raising. ``trace``: a folder for the
    allocation trace of the measured CUDA step (``fxmem.bench.trace``)."""
    row = empty_row(config, label)
    try:
        kw = dict(steps=steps, warmup=warmup, device=device, dtype=dtype, lock=lock, threads=threads, trace=trace)
        _run(spec, config, row, **kw)
    except Exception as err:  # noqa: BLE001 - a failing configuration is a result, not a crash
        traceback.print_exc(file=sys.stderr)
        row["error"] = f"{type(err).__name__}: {err}"[:2000]
    row.pop("_compiler", None)
    return row


def _create_optimizer_state(optimizer: Any) -> None:
    """Allocate AdamW's moments before the first compiled step (a step with zero gradients at lr 0
    leaves the weights as they are), so that every system compiles with the memory it trains with,
    and fxmem's absolute budgets see the optimizer state."""
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for param in group["params"]:
            param.grad = param.detach().new_zeros(param.shape)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr


def _run(spec: str, config: dict[str, Any], row: dict[str, Any], **kw: Any) -> None:
    import torch

    from fxmem.factory import build_from_spec

    device, steps, warmup = kw["device"], max(1, kw["steps"]), max(1, kw["warmup"])
    if kw.get("threads"):
        torch.set_num_threads(kw["threads"])
    cuda = device.startswith("cuda")
    model, inputs = build_from_spec(spec)
    model = model.to(device).train()
    inputs = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)
    tracker = SavedTensors([*model.parameters(), *model.buffers()])
    autocast = (
        torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
        if kw["dtype"] == "bfloat16"
        else contextlib.nullcontext()
    )
    reference = None
    if config["system"] != "eager":
        if has_dropout(model):  # eager and compiled code draw different masks: nothing to compare
            add_note(row, "gradients not compared with eager: the model has dropout")
        else:
            reference = reference_grads(model, inputs, autocast)
    step_fn = prepare(config, model, tracker, row)
    if step_fn is None:
        return
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    _create_optimizer_state(optimizer)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step(check: Any = None) -> Any:
        with autocast:
            loss = step_fn(*inputs)
        loss.backward()
        if check is not None:
            check()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def timed(check: Any = None) -> tuple[float, Any]:
        sync()
        start = time.perf_counter()
        loss = step(check)
        sync()
        return time.perf_counter() - start, loss

    def compare() -> None:  # the first step's gradients against eager's, before the optimizer moves
        if reference is not None:
            error = grad_error(model, reference)
            row["grad_error"] = error if math.isfinite(error) else None
            if not math.isfinite(error):
                add_note(row, "a parameter has a gradient in eager but not here, or the other way round")
            reference.clear()

    torch.manual_seed(0)
    simulations: list[dict[str, Any]] = []  # the plans fxmem simulates while compiling, for the trace
    with recorded_simulations(simulations) if kw["trace"] else contextlib.nullcontext():
        row["compile_s"], _ = timed(compare)
    with _lock(kw["lock"]):
        for _ in range(warmup - 1):
            timed()
        times, loss = [], None
        for _ in range(steps):
            seconds, loss = timed()
            times.append(seconds * 1e3)
        row["step_ms"] = statistics.median(times)
        row["step_ms_min"], row["step_ms_max"] = min(times), max(times)
        row["loss"] = float(loss.detach().float().item())
        with tracker.recording():
            step()
        row["saved_bytes"] = tracker.bytes
        row["saved_by_dtype"] = dict(sorted(tracker.by_dtype.items()))
        if cuda:
            sync()
            torch.cuda.reset_peak_memory_stats()
            step()
            sync()
            row["peak_bytes"] = torch.cuda.max_memory_allocated()
            if kw["trace"]:
                _traced_step(step, row, kw["trace"], simulations)
    fxmem_predictions(row)
    fp8_note(config, row)


def _traced_step(step: Any, row: dict[str, Any], folder: str, simulations: list[dict[str, Any]]) -> None:
    """One more step, its allocations recorded and written to ``folder`` with fxmem's predictions. A
    diagnostic: if it fails, the row says so and keeps its measurements."""
    import torch

    from fxmem._compat import recorded_cuda_allocations

    try:
        torch.cuda.reset_peak_memory_stats()
        allocated_before, events = torch.cuda.memory_allocated(), []
        with recorded_cuda_allocations(events):
            step()
        reports = getattr(row.get("_compiler"), "reports", ())
        peak = torch.cuda.max_memory_allocated()
        path = trace_path(folder, row["label"])
        write_trace(path, row, reports, events, allocated_before, peak, simulations)
    except Exception as err:  # noqa: BLE001 - the row's measurements stand without the trace
        traceback.print_exc(file=sys.stderr)
        add_note(row, f"no allocation trace: {type(err).__name__}: {err}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fxmem.bench.runner", description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="FILE.py:FACTORY")
    parser.add_argument("--config", required=True, help='JSON: {"system": ..., "options": {...}}')
    parser.add_argument("--label", default="")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--lock", default=None, help="a lock file held while timing (concurrent runs)")
    parser.add_argument("--trace", default=None, help="a folder for the measured CUDA step's allocation trace")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    stdout = sys.stdout
    sys.stdout = sys.stderr  # whatever the model prints must not mix with the row
    try:
        row = run_config(
            args.spec,
            json.loads(args.config),
            steps=args.steps,
            warmup=args.warmup,
            device=args.device,
            dtype=args.dtype,
            lock=args.lock,
            label=args.label,
            threads=args.threads,
            trace=args.trace,
        )
    finally:
        sys.stdout = stdout
    print(json.dumps(row, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
