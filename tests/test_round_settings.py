"""What a device receives each round: typed, versioned, checked field by field; a run's settings resolved once."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fedlora import protocol
from fedlora.config import ConfigError, compose
from fedlora.round_settings import VERSION, RoundSettings, RoundSettingsError
from fedlora.run_settings import resolve_run

STRATEGY = {"proximal_mu": 0.0, "freeze_a": False}


def settings(*overrides: str) -> RoundSettings:
    return resolve_run(compose(["model=tiny", *overrides])).round_settings(2, STRATEGY)


def test_round_settings_carry_what_a_device_needs_and_round_trip_as_json():
    s = settings("privacy=secagg_dp", "privacy.clip_norm=0.5", "data.records_per_client=12", "simulation.cpus_per_client=3")
    assert (s.version, s.round, s.seed, s.num_partitions) == (VERSION, 2, 42, 8)
    assert (s.privacy, s.clip_norm, s.max_examples, s.threads) == ("secagg_dp", 0.5, 12, 3)
    assert protocol.decode_settings(protocol.encode_settings(s)) == s
    assert "federation" not in s.to_dict() and "topology" not in s.to_dict()  # not the whole config


def test_round_settings_refuse_another_version_and_malformed_fields_naming_them():
    doc = settings().to_dict()
    for other in (VERSION - 1, VERSION + 1):
        with pytest.raises(RoundSettingsError, match=f"version={other}"):
            RoundSettings.from_dict({**doc, "version": other})
    with pytest.raises(RoundSettingsError, match="train.batch_size"):
        RoundSettings.from_dict({**doc, "train": {**doc["train"], "batch_size": "four"}})
    with pytest.raises(RoundSettingsError, match="train.batch_size=0"):
        RoundSettings.from_dict({**doc, "train": {**doc["train"], "batch_size": 0}})
    with pytest.raises(RoundSettingsError, match="bogus"):
        RoundSettings.from_dict({**doc, "bogus": 1})
    with pytest.raises(RoundSettingsError, match="lack lora.r"):
        RoundSettings.from_dict({**doc, "lora": {k: v for k, v in doc["lora"].items() if k != "r"}})
    with pytest.raises(RoundSettingsError, match="privacy="):
        RoundSettings.from_dict({**doc, "privacy": "auto"})
    with pytest.raises(RoundSettingsError, match="not JSON"):
        protocol.decode_settings("{")
    with pytest.raises(RoundSettingsError, match="mapping"):
        protocol.decode_settings(json.dumps([1]))


def test_a_device_does_not_look_for_the_federations_files(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "q", "input": "", "output": "a"}\n')
    doc = settings("data=file", f"data.path={data}").to_dict()
    data.unlink()  # only the machine composing the run checks the path; the device reads its data itself
    assert RoundSettings.from_dict(doc).data.path == str(data)


def test_a_run_resolves_privacy_n_max_and_its_tree_once_and_refuses_an_overflowing_sum():
    run = resolve_run(compose(["topology=small6g", "federation.num_clients=8"]))
    assert run.privacy == "secagg" and run.secure and run.max_examples == 64 and run.tree.kind == "tree"
    assert resolve_run(compose(["topology=small6g", "federation.num_clients=4"])).privacy == "none"  # sparse cells
    flat = resolve_run(compose(["topology=flat"]))
    assert flat.privacy == "none" and flat.secure_settings({}) is None
    with pytest.raises(ConfigError, match="privacy.bits=24 with privacy.max_examples=64 and federation.num_clients=300"):
        resolve_run(compose(["privacy=secagg", "privacy.bits=24", "federation.num_clients=300"]))


def test_round_settings_built_field_by_field_as_the_wire_does_are_checked_exactly():
    s = settings()
    with pytest.raises(RoundSettingsError, match="round='2' is not of the field's type"):
        dataclasses.replace(s, round="2")
    with pytest.raises(RoundSettingsError, match="lora.r"):
        dataclasses.replace(s, lora=dataclasses.replace(s.lora, r="x"))
    with pytest.raises(RoundSettingsError, match="threads=0 must be >= 1"):
        dataclasses.replace(s, threads=0)


@pytest.mark.parametrize("overrides, words", [
    (["strategy=fedsa_lora", "train.mode=split", "privacy=none"], "personal strategies with split learning"),
    (["strategy=feddpa", "topology=flat",
      "topology.profiles.phone.lora_r=2"], "personal strategies at several ranks"),
    (["train.mode=split", "privacy=none", "topology=flat",
      "topology.profiles.phone.lora_r=2"], "per-device LoRA ranks"),
])
def test_pairings_that_are_not_built_are_refused_by_name(overrides, words):
    with pytest.raises(ConfigError, match=words):
        resolve_run(compose(["model=tiny", *overrides]))
