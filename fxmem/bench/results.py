"""Benchmark results: the comparison table, the machine record and the JSON file."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fxmem.bench.matrix import SYSTEMS

__all__ = ["format_table", "load_results", "machine_info", "memory_metric", "mib_text", "sort_rows", "write_results"]

MIB = 2**20


def machine_info(device: str = "cpu") -> dict[str, Any]:
    import torch

    cuda_name = None
    if device.startswith("cuda") and torch.cuda.is_available():
        cuda_name = torch.cuda.get_device_name(torch.device(device))
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_device": cuda_name,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": _dt.date.today().isoformat(),
    }


def sort_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """By system (eager, eager+checkpoint, torch.compile, fxmem), keeping the matrix order within one."""
    order = {name: i for i, name in enumerate(SYSTEMS)}
    return sorted(rows, key=lambda r: order.get(r.get("system"), len(order)))


def memory_metric(rows: Sequence[dict[str, Any]]) -> str:
    """``peak_bytes`` where the rows measured a peak (CUDA), else ``saved_bytes``."""
    return "peak_bytes" if any(r.get("peak_bytes") is not None for r in rows) else "saved_bytes"


def mib_text(value: Any) -> str:
    """Bytes as MiB for a table ("-" for none)."""
    return "-" if value is None else f"{value / MIB:.2f}" if value < 100 * MIB else f"{value / MIB:.0f}"


def _num(value: Any, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _options(row: dict[str, Any]) -> str:
    return row.get("label") or json.dumps(row.get("options") or {}) or "-"


def _remark(row: dict[str, Any], width: int | None) -> str:
    text = row.get("error") or row.get("note") or ""
    text = ("ERROR " + text if row.get("error") else text).splitlines()[0] if text else ""
    return text if width is None or len(text) <= width else text[: width - 3] + "..."


def format_table(rows: Sequence[dict[str, Any]], *, markdown: bool = False, remark_width: int | None = 70) -> str:
    """The rows as an aligned text table (or a Markdown one), sorted by system."""
    header = [
        "system",
        "options",
        "step ms",
        "min-max ms",
        "1st step s",
        "saved MiB",
        "pred. saved",
        "peak MiB",
        "pred. peak",
        "loss",
        "grad err",
        "error / note",
    ]
    body = []
    for r in sort_rows(rows):
        spread = "-" if r.get("step_ms_min") is None else f"{r['step_ms_min']:.2f}-{r['step_ms_max']:.2f}"
        body.append(
            [
                r.get("system", "?"),
                _options(r),
                _num(r.get("step_ms"), 2),
                spread,
                _num(r.get("compile_s"), 1),
                mib_text(r.get("saved_bytes")),
                mib_text(r.get("predicted_saved_bytes")),
                mib_text(r.get("peak_bytes")),
                mib_text(r.get("predicted_peak_bytes")),
                _num(r.get("loss"), 4),
                "-" if r.get("grad_error") is None else f"{r['grad_error']:.1e}",
                _remark(r, remark_width),
            ]
        )
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in body]
        return "\n".join(lines)
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    numeric = set(range(2, 11))

    def fmt(line: list[str]) -> str:
        cells = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))]
        return "  ".join(cells).rstrip()

    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, body)])


def write_results(path: str | Path, rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> None:
    """``{"rows": [...], "machine": {...}, ...meta}`` as JSON; folders are made as needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"rows": list(rows), **meta}
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def load_results(path: str | Path) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path}: not a benchmark result (no 'rows' list)")
    return data
