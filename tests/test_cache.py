"""Caching: the partitioner's ``uuid()`` keys Inductor's caches, so a cached compile is reused under the
same options and never served under different ones."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import fxmem
import fxmem.partitioner
from fxmem.config import FxmemConfig
from fxmem.partitioner import FxmemPartitioner
from tests.helpers import build, eager_step, rel_err, run_step

try:
    from torch._inductor.utils import fresh_cache
except ImportError:  # older name
    from torch._inductor.utils import fresh_inductor_cache as fresh_cache

# fp32 with Inductor: fused kernels reorder floating-point reductions.
INDUCTOR_TOL = 1e-4

VARIANTS = [
    {},
    {"memory_budget": 0.5},
    {"memory_budget": 0.3},
    {"memory_budget": "64KiB"},
    {"quantize": "int8"},
    {"quantize": ["int8", "int4"]},
    {"recompute": False},
    {"solver": "mincut"},
    {"codegen": "eager"},
    {"device": "a100"},
    {"group_size": 32},
    {"stochastic_rounding": True},
    {"on_infeasible": "best_effort"},
    {"calibrate": True},
]


def _uuid(**options) -> str:
    return FxmemPartitioner(FxmemConfig(**options)).uuid()


def test_uuid_differs_when_any_option_differs():
    uuids = {repr(options): _uuid(**options) for options in VARIANTS}
    assert len(set(uuids.values())) == len(VARIANTS), uuids


@pytest.mark.parametrize("options", VARIANTS, ids=repr)
def test_uuid_is_stable_for_equal_configs(options):
    first = _uuid(**options)
    assert isinstance(first, str) and first
    assert _uuid(**options) == first
    assert FxmemPartitioner(FxmemConfig.from_options(dict(options)), on_report=print).uuid() == first


def test_uuid_covers_the_source(monkeypatch):
    before = _uuid()
    monkeypatch.setattr(fxmem.partitioner, "_source_hash", lambda: "edited")
    assert _uuid() != before


@pytest.mark.slow
def test_fx_graph_cache_is_keyed_by_the_options(tmp_path, monkeypatch):
    # Pin the source part of the key (test_uuid_covers_the_source checks it) so that an edit to fxmem's
    # files while this test compiles cannot turn the expected hit into a miss.
    source = fxmem.partitioner._source_hash()
    monkeypatch.setattr(fxmem.partitioner, "_source_hash", lambda: source)
    _, grads_ref, _ = eager_step("mlp")
    options_a = {}  # default: a time budget
    options_b = {"memory_budget": 0.3}

    def compile_once(options):
        torch._dynamo.reset()
        counters.clear()
        model, inputs = build("mlp")
        backend = fxmem.backend(**options)  # codegen="inductor"
        _, grads, saved = run_step(model, inputs, backend)
        assert rel_err(grads, grads_ref) <= INDUCTOR_TOL
        hits = counters["aot_autograd"]["autograd_cache_hit"] + counters["inductor"]["fxgraph_cache_hit"]
        return backend.reports, saved, hits

    with torch._inductor.config.patch(fx_graph_cache=True), fresh_cache(dir=str(tmp_path)):
        reports_a, saved_a, hits = compile_once(options_a)
        assert len(reports_a) == 1 and reports_a[0].fallback_reason is None
        assert hits == 0  # a fresh cache

        # Same options: served from the cache; if the partitioner runs at all, it plans the same.
        reports_again, saved_again, hits = compile_once(options_a)
        assert hits > 0
        assert saved_again == saved_a
        for report in reports_again:
            assert report.plan.saved == reports_a[0].plan.saved
            assert report.plan.recomputed == reports_a[0].plan.recomputed

        # Other options: a cache miss, so the partitioner plans again, differently.
        reports_b, saved_b, _ = compile_once(options_b)
        assert len(reports_b) == 1 and reports_b[0].fallback_reason is None
        assert reports_b[0].options["memory_budget"] == 0.3
        assert reports_b[0].plan.saved != reports_a[0].plan.saved
        assert saved_b == reports_b[0].predicted_saved_bytes
        assert saved_b <= 0.3 * reports_b[0].reference_saved_bytes
        assert saved_b < saved_a
