"""Looking at fxmem's plans: ``inspect`` a model without training it, then read the ``Report`` as a table,
JSON, a memory timeline picture, Graphviz DOT, or one tensor's explanation."""

from __future__ import annotations

from fxmem.inspection.api import Report, UnknownTensorError, inspect
from fxmem.inspection.logs import ENV_VAR, configure_logging, configure_logging_from_env
from fxmem.inspection.schema import SCHEMA_VERSION
from fxmem.inspection.timeline import Timeline

__all__ = [
    # inspecting
    "Report",
    "Timeline",
    "UnknownTensorError",
    "inspect",
    "SCHEMA_VERSION",
    # logging
    "ENV_VAR",
    "configure_logging",
    "configure_logging_from_env",
]
