"""Closing the gap to centralised training: server momentum (``strategy=fedavgm``) and the clients'
learning rate across rounds (``federation.lr_schedule``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_federation import FLAT4, adapter_tensors

from fedlora.aggregate.strategies import FedAvgM, make_strategy
from fedlora.config import ConfigError, StrategyConfig, compose, validate
from fedlora.roles.cloud import run_federation
from fedlora.roles.local import InProcessTransport
from fedlora.run_settings import resolve_run
from fedlora.schedule import lr_factor

CLIENT = {"proximal_mu": 0.0, "freeze_a": False}


def _state(rng, scale=1.0):
    return {"a.lora_A.weight": (scale * rng.standard_normal((4, 8))).astype(np.float32),
            "a.lora_B.weight": (scale * rng.standard_normal((8, 4))).astype(np.float32)}


def test_fedavgm_without_momentum_at_server_lr_1_is_fedavg():
    rng = np.random.default_rng(0)
    g, d = _state(rng), _state(rng, 0.01)
    plain = make_strategy(StrategyConfig(name="fedavg")).apply(g, d)
    m = make_strategy(StrategyConfig(name="fedavgm", server_lr=1.0, server_momentum=0.0)).apply(g, d)
    for k in g:
        np.testing.assert_array_equal(plain[k], m[k])


def test_fedavgm_accumulates_velocity_and_its_state_roundtrips():
    cfg = StrategyConfig(name="fedavgm", server_lr=0.5, server_momentum=0.9)
    rng = np.random.default_rng(1)
    g, d1, d2, d3 = _state(rng), _state(rng, 0.01), _state(rng, 0.01), _state(rng, 0.01)
    s = make_strategy(cfg)
    assert isinstance(s, FedAvgM)
    g1 = s.apply(g, d1)
    g2 = s.apply(g1, d2)
    for k in g:
        np.testing.assert_allclose(g1[k], g[k] + 0.5 * d1[k], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(g2[k], g1[k] + 0.5 * (0.9 * d1[k] + d2[k]), rtol=1e-6, atol=1e-7)
        assert g2[k].dtype == np.float32
    restored = make_strategy(cfg)
    restored.load_state(s.state())  # a resumed cloud takes the identical next step
    a, b = s.apply(g2, d3), restored.apply(g2, d3)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_fedavgm_config_and_bad_values():
    cfg = compose(["model=tiny", "strategy=fedavgm"])
    assert (cfg.strategy.name, cfg.strategy.server_lr, cfg.strategy.server_momentum) == ("fedavgm", 1.0, 0.9)
    with pytest.raises(ConfigError, match="server_momentum"):
        validate(compose(["model=tiny", "strategy=fedavgm", "strategy.server_momentum=1.0"]), files=False)
    with pytest.raises(ConfigError, match="federation.lr_schedule"):
        validate(compose(["model=tiny", "federation.lr_schedule=step"]), files=False)
    with pytest.raises(ConfigError, match="federation.lr_warmup_rounds"):
        validate(compose(["model=tiny", "federation.lr_warmup_rounds=-1"]), files=False)


def test_round_lr_schedule_sets_each_rounds_client_lr():
    constant = resolve_run(compose(["model=tiny", "train.lr=0.004", "federation.rounds=4"]))
    for r in range(1, 5):  # the default leaves the train settings exactly as configured
        assert constant.round_settings(r, CLIENT).train == constant.config.train
    cosine = resolve_run(compose(["model=tiny", "train.lr=0.004", "federation.rounds=4", "federation.lr_schedule=cosine"]))
    lrs = [cosine.round_settings(r, CLIENT).train.lr for r in range(1, 5)]
    assert lrs == pytest.approx([0.004 * lr_factor("cosine", r, 4, 0) for r in range(4)])
    assert lrs[0] == pytest.approx(0.004) and lrs[1] == pytest.approx(0.004 * (0.5 + 0.5 * np.cos(np.pi / 4)))
    assert lrs[-1] > 0 and lrs == sorted(lrs, reverse=True)
    warm = resolve_run(compose(["model=tiny", "train.lr=0.004", "federation.rounds=4", "federation.lr_warmup_rounds=2"]))
    assert [warm.round_settings(r, CLIENT).train.lr for r in range(1, 5)] == pytest.approx([0.002, 0.004, 0.004, 0.004])
    # Only the learning rate changes; the client's own in-round schedule stays the configured one.
    s = cosine.round_settings(3, CLIENT).train
    assert (s.lr_schedule, s.local_steps) == (cosine.config.train.lr_schedule, cosine.config.train.local_steps)


def test_fedavgm_with_round_lr_schedule_resumes_to_the_same_adapter(tmp_path, short_run):
    """The velocity is checkpointed and the round's lr follows from the round number: a run interrupted in
    round 2 and resumed ends where the uninterrupted one does; the schedule changes what is trained."""
    cfg = short_run(*FLAT4, "federation.rounds=3", "strategy=fedavgm", "federation.lr_schedule=cosine")
    full = tmp_path / "full"
    run_federation(cfg, full, InProcessTransport(4))

    def crash_in_round_2(server_round, reply):
        if server_round == 2:
            raise KeyboardInterrupt
        return reply

    broken = tmp_path / "broken"
    with pytest.raises(KeyboardInterrupt):
        run_federation(cfg, broken, InProcessTransport(4, fault=crash_in_round_2))
    run_federation(cfg, broken, InProcessTransport(4), resume=True)
    a, b = adapter_tensors(full), adapter_tensors(broken)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    losses = [[json.loads(line)["eval_loss"] for line in (d / "rounds.jsonl").read_text().splitlines()] for d in (full, broken)]
    assert losses[0] == losses[1]

    constant = tmp_path / "constant"
    run_federation(short_run(*FLAT4, "federation.rounds=3", "strategy=fedavgm"), constant, InProcessTransport(4))
    c = adapter_tensors(constant)
    assert any(not np.array_equal(a[k], c[k]) for k in a if "lora_B" in k)
