"""Tests for ``fxmem.inspection``: planning a model without training it, and the views of a ``Report``.

Everything compiles with ``codegen="eager"`` (about a second per tiny model on CPU).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
import shutil
import subprocess
import sys
from typing import Any

import pytest
import torch

import fxmem
import fxmem.rng
import models.gpt
import models.mlp
from fxmem.inspection import SCHEMA_VERSION, Report, UnknownTensorError, inspect
from fxmem.inspection.logs import configure_logging_from_env
from fxmem.inspection.schema import GRAPH_KEYS, TENSOR_KEYS
from fxmem.inspection.text import FORMAT_BITS, dtype_bits
from tests.test_rng_replay import RReLUNet

FACTORIES = {"gpt": models.gpt.tiny, "mlp": models.mlp.tiny}
OPTIONS = {
    "budget": {"memory_budget": 0.4},
    "budget-int8": {"memory_budget": 0.3, "quantize": "int8"},
}
CASES = [(m, o) for m in FACTORIES for o in OPTIONS]
# Predicted saved bytes against what saved-tensor hooks measure on the compiled model.
SAVED_BYTES_RTOL = 0.02


@pytest.fixture(scope="module", autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def inspected() -> Any:
    """``inspected(model, options)`` -> ``(model, inputs, report)``, each inspected once per module."""
    cache: dict[tuple[str, str], tuple[torch.nn.Module, tuple[Any, ...], Report]] = {}

    def get(model_name: str, options_name: str) -> tuple[torch.nn.Module, tuple[Any, ...], Report]:
        key = (model_name, options_name)
        if key not in cache:
            model, inputs = FACTORIES[model_name]()
            cache[key] = (model, inputs, inspect(model, *inputs, **OPTIONS[options_name]))
        return cache[key]

    return get


def measure_saved_bytes(model: torch.nn.Module, inputs: tuple[Any, ...], options: dict[str, Any]) -> int:
    """Bytes the forward of ``model`` compiled by fxmem saves for the backward, as saved-tensor hooks see
    them: distinct storages, parameters and buffers left out."""
    model = copy.deepcopy(model)
    excluded = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    compiled = torch.compile(model, backend=fxmem.FxmemCompiler(codegen="eager", **options))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = compiled(*inputs)  # the saved tensors stay referenced by loss's graph while we count
    total = sum(storages.values())
    del loss
    return total


def _shown_rows(report: Report) -> list[Any]:
    return [row for row in report.rows if row.kind != "param"]


@pytest.mark.parametrize("model_name,options_name", CASES)
def test_predicted_saved_bytes_match_hooks(inspected, model_name, options_name):
    model, inputs, report = inspected(model_name, options_name)
    measured = measure_saved_bytes(model, inputs, OPTIONS[options_name])
    assert len(report.graphs) == 1 and report.graphs[0].fallback_reason is None
    assert report.predicted_saved_bytes == pytest.approx(measured, rel=SAVED_BYTES_RTOL)
    assert report.predicted_saved_bytes < report.reference_saved_bytes
    decisions = {row.decision for row in report.rows}
    assert decisions <= {"keep", "recompute", "quantize"} and "recompute" in decisions


def test_inspect_leaves_the_model_alone():
    model, inputs = models.mlp.build("tiny-dropout")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    report = inspect(model, *inputs, memory_budget=0.4)
    assert report.graphs
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and not isinstance(model, torch._dynamo.eval_frame.OptimizedModule)


def test_inspect_errors():
    model, inputs = models.mlp.tiny()
    with pytest.raises(ValueError, match="memory_budget"):
        inspect(model, *inputs, memory_budget=2.0)
    with pytest.raises(ValueError, match="cannot be met"):  # fxmem's own error, not torch.compile's wrapper
        inspect(model, *inputs, memory_budget=1000, on_infeasible="error")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        inspect(lambda x: x, inputs[0])
    frozen = copy.deepcopy(model).requires_grad_(False)
    with pytest.raises(RuntimeError, match="planned no graph"):
        inspect(frozen, *inputs)


def test_inspect_refuses_the_meta_device():
    """On ``meta`` PyTorch traces some backward ops without their gradient (cross-entropy's nll_loss,
    mse_loss's broadcast_tensors): a clear error rather than an empty plan."""
    model, (features, labels) = models.mlp.tiny()
    with pytest.raises(ValueError, match="meta device.*on the CPU"):
        inspect(copy.deepcopy(model).to("meta"), features, labels)
    with pytest.raises(ValueError, match="meta device"):
        inspect(model, features.to("meta"), labels.to("meta"))


def test_json_schema(inspected, tmp_path):
    _, _, report = inspected("gpt", "budget-int8")
    data = json.loads(report.to_json())
    assert data["schema_version"] == SCHEMA_VERSION == 1
    assert data["fxmem_version"] == fxmem.__version__
    (graph,) = data["graphs"]
    assert set(GRAPH_KEYS) <= set(graph)
    assert graph["predicted_saved_bytes"] == report.predicted_saved_bytes
    assert graph["options"]["quantize"] == ["int8"] and graph["options"]["codegen"] == "eager"
    assert [p["name"] for p in graph["passes"]][:2] == ["reference", "capture"]
    assert len(graph["tensors"]) == len(report.rows)
    for tensor in graph["tensors"]:
        assert set(TENSOR_KEYS) <= set(tensor)
        assert all(isinstance(d, (int, str)) for d in tensor["shape"])
        if tensor["decision"] == "quantize":
            assert tensor["bits"] == FORMAT_BITS[tensor["format"]]
            assert 0 < tensor["stored_bytes"] < tensor["bytes"]
        elif tensor["decision"] == "keep":
            assert tensor["bits"] == dtype_bits(tensor["dtype"]) and tensor["format"] is None
        else:
            assert tensor["bits"] is None and tensor["stored_bytes"] == 0
    assert any(t["decision"] == "quantize" and t["bits"] == 8 for t in graph["tensors"])
    path = report.save_json(tmp_path / "deep" / "plan.json")
    assert json.loads(path.read_text()) == data


def test_table_lists_the_tensors(inspected, monkeypatch):
    _, _, report = inspected("gpt", "budget")
    names = [row.name for row in _shown_rows(report)]
    for text in (report.table(width=200), _plain_table(report, monkeypatch)):
        assert all(re.search(rf"\b{re.escape(name)}\b", text) for name in names)
        assert "decision" in text and "total over 1 graph" in text
        assert "primals_2" not in text  # a parameter: shown only with params=True
    assert "primals_2" in report.table(params=True, width=200)


def _plain_table(report: Report, monkeypatch: pytest.MonkeyPatch) -> str:
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "rich", None)  # rich is optional: import fails
        text = report.table()
    assert "─" not in text
    return text


def test_to_dot(inspected):
    _, _, report = inspected("gpt", "budget-int8")
    text = report.to_dot()
    assert text.startswith("digraph fxmem {") and text.rstrip().endswith("}")
    assert text.count("{") == text.count("}")
    assert len(re.findall(r'(?<!\\)"', text)) % 2 == 0
    assert "->" in text
    for row in _shown_rows(report):
        assert f'"g{report.graphs[0].graph_id}:{row.name}"' in text
    for colour in ("#d0d0d0", "#9ecae1", "#fdae6b"):  # keep grey, recompute blue, quantize orange
        assert colour in text
    if shutil.which("dot"):
        subprocess.run(["dot", "-Tsvg"], input=text, text=True, check=True, capture_output=True)


def test_explain(inspected):
    _, _, report = inspected("gpt", "budget-int8")
    by_decision = {row.decision: row for row in _shown_rows(report)}
    assert set(by_decision) == {"keep", "recompute", "quantize"}
    for decision, row in by_decision.items():
        text = report.explain(row.name)
        assert text.startswith(row.name) and f"Decision: {decision}." in text
        assert f"{row.bytes:,} bytes" in text and row.reason in text
    assert "Alternatives:" in report.explain(by_decision["quantize"].name)
    with pytest.raises(UnknownTensorError, match="no tensor named 'nope'") as info:
        report.explain("nope")
    assert isinstance(info.value, ValueError) and isinstance(info.value, KeyError)


def test_several_graphs(inspected):
    _, _, first = inspected("mlp", "budget")
    _, _, second = inspected("mlp", "budget-int8")
    both = Report(first.graphs + second.graphs)
    assert (both[0], both[-1]) == (first.graphs[0], second.graphs[0]) and list(both) == both.graphs
    assert both.predicted_saved_bytes == first.predicted_saved_bytes + second.predicted_saved_bytes
    assert both.reference_saved_bytes == first.reference_saved_bytes + second.reference_saved_bytes
    name = min({r.name for r in first.graphs[0].rows} & {r.name for r in second.graphs[0].rows})
    with pytest.raises(ValueError, match="pass graph="):
        both.explain(name)
    assert both.explain(name, graph=second.graphs[0].graph_id).startswith(f"{name} (graph")
    assert len(json.loads(both.to_json())["graphs"]) == 2
    assert all(g in Report().graphs for g in both.graphs)  # Report() wraps fxmem.reports()


def test_timeline(inspected):
    _, _, report = inspected("gpt", "budget")
    (graph,) = report.graphs
    timeline = report.timeline()
    assert timeline.source == "simulated"
    assert timeline.peak_bytes == report.predicted_peak_bytes == graph.predicted_peak_bytes
    assert timeline.reference and timeline.backward_start == 1.0
    estimated = Report([dataclasses.replace(graph, timeline=None, reference_timeline=None)]).timeline()
    assert estimated.source == "estimate"
    forward_end = [b for s, b in estimated.fxmem if s <= 1.0][-1]
    assert forward_end == pytest.approx(graph.predicted_saved_bytes)
    assert [b for s, b in estimated.reference if s <= 1.0][-1] == pytest.approx(graph.reference_saved_bytes)
    assert estimated.fxmem[0][1] == estimated.fxmem[-1][1] == 0
    assert estimated.budget_bytes == pytest.approx(graph.budget_bytes)


def test_training_reports_draw_the_estimate():
    """A training compile does not build torch.compile's split just to simulate it (only inspect does), so
    the picture of its reports is the estimate for both curves, which stay comparable."""
    model, inputs = models.gpt.build("tiny")
    backend = fxmem.backend(memory_budget=0.4, codegen="eager")
    torch.compile(model, backend=backend)(*inputs).backward()
    (graph,) = backend.reports
    assert graph.timeline is not None and graph.reference_timeline is None
    timeline = Report(backend.reports).timeline()
    assert timeline.source == "estimate" and timeline.reference and timeline.fxmem


@pytest.mark.parametrize("suffix,magic", [(".png", b"\x89PNG\r\n\x1a\n"), (".svg", b"<svg")])
def test_plot_timeline(inspected, tmp_path, suffix, magic):
    pytest.importorskip("matplotlib")
    _, _, report = inspected("mlp", "budget")
    path = report.plot_timeline(tmp_path / f"timeline{suffix}")
    data = path.read_bytes()
    assert data.startswith(magic) if suffix == ".png" else magic in data[:2000]
    with pytest.raises(ValueError, match=r"\.png or \.svg"):
        report.plot_timeline(tmp_path / "timeline.pdf")


def test_log_level_from_env():
    logger = logging.getLogger("fxmem")
    level, handlers = logger.level, list(logger.handlers)
    try:
        assert configure_logging_from_env({}) is None
        assert configure_logging_from_env({"FXMEM_LOG": "nonsense"}) is None
        assert configure_logging_from_env({"FXMEM_LOG": "DEBUG"}) == logging.DEBUG
        assert configure_logging_from_env({"FXMEM_LOG": "debug"}) == logging.DEBUG
        assert logger.level == logging.DEBUG and len(logger.handlers) == len(handlers) + 1
    finally:
        logger.handlers[:] = handlers
        logger.setLevel(level)


def test_held_outputs_of_a_replayable_random_op_say_what_a_replay_would_hold():
    """The eager codegen can replay RReLU from a snapshot of the generator state; its 256-byte outputs
    cost less to hold than the snapshot, and their reasons say so."""
    report = inspect(RReLUNet(8, 16, 1), torch.randn(4, 8), memory_budget=0.1, on_infeasible="best_effort")
    held = [row for row in report.graphs[0].rows if row.kind == "getitem" and row.decision == "keep"]
    assert len(held) == 2
    state = torch.get_rng_state().numel()
    for row in held:
        assert row.reason == f"recomputing it needs generator_state held: {state} bytes, against its own 256"


def test_a_held_output_of_a_random_multi_output_op_says_why(monkeypatch):
    """Where random draws are not replayed (here: on no device; elsewhere, draws with a generator of their
    own), RReLU's tuple can be neither held nor recomputed: each output is held, and its reason names the
    op rather than the time it would cost."""
    monkeypatch.setattr(fxmem.rng, "_DEVICE_TYPES", ())
    report = inspect(RReLUNet(8, 16, 1), torch.randn(4, 8), memory_budget=0.1, on_infeasible="best_effort")
    held = [row for row in report.graphs[0].rows if row.kind == "getitem" and row.decision == "keep"]
    assert len(held) == 2
    for row in held:
        assert row.reason.startswith("recomputing it needs rrelu_with_noise") and "neither held nor" in row.reason


def test_a_held_mask_that_only_its_larger_inputs_could_rebuild_says_why():
    """A bool mask computed from int64 labels, under a budget no plan meets: holding the mask (64 bytes)
    is cheaper than holding the labels it would be recomputed from (512), and its reason says so rather
    than naming the time a recomputation would cost. (Inductor's codegen: the eager one bit-packs it.)"""

    class Masked(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(8, 8)

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            keep = (labels != 0).unsqueeze(1).float()
            return (self.linear(x) * keep).square().mean()

    inputs = torch.randn(64, 8), torch.randint(0, 3, (64,))
    options = dict(memory_budget=0.1, on_infeasible="best_effort", quantize="none", codegen="inductor")
    report = inspect(Masked(), *inputs, **options)
    (mask,) = [row for row in report.graphs[0].rows if row.dtype == "bool"]
    assert mask.decision == "keep" and mask.bytes == 64
    assert mask.reason.startswith("recomputing it needs ") and mask.reason.endswith(
        "held: 512 bytes, against its own 64"
    )


def test_a_held_tensor_that_cannot_be_recomputed_says_which_rule_holds_it():
    """A graph input can only be held; with ``recompute=False`` a matmul's output is held by the option,
    and its reason names the option rather than the budget."""
    model, inputs = models.mlp.build("tiny")
    report = inspect(model, *inputs, memory_budget=None, recompute=False, quantize="none")
    held = {row.kind: row.reason for row in report.graphs[0].rows if row.decision == "keep"}
    assert held["input"] == "a graph input: nothing in the graph can recompute it"
    assert held["matmul"].startswith("recompute=False: ")
