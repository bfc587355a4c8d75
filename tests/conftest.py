"""Put the repository root on ``sys.path`` so tests can import the bundled ``models`` package, and give
every test a fresh Dynamo and an empty list of fxmem reports."""

import sys
from pathlib import Path

import pytest
import torch

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    import fxmem

    torch._dynamo.reset()
    fxmem.clear_reports()
    yield
    torch._dynamo.reset()
    fxmem.clear_reports()
