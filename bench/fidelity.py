"""Training fidelity of quantized saved activations, on real data that needs no download.

Two tasks, each trained for the same number of steps from the same initial weights on the same batches,
once per configuration:

* ``gpt``: a character-level GPT (``models/gpt.py``, 2 layers, 64 wide) on the Python standard library's
  own ``*.py`` sources (the first ``--corpus-mb`` MB of the top-level files of ``Path(os.__file__).parent``
  in name order; byte vocabulary; the last 10% of the text is the validation split). 500 steps, 1 seed.
* ``cnn``: a small ResNet (``models/resnet.py``, BasicBlocks, 1 input channel) on scikit-learn's bundled
  ``load_digits`` (1797 8x8 handwritten digits, shipped inside the package); a fixed 80/20 split and
  random +-1 pixel shifts as augmentation. 300 steps, 3 seeds (init and batch order), because one seed's
  final loss moves by about 1% under any perturbation at all.

Configurations: ``lossless`` fxmem (``{"codegen": "eager"}``), the baseline of every delta; ``noise``, the
same from initial weights perturbed by 1e-4 (relative), which shows how far a delta moves with no
quantization at all; and ``{"quantize": Q, "recompute": False, "memory_budget": B, "codegen": "eager"}`` for
``(Q, B)`` in ``(int8, 0.3), (fp8, 0.3), (int4, 0.2), (int2, 0.15)``. For each run it records the final
training loss (mean of the last ``k = steps/10`` steps), the validation loss and accuracy, the deltas
against the lossless run in %, the fraction of torch.compile's saved-for-backward bytes that fxmem keeps
(fxmem's prediction over the default partitioner's, from the ``GraphReport``), which formats the plan used
for how many tensors, and the wall time. Targets: |train-loss delta| <= 1% for int8 and fp8, <= 3% for int2.

``--grad-errors`` also measures, for the bundled ``tiny`` presets of gpt / vit / resnet / mlp, the error of
one step's parameter gradients against eager PyTorch (relative L2 error and cosine) for each configuration.

    python bench/fidelity.py --grad-errors           # everything (about 9 minutes on a busy 2-core machine)
    python bench/fidelity.py --quick                 # a smoke run (about a minute)
    python bench/fidelity.py --grad-errors --tasks none
    python bench/fidelity.py --tasks gpt --configs lossless,int4 --steps 600 --json out/fidelity.json

The ``cnn`` task needs scikit-learn (``pip install scikit-learn``); without it that task is skipped with a
message. Everything runs on the CPU with ``codegen="eager"`` (fxmem's rewritten graphs without Inductor),
with one intra-op thread by default: on a small shared machine more threads oversubscribe the cores.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fxmem  # noqa: E402
from bench.fidelity_data import (  # noqa: E402
    ImageData,
    TextData,
    image_batches,
    load_digits_data,
    load_text,
    text_batches,
    text_eval_windows,
)
from bench.fidelity_tables import print_grad_table, print_training_table  # noqa: E402
from models import gpt as gpt_models  # noqa: E402
from models import mlp as mlp_models  # noqa: E402
from models import resnet as resnet_models  # noqa: E402
from models import vit as vit_models  # noqa: E402

# (label, fxmem options). "lossless" is the baseline every delta is taken against; "noise" is lossless fxmem
# again from initial weights perturbed by NOISE_SCALE (relative): how far a delta moves with no quantization
# at all, i.e. the noise floor below which a delta says nothing.
CONFIGS: dict[str, dict[str, Any]] = {
    "lossless": {"codegen": "eager"},
    "noise": {"codegen": "eager"},
    "int8": {"quantize": "int8", "recompute": False, "memory_budget": 0.3, "codegen": "eager"},
    "fp8": {"quantize": "fp8", "recompute": False, "memory_budget": 0.3, "codegen": "eager"},
    "int4": {"quantize": "int4", "recompute": False, "memory_budget": 0.2, "codegen": "eager"},
    "int2": {"quantize": "int2", "recompute": False, "memory_budget": 0.15, "codegen": "eager"},
}
NOISE_SCALE = 1e-4
# Largest |final training-loss delta| vs lossless, in %, that the configuration should stay within.
TARGETS_PCT: dict[str, float] = {"int8": 1.0, "fp8": 1.0, "int2": 3.0}

GRAD_MODELS = {"gpt": gpt_models, "vit": vit_models, "resnet": resnet_models, "mlp": mlp_models}


# ---------------------------------------------------------------------------------------------------
# Tasks.


@dataclass
class Task:
    name: str
    description: str
    make_model: Callable[[], nn.Module]
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    batches: list[tuple[torch.Tensor, ...]]
    evaluate: Callable[[nn.Module], tuple[float, float]]  # model -> (val loss, val accuracy)
    info: dict[str, Any]


def gpt_logits(model: gpt_models.GPT, idx: torch.Tensor) -> torch.Tensor:
    """The logits ``(B, T, V)`` of ``models.gpt.GPT`` (whose ``forward`` returns only the loss)."""
    pos = torch.arange(idx.shape[1])
    x = model.drop(model.tok_emb(idx) + model.pos_emb(pos))
    for block in model.blocks:
        x = block(x)
    return model.head(model.ln_f(x))


def resnet_logits(model: resnet_models.ResNet, images: torch.Tensor) -> torch.Tensor:
    """The class logits ``(B, classes)`` of ``models.resnet.ResNet``."""
    x = model.stages(model.stem(images))
    return model.fc(x.mean(dim=(2, 3)))


def _classify(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    loss = F.cross_entropy(logits, labels).item()
    acc = (logits.argmax(-1) == labels).float().mean().item()
    return loss, acc


def gpt_task(data: TextData, steps: int, seed: int) -> Task:
    config = gpt_models.GPTConfig(
        vocab_size=len(data.vocab), block_size=64, n_layer=2, n_head=4, n_embd=64, batch_size=16, seq_len=64
    )
    windows = text_batches(data.train, steps, config.batch_size, config.seq_len, seed)
    val = text_eval_windows(data.val, 128, config.seq_len)

    def make_model() -> nn.Module:
        torch.manual_seed(seed)
        return gpt_models.GPT(config)

    def evaluate(model: nn.Module) -> tuple[float, float]:
        logits = torch.cat([gpt_logits(model, w[:, :-1]) for w in val.split(32)])  # (N, T, V)
        return _classify(logits.reshape(-1, logits.shape[-1]), val[:, 1:].reshape(-1))

    return Task(
        name="gpt",
        description=(
            f"char GPT {config.n_layer}L/{config.n_embd}d/{config.n_head}h, vocab {len(data.vocab)}, "
            f"B={config.batch_size} T={config.seq_len}, AdamW 2e-3; {len(data.train) + len(data.val):,} bytes "
            f"of stdlib *.py ({data.files} files)"
        ),
        make_model=make_model,
        make_optimizer=lambda m: torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.01),
        batches=[(w[:, :-1].contiguous(), w[:, 1:].contiguous()) for w in windows],
        evaluate=evaluate,
        info={
            "corpus_bytes": len(data.train) + len(data.val),
            "corpus_files": data.files,
            "corpus_sha256_16": data.sha256,
            "vocab_size": len(data.vocab),
            "train_tokens": len(data.train),
            "val_windows": len(val),
            "model": {k: getattr(config, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "seq_len")},
            "batch_size": config.batch_size,
            "optimizer": "AdamW(lr=2e-3, weight_decay=0.01)",
        },
    )


def cnn_task(data: ImageData, steps: int, seed: int) -> Task:
    config = resnet_models.ResNetConfig(
        block="basic",
        layers=(1, 1),
        widths=(16, 32),
        stem="cifar",
        in_chans=1,
        num_classes=10,
        image_size=8,
        batch_size=64,
    )
    batches = image_batches(data, steps, config.batch_size, seed)

    def make_model() -> nn.Module:
        torch.manual_seed(seed)
        return resnet_models.ResNet(config)

    def evaluate(model: nn.Module) -> tuple[float, float]:
        return _classify(resnet_logits(model, data.x_val), data.y_val)

    return Task(
        name="cnn",
        description=(
            f"ResNet basic {config.layers}/{config.widths} on sklearn digits 8x8 "
            f"({len(data.y_train)} train / {len(data.y_val)} val, +-1px shifts), B={config.batch_size}, AdamW 1e-3"
        ),
        make_model=make_model,
        make_optimizer=lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01),
        batches=batches,
        evaluate=evaluate,
        info={
            "dataset": "sklearn.datasets.load_digits",
            "train": len(data.y_train),
            "val": len(data.y_val),
            "model": {"block": config.block, "layers": config.layers, "widths": config.widths},
            "batch_size": config.batch_size,
            "optimizer": "AdamW(lr=1e-3, weight_decay=0.01)",
        },
    )


# ---------------------------------------------------------------------------------------------------
# Training runs.


def plan_summary(report: Any) -> dict[str, Any]:
    """Which saved tensors the plan quantized, to which format, and how many bytes each format holds."""
    formats: Counter[str] = Counter()
    fmt_bytes: Counter[str] = Counter()
    decisions: Counter[str] = Counter()
    tensors = []
    for row in report.rows:
        decisions[row.decision] += 1
        if row.decision == "quantize":
            formats[row.fmt] += 1
            fmt_bytes[row.fmt] += row.bytes
            tensors.append(
                {"name": row.name, "op": row.op, "shape": list(row.shape), "fmt": row.fmt, "bytes": row.bytes}
            )
    return {
        "decisions": dict(decisions),
        "formats": dict(formats),
        "format_full_bytes": dict(fmt_bytes),
        "quantized": tensors,
    }


class _Collect(logging.Handler):
    """Keeps fxmem's warnings (e.g. an unmeetable budget) for the run's row instead of printing them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def train_one(task: Task, label: str, options: dict[str, Any], init_state: dict[str, torch.Tensor], k: int) -> dict:
    collect = _Collect()
    logging.getLogger("fxmem").addHandler(collect)
    try:
        return _train_one(task, label, options, init_state, k) | {"warnings": collect.messages}
    finally:
        logging.getLogger("fxmem").removeHandler(collect)


def _train_one(task: Task, label: str, options: dict[str, Any], init_state: dict[str, torch.Tensor], k: int) -> dict:
    torch._dynamo.reset()
    model = task.make_model()
    model.load_state_dict(init_state)
    model.train()
    compiler = fxmem.backend(**options)
    step = torch.compile(model, backend=compiler)
    optimizer = task.make_optimizer(model)
    losses: list[float] = []
    times: list[float] = []
    started = time.perf_counter()
    for inputs in task.batches:
        t0 = time.perf_counter()
        loss = step(*inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - started
    model.eval()
    with torch.no_grad():
        val_loss, val_acc = task.evaluate(model)
    reports = compiler.reports
    row: dict[str, Any] = {
        "task": task.name,
        "config": label,
        "options": options,
        "steps": len(losses),
        "train_loss": statistics.fmean(losses[-k:]),
        "val_loss": val_loss,
        "val_acc": val_acc,
        "finite": all(math.isfinite(x) for x in losses),
        "wall_s": wall,
        "first_step_s": times[0],
        "step_ms": 1e3 * statistics.median(times[1:]) if len(times) > 1 else float("nan"),
        "graphs": len(reports),
        "losses": losses,
    }
    if reports:
        report = reports[0]
        row["fallback"] = report.fallback_reason
        row["predicted_saved_bytes"] = report.predicted_saved_bytes
        row["reference_saved_bytes"] = report.reference_saved_bytes
        if report.predicted_saved_bytes is not None and report.reference_saved_bytes:
            row["saved_fraction"] = report.predicted_saved_bytes / report.reference_saved_bytes
        budget = options.get("memory_budget")
        if isinstance(budget, float) and "saved_fraction" in row:
            row["budget_met"] = row["saved_fraction"] <= budget + 1e-9
        row["plan"] = plan_summary(report)
    return row


def perturbed(state: dict[str, torch.Tensor], scale: float, seed: int = 12345) -> dict[str, torch.Tensor]:
    """``state`` with ``scale * std(t) * N(0, 1)`` added to every floating tensor of more than one element."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state.items():
        if t.is_floating_point() and t.numel() > 1:
            t = t + scale * t.std() * torch.randn(t.shape, generator=g, dtype=t.dtype)
        out[name] = t
    return out


def run_seed(task: Task, labels: Sequence[str], k: int, seed: int) -> list[dict]:
    """Every configuration on one seed (one init and one batch order), with deltas vs this seed's lossless."""
    init_state = copy.deepcopy(task.make_model().state_dict())
    rows = []
    for label in labels:
        print(f"  seed {seed} {label:9s} ...", end=" ", flush=True)
        state = perturbed(init_state, NOISE_SCALE) if label == "noise" else init_state
        row = train_one(task, label, CONFIGS[label], state, k) | {"seed": seed}
        print(f"train {row['train_loss']:.4f}  val {row['val_loss']:.4f}  {row['wall_s']:.0f} s", flush=True)
        for message in row["warnings"]:
            print(f"    fxmem warning: {message}")
        rows.append(row)
    base = next((r for r in rows if r["config"] == "lossless"), None)
    if base is not None:
        for row in rows:
            row["train_delta_pct"] = 100 * (row["train_loss"] - base["train_loss"]) / base["train_loss"]
            row["val_delta_pct"] = 100 * (row["val_loss"] - base["val_loss"]) / base["val_loss"]
            row["val_acc_delta_pp"] = 100 * (row["val_acc"] - base["val_acc"])
    return rows


def summarise(task: str, runs: list[dict]) -> list[dict]:
    """One row per configuration: means over seeds, the per-seed delta range, and the target check."""
    out = []
    for label in dict.fromkeys(r["config"] for r in runs):
        rs = [r for r in runs if r["config"] == label]
        first = rs[0]
        row: dict[str, Any] = {"task": task, "config": label, "seeds": [r["seed"] for r in rs], "steps": first["steps"]}
        for key in ("train_loss", "val_loss", "val_acc", "step_ms"):
            row[key] = statistics.fmean(r[key] for r in rs)
        row["wall_s"] = sum(r["wall_s"] for r in rs)
        for key in ("train_delta_pct", "val_delta_pct", "val_acc_delta_pp"):
            if key in first:
                row[key] = statistics.fmean(r[key] for r in rs)
                row[key + "_range"] = [min(r[key] for r in rs), max(r[key] for r in rs)]
        for key in ("saved_fraction", "budget_met", "plan", "predicted_saved_bytes", "reference_saved_bytes"):
            if key in first:
                row[key] = first[key]
        row["finite"] = all(r["finite"] for r in rs)
        target = TARGETS_PCT.get(label)
        row["target_pct"] = target
        if target is not None and "train_delta_pct" in row:
            row["target_met"] = row["finite"] and abs(row["train_delta_pct"]) <= target
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------------
# Gradient error of one step against eager PyTorch.


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def grad_error(reference: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Relative L2 error and cosine of all parameter gradients (concatenated), and the worst parameter."""
    if set(reference) != set(grads):
        missing = sorted(set(reference) ^ set(grads))
        raise RuntimeError(f"gradients differ in which parameters they cover: {missing[:5]}")
    ref = torch.cat([reference[n].double().reshape(-1) for n in reference])
    got = torch.cat([grads[n].double().reshape(-1) for n in reference])
    worst_name, worst = "", 0.0
    for n in reference:
        denom = reference[n].double().norm().item()
        err = (grads[n].double() - reference[n].double()).norm().item()
        rel = err / denom if denom > 0 else (0.0 if err == 0 else math.inf)
        if rel > worst:
            worst_name, worst = n, rel
    return {
        "rel_error": ((got - ref).norm() / ref.norm()).item(),
        "cosine": F.cosine_similarity(got, ref, dim=0).item(),
        "worst_param": worst_name,
        "worst_param_rel_error": worst,
    }


def grad_errors(labels: Sequence[str], models: Sequence[str], seed: int = 0) -> list[dict]:
    rows = []
    for name in models:
        module = GRAD_MODELS[name]
        model, inputs = module.build("tiny", seed=seed)
        init_state = copy.deepcopy(model.state_dict())
        model(*inputs).backward()
        reference = _grads(model)
        for label in labels:
            torch._dynamo.reset()
            model, inputs = module.build("tiny", seed=seed)
            model.load_state_dict(init_state)
            compiler = fxmem.backend(**CONFIGS[label])
            collect = _Collect()
            logging.getLogger("fxmem").addHandler(collect)
            try:
                torch.compile(model, backend=compiler)(*inputs).backward()
            finally:
                logging.getLogger("fxmem").removeHandler(collect)
            row = {"model": f"{name}/tiny", "config": label, **grad_error(reference, _grads(model))}
            row["warnings"] = collect.messages
            if compiler.reports and compiler.reports[0].reference_saved_bytes:
                report = compiler.reports[0]
                row["saved_fraction"] = report.predicted_saved_bytes / report.reference_saved_bytes
                budget = CONFIGS[label].get("memory_budget")
                if isinstance(budget, float):
                    row["budget_met"] = row["saved_fraction"] <= budget + 1e-9
                row["plan"] = plan_summary(report)
            rows.append(row)
            print(f"  {row['model']:12s} {label:9s} rel {row['rel_error']:.2e}  cos {row['cosine']:.6f}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="gpt,cnn", help="comma-separated: gpt, cnn (or 'none'); default gpt,cnn")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: gpt 500, cnn 300)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds (init + batch order) per task (gpt 1, cnn 3)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 40 steps, one seed, a 0.5 MB corpus")
    parser.add_argument("--last-k", type=int, default=None, help="steps averaged for the final loss (steps/10)")
    parser.add_argument("--corpus-mb", type=float, default=3.0, help="MB of standard-library source for gpt")
    parser.add_argument("--grad-errors", action="store_true", help="also measure one-step gradient errors")
    parser.add_argument("--grad-models", default=",".join(GRAD_MODELS), help="models for --grad-errors")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="the first seed")
    parser.add_argument("--json", type=Path, default=None, help="write every row (with loss curves) here")
    args = parser.parse_args(argv)

    tasks = [t for t in args.tasks.split(",") if t and t != "none"]
    labels = [c for c in args.configs.split(",") if c]
    for t in tasks:
        if t not in ("gpt", "cnn"):
            parser.error(f"unknown task {t!r}; choose from gpt, cnn, none")
    for c in labels:
        if c not in CONFIGS:
            parser.error(f"unknown config {c!r}; choose from {', '.join(CONFIGS)}")
    if "lossless" in labels:
        labels = ["lossless", *[c for c in labels if c != "lossless"]]
    grad_models = [m for m in args.grad_models.split(",") if m]
    for m in grad_models:
        if m not in GRAD_MODELS:
            parser.error(f"unknown model {m!r} for --grad-errors; choose from {', '.join(GRAD_MODELS)}")
    for name in ("steps", "seeds", "last_k", "threads"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, tasks, labels, grad_models, argv)
    finally:
        torch.set_num_threads(threads)


def _run(
    args: argparse.Namespace,
    tasks: list[str],
    labels: list[str],
    grad_models: list[str],
    argv: Sequence[str] | None,
) -> int:
    corpus_bytes = int((0.5 if args.quick else args.corpus_mb) * 1e6)
    default_steps = {"gpt": 40, "cnn": 40} if args.quick else {"gpt": 500, "cnn": 300}
    default_seeds = {"gpt": 1, "cnn": 1} if args.quick else {"gpt": 1, "cnn": 3}

    meta: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", "bench/fidelity.py", *(sys.argv[1:] if argv is None else argv)]),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch thread(s)",
        "fxmem": fxmem.__version__,
        "configs": {c: CONFIGS[c] for c in labels},
        "noise_scale": NOISE_SCALE,
        "targets_pct": TARGETS_PCT,
    }
    print(f"fxmem {meta['fxmem']}, torch {meta['torch']}, python {meta['python']}, {meta['machine']}")
    started = time.perf_counter()
    runs: list[dict] = []
    summary: list[dict] = []
    setup: dict[str, dict[str, Any]] = {}
    for name in tasks:
        steps = args.steps or default_steps[name]
        k = args.last_k or max(5, steps // 10)
        seeds = list(range(args.seed, args.seed + (args.seeds or default_seeds[name])))
        if name == "gpt":
            make = functools.partial(gpt_task, load_text(corpus_bytes), steps)
        else:
            try:
                images = load_digits_data()
            except ImportError:
                print("\n[cnn] skipped: scikit-learn is not installed (pip install scikit-learn)")
                continue
            make = functools.partial(cnn_task, images, steps)
        task_runs: list[dict] = []
        for seed in seeds:
            task = make(seed)
            if seed == seeds[0]:
                print(f"\n[{name}] {task.description}; {steps} steps, seeds {seeds}", flush=True)
                setup[name] = {"description": task.description, "steps": steps, "last_k": k, "seeds": seeds}
                setup[name].update(task.info)
            task_runs.extend(run_seed(task, labels, k, seed))
        runs.extend(task_runs)
        summary.extend(summarise(name, task_runs))
    if summary:
        print_training_table(summary, setup)
    grads: list[dict] = []
    if args.grad_errors:
        print("\n[grad errors] tiny presets, one step vs eager", flush=True)
        grads = grad_errors([c for c in labels if c != "noise"], grad_models, args.seed)
        print_grad_table(grads)
    meta["wall_s"] = time.perf_counter() - started
    print(f"\ntotal wall time {meta['wall_s']:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"meta": meta, "tasks": setup, "summary": summary, "runs": runs, "grad_errors": grads}
        args.json.write_text(json.dumps(payload, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
