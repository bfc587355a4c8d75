"""The options contract: validation messages, size strings, and FxmemConfig's value semantics."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fxmem
from fxmem.config import CODEGENS, DEVICE_PROFILES, ON_INFEASIBLE, QUANTIZE_MODES, FxmemConfig, parse_bytes
from fxmem.cost import available_cost_models
from fxmem.solve import available_solvers

OPTION_NAMES = sorted(f.name for f in dataclasses.fields(FxmemConfig))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _error(**options) -> str:
    with pytest.raises(ValueError) as info:
        FxmemConfig.from_options(options)
    return str(info.value)


def _assert_lists(message: str, values) -> None:
    for value in values:
        assert value in message, (value, message)


# --- unknown options -------------------------------------------------------------------------------------


def test_unknown_option_lists_the_valid_ones():
    message = _error(bogus=1)
    assert "'bogus'" in message
    assert "valid options" in message
    _assert_lists(message, OPTION_NAMES)


def test_several_unknown_options_are_all_named():
    message = _error(bogus=1, memroy_budget=0.5, codegen="eager")
    assert "'bogus'" in message and "'memroy_budget'" in message


@pytest.mark.parametrize("make", [fxmem.backend, fxmem.FxmemCompiler], ids=["backend", "FxmemCompiler"])
def test_every_entry_point_validates_at_once(make):
    with pytest.raises(ValueError, match="bogus"):
        make(bogus=1)
    with pytest.raises(ValueError, match="memory_budget"):
        make(memory_budget=1.5)


def test_config_and_options_together_are_rejected():
    with pytest.raises(ValueError, match="not both"):
        fxmem.FxmemCompiler(FxmemConfig(), codegen="eager")


def test_torch_compile_with_an_unknown_option_raises():
    model = torch.nn.Linear(4, 2)
    compiled = torch.compile(model, backend="fxmem", options={"bogus": 1})
    with pytest.raises(Exception) as info:  # dynamo wraps the backend's ValueError
        compiled(torch.randn(3, 4))
    assert "bogus" in str(info.value)
    assert "valid options" in str(info.value)


# --- memory_budget ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-1, 1.5, -0.1, "6 parsecs", True, False, [1], {"a": 1}, float("nan")])
def test_bad_memory_budget(value):
    message = _error(memory_budget=value)
    assert message.startswith("memory_budget:"), message


def test_bad_memory_budget_messages_say_what_is_valid():
    assert "[0, 1]" in _error(memory_budget=1.5)
    assert "'6GiB'" in _error(memory_budget=1.5)
    assert ">= 0" in _error(memory_budget=-1)
    message = _error(memory_budget="6 parsecs")
    assert "'6 parsecs'" in message
    _assert_lists(message, ["B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB"])
    assert "list" in _error(memory_budget=[1])
    assert "True" in _error(memory_budget=True)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("6GiB", 6 * 2**30),
        ("512MiB", 512 * 2**20),
        ("1.5GB", 1_500_000_000),
        ("100", 100),
        ("100B", 100),
        ("2KiB", 2048),
        ("3kb", 3000),
        (" 4 MB ", 4_000_000),
        ("1TiB", 2**40),
    ],
)
def test_size_strings(text, expected):
    assert parse_bytes(text) == expected
    budget = FxmemConfig(memory_budget=text).memory_budget
    assert budget == expected and type(budget) is int


@pytest.mark.parametrize("text", ["", "GiB", "6 GiBs", "-5MiB", "1e9", "six GiB", "5 5MiB"])
def test_bad_size_strings(text):
    with pytest.raises(ValueError, match="memory_budget"):
        parse_bytes(text)


@pytest.mark.parametrize("text", ["0.4", "1.5", "0.5B"])
def test_a_fraction_as_a_string_is_refused(text):
    """As bytes, "0.4" would be a 0-byte budget; the error says a fraction is a float."""
    with pytest.raises(ValueError, match=r"not a whole number of bytes; a fraction is a float \(0.4\)"):
        FxmemConfig(memory_budget=text)


@pytest.mark.parametrize(
    "value, expected",
    [(None, None), (0.4, 0.4), (0.0, 0.0), (1.0, 1.0), (0, 0.0), (1, 1.0), (4096, 4096)],
)
def test_memory_budget_normalisation(value, expected):
    config = FxmemConfig(memory_budget=value)
    assert config.memory_budget == expected
    assert type(config.memory_budget) is type(expected)
    # 0 and 1 as ints read as fractions; other ints are bytes.
    assert config.budget_is_fraction == isinstance(expected, float)


def test_on_infeasible_auto_is_strict_only_for_absolute_budgets():
    assert FxmemConfig().on_infeasible == "auto"
    assert FxmemConfig(memory_budget=0.3).strict_budget is False
    assert FxmemConfig(memory_budget="1GiB").strict_budget is True
    assert FxmemConfig(memory_budget=None).strict_budget is False
    assert FxmemConfig(memory_budget=0.3, on_infeasible="error").strict_budget is True
    assert FxmemConfig(memory_budget="1GiB", on_infeasible="best_effort").strict_budget is False


# --- quantize --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["int3", "INT7", ["int8", "bogus"], [8], 8])
def test_bad_quantize_value_lists_the_valid_ones(value):
    message = _error(quantize=value)
    assert message.startswith("quantize:"), message
    _assert_lists(message, QUANTIZE_MODES)


@pytest.mark.parametrize("value", [["none", "int8"], ("int4", "none"), ["auto", "fp8"]])
def test_quantize_none_or_auto_mixed_with_formats(value):
    message = _error(quantize=value)
    assert message.startswith("quantize:")
    assert "cannot be combined" in message


def test_empty_quantize_list():
    assert _error(quantize=[]).startswith("quantize:")


@pytest.mark.parametrize(
    "value, expected",
    [("none", ("none",)), ("INT8", ("int8",)), (["int8", "int4"], ("int8", "int4")), (["fp8", "FP8"], ("fp8",))],
)
def test_quantize_normalisation(value, expected):
    assert FxmemConfig(quantize=value).quantize == expected


def test_quant_formats():
    assert FxmemConfig().quant_formats == ()
    assert set(FxmemConfig(quantize="auto").quant_formats) == set(QUANTIZE_MODES) - {"none", "auto"}
    assert FxmemConfig(quantize=["int4", "int8"]).quant_formats == ("int4", "int8")


# --- choices ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, valid",
    [
        ("codegen", CODEGENS),
        ("device", DEVICE_PROFILES),
        ("on_infeasible", ON_INFEASIBLE),
        ("solver", ("auto", *available_solvers())),
        ("cost_model", available_cost_models()),
    ],
)
@pytest.mark.parametrize("value", ["bogus", 3, None])
def test_bad_choice_lists_the_valid_values(option, valid, value):
    message = _error(**{option: value})
    assert message.startswith(f"{option}:"), message
    assert repr(value) in message
    assert "valid values" in message
    _assert_lists(message, valid)


def test_choices_are_case_insensitive():
    config = FxmemConfig(codegen="EAGER", device="CPU", solver="Auto", on_infeasible="Best_Effort")
    got = (config.codegen, config.device, config.solver, config.on_infeasible)
    assert got == ("eager", "cpu", "auto", "best_effort")


@pytest.mark.parametrize("option", ["recompute", "stochastic_rounding", "calibrate"])
@pytest.mark.parametrize("value", ["yes", 1, 0, None])
def test_bad_bool_option(option, value):
    message = _error(**{option: value})
    assert message.startswith(f"{option}:")
    assert "True or False" in message


def test_calibrate_needs_the_auto_device():
    message = _error(calibrate=True, device="h100")
    assert message.startswith("calibrate:")
    assert "device='auto'" in message and "'h100'" in message
    assert FxmemConfig(calibrate=True, device="AUTO").calibrate is True


@pytest.mark.parametrize("value", [0, -8, True, 1.5, "64"])
def test_bad_group_size(value):
    message = _error(group_size=value)
    assert message.startswith("group_size:")
    assert "positive int" in message


@pytest.mark.parametrize("value", [None, 1, 32, 128])
def test_good_group_size(value):
    assert FxmemConfig(group_size=value).group_size == value


# --- value semantics -------------------------------------------------------------------------------------


def test_config_is_frozen():
    config = FxmemConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.memory_budget = 0.5  # type: ignore[misc]


def test_config_is_hashable_and_compares_by_value():
    a = FxmemConfig(memory_budget=0.4, quantize=["int8", "int4"], codegen="eager")
    b = FxmemConfig.from_options({"memory_budget": 0.4, "quantize": ("INT8", "int4"), "codegen": "Eager"})
    assert a == b and hash(a) == hash(b)
    assert len({a, b, FxmemConfig()}) == 2
    assert {a: 1}[b] == 1


VARIANTS = [
    {},
    {"memory_budget": 0.5},
    {"memory_budget": 0.4},
    {"memory_budget": "1GiB"},
    {"quantize": "int8"},
    {"quantize": "auto"},
    {"recompute": False},
    {"codegen": "eager"},
    {"device": "h100"},
    {"group_size": 64},
    {"stochastic_rounding": True},
    {"on_infeasible": "error"},
    {"calibrate": True},
]


def test_cache_key_differs_for_different_options():
    keys = [FxmemConfig(**options).cache_key() for options in VARIANTS]
    assert len(set(keys)) == len(keys), keys


@pytest.mark.parametrize("options", VARIANTS, ids=repr)
def test_cache_key_equal_for_equal_options(options):
    assert FxmemConfig(**options).cache_key() == FxmemConfig.from_options(dict(options)).cache_key()


def test_cache_key_sees_normalised_values():
    assert FxmemConfig(memory_budget=1).cache_key() == FxmemConfig(memory_budget=1.0).cache_key()
    assert FxmemConfig(memory_budget="1KiB").cache_key() == FxmemConfig(memory_budget=1024).cache_key()
    assert FxmemConfig(codegen="EAGER").cache_key() == FxmemConfig(codegen="eager").cache_key()
    assert FxmemConfig(quantize="int8").cache_key() == FxmemConfig(quantize=["int8"]).cache_key()
    assert fxmem.__version__ in FxmemConfig().cache_key()


def test_as_dict_round_trips():
    config = FxmemConfig(memory_budget="512MiB", quantize=["int8"], codegen="eager", group_size=32)
    assert sorted(config.as_dict()) == OPTION_NAMES
    assert FxmemConfig.from_options(config.as_dict()) == config
