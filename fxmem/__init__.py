"""fxmem: a torch.compile backend that cuts the activation memory of training.

For each tensor the forward saves for the backward, fxmem decides, under a memory budget, to keep it,
recompute it in the backward, or store it quantized::

    step = torch.compile(model, backend="fxmem", options={"memory_budget": 0.4})
"""

from __future__ import annotations

__version__ = "0.1.0"

from fxmem.capacity import max_batch_size
from fxmem.compiler import FxmemCompiler, backend, compile, fxmem_backend
from fxmem.config import FxmemConfig
from fxmem.inspection import Report, inspect
from fxmem.inspection.logs import configure_logging_from_env
from fxmem.report import GraphReport, TensorRow, clear_reports, reports

configure_logging_from_env()

__all__ = [
    "__version__",
    # compiling
    "FxmemCompiler",
    "FxmemConfig",
    "backend",
    "compile",
    "fxmem_backend",
    "max_batch_size",
    # inspecting
    "GraphReport",
    "Report",
    "TensorRow",
    "clear_reports",
    "inspect",
    "reports",
]
