"""easyroutine's import paths reach easyroutine_dist's single implementations; the small compat records behave
as easyroutine 1.1.5 documents them."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

from easyroutine_dist.errors import ConfigError, PositionError

# (easyroutine_dist path, name, module that implements it)
REEXPORTS = [
    ("hooked_model", "HookedModel", "easyroutine_dist.hooked_model"),
    ("hooked_model", "ExtractionConfig", "easyroutine_dist.config"),
    ("hooked_model", "HookedModelConfig", "easyroutine_dist.compat"),
    ("activation_cache", "ActivationCache", "easyroutine_dist.cache"),
    ("activation_cache", "ValueWithInfo", "easyroutine_dist.compat"),
    ("interventions", "Intervention", "easyroutine_dist.intervention_spec"),
    ("activation_saver", "ActivationSaver", "easyroutine_dist.storage.api"),
    ("activation_saver", "ActivationLoader", "easyroutine_dist.storage.api"),
    ("activation_saver", "QueryResult", "easyroutine_dist.storage.api"),
    ("tools", "LogitLens", "easyroutine_dist.lens"),
    ("tools.logit_lens", "LogitLens", "easyroutine_dist.lens"),
    ("token_index", "TokenIndex", "easyroutine_dist.interpretability.token_index"),
]


@pytest.mark.parametrize("path,name,home", REEXPORTS)
def test_easyroutine_paths_are_reexports_not_copies(path, name, home):
    obj = getattr(importlib.import_module(f"easyroutine_dist.interpretability.{path}"), name)
    assert obj is getattr(importlib.import_module(home), name)
    assert obj.__module__ == home


def test_package_level_names_are_the_same_objects():
    import easyroutine_dist.interpretability as pkg
    from easyroutine_dist.interpretability import hooked_model, interventions

    assert pkg.HookedModel is hooked_model.HookedModel and pkg.Intervention is interventions.Intervention


def test_hooked_model_config_has_easyroutine_defaults():
    from easyroutine_dist.interpretability.hooked_model import HookedModelConfig

    cfg = HookedModelConfig(model_name="org/m")
    # easyroutine 1.1.5's documented defaults
    assert (cfg.device_map, cfg.torch_dtype, cfg.attn_implementation, cfg.batch_size) == \
        ("balanced", torch.bfloat16, "custom_eager", 1)
    assert HookedModelConfig("m", "cpu", "float32", "eager", 4).torch_dtype is torch.float32
    assert HookedModelConfig("m", torch_dtype="auto").torch_dtype == "auto"
    assert cfg.to_dict() == {"model_name": "org/m", "device_map": "balanced", "torch_dtype": "bfloat16",
                             "attn_implementation": "custom_eager", "batch_size": 1}


@pytest.mark.parametrize("kwargs,word", [({"model_name": ""}, "model_name"),
                                         ({"model_name": "m", "torch_dtype": "float33"}, "torch_dtype"),
                                         ({"model_name": "m", "batch_size": 0}, "batch_size")])
def test_hooked_model_config_refuses_bad_fields(kwargs, word):
    from easyroutine_dist.interpretability.hooked_model import HookedModelConfig

    with pytest.raises(ConfigError, match=word):
        HookedModelConfig(**kwargs)


def test_value_with_info_parts_and_attributes():
    from easyroutine_dist.interpretability.activation_cache import ValueWithInfo

    t = torch.arange(6.0).reshape(2, 3)
    v = ValueWithInfo(t, {"rows": [0, 1]})
    assert v.value() is t and v.info() == {"rows": [0, 1]}
    assert v.shape == (2, 3) and v.dtype == torch.float32  # other attributes come from the value
    with pytest.raises(AttributeError):
        v.not_an_attribute
    assert "ValueWithInfo(" in repr(v)


def test_value_with_info_copies_and_compares():
    from easyroutine_dist.interpretability.activation_cache import ValueWithInfo

    v = ValueWithInfo(torch.tensor([1.0, 2.0]), "note")
    w = copy.deepcopy(v)  # goes through __getstate__/__setstate__, as pickling does
    assert w is not v and torch.equal(w.value(), torch.tensor([1.0, 2.0])) and w.info() == "note"
    assert w == v and w != ValueWithInfo(torch.tensor([1.0, 3.0]), "note") and w != ValueWithInfo(v.value(), "x")


def test_token_index_positions_written_by_hand():
    from easyroutine_dist.interpretability.token_index import TokenIndex

    tokens = ["I", "love", "cats", "and", "dogs", "."]
    ti = TokenIndex("any-model", pivot_positions=[4])
    assert ti.get_token_index(["last"], tokens) == [5]
    assert ti.get_token_index([(1, 3), 0], tokens) == [1, 2, 0]
    assert ti.get_token_index(["inputs-partition-0"], tokens) == [0, 1, 2, 3]
    assert ti.get_token_index(["inputs-partition-1", "last-2"], tokens, return_type="dict") == \
        {"inputs-partition-1": [4, 5], "last-2": [4]}
    flat, by_spec = ti.get_token_index(["all"], tokens, return_type="all")
    assert flat == [0, 1, 2, 3, 4, 5] and by_spec == {"all": [0, 1, 2, 3, 4, 5]}


def test_token_index_refusals():
    from easyroutine_dist.interpretability.token_index import TokenIndex

    with pytest.raises(ConfigError, match="pivot_positions"):
        TokenIndex("m", pivot_tokens=["."])
    with pytest.raises(ConfigError, match="list"):
        TokenIndex("m").get_token_index("last", ["a"])
    with pytest.raises(ConfigError, match="return_type"):
        TokenIndex("m").get_token_index(["last"], ["a"], return_type="tuple")
    with pytest.raises(PositionError):
        TokenIndex("m").get_token_index([7], ["a", "b"])
