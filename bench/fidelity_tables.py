"""The tables ``bench/fidelity.py`` prints: training fidelity per task and configuration, and the gradient
error of one step against eager PyTorch."""

from __future__ import annotations

import math
from typing import Any


def _fmt_formats(plan: dict[str, Any] | None) -> str:
    if not plan or not plan["formats"]:
        return "-"
    short = {"bitmask": "bm"}
    order = ["int8", "fp8", "int4", "int2", "bitmask"]
    items = sorted(plan["formats"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99)
    return " ".join(f"{short.get(f, f)}x{n}" for f, n in items)


def _num(value: float | None, width: int, signed: bool = False) -> str:
    if value is None:  # no lossless run to compare with
        return f"{'-':>{width}}"
    text = f"{value:+.2f}" if signed else f"{value:.4f}"
    if len(text) > width or not math.isfinite(value):
        text = f"{value:+.2g}" if signed else f"{value:.3g}"
    return f"{text:>{width}}"


def print_training_table(rows: list[dict], setup: dict[str, dict[str, Any]]) -> None:
    print("\nTraining fidelity. train loss: mean of the last k steps; Δ%: vs lossless fxmem, mean over seeds")
    print("(per-seed range in brackets when several); saved/default: fxmem's saved-for-backward bytes over")
    print("torch.compile's (* = budget not met); target: |train Δ%| allowed")
    for task, info in setup.items():
        print(f"  {task}: {info['steps']} steps, k={info['last_k']}, seeds {info['seeds']}")
    head = (
        f"{'task':4} {'config':8} {'train loss':>10} {'Δ%':>7} {'(range)':>15} {'val loss':>9} {'Δ%':>7} "
        f"{'val acc':>7} {'saved/default':>13} {'target':>7} {'formats (tensors)':26} {'wall s':>6} {'ms/step':>7}"
    )
    _print_head(head)
    for r in rows:
        target = r.get("target_pct")
        met = r.get("target_met")
        target_text = "-" if target is None or met is None else f"{'ok' if met else 'MISS'} {target:g}"
        frac_text = _fraction_text(r)
        lo, hi = r.get("train_delta_pct_range", (0.0, 0.0))
        span = f"[{lo:+.2g},{hi:+.2g}]" if len(r["seeds"]) > 1 else ""
        print(
            f"{r['task']:4} {r['config']:8} {_num(r['train_loss'], 10)} {_num(r.get('train_delta_pct'), 7, True)} "
            f"{span:>15} {_num(r['val_loss'], 9)} {_num(r.get('val_delta_pct'), 7, True)} "
            f"{100 * r['val_acc']:>6.1f}% {frac_text:>13} {target_text:>7} "
            f"{_fmt_formats(r.get('plan')):26} {r['wall_s']:>6.0f} {r['step_ms']:>7.1f}"
        )


def _print_head(head: str) -> None:
    print(head)
    print("-" * len(head))


def _fraction_text(row: dict) -> str:
    """A row's saved/default fraction, starred when its budget was not met."""
    frac = row.get("saved_fraction")
    return "?" if frac is None else f"{frac:.3f}" + ("*" if row.get("budget_met") is False else " ")


def print_grad_table(rows: list[dict]) -> None:
    print("\nGradient error of one step vs eager PyTorch (all parameter gradients)")
    head = (
        f"{'model':12} {'config':8} {'rel L2 err':>10} {'cosine':>9} {'saved/default':>13} "
        f"{'formats (tensors)':30} worst parameter (rel err)"
    )
    _print_head(head)
    for r in rows:
        frac_text = _fraction_text(r)
        print(
            f"{r['model']:12} {r['config']:8} {r['rel_error']:>10.2e} {r['cosine']:>9.6f} "
            f"{frac_text:>13} {_fmt_formats(r.get('plan')):30} "
            f"{r['worst_param']} ({r['worst_param_rel_error']:.2e})"
        )
