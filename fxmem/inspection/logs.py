"""fxmem's log output: ``FXMEM_LOG=debug`` (or info, warning, error) in the environment, or ``-v`` on the
command line, sends the ``fxmem`` logger's records to stderr."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

ENV_VAR = "FXMEM_LOG"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_FORMAT = "[%(asctime)s %(levelname)s %(name)s] %(message)s"


class _FxmemHandler(logging.StreamHandler):
    """The handler ``configure_logging`` installs; marked so that a second call replaces it."""


def configure_logging(level: int | str = logging.INFO, *, stream: TextIO | None = None) -> logging.Logger:
    """Send the ``fxmem`` logger's records at ``level`` and above to ``stream`` (stderr by default)."""
    if isinstance(level, str):
        if level.lower() not in LEVELS:
            raise ValueError(f"unknown log level {level!r}; valid levels: {', '.join(LEVELS)}")
        level = LEVELS[level.lower()]
    logger = logging.getLogger("fxmem")
    for handler in [h for h in logger.handlers if isinstance(h, _FxmemHandler)]:
        logger.removeHandler(handler)
    handler = _FxmemHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level)
    return logger


def configure_logging_from_env(environ: Mapping[str, str] | None = None) -> int | None:
    """Honour ``FXMEM_LOG`` (``debug``, ``info``, ``warning`` or ``error``); return the level set, or None
    when the variable is unset or empty. An unknown value is reported once and ignored."""
    value = (os.environ if environ is None else environ).get(ENV_VAR, "").strip().lower()
    if not value:
        return None
    if value not in LEVELS:
        logging.getLogger("fxmem").warning("fxmem: ignoring %s=%r; valid values: %s", ENV_VAR, value, ", ".join(LEVELS))
        return None
    configure_logging(LEVELS[value])
    return LEVELS[value]
