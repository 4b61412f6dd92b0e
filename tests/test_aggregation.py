"""Aggregation maths: weighted sums, strategies, and reply validation."""

import numpy as np
import pytest

from fedlora import adapters
from fedlora.aggregate.strategies import FedOpt, make_strategy
from fedlora.aggregate.sums import WeightedSum
from fedlora.config import StrategyConfig


def _state(rng, scale=1.0):
    return {"a.lora_A.weight": (rng.standard_normal((4, 8)) * scale).astype(np.float32),
            "a.lora_B.weight": (rng.standard_normal((8, 4)) * scale).astype(np.float32)}


def test_weighted_mean_matches_numpy():
    rng = np.random.default_rng(0)
    deltas = [_state(rng) for _ in range(5)]
    weights = [3, 1, 7, 2, 5]
    acc = WeightedSum()
    for d, w in zip(deltas, weights):
        acc.add(d, w)
    mean = acc.mean()
    for key in deltas[0]:
        expected = sum(w * d[key].astype(np.float64) for d, w in zip(deltas, weights)) / sum(weights)
        np.testing.assert_allclose(mean[key], expected, rtol=1e-6)
    assert acc.count == 5 and acc.weight == sum(weights)


def test_sums_compose_like_a_tree():
    """Summing two cells and merging them equals summing every client at once."""
    rng = np.random.default_rng(1)
    deltas = [_state(rng) for _ in range(6)]
    flat, left, right = WeightedSum(), WeightedSum(), WeightedSum()
    for i, d in enumerate(deltas):
        flat.add(d, i + 1)
        (left if i < 3 else right).add(d, i + 1)
    left.merge(right)
    for key in flat.total:
        np.testing.assert_allclose(left.total[key], flat.total[key], rtol=1e-12)
    assert left.weight == flat.weight and left.count == flat.count


def test_weighted_sum_rejects_bad_weight_and_empty_mean():
    acc = WeightedSum()
    with pytest.raises(ValueError):
        acc.add({"x": np.zeros(2, np.float32)}, 0)
    with pytest.raises(ValueError):
        acc.mean()


def test_fedavg_applies_mean_delta():
    rng = np.random.default_rng(2)
    g, d = _state(rng), _state(rng, 0.01)
    new = make_strategy(StrategyConfig(name="fedavg")).apply(g, d)
    for k in g:
        np.testing.assert_allclose(new[k], g[k] + d[k], rtol=1e-6)


def test_fedprox_and_ffa_client_settings():
    assert (make_strategy(StrategyConfig(name="fedprox", proximal_mu=0.3)).client_settings()
            == {"proximal_mu": 0.3, "freeze_a": False})
    assert make_strategy(StrategyConfig(name="ffa_lora")).client_settings()["freeze_a"] is True
    assert make_strategy(StrategyConfig(name="fedavg")).client_settings() == {"proximal_mu": 0.0, "freeze_a": False}


def test_ffa_partial_update_keeps_frozen_a():
    rng = np.random.default_rng(3)
    g = _state(rng)
    delta_b = {"a.lora_B.weight": np.ones((8, 4), np.float32)}
    new = make_strategy(StrategyConfig(name="ffa_lora")).apply(g, delta_b)
    np.testing.assert_array_equal(new["a.lora_A.weight"], g["a.lora_A.weight"])
    np.testing.assert_allclose(new["a.lora_B.weight"], g["a.lora_B.weight"] + 1)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_fedopt_first_step_is_server_lr_sized_and_state_roundtrips(name):
    cfg = StrategyConfig(name=name, server_lr=0.05, tau=1e-9)
    rng = np.random.default_rng(4)
    g, d = _state(rng), _state(rng, 0.001)
    s = make_strategy(cfg)
    new = s.apply(g, d)
    # Bias-corrected first step: server_lr * sign(delta) (up to tau).
    for k in g:
        np.testing.assert_allclose(new[k] - g[k], 0.05 * np.sign(d[k]), rtol=1e-3, atol=1e-6)
    # A second strategy restored from the first's state takes the identical next step.
    s2 = make_strategy(cfg)
    s2.load_state(s.state())
    d2 = _state(rng, 0.001)
    a, b = s.apply(new, d2), s2.apply(new, d2)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert isinstance(s, FedOpt) and s.t == 2


def test_check_update_catches_every_malformation():
    expected = {"w": (2, 3)}
    good = {"w": np.zeros((2, 3), np.float32)}
    assert adapters.check_update(good, expected) is None
    assert "missing" in adapters.check_update({}, expected)
    assert "unexpected" in adapters.check_update({**good, "x": np.zeros(1, np.float32)}, expected)
    assert "shape" in adapters.check_update({"w": np.zeros((3, 2), np.float32)}, expected)
    assert "dtype" in adapters.check_update({"w": np.zeros((2, 3), np.float64)}, expected)
    bad = np.zeros((2, 3), np.float32)
    bad[1, 1] = np.nan
    assert "NaN" in adapters.check_update({"w": bad}, expected)
    bad[1, 1] = np.inf
    assert "NaN or inf" in adapters.check_update({"w": bad}, expected)
    assert "not a mapping" in adapters.check_update([1, 2], expected)
    assert "not an array" in adapters.check_update({"w": [[0, 0, 0], [0, 0, 0]]}, expected)


@pytest.mark.parametrize("value,ok", [(10, True), (10.0, True), (0, False), (-3, False), (2.5, False),
                                      (float("nan"), False), (float("inf"), False), (True, False), ("7", False), (None, False)])
def test_check_count(value, ok):
    assert (adapters.check_count(value) is None) == ok
