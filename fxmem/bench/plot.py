"""The Pareto plot of a benchmark: memory against step time, one marker per row, each system's frontier
drawn as a step line. Needs matplotlib (``pip install fxmem[plot]``), imported only here."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fxmem.bench.matrix import SYSTEMS
from fxmem.bench.results import MIB, memory_metric

__all__ = ["pareto_front", "plot_pareto"]

_STYLE = {
    "eager": ("tab:gray", "s"),
    "eager+checkpoint": ("tab:brown", "D"),
    "torch.compile": ("tab:blue", "o"),
    "fxmem": ("tab:red", "*"),
}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats in both coordinates (both lower is better), by increasing x."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def plot_pareto(rows: Sequence[dict[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Writes the plot to ``path`` (the format follows the suffix) and returns the path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("the Pareto plot needs matplotlib: pip install 'fxmem[plot]'") from err

    metric = memory_metric(rows)
    ok = [r for r in rows if not r.get("error") and r.get("step_ms") is not None and r.get(metric) is not None]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for system in SYSTEMS:
        mine = [r for r in ok if r.get("system") == system]
        if not mine:
            continue
        color, marker = _STYLE[system]
        xs = [r["step_ms"] for r in mine]
        ys = [r[metric] / MIB for r in mine]
        ax.scatter(xs, ys, color=color, marker=marker, s=70 if marker == "*" else 40, label=system, zorder=3)
        for r, x, y in zip(mine, xs, ys, strict=True):
            ax.annotate(r.get("label") or "", (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        front = pareto_front(list(zip(xs, ys, strict=True)))
        if len(front) > 1:
            fx, fy = zip(*front, strict=True)
            ax.step(fx, fy, where="post", color=color, alpha=0.6, linewidth=1.2, zorder=2)
    ax.set_xlabel("step time (ms, median)")
    ax.set_ylabel("peak memory (MiB)" if metric == "peak_bytes" else "saved activations (MiB)")
    ax.set_title(title or "memory vs step time (lower left is better)")
    ax.grid(True, alpha=0.3)
    if ok:
        ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
