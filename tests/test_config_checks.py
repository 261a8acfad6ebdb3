"""Configs refuse a bad field where they are built, naming it; checkpoint loading names the file it could not use.

The configs are fuzzed with hypothesis: any field set to a value of the wrong type (a string for a number, 16.0
for an int, a list for a scalar, a bool for a number, null where none is allowed), a negative number, a zero
where zero means nothing, or a non-finite float must give a ValueError or TypeError naming that field."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longattn.models import BigBirdConfig, EncoderConfig, LongformerConfig, TransformerXL, XLConfig
from longattn.models.botnet import BotNetConfig
from longattn.models.etc import EtcConfig
from longattn.models.hf_checkpoint import read_weights, save_directory
from longattn.models.paraformer import ParaformerConfig

# (config class, the arguments it needs, the fields where 0 is meaningful)
CONFIGS = [
    (LongformerConfig, {}, {"pad_token_id", "type_vocab_size", "initializer_range", "hidden_dropout_prob",
                            "attention_probs_dropout_prob"}),
    (BigBirdConfig, {}, {"pad_token_id", "type_vocab_size", "initializer_range", "hidden_dropout_prob",
                         "attention_probs_dropout_prob", "num_random_blocks", "random_seed"}),
    (XLConfig, {}, {"mem_len", "dropout", "attn_dropout"}),
    (EncoderConfig, {"vocab_size": 10, "num_classes": 2, "max_len": 64}, {"dropout", "attn_dropout"}),
    (EtcConfig, {"vocab_size": 10}, {"local_radius", "max_relative_distance", "dropout", "attn_dropout",
                                     "initializer_range"}),
    (BotNetConfig, {}, {"num_classes", "radius"}),
    (ParaformerConfig, {}, {"depth", "dropout"}),
]
RATES = {"hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attn_dropout"}


def _kinds(cls, name):
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return {a if typing.get_origin(a) is None else typing.get_origin(a) for a in args}


def _checked(cls):
    """Fields whose every allowed type is a plain one (int, float, bool, str, list of ints, None)."""
    return [f.name for f in dataclasses.fields(cls) if f.name != "extra"
            and _kinds(cls, f.name) <= {int, float, bool, str, list, type(None)}]


def _bad_values(cls, name, zero_ok):
    kinds = _kinds(cls, name)
    numeric = bool(kinds & {int, float, list})
    options = [st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)]
    if type(None) not in kinds:
        options.append(st.none())
    if numeric:
        options += [st.text(max_size=5), st.booleans(), st.integers(max_value=-1)]
        if list not in kinds:
            options.append(st.lists(st.integers(1, 4), min_size=1, max_size=3))
        if int in kinds and float not in kinds:
            options.append(st.floats(allow_nan=False, allow_infinity=False))  # 16.0 is not an int either
        if float in kinds:
            options.append(st.sampled_from([math.nan, math.inf, -math.inf]))
        if name not in zero_ok:
            options.append(st.just(0))
        if name in RATES:
            options.append(st.floats(1.0, 1e6))
    elif kinds & {str}:
        options += [st.integers(), st.lists(st.text(max_size=2), max_size=2)]
    elif kinds & {bool}:
        options += [st.integers(2, 5), st.text(min_size=1, max_size=3)]
    return st.one_of(options)


@st.composite
def _bad_config(draw):
    cls, needed, zero_ok = draw(st.sampled_from(CONFIGS))
    name = draw(st.sampled_from(_checked(cls)))
    return cls, {**needed, name: draw(_bad_values(cls, name, zero_ok))}, name


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_bad_config())
def test_a_bad_field_is_named_at_construction(case):
    cls, kwargs, name = case
    with pytest.raises((TypeError, ValueError), match=rf"\b{name}\b"):
        cls(**kwargs)


@pytest.mark.parametrize("cls, needed, zero_ok", CONFIGS)
def test_the_defaults_pass(cls, needed, zero_ok):
    cls(**needed)


@pytest.mark.parametrize("field, value, error, words", [
    ("hidden_size", "32", TypeError, "hidden_size must be an int, got '32'"),
    ("num_attention_heads", 0, ValueError, "num_attention_heads must be >= 1"),
    ("attention_window", 16.0, TypeError, "attention_window must be an int or a list of ints, got 16.0"),
    ("layer_norm_eps", "x", TypeError, "layer_norm_eps must be a number"),
    ("num_hidden_layers", -1, ValueError, "num_hidden_layers must be >= 1, got -1"),
])
def test_config_json_values_name_the_file_and_field(tmp_path, field, value, error, words):
    from longattn.models import LongformerModel

    LongformerModel(LongformerConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=20, attention_window=4)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(error, match=rf"config\.json: LongformerConfig: {words}"):
        LongformerModel.from_pretrained(tmp_path)


def test_a_config_json_that_is_not_an_object(tmp_path):
    from longattn.models import LongformerModel

    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object of config fields, found a list"):
        LongformerModel.from_pretrained(tmp_path)


# --- weights: shard indexes, damaged files, layers the config has no place for --------------------------------

def _sharded(tmp_path, weight_map):
    save_directory(tmp_path, {"model_type": "x"}, {"a": torch.ones(2)})
    (tmp_path / "model.safetensors").rename(tmp_path / "shard-1.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(weight_map))


def test_a_shard_index_loads_its_shards(tmp_path):
    _sharded(tmp_path, {"weight_map": {"a": "shard-1.safetensors"}})
    assert torch.equal(read_weights(tmp_path)["a"], torch.ones(2))


@pytest.mark.parametrize("index, words", [
    ({"metadata": {}}, "expected a 'weight_map' object"),
    ({"weight_map": {"a": "../other/model.safetensors"}}, "lies outside the checkpoint folder"),
    ({"weight_map": {"a": "/etc/passwd"}}, "lies outside the checkpoint folder"),
    ({"weight_map": {"a": "shard-2.safetensors"}}, "shard-2.safetensors: missing"),
    ([1], "not a shard index"),
])
def test_a_bad_shard_index_is_named(tmp_path, index, words):
    _sharded(tmp_path, index)
    with pytest.raises(ValueError, match=words) as err:
        read_weights(tmp_path)
    assert "model.safetensors.index.json" in str(err.value) or "shard-2" in str(err.value)


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_a_truncated_weight_file_is_named(tmp_path, name):
    state = {"w": torch.randn(64, 64)}
    if name.endswith(".bin"):
        torch.save(state, tmp_path / name)
    else:
        save_directory(tmp_path, {"model_type": "x"}, state)
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{name}: cannot read the weights"):
        read_weights(tmp_path)


def test_transformer_xl_refuses_fewer_layers_than_its_weights(tmp_path):
    TransformerXL(XLConfig(dim=16, depth=2, heads=2, seg_len=8, mem_len=8)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "depth": 1}))
    with pytest.raises(ValueError, match=r"no place for: blocks\.1\."):
        TransformerXL.from_pretrained(tmp_path)
    assert len(TransformerXL.from_pretrained(tmp_path, strict=False).blocks) == 1
