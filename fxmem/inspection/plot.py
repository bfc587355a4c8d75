"""The timeline picture: saved activation memory over one forward+backward, fxmem vs torch.compile's default.

matplotlib is optional (``pip install matplotlib``) and is used through its object API, so the user's
pyplot backend and open figures are left alone.
"""

from __future__ import annotations

from pathlib import Path

from fxmem.inspection.timeline import Timeline

SUFFIXES = (".png", ".svg")
COLORS = {"fxmem": "#1f77b4", "reference": "#7f7f7f", "budget": "#d62728"}


def check_plot_path(path: str | Path) -> Path:
    """``path`` as a ``Path``; raises ``ValueError`` unless it ends in .png or .svg, ``ImportError``
    without matplotlib."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"{str(path)!r} must end in .png or .svg")
    _figure_class()
    return path


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("plotting the timeline needs matplotlib: pip install matplotlib") from err
    return Figure


def _unit(peak: float) -> tuple[str, float]:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if peak >= scale:
            return unit, float(scale)
    return "B", 1.0


def plot_timeline(timeline: Timeline, path: str | Path, *, title: str | None = None) -> Path:
    """Draw ``timeline`` to ``path`` (PNG or SVG by its suffix) and return the path."""
    path = check_plot_path(path)
    figure = _figure_class()(figsize=(8, 4.5), dpi=110, layout="constrained")
    ax = figure.add_subplot()
    unit, scale = _unit(max(timeline.peak_bytes, timeline.reference_peak_bytes, timeline.budget_bytes or 0.0))
    for name, series, label, width in (
        ("reference", timeline.reference, "torch.compile default", 1.5),
        ("fxmem", timeline.fxmem, "fxmem", 2.0),
    ):
        if not series:
            continue
        steps, held = zip(*series, strict=True)
        values = [b / scale for b in held]
        peak = max(values)
        ax.step(steps, values, where="post", color=COLORS[name], linewidth=width,
                label=f"{label} (peak {peak:.3g} {unit})")  # fmt: skip
        if name == "fxmem":
            ax.fill_between(steps, values, step="post", color=COLORS[name], alpha=0.15)
        ax.plot([steps[values.index(peak)]], [peak], marker="o", color=COLORS[name], markersize=4)
    if timeline.budget_bytes is not None:
        ax.axhline(timeline.budget_bytes / scale, color=COLORS["budget"], linestyle="--", linewidth=1.2,
                   label=f"{timeline.budget_label} ({timeline.budget_bytes / scale:.3g} {unit})")  # fmt: skip
    if timeline.backward_start is not None:
        ax.axvline(timeline.backward_start, color="black", linestyle=":", linewidth=1)
        ax.set_xticks([0.0, timeline.backward_start, 2.0], ["start", "forward | backward", "end"])
    if timeline.source == "simulated":
        ax.set_ylabel(f"live memory, parameters included ({unit})")
        default_title = "Memory over one training step (simulated)"
    else:
        ax.set_ylabel(f"saved activations held ({unit})")
        default_title = "Saved activations over one training step (estimate)"
    ax.set_xlabel("schedule: forward, then backward")
    ax.set_title(title or default_title)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format=path.suffix.lower().lstrip("."))
    return path
