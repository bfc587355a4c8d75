"""Load a model factory named on a command line: ``path/to/file.py:FACTORY`` or ``models/gpt.py:tiny``.

``FACTORY()`` returns ``(model, example_inputs)`` with ``model(*example_inputs)`` the loss.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch


def load_factory(spec: str) -> Any:
    """The callable named by ``spec`` (``FILE.py:NAME``)."""
    path_text, sep, name = spec.rpartition(":")
    if not sep or not path_text or not name:
        raise ValueError(f"expected FILE.py:FACTORY, e.g. models/gpt.py:tiny, got {spec!r}")
    path = Path(path_text)
    if not path.is_file():
        raise ValueError(f"{spec!r}: no such file {path_text!r}")
    module_name = f"fxmem_factory_{path.stem}_{abs(hash(path.resolve()))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"{spec!r}: cannot import {path_text!r} as Python")
    module = importlib.util.module_from_spec(module_spec)
    # The file's folder and its parent go on the path so that `models/gpt.py` can import siblings.
    for folder in (str(path.resolve().parent), str(path.resolve().parent.parent)):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    sys.modules[module_name] = module
    module_spec.loader.exec_module(module)
    factory = getattr(module, name, None)
    if not callable(factory):
        known = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise ValueError(f"{spec!r}: {path_text} has no callable {name!r}; callables there: {', '.join(known)}")
    return factory


def build_from_spec(spec: str) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    """Call the factory and check what it returns."""
    result = load_factory(spec)()
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        raise ValueError(f"{spec!r} must return (model, example_inputs), got {type(result).__name__}")
    model, inputs = result
    inputs = tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)
    return model, inputs
