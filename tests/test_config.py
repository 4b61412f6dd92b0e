"""Config composition and validation: wrong keys and values are clear errors."""

import pytest

from fedlora.config import ConfigError, compose, to_typed


def test_default_config_composes_and_validates():
    cfg = compose([])
    assert cfg.model.source == "smollm2"
    assert cfg.data.source == "wearable"
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.strategy.name == "fedavg"


def test_group_and_value_overrides():
    cfg = compose(["model=tiny", "lora=all_linear_r16", "strategy=fedadam", "train.lr=0.01", "federation.rounds=5"])
    assert cfg.model.source == "tiny"
    assert cfg.lora.r == 16 and "down_proj" in cfg.lora.target_modules
    assert cfg.strategy.name == "fedadam" and cfg.strategy.server_lr == 0.01
    assert cfg.train.lr == 0.01 and cfg.federation.rounds == 5


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(Exception, match="lora.rr|rr"):
        compose(["lora.rr=4"])
    with pytest.raises(ConfigError, match="bogus"):
        to_typed({"train": {"bogus": 1}})


def test_wrong_type_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match="train.lr|lr"):
        to_typed({"train": {"lr": "fast"}})


@pytest.mark.parametrize(
    "override,needle",
    [
        ({"strategy": {"name": "fedsgd"}}, "strategy.name='fedsgd' is not one of"),
        ({"model": {"source": "gpt5"}}, "model.source"),
        ({"model": {"source": "local", "path": "/no/such/dir"}}, "model.path"),
        ({"data": {"source": "file", "path": "/no/such.jsonl"}}, "data.path"),
        ({"data": {"source": "file", "path": ""}}, "data.path must name"),
        ({"federation": {"fraction": 1.5}}, "federation.fraction"),
        ({"federation": {"min_clients": 20, "num_clients": 4}}, "federation.min_clients"),
        ({"train": {"batch_size": 0}}, "train.batch_size"),
        ({"lora": {"dropout": 1.0}}, "lora.dropout"),
        ({"lora": {"target_modules": []}}, "lora.target_modules"),
        ({"train": {"lr_schedule": "step"}}, "train.lr_schedule"),
    ],
)
def test_bad_values_name_the_setting(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(".", r"\.").replace("'", ".")):
        to_typed(override)
