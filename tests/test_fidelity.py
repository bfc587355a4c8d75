"""Smoke tests of ``bench/fidelity.py``: its data, its gradient-error metric, and a few training steps."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parent.parent / "bench" / "fidelity.py"


@pytest.fixture(scope="module")
def fidelity():
    spec = importlib.util.spec_from_file_location("bench_fidelity", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)
    torch._dynamo.reset()


def test_text_data_is_deterministic_and_covers_its_vocabulary(fidelity):
    a, b = fidelity.load_text(50_000), fidelity.load_text(50_000)
    assert a.sha256 == b.sha256 and torch.equal(a.train, b.train)
    assert len(a.train) + len(a.val) == 50_000
    assert 0 <= int(a.train.min()) and int(a.train.max()) < len(a.vocab)
    batches = fidelity.text_batches(a.train, 3, 4, 16, seed=0)
    assert [tuple(x.shape) for x in batches] == [(4, 17)] * 3
    assert all(
        torch.equal(x, y) for x, y in zip(batches, fidelity.text_batches(a.train, 3, 4, 16, seed=0), strict=True)
    )


def test_digit_batches_are_shifted_images(fidelity):
    pytest.importorskip("sklearn")
    data = fidelity.load_digits_data()
    batches = fidelity.image_batches(data, 30, 64, seed=0)  # more than one epoch of 1438 images
    assert len(batches) == 30
    images, labels = batches[0]
    assert images.shape == (64, 1, 8, 8) and labels.shape == (64,) and labels.dtype == torch.int64


def test_grad_error_metric(fidelity):
    g = {"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0])}
    same = fidelity.grad_error(g, {k: v.clone() for k, v in g.items()})
    assert same["rel_error"] == 0.0 and same["cosine"] == pytest.approx(1.0)
    off = fidelity.grad_error(g, {"w": torch.tensor([3.0, 4.5]), "b": torch.tensor([0.0])})
    assert off["rel_error"] == pytest.approx(0.1) and off["worst_param"] == "w"


def test_training_smoke_writes_json(fidelity, tmp_path, capsys):
    out = tmp_path / "fidelity.json"
    argv = ["--tasks", "gpt", "--configs", "lossless,int8", "--steps", "3", "--corpus-mb", "0.05", "--json", str(out)]
    assert fidelity.main(argv) == 0
    payload = json.loads(out.read_text())
    rows = {r["config"]: r for r in payload["summary"]}
    assert set(rows) == {"lossless", "int8"}
    assert rows["lossless"]["train_delta_pct"] == 0.0
    assert rows["int8"]["plan"]["formats"].get("int8", 0) > 0
    assert 0 < rows["int8"]["saved_fraction"] <= 0.3 + 1e-9
    assert all(len(r["losses"]) == 3 for r in payload["runs"])
    assert "Training fidelity" in capsys.readouterr().out
