"""A LoRA rank per device (fedlora/aggregate/ranks.py): a device trains the first r components of the
global adapter and returns its update zero-padded to the global rank; the cloud's sum is the padded
weighted sum, plain or secure."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedlora import adapters
from fedlora.aggregate import ranks
from fedlora.aggregate.sums import WeightedSum
from fedlora.config import ConfigError
from fedlora.model import load_base_model, wrap_lora
from fedlora.run_settings import resolve_run

STRATEGY = {"proximal_mu": 0.0, "freeze_a": False}
# Two profiles: phones train rank 2 of the global rank 8, laptops the full 8.
MIXED = ("topology.profiles.phone.lora_r=2", "topology.profiles.laptop.lora_r=0", "topology.profile_mix.phone=0.5",
         "topology.profile_mix.laptop=0.5", "topology.profile_mix.rpi4=0", "topology.profile_mix.car=0")


def test_heterogeneous_ranks_aggregate_to_the_hand_computed_padded_weighted_sum():
    rng = np.random.default_rng(0)
    shapes = {"m.q_proj.lora_A.weight": (8, 6), "m.q_proj.lora_B.weight": (5, 8)}
    devices = [(2, 3.0), (4, 1.0), (8, 2.0)]  # (rank, weight)
    total, deltas = WeightedSum(), []
    for r, w in devices:
        small = {"m.q_proj.lora_A.weight": rng.normal(size=(r, 6)).astype(np.float32),
                 "m.q_proj.lora_B.weight": rng.normal(size=(5, r)).astype(np.float32)}
        padded = ranks.pad_state(small, shapes)
        assert adapters.shapes(padded) == shapes and adapters.check_update(padded, shapes) is None
        assert all(np.array_equal(ranks.slice_state(padded, r)[k], small[k]) for k in small)  # slice inverts pad
        total.add(padded, w)
        deltas.append((r, w, small))
    mean = total.mean()
    want_a, want_b = np.zeros((8, 6)), np.zeros((5, 8))
    for r, w, small in deltas:  # by hand: each device fills its first r rows of A and columns of B
        want_a[:r] += w * small["m.q_proj.lora_A.weight"]
        want_b[:, :r] += w * small["m.q_proj.lora_B.weight"]
    np.testing.assert_allclose(mean["m.q_proj.lora_A.weight"], want_a / 6.0, rtol=1e-6)
    np.testing.assert_allclose(mean["m.q_proj.lora_B.weight"], want_b / 6.0, rtol=1e-6)
    with pytest.raises(ValueError, match="rank 2; cannot take its first 4"):
        ranks.slice_state(ranks.slice_state(mean, 2), 4)
    assert ranks.device_alpha(16, 2, 8) == 4.0


def test_a_devices_slice_reproduces_the_global_adapter_restricted_to_its_components(tiny_config):
    cfg = tiny_config("lora.r=8", "lora.alpha=16", "lora.dropout=0")
    base, _ = load_base_model(cfg.model)
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    model = wrap_lora(base, cfg.lora, init_seed=1)
    rng = np.random.default_rng(1)
    full = {k: rng.normal(scale=0.3, size=v.shape).astype(np.float32) for k, v in adapters.get_state(model).items()}
    restricted = {k: v.copy() for k, v in full.items()}
    for k, v in restricted.items():
        (v[3:] if ranks.is_lora_a(k) else v[:, 3:])[...] = 0  # the global's components 0-2 only
    adapters.set_state(model, restricted)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    device = wrap_lora(base, dataclass_r(cfg.lora, 3), init_seed=1, lora_alpha=ranks.device_alpha(16, 3, 8))
    adapters.set_state(device, ranks.slice_state(full, 3))
    with torch.no_grad():
        got = device(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plain = wrap_lora(base, dataclass_r(cfg.lora, 3), init_seed=1)  # scaling alpha/3 instead: not the global's
    adapters.set_state(plain, ranks.slice_state(full, 3))
    with torch.no_grad():
        assert not torch.allclose(plain(input_ids=ids).logits, want, atol=1e-3)


def dataclass_r(lora, r):
    import dataclasses

    return dataclasses.replace(lora, r=r)


def test_ranks_follow_profiles_and_travel_in_the_round_settings(short_run):
    from fedlora.round_settings import RoundSettings, RoundSettingsError

    resolved = resolve_run(short_run("topology=flat", "federation.num_clients=6", *MIXED))
    settings = resolved.round_settings(1, STRATEGY)
    phones = sorted(int(c) for c, p in resolved.tree.profile_of.items() if p == "phone")
    assert phones and settings.lora_ranks == {str(c): 2 for c in phones}
    assert RoundSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings
    assert resolve_run(short_run("topology=flat")).round_settings(1, STRATEGY).lora_ranks == {}  # default: one rank
    with pytest.raises(ConfigError, match="topology.profiles.phone.lora_r=16 exceeds lora.r=8"):
        short_run("topology.profiles.phone.lora_r=16")
    doc = settings.to_dict() | {"lora_ranks": {"0": 9}}
    with pytest.raises(RoundSettingsError, match=r"lora_ranks\['0'\]=9 must be"):
        RoundSettings.from_dict(doc)


@pytest.mark.parametrize("strategy", ["fedavg", "ffa_lora"])
def test_a_lower_rank_device_trains_its_slice_and_pads_its_update(short_run, strategy):
    from fedlora.aggregate.strategies import make_strategy
    from fedlora.roles.device import initial_adapter, train_round

    cfg = short_run("topology=flat", "federation.num_clients=4", f"strategy={strategy}", "train.lr=0.01")
    client = make_strategy(cfg.strategy).client_settings()
    plain = resolve_run(cfg).round_settings(1, client)
    mixed = resolve_run(cfg).round_settings(1, client).__class__(**{**plain.__dict__, "lora_ranks": {"1": 2}})
    full = initial_adapter(cfg, freeze_a=client["freeze_a"])
    sent = {k: v for k, v in full.items() if not (client["freeze_a"] and ranks.is_lora_a(k))}
    expected = adapters.shapes(sent)
    d_full, _ = train_round(mixed, sent, 0)
    d_low, _ = train_round(mixed, sent, 1)
    assert adapters.check_update(d_low, expected) is None and adapters.check_update(d_full, expected) is None
    for k, v in d_low.items():
        beyond = v[2:] if ranks.is_lora_a(k) else v[:, 2:]
        assert not beyond.any(), k  # zero padding: components 2-7 untouched by the rank-2 device
    assert any(np.abs(v).max() > 0 for v in d_low.values())
    assert any(np.abs(v[:, 2:]).max() > 0 for k, v in d_full.items() if ranks.is_lora_b(k))
    again, _ = train_round(plain, sent, 0)  # the full-rank device is unchanged by a neighbour's rank
    assert all(np.array_equal(again[k], d_full[k]) for k in d_full)


@pytest.mark.parametrize("privacy", ["none", "secagg"])
def test_a_mixed_rank_federation_runs_plain_and_secure(tmp_path, short_run, privacy):
    from fedlora.roles.cloud import run_federation
    from fedlora.roles.local import InProcessTransport

    cfg = short_run("topology=small6g", "topology.suburban_cells=1", "topology.neighbourhoods_per_suburban=1",
                    "topology.mobility.model=none", "federation.num_clients=4", "federation.fraction=1.0",
                    "federation.rounds=1", f"privacy={privacy}", *MIXED,
                    *[f"topology.profiles.{p}.availability=1.0" for p in ("phone", "laptop")])
    summary = run_federation(cfg, tmp_path / privacy, InProcessTransport(4))
    record = [json.loads(line) for line in (tmp_path / privacy / "rounds.jsonl").read_text().splitlines()][0]
    assert record["aggregated"] and len(record["participants"]) == 4 and np.isfinite(summary["final_eval_loss"])
