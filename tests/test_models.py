"""Tests for the bundled reference models in ``models/`` (CPU, tiny presets only)."""

from __future__ import annotations

import dataclasses
import math
from types import ModuleType

import pytest
import torch

import models.gpt
import models.mlp
import models.resnet
import models.vit

MODULES: dict[str, ModuleType] = {
    "gpt": models.gpt,
    "resnet": models.resnet,
    "vit": models.vit,
    "mlp": models.mlp,
}
CONFIGS = {
    "gpt": models.gpt.GPTConfig,
    "resnet": models.resnet.ResNetConfig,
    "vit": models.vit.ViTConfig,
    "mlp": models.mlp.MLPConfig,
}
MODEL_CLASSES = {
    "gpt": models.gpt.GPT,
    "resnet": models.resnet.ResNet,
    "vit": models.vit.ViT,
    "mlp": models.mlp.MLP,
}
TINY = [(m, p) for m, mod in MODULES.items() for p in mod.PRESETS if p.startswith("tiny")]
ALL = [(m, p) for m, mod in MODULES.items() for p in mod.PRESETS]

# Reference parameter counts (GPT-2 124M, torchvision ResNets, timm ViT-S/16 and ViT-B/16).
PARAM_COUNTS = {
    ("gpt", "gpt2-small"): 124_439_808,
    ("resnet", "resnet18"): 11_689_512,
    ("resnet", "resnet50"): 25_557_032,
    ("vit", "vit-small"): 22_050_664,
    ("vit", "vit-base"): 86_567_656,
}

# (module, field, bad value): each must make the config raise ValueError naming the field.
BAD_FIELDS = [
    ("gpt", "n_layer", 0),
    ("gpt", "n_embd", 33),  # not divisible by n_head
    ("gpt", "seq_len", 10_000),  # longer than block_size
    ("gpt", "dropout", 1.5),
    ("gpt", "vocab_size", 2.5),
    ("resnet", "block", "dense"),
    ("resnet", "layers", (1, 0)),
    ("resnet", "widths", (16,)),  # length differs from layers
    ("resnet", "stem", "nope"),
    ("vit", "patch_size", 7),  # image_size not divisible
    ("vit", "n_head", 5),  # dim not divisible
    ("vit", "dropout", -0.1),
    ("mlp", "activation", "tanh"),
    ("mlp", "hidden", (64, -1)),
    ("mlp", "batch_size", 0),
]


def _ids(params: list[tuple[str, str]]) -> list[str]:
    return [f"{m}:{p}" for m, p in params]


def _loss(mod: ModuleType, preset: str, seed: int = 0) -> torch.Tensor:
    model, inputs = mod.build(preset, seed=seed)
    return model(*inputs)


@pytest.mark.parametrize(("m", "preset"), TINY, ids=_ids(TINY))
def test_build_forward_backward(m: str, preset: str) -> None:
    model, inputs = MODULES[m].build(preset)
    assert isinstance(model, torch.nn.Module)
    assert isinstance(inputs, tuple) and all(isinstance(t, torch.Tensor) for t in inputs)
    for t in inputs:
        assert t.device.type == "cpu"
        assert t.dtype in (torch.float32, torch.int64)
    assert model.training
    loss = model(*inputs)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize(("m", "preset"), TINY, ids=_ids(TINY))
def test_deterministic_under_seed(m: str, preset: str) -> None:
    mod = MODULES[m]
    assert torch.equal(_loss(mod, preset, seed=0), _loss(mod, preset, seed=0))
    assert not torch.equal(_loss(mod, preset, seed=0), _loss(mod, preset, seed=1))


@pytest.mark.parametrize(("m", "preset"), TINY, ids=_ids(TINY))
def test_dtype_and_batch_size(m: str, preset: str) -> None:
    model, inputs = MODULES[m].build(preset, batch_size=3, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    for t in inputs:
        assert t.shape[0] == 3
        assert t.dtype == (torch.float64 if t.is_floating_point() else torch.int64)
    assert model(*inputs).dtype == torch.float64


@pytest.mark.parametrize(("m", "preset"), TINY, ids=_ids(TINY))
def test_autocast(m: str, preset: str) -> None:
    model, inputs = MODULES[m].build(preset)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(*inputs)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()


@pytest.mark.parametrize("m", ["gpt", "resnet"])  # attention and BatchNorm (buffer updates); kept short
def test_torch_compile_fullgraph(m: str) -> None:
    torch._dynamo.reset()
    model, inputs = MODULES[m].build("tiny")
    expected = model(*inputs)
    loss = torch.compile(model, backend="aot_eager", fullgraph=True)(*inputs)
    loss.backward()
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize(("m", "preset"), TINY, ids=_ids(TINY))
def test_zero_arg_factory(m: str, preset: str) -> None:
    factory = getattr(MODULES[m], preset.replace("-", "_"))
    model, inputs = factory()
    ref_model, ref_inputs = MODULES[m].build(preset)
    assert all(torch.equal(a, b) for a, b in zip(inputs, ref_inputs, strict=True))
    ref_state = ref_model.state_dict()
    assert all(torch.equal(v, ref_state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("m", "preset"), ALL, ids=_ids(ALL))
def test_every_preset_has_a_factory_and_valid_config(m: str, preset: str) -> None:
    assert callable(getattr(MODULES[m], preset.replace("-", "_")))
    config = CONFIGS[m].from_name(preset)
    assert config.batch_size > 0


@pytest.mark.parametrize("m", list(MODULES))
def test_unknown_preset_lists_known_names(m: str) -> None:
    with pytest.raises(ValueError) as info:
        CONFIGS[m].from_name("no-such-model")
    for name in MODULES[m].PRESETS:
        assert name in str(info.value)
    with pytest.raises(ValueError):
        MODULES[m].build("no-such-model")


@pytest.mark.parametrize(("m", "field", "value"), BAD_FIELDS, ids=[f"{m}.{f}" for m, f, _ in BAD_FIELDS])
def test_bad_config_field_names_the_field(m: str, field: str, value: object) -> None:
    config = CONFIGS[m].from_name("tiny")
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(config, **{field: value})


@pytest.mark.parametrize(("m", "preset"), list(PARAM_COUNTS), ids=_ids(list(PARAM_COUNTS)))
def test_full_size_param_counts_on_meta(m: str, preset: str) -> None:
    with torch.device("meta"):
        model = MODEL_CLASSES[m](CONFIGS[m].from_name(preset))
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[(m, preset)]


def test_gpt_tied_weights_and_initial_loss() -> None:
    model, inputs = models.gpt.build("tiny")
    assert model.head.weight is model.tok_emb.weight
    # Small init: the initial loss is close to uniform over the vocabulary.
    assert abs(model(*inputs).item() - math.log(model.config.vocab_size)) < 0.1


@pytest.mark.parametrize("m", ["gpt", "vit"])
def test_sdpa_matches_matmul_attention(m: str) -> None:
    model, inputs = MODULES[m].build("tiny")
    fused = MODEL_CLASSES[m](dataclasses.replace(model.config, sdpa=True))
    fused.load_state_dict(model.state_dict())
    torch.testing.assert_close(fused(*inputs), model(*inputs))


def test_mlp_variants() -> None:
    base = models.mlp.MLPConfig.from_name("tiny")
    x = torch.randn(4, base.in_features)
    y = torch.randint(0, base.num_classes, (4,))
    for config in (dataclasses.replace(base, activation="relu"), dataclasses.replace(base, layernorm=True)):
        loss = models.mlp.MLP(config)(x, y)
        assert torch.isfinite(loss)
