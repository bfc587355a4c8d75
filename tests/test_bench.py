"""The benchmark tool: the matrix syntax, the result helpers, and ``fxmem bench`` end to end on a small model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fxmem.bench import cli
from fxmem.bench.launch import resolve_spec, run_matrix
from fxmem.bench.matrix import BenchConfig, default_configs, fp8_pass_options, parse_config, parse_configs
from fxmem.bench.measure import joint_graphs
from fxmem.bench.plot import pareto_front
from fxmem.bench.results import format_table
from fxmem.bench.runner import ROW_FIELDS
from fxmem.bench.systems import find_blocks
from fxmem.bench.targets import check_budgets, check_dominance, check_speed_at_memory

MODEL = textwrap.dedent(
    """
    import os

    import torch
    import torch.nn as nn
    import torch.nn.functional as F


    class Block(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.norm = nn.LayerNorm(width)
            self.fc1 = nn.Linear(width, 4 * width)
            self.fc2 = nn.Linear(4 * width, width)

        def forward(self, x):
            return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


    class Net(nn.Module):
        def __init__(self, width=32, depth=2):
            super().__init__()
            self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
            self.head = nn.Linear(width, 10)

        def forward(self, x, y):
            for block in self.blocks:
                x = block(x)
            return F.cross_entropy(self.head(x), y)


    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 2)

        def forward(self, x, y):
            return F.cross_entropy(self.fc(x), y)


    def net():
        torch.manual_seed(0)
        return Net(), (torch.randn(64, 32), torch.randint(0, 10, (64,)))


    def flat():
        return Flat(), (torch.randn(4, 8), torch.randint(0, 2, (4,)))
    """
)


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.py"
    path.write_text(MODEL)
    return path


def _bench(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    parser = __import__("argparse").ArgumentParser()
    cli.add_arguments(parser)
    code = cli.run(parser.parse_args(argv))
    return code, capsys.readouterr().out


# --- the matrix ---------------------------------------------------------------------------------------------


def test_parse_config_forms():
    assert parse_config("eager") == BenchConfig("eager")
    assert parse_config("checkpoint").system == "eager+checkpoint"
    assert parse_config("compile:budget=0.5").options == {"activation_memory_budget": 0.5}
    cfg = parse_config("fxmem:memory_budget=0.25,quantize=int8")
    assert cfg.options == {"memory_budget": 0.25, "quantize": "int8"}
    assert parse_config('fxmem:{"memory_budget": "3000MiB"}').options == {"memory_budget": "3000MiB"}
    assert parse_config("fxmem").label == "default"


@pytest.mark.parametrize(
    "text, message",
    [("eagr", "unknown system"), ("compile:bogus=1", "unknown option"), ("eager:x=1", "takes no options"),
     ("fxmem:{bad", "not valid JSON"), ("fxmem:memory_budget", "expected key=value")],
)  # fmt: skip
def test_parse_config_errors(text: str, message: str):
    with pytest.raises(ValueError, match=message):
        parse_config(text)


def test_fp8_pass_sets_scaling_for_both_halves():
    # partitioners.py reads one "use_scaling" key with different defaults in the forward (True) and the
    # backward (False): it must be set explicitly.
    options = parse_config("compile:fp8", device="cuda", dtype="bfloat16").options
    fp8 = options["activation_quantization_aten_pass"]
    assert fp8["use_scaling"] is True
    assert fp8["allowed_dtypes"] == "torch.bfloat16"
    assert fp8_pass_options("cpu", "float32")["allowed_dtypes"].split(";") == ["torch.bfloat16", "torch.float32"]


def test_default_matrix_covers_every_system():
    configs = default_configs("cpu")
    systems = {c.system for c in configs}
    assert systems == {"eager", "eager+checkpoint", "torch.compile", "fxmem"}
    budgets = [c.options.get("activation_memory_budget") for c in configs if c.system == "torch.compile"]
    assert budgets[1:6] == [0.75, 0.5, 0.25, 0.1, 0.0]
    assert len([c for c in configs if c.system == "fxmem"]) == 7
    # absolute budgets only where a peak is measured
    assert not any(isinstance(c.options.get("memory_budget"), str) for c in configs)
    assert any(isinstance(c.options.get("memory_budget"), str) for c in default_configs("cuda"))
    assert len(parse_configs(None, quick=True)) < len(configs)


def test_find_blocks_opens_stages_of_blocks():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from models import gpt, resnet

    name, blocks = find_blocks(gpt.build("tiny")[0])
    assert name == "blocks" and len(blocks) == 2
    name, blocks = find_blocks(resnet.build("tiny")[0])  # stages: Sequential of Sequential of blocks
    assert name == "stages" and all(isinstance(b, resnet.BasicBlock) for b in blocks)


def test_resolve_spec_finds_bundled_models_from_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_spec("models/gpt.py:tiny").endswith("models/gpt.py:tiny")
    with pytest.raises(ValueError, match="no such file"):
        resolve_spec("nowhere.py:tiny")


# --- results and targets ------------------------------------------------------------------------------------


def _row(system: str, step_ms: float, peak_mib: float | None, **options) -> dict:
    row = dict.fromkeys(ROW_FIELDS)
    peak = None if peak_mib is None else int(peak_mib * 2**20)
    row.update(system=system, options=options, label="", step_ms=step_ms, peak_bytes=peak, saved_bytes=1)
    return row


def test_joint_graphs_without_running_the_step():
    """``run=False`` stops the compile once the joint graph is copied: the graph computes every gradient,
    and the step never ran (no gradient was set)."""
    import models.gpt

    model, inputs = models.gpt.build("tiny")
    (joint,) = joint_graphs(model, inputs, run=False)
    gm, _, kwargs = joint
    (output,) = gm.graph.find_nodes(op="output")
    grads = output.args[0][kwargs["num_fwd_outputs"] :]
    assert sum(grad is not None for grad in grads) == len(list(model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_pareto_front():
    assert pareto_front([(3, 1), (1, 5), (2, 2), (2.5, 3)]) == [(1, 5), (2, 2), (3, 1)]


def test_targets_on_synthetic_rows():
    rows = [
        _row("torch.compile", 20.0, 5000),
        _row("eager", 40.0, 6600),
        _row("fxmem", 21.5, 2900, memory_budget="3000MiB"),
        _row("fxmem", 30.0, 3100, memory_budget="3000MiB", quantize="auto"),
    ]
    assert check_speed_at_memory(rows, 3000, "P1").startswith("P1: MET - fxmem")
    assert "NOT MET" in check_speed_at_memory(rows, 2000, "P1")
    dominance = check_dominance(rows)
    assert dominance[0].startswith("P3 NOT MET") and dominance[1].startswith("P3 MET")  # compile, eager
    budgets = check_budgets(rows)
    assert budgets[0].startswith("P4 MET") and budgets[1].startswith("P4 NOT MET")
    table = format_table(rows)
    assert table.splitlines()[2].startswith("eager")  # sorted by system


# --- end to end ---------------------------------------------------------------------------------------------


def test_bench_command_end_to_end(model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    # One Inductor compile (torch.compile's default), overlapping the other rows; fxmem with its eager codegen
    # plans the same way and compiles in seconds. fxmem through Inductor is the slow test below.
    out = tmp_path / "out.json"
    configs = [
        "compile",
        "eager",
        "checkpoint",
        "fxmem:codegen=eager,memory_budget=0.25",
        "fxmem:quantize=int3",  # not a format: this configuration fails in its process
    ]
    argv = [f"{model_file}:net", "--steps", "2", "--warmup", "1", "--jobs", "2", "-q", "--json", str(out)]
    code, stdout = _bench([*argv, "--configs", *configs], capsys)
    assert code == 0
    data = json.loads(out.read_text())
    assert {"torch", "cpu_count", "date", "python", "cuda_device"} <= set(data["machine"])
    rows = {(r["system"], r["label"]): r for r in data["rows"]}
    assert len(rows) == 5
    for row in data["rows"]:
        assert set(ROW_FIELDS) <= set(row)
        assert row["system"] in stdout
    ok = [r for r in data["rows"] if not r["error"]]
    assert len(ok) == 4
    for row in ok:
        assert row["step_ms_min"] <= row["step_ms"] <= row["step_ms_max"]
        assert row["saved_bytes"] > 0 and row["compile_s"] > 0 and row["peak_bytes"] is None
        assert abs(row["loss"] - ok[0]["loss"]) < 1e-4  # same weights, data and updates
        if row["system"] != "eager":  # lossless plans: the first step's gradients are eager's
            assert row["grad_error"] < 1e-3
    eager = rows[("eager", "default")]
    checkpointed = rows[("eager+checkpoint", "every block")]
    assert checkpointed["saved_bytes"] < eager["saved_bytes"]
    compiled = rows[("torch.compile", "default")]
    fxmem = rows[("fxmem", "codegen=eager memory_budget=0.25")]
    assert fxmem["saved_bytes"] < compiled["saved_bytes"]
    assert fxmem["predicted_saved_bytes"] == fxmem["saved_bytes"] and fxmem["graphs"] == 1
    failed = rows[("fxmem", "quantize=int3")]
    assert "int3" in failed["error"] and failed["step_ms"] is None
    assert "ERROR" in stdout


def test_checkpoint_skipped_without_blocks_and_all_failed_exits_1(model_file: Path, tmp_path: Path, capsys):
    out = tmp_path / "out.json"
    argv = [f"{model_file}:flat", "--steps", "1", "-q", "--json", str(out), "--configs", "checkpoint"]
    code, stdout = _bench([*argv, "fxmem:solver=no-such-solver"], capsys)
    (row,) = json.loads(out.read_text())["rows"]  # no checkpoint row: the model has no blocks
    assert code == 1 and row["system"] == "fxmem" and "no-such-solver" in row["error"]
    assert "eager+checkpoint" not in stdout


def test_child_that_hangs_becomes_an_error_row(model_file: Path):
    rows = run_matrix(f"{model_file}:net", [BenchConfig("eager")], timeout=0.5)
    assert rows[0]["error"].startswith("timed out") and rows[0]["system"] == "eager"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_script_parses_and_rejects_unknown_arguments():
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    result = subprocess.run(["bash", str(script), "--bogus"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "usage" in result.stderr


@pytest.mark.slow
def test_first_call_benchmark_runs_each_cold_call_in_its_own_interpreter(tmp_path: Path):
    script = Path(__file__).resolve().parents[1] / "bench" / "first_call.py"
    out = tmp_path / "rows.json"
    command = [sys.executable, str(script), "--cold", "--models", "mlp:tiny", "--budgets", "0.5", "--repeats", "1"]
    subprocess.run([*command, "--json", str(out)], check=True, capture_output=True, timeout=600)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["cold"] and row["model"] == "mlp:tiny" and row["budget"] == 0.5
    assert all(row[f"{system}_s"] > 0 for system in ("torch", "torch-decomp", "fxmem"))
    assert row["ratio_torch"] == pytest.approx(row["fxmem_s"] / row["torch_s"])


@pytest.mark.slow
def test_bench_inductor_rows(model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], inductor_cache):
    plot, out = tmp_path / "pareto.png", tmp_path / "out.json"
    argv = [f"{model_file}:net", "--steps", "2", "--warmup", "1", "-q", "--plot", str(plot), "--json", str(out)]
    code, stdout = _bench([*argv, "--configs", "compile", "fxmem:memory_budget=0.25"], capsys)
    assert code == 0 and "ERROR" not in stdout
    compiled, fxmem = json.loads(out.read_text())["rows"]
    assert fxmem["saved_bytes"] < compiled["saved_bytes"]
    assert fxmem["predicted_saved_bytes"] == fxmem["saved_bytes"]
    pytest.importorskip("matplotlib")
    assert plot.stat().st_size > 0


# --- the absolute-budget sweep ------------------------------------------------------------------------------


def test_sweep_budgets_span_the_predicted_peaks() -> None:
    from fxmem.bench.sweep import sweep_budgets

    assert sweep_budgets(1000, 600, 5) == [1000, 900, 800, 700, 600]
    assert sweep_budgets(600, 1000, 3) == [1000, 800, 600]  # either order
    assert sweep_budgets(1000, 600, 1) == [800]
    assert sweep_budgets(600, 600, 5) == [600]  # each budget once
    with pytest.raises(ValueError, match="points"):
        sweep_budgets(1000, 600, 0)


def test_sweep_verdicts() -> None:
    from fxmem.bench.sweep import MIB, check_sweep, format_verdicts

    def row(budget, predicted, measured, error=None):
        return {"budget": budget * MIB, "predicted_peak_bytes": predicted * MIB, "peak_bytes": measured * MIB,
                "error": error}  # fmt: skip

    verdicts, failures = check_sweep([row(80, 79, 78), row(100, 95, 97), row(60, 70, 69)])
    assert [v["verdict"] for v in verdicts] == ["MET", "MET", "infeasible (best effort)"]
    assert verdicts[0]["error"] == pytest.approx(-2 / 97)
    assert failures == []
    assert "outside" not in format_verdicts(verdicts)

    _, failures = check_sweep([row(100, 95, 101), row(80, 79, 78)])
    assert failures == ["100 MiB: measured peak 101 MiB is over it"]
    _, failures = check_sweep([row(100, 90, 80), row(80, 79, 79.5), row(60, 59, 85)])
    assert len(failures) == 2 and "over it" in failures[0] and failures[1].startswith("not monotonic")
    verdicts, failures = check_sweep([row(100, 90, 80, error="RuntimeError: boom\ntrace")])
    assert verdicts[0]["verdict"] == "error: RuntimeError: boom" and len(failures) == 1
    assert "(outside ±5%)" in format_verdicts(check_sweep([row(100, 90, 80)])[0])


def test_allocation_trace_keeps_each_allocations_generated_line(tmp_path: Path) -> None:
    """An allocation is attributed to its innermost frame outside installed packages (a compiled graph's
    generated code), whose source is saved once; each graph's predicted timeline goes with it."""
    import torch

    from fxmem.bench.trace import trace_path, write_trace
    from fxmem.compiler import FxmemCompiler
    from tests.helpers import build, run_step

    model, inputs = build("mlp")
    compiler = FxmemCompiler(memory_budget=0.4, codegen="eager")
    run_step(torch.compile(model, backend=compiler), inputs)
    generated = tmp_path / "generated.py"
    generated.write_text("buf0 = empty()\nbuf1 = empty()\n")
    library = str(Path(torch.__file__).parent / "nn" / "functional.py")
    frames = [{"filename": library, "line": 3, "name": "linear"}, {"filename": str(generated), "line": 2, "name": "c"}]
    events = [
        {"action": "alloc", "addr": 16, "size": 512, "frames": frames},
        {"action": "segment_alloc", "addr": 0, "size": 2 << 20, "frames": []},
        {"action": "free_requested", "addr": 16, "size": 512, "frames": []},
    ]
    path = trace_path(str(tmp_path / "traces"), "fxmem memory_budget=0.4")
    assert path.name == "fxmem_memory_budget_0_4.json"
    report = compiler.reports[0]
    simulations = [{"peak_bytes": report.timeline.peak_bytes}, {"peak_bytes": 1}]
    row = {"label": "fxmem memory_budget=0.4", "options": {}}
    write_trace(path, row, compiler.reports, events, 1024, 4096, simulations)
    trace = json.loads(path.read_text())
    assert trace["events"] == [["alloc", 16, 512, str(generated), 2], ["free_requested", 16, 512, "", 0]]
    assert trace["sources"] == {str(generated): generated.read_text()}
    assert (trace["allocated_before"], trace["peak_bytes"]) == (1024, 4096)
    (graph,) = trace["graphs"]
    assert graph["predicted_peak_bytes"] == report.predicted_peak_bytes
    assert graph["simulation"] == 0 and trace["simulations"] == simulations
    assert [tuple(p) for p in graph["points"]] == report.timeline.points


def test_recorded_simulations_load_back_into_the_same_timelines(monkeypatch: pytest.MonkeyPatch):
    """A plan's graphs saved as tables (with a trace) and loaded back, on meta values, simulate to the
    same peak, fused or not: the trace of a GPU step can be replayed against the simulator anywhere."""
    import torch

    from fxmem import partitioner
    from fxmem.bench.trace import load_simulation, recorded_simulations
    from fxmem.compiler import FxmemCompiler
    from fxmem.simulate import simulate
    from tests.helpers import build, run_step

    originals = []

    def keep(fw, bw, num_fwd_outputs, static, **kwargs):
        originals.append((fw, bw, num_fwd_outputs, list(static), kwargs))
        return simulate(fw, bw, num_fwd_outputs, originals[-1][3], **kwargs)

    monkeypatch.setattr(partitioner, "simulate", keep)
    model, inputs = build("gpt")
    recorded: list = []
    with recorded_simulations(recorded):
        run_step(torch.compile(model, backend=FxmemCompiler(memory_budget=0.4, codegen="eager")), inputs)
    assert partitioner.simulate is keep
    assert len(recorded) == len(originals) >= 1
    for table, (fw, bw, num_fwd_outputs, static, kwargs) in zip(recorded, originals, strict=True):
        table = json.loads(json.dumps(table))
        loaded_fw, loaded_bw, loaded = load_simulation(table)
        assert simulate(loaded_fw, loaded_bw, **loaded).peak_bytes == table["peak_bytes"]
        for fused in (True, False):
            want = simulate(fw, bw, num_fwd_outputs, static, fused=fused, outside_bytes=kwargs["outside_bytes"])
            got = simulate(loaded_fw, loaded_bw, **{**loaded, "fused": fused})
            assert got.points == want.points, fused


def test_joint_graphs_copy_graphs_that_hold_tensor_constants():
    """A tensor made in ``forward`` becomes a constant of the joint graph; the copy keeps it real and the
    graph's values fake."""
    import torch

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (self.linear(x) * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum()

    (joint,) = joint_graphs(Scaled(), (torch.randn(2, 4),), run=False)
    gm = joint[0]
    (constant,) = gm.graph.find_nodes(op="get_attr")
    assert torch.equal(getattr(gm, constant.target), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert all(type(n.meta["val"]).__name__ == "FakeTensor" for n in gm.graph.find_nodes(op="placeholder"))


def test_replay_sets_each_fused_model_against_a_traced_peak(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], inductor_cache
) -> None:
    """``python -m fxmem.bench.replay`` rebuilds the plan a traced step ran and simulates it again: as
    fxmem plans it gives the recorded prediction; the scheduler model with no allowance predicts less,
    and the walk with its former allowance more than the bare walk. A trace of several graphs is skipped,
    with the reason."""
    import torch

    from fxmem.bench import replay
    from fxmem.bench.trace import recorded_simulations, trace_path, write_trace
    from fxmem.compiler import FxmemCompiler
    from tests.helpers import build, run_step

    model, inputs = build("gpt")
    compiler = FxmemCompiler(memory_budget=0.4)  # Inductor: the fused model
    simulations: list = []
    with recorded_simulations(simulations):
        run_step(torch.compile(model, backend=compiler), inputs)
    report = compiler.reports[0]
    path = trace_path(str(tmp_path), "gpt tiny")
    write_trace(path, {"label": "gpt tiny", "options": {}}, compiler.reports, [], 0, 2**20, simulations)
    row = replay.replay(json.loads(path.read_text()))
    assert row["predicted"]["fxmem"] == report.predicted_peak_bytes
    assert row["predicted"]["walk"] < row["predicted"]["walk, 7/6"]
    assert row["predicted"]["fusion"] < report.predicted_peak_bytes
    skipped = {**json.loads(path.read_text()), "label": "two"}
    skipped["graphs"] *= 2
    (tmp_path / "two.json").write_text(json.dumps(skipped))
    assert replay.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if line.startswith("gpt_tiny")]
    assert " 1.0 " in line and line.count("%") == len(replay.VARIANTS)
    assert "two" in out and "skipped: 2 graphs" in out


def test_generated_kernels_are_read_from_the_call_with_the_nodes_each_names() -> None:
    """A kernel's comment names its nodes; its launch is the first line after it that neither allocates
    nor picks a stream, whatever launches it (Triton, an extern or a CPU kernel). The definitions above
    ``call`` carry the same comments and are not kernels launched."""
    from fxmem.bench.kernels import generated_kernels

    source = textwrap.dedent(
        """\
        # Topologically Sorted Source Nodes: [defined_only]
        triton_poi_0 = async_compile.triton('triton_poi_0', '''...''')
        def call(args):
            # Topologically Sorted Source Nodes: [add, user_x], Original ATen: [aten.add]
            buf0 = empty_strided_cuda((4, ), (1, ), torch.float32)
            stream0 = get_raw_stream(0)
            triton_poi_0.run(arg0, buf0, 4, stream=stream0)
            # Topologically Sorted Source Nodes: [mm]
            buf1 = empty_strided_cpu((4, 4), (4, 1), torch.float32)
            extern_kernels.mm(buf0, buf0, out=buf1)
            # Topologically Sorted Source Nodes: [relu]

            cpp_fused_relu_1(buf1)
            return (buf1, )
        """
    )
    assert generated_kernels(source) == [(7, ("add", "user_x")), (10, ("mm",)), (13, ("relu",))]


def test_kernel_table_sets_each_kernels_allocations_against_the_walk_at_its_nodes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A kernel's measured bytes are the most the allocator held while allocating for it; its prediction,
    the highest point the simulator gives the graph nodes it names (none when it names none)."""
    import torch

    from fxmem.bench import replay
    from fxmem.bench.kernels import kernel_table
    from fxmem.bench.trace import recorded_simulations, trace_path, write_trace
    from fxmem.compiler import FxmemCompiler
    from tests.helpers import build, run_step

    model, inputs = build("mlp")
    compiler = FxmemCompiler(memory_budget=0.4, codegen="eager")
    simulations: list = []
    with recorded_simulations(simulations):
        run_step(torch.compile(model, backend=compiler), inputs)
    points = [(name, live) for phase, name, live in compiler.reports[0].timeline.points if phase == "backward"]
    (first, first_live), (second, second_live) = points[1], points[2]
    path = trace_path(str(tmp_path), "mlp tiny")
    write_trace(path, {"label": "mlp tiny", "options": {}}, compiler.reports, [], 1000, 2**20, simulations)
    trace = json.loads(path.read_text())
    source = "\n".join([
        "# AOT ID: ['0_backward']", "def call(args):",
        f"    # Topologically Sorted Source Nodes: [{first}, not_a_node]",
        "    buf0 = empty_strided_cuda((128, ), (1, ), torch.float32)",  # line 4
        "    triton_poi_0.run(buf0)",
        f"    # Topologically Sorted Source Nodes: [{second}]",
        "    buf1 = empty_strided_cuda((64, ), (1, ), torch.float32)",  # line 7
        "    extern_kernels.mm(buf0, buf0, out=buf1)",
        "    # Topologically Sorted Source Nodes: [not_a_node]",
        "    triton_poi_2.run(buf1)",
    ])  # fmt: skip
    trace["sources"] = {"generated.py": source}
    trace["events"] = [
        ["alloc", 1, 512, "generated.py", 4], ["free_requested", 1, 512, "", 0],
        ["alloc", 2, 256, "generated.py", 7], ["alloc", 3, 64, "", 0],
    ]  # fmt: skip
    rows = kernel_table(trace)
    assert [(r.phase, r.index, r.nodes) for r in rows] == [
        ("backward", 0, (first, "not_a_node")), ("backward", 1, (second,)), ("backward", 2, ("not_a_node",)),
    ]  # fmt: skip
    assert [r.measured for r in rows] == [1512, 1256, None]
    assert [r.predicted for r in rows] == [first_live, second_live, None]
    path.write_text(json.dumps(trace))
    assert replay.main(["--kernels", str(path)]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1 + 1 + 2 + 1  # the trace, the header, the kernels that allocated, the sum
    assert out.splitlines()[-1] == "2 of 3 kernels name a graph node; 2 allocated"
    two = tmp_path / "two.json"
    two.write_text(json.dumps({**trace, "graphs": trace["graphs"] * 2}))
    assert replay.main(["--kernels", str(two)]) == 0
    assert "skipped: a kernel table needs a trace of one graph, not 2" in capsys.readouterr().out
