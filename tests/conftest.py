"""Put the repository root on ``sys.path`` so tests can import the bundled ``models`` package, give
every test a fresh Dynamo and an empty list of fxmem reports, and offer a fresh Inductor cache."""

import sys
from pathlib import Path

import pytest
import torch

try:
    from torch._inductor.utils import fresh_cache
except ImportError:  # older name
    from torch._inductor.utils import fresh_inductor_cache as fresh_cache

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


@pytest.fixture
def inductor_cache(tmp_path):
    """A fresh, empty Inductor cache: a compile served from a cache skips the partitioner, so fxmem makes
    no plan and no report (``fxmem.inspect`` turns the caches off; see
    ``test_inspect_with_inductor_on_a_warm_cache``). For tests that read the report of an Inductor
    compile, which an earlier run with the same options and fxmem source would otherwise serve."""
    with torch._inductor.config.patch(fx_graph_cache=True), fresh_cache(dir=str(tmp_path)):
        yield
