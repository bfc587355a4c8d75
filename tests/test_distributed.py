"""fxmem under data parallelism: DDP and FSDP2 over two processes.

Each rank trains on its own shard of one batch; the reference is single-process eager PyTorch on the
whole batch with the mean loss. Both wrappers average gradients across ranks, and the shards are of
equal size, so the mean of the ranks' shard-mean losses is the whole batch's mean loss and the gradients
must agree up to rounding.

On CPU the ranks talk over gloo on the loopback interface; the two worker processes run once per module
(DDP, then FSDP2, in the same processes) and are killed if they take longer than ``TIMEOUT_S``. The same
workers run on two GPUs over NCCL with Inductor when CUDA has two devices (``gpu`` tests, skipped here).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

WORLD = 2
TIMEOUT_S = 150
GRAD_TOL = 1e-4
BUDGET = 0.4
SEED = 0
DATA_SEED = 1
BATCH = 8  # the whole batch; each rank takes BATCH // WORLD rows
WIDTH = 256  # Linear(256, 1024) holds 1 MiB of fp32 weights: DDP's 1 MiB buckets split the graph
BUCKET_MB = 1


class Block(nn.Module):
    """A pre-LayerNorm residual MLP block, as in a transformer."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(F.gelu(self.fc(self.ln(x)), approximate="tanh"))


class Net(nn.Module):
    """Two blocks called one after the other: under FSDP2, Dynamo breaks the graph at each block's hooks,
    and a break inside a ``for`` loop would send the whole ``forward`` back to eager."""

    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.embed = nn.Linear(16, width)
        self.block1 = Block(width)
        self.block2 = Block(width)
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.block1(self.embed(x))))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(DATA_SEED)
    return torch.randn(BATCH, 16, generator=g), torch.randn(BATCH, 4, generator=g)


def _model(device: str = "cpu") -> Net:
    torch.manual_seed(SEED)
    return Net().to(device)


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, target)


def _reference_grads() -> dict[str, torch.Tensor]:
    model = _model()
    x, y = _data()
    _loss(model(x), y).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _summary(reports: list[Any]) -> dict[str, Any]:
    return {
        "count": len(reports),
        "fallbacks": [r.fallback_reason for r in reports],
        "saved": [r.predicted_saved_bytes for r in reports],
        "reference": [r.reference_saved_bytes for r in reports],
        "budget": [r.budget_bytes for r in reports],
    }


def _step(model: nn.Module, compiled: Any, rank: int, device: str) -> None:
    x, y = _data()
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    _loss(compiled(x[rows].to(device)), y[rows].to(device)).backward()


def _run_ddp(rank: int, device: str, codegen: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    import fxmem

    torch._dynamo.reset()
    model = _model(device)
    ddp = DDP(model, bucket_cap_mb=BUCKET_MB, device_ids=None if device == "cpu" else [torch.device(device)])
    backend = fxmem.backend(memory_budget=BUDGET, codegen=codegen)
    _step(model, torch.compile(ddp, backend=backend), rank, device)
    grads = {name: p.grad.detach().cpu().clone() for name, p in model.named_parameters()}
    return grads, _summary(backend.reports)


def _run_fsdp2(rank: int, device: str, codegen: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from torch.distributed.fsdp import fully_shard

    import fxmem

    torch._dynamo.reset()
    model = _model(device)
    fully_shard(model.block1)
    fully_shard(model.block2)
    fully_shard(model)
    backend = fxmem.backend(memory_budget=BUDGET, codegen=codegen)
    _step(model, torch.compile(model, backend=backend), rank, device)
    # Each rank holds a shard of each gradient (a DTensor); gather the whole of it.
    grads = {name: p.grad.full_tensor().detach().cpu().clone() for name, p in model.named_parameters()}
    sharded = all(p.grad.to_local().numel() < p.numel() for p in model.parameters() if p.numel() >= WORLD)
    return grads, {**_summary(backend.reports), "sharded": sharded}


@contextlib.contextmanager
def _fresh_inductor_cache(parent: Path) -> Iterator[None]:
    """An empty Inductor cache in a new folder under ``parent`` while the context lasts."""
    try:
        from torch._inductor.utils import fresh_cache
    except ImportError:  # older name
        from torch._inductor.utils import fresh_inductor_cache as fresh_cache
    with torch._inductor.config.patch(fx_graph_cache=True), fresh_cache(dir=str(parent)):
        yield


def _worker(rank: int, port: int, out_dir: str, device_kind: str) -> None:
    """One rank: DDP, then FSDP2; writes ``<wrapper>_rank<r>.pt`` and ``.json`` (or ``error_rank<r>.txt``)."""
    import torch.distributed as dist

    out = Path(out_dir)
    try:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        if device_kind == "cuda":
            torch.cuda.set_device(rank)
            device, pg, codegen = f"cuda:{rank}", "nccl", "inductor"
        else:
            device, pg, codegen = "cpu", "gloo", "eager"
        dist.init_process_group(pg, rank=rank, world_size=WORLD)
        with contextlib.ExitStack() as stack:
            if codegen == "inductor":  # an empty cache: a compile served from it would skip fxmem's planning
                stack.enter_context(_fresh_inductor_cache(out))
            for name, run in (("ddp", _run_ddp), ("fsdp2", _run_fsdp2)):
                started = time.perf_counter()
                grads, summary = run(rank, device, codegen)
                summary["seconds"] = time.perf_counter() - started
                torch.save(grads, out / f"{name}_rank{rank}.pt")
                (out / f"{name}_rank{rank}.json").write_text(json.dumps(summary))
        dist.destroy_process_group()
    except BaseException:
        (out / f"error_rank{rank}.txt").write_text(traceback.format_exc())
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown, which takes several seconds after torch.compile.
    os._exit(0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out_dir: Path, device_kind: str) -> dict[str, Any]:
    context = mp.start_processes(
        _worker, args=(_free_port(), str(out_dir), device_kind), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the {WORLD} ranks did not finish in {TIMEOUT_S} s")
    except Exception as err:
        for process in context.processes:
            if process.is_alive():
                process.kill()
        errors = "\n".join(p.read_text() for p in sorted(out_dir.glob("error_rank*.txt")))
        pytest.fail(f"distributed workers failed: {err}\n{errors}")
    results: dict[str, Any] = {}
    for name in ("ddp", "fsdp2"):
        results[name] = [
            (
                torch.load(out_dir / f"{name}_rank{r}.pt"),
                json.loads((out_dir / f"{name}_rank{r}.json").read_text()),
            )
            for r in range(WORLD)
        ]
    return results


def _assert_grads_match(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert grads.keys() == reference.keys()
    for name, expected in reference.items():
        got = grads[name]
        assert got.shape == expected.shape, name
        err = ((got.double() - expected.double()).norm() / expected.double().norm()).item()
        assert err <= GRAD_TOL, f"{name}: relative error {err:.2e}"


def _assert_planned(summary: dict[str, Any], *, min_graphs: int) -> None:
    assert summary["count"] >= min_graphs, summary
    assert summary["fallbacks"] == [None] * summary["count"], summary
    for saved, reference in zip(summary["saved"], summary["reference"], strict=True):
        assert reference is not None and saved is not None
        assert saved <= reference, summary  # a 0.4 budget never holds more than the default


# --- CPU: gloo ------------------------------------------------------------------------------------------

needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs gloo"
)


@pytest.fixture(scope="module")
def cpu_results(tmp_path_factory) -> dict[str, Any]:
    return _launch(tmp_path_factory.mktemp("gloo"), "cpu")


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return _reference_grads()


@needs_gloo
def test_ddp_gradients_match_single_process_eager(cpu_results, reference):
    for grads, _ in cpu_results["ddp"]:
        _assert_grads_match(grads, reference)


@needs_gloo
def test_ddp_every_bucket_graph_is_planned(cpu_results):
    # DDP's optimizer splits the graph at its 1 MiB gradient buckets: several graphs, each planned.
    summaries = [summary for _, summary in cpu_results["ddp"]]
    for summary in summaries:
        _assert_planned(summary, min_graphs=2)
    assert summaries[0]["count"] == summaries[1]["count"]


@needs_gloo
def test_fsdp2_gradients_match_single_process_eager(cpu_results, reference):
    for grads, _ in cpu_results["fsdp2"]:
        _assert_grads_match(grads, reference)


@needs_gloo
def test_fsdp2_graphs_are_planned_and_gradients_sharded(cpu_results):
    # Dynamo breaks the graph at each FSDP2 module's hooks: the embedding, the block code (one graph that
    # serves both blocks) and the head are compiled and planned separately.
    for _, summary in cpu_results["fsdp2"]:
        _assert_planned(summary, min_graphs=3)
        assert summary["sharded"], "FSDP2 should leave each rank a shard of each gradient"


# --- GPU: NCCL, Inductor --------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason=f"needs {WORLD} CUDA devices")
def test_ddp_and_fsdp2_on_gpus_with_inductor(tmp_path):
    results = _launch(tmp_path, "cuda")
    reference = _reference_grads()
    for name in ("ddp", "fsdp2"):
        for grads, summary in results[name]:
            _assert_grads_match(grads, reference)
            _assert_planned(summary, min_graphs=1)
