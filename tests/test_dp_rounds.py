"""privacy=secagg_dp: clipped, equally weighted updates; noise once per released sum; epsilon per round."""

from __future__ import annotations

import numpy as np
import pytest
from test_secure_rounds import EIGHT_LAPTOPS, adapter, crash_in_round

from fedlora.aggregate.dp import DEFAULT_ORDERS, compute_rdp, rdp_to_epsilon
from fedlora.config import compose
from fedlora.roles.cloud import run_federation
from fedlora.roles.device import private_update
from fedlora.roles.local import InProcessTransport
from fedlora.run_settings import resolve_run
from fedlora.runs import report

# test_secure_rounds' eight laptops, two rounds under secagg_dp.
DP_LAPTOPS = (*EIGHT_LAPTOPS, "federation.rounds=2", "privacy=secagg_dp", "privacy.clip=1.0", "privacy.clip_norm=0.05")


def test_a_device_clips_its_update_weighs_it_like_everyone_and_withholds_its_loss():
    strategy = {"proximal_mu": 0.0, "freeze_a": False}
    cfg = resolve_run(compose(["model=tiny", "privacy=secagg_dp", "privacy.clip_norm=0.5", "data.records_per_client=12"])
                      ).round_settings(1, strategy)
    delta = {"a": np.full((3, 4), 1.0, np.float32), "b": np.full((2,), -1.0, np.float32)}  # L2 norm sqrt(14)
    out, metrics = private_update(delta, {"num_examples": 7, "train_loss": 2.5, "train_seconds": 1.0}, cfg)
    norm = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in out.values()))
    assert norm == pytest.approx(0.5, rel=1e-6)
    np.testing.assert_allclose(out["a"] / out["a"][0, 0], 1.0)  # direction kept
    assert metrics["num_examples"] == 12 and metrics["train_loss"] == 0.0 and metrics["update_norm"] == pytest.approx(np.sqrt(14))
    plain = resolve_run(compose(["model=tiny", "privacy=secagg"])).round_settings(1, strategy)
    same, m = private_update(delta, {"num_examples": 7, "train_loss": 2.5}, plain)
    assert same is delta and m["num_examples"] == 7


@pytest.fixture(scope="module")
def noisy_and_noiseless(tmp_path_factory, short_run):
    base = tmp_path_factory.mktemp("dp-runs")
    run_federation(short_run(*DP_LAPTOPS, "privacy.noise_multiplier=1.0"), base / "noisy", InProcessTransport(8))
    run_federation(short_run(*DP_LAPTOPS, "privacy.noise_multiplier=0.0", "federation.rounds=1"), base / "noiseless",
                   InProcessTransport(8))
    run_federation(short_run(*DP_LAPTOPS, "privacy.noise_multiplier=1.0", "federation.rounds=1"), base / "noisy1",
                   InProcessTransport(8))
    return base


def test_epsilon_per_round_follows_the_rdp_accountant(noisy_and_noiseless):
    rounds = report.read_rounds(noisy_and_noiseless / "noisy")
    assert [r["dp"]["rounds_accounted"] for r in rounds] == [1, 2]
    q = rounds[0]["dp"]["sample_rate"]
    assert q == pytest.approx(1.0)  # every one of the 8 clients trains each round
    for k, r in enumerate(rounds, start=1):
        expected = rdp_to_epsilon(DEFAULT_ORDERS, compute_rdp(q, 1.0, k, DEFAULT_ORDERS), 1e-5)[0]
        assert r["dp"]["epsilon"] == pytest.approx(expected, rel=1e-9)
        assert r["train_loss"] is None  # no loss is released under DP
        assert r["num_examples"] == 8 * 12  # every count is n_max: the sum reveals nothing
        assert r["aggregated"] and r["secure"]["clients_in_sum"] == 8
    assert rounds[1]["dp"]["epsilon"] > rounds[0]["dp"]["epsilon"] > 0
    noiseless = report.read_rounds(noisy_and_noiseless / "noiseless")[0]
    assert noiseless["dp"]["epsilon"] is None  # z = 0: no guarantee, said as such


def test_the_released_mean_carries_gaussian_noise_of_the_configured_size(noisy_and_noiseless):
    # Same seeds, same training, same quantisation draws: the one-round adapters differ only by
    # the noise on the sum, divided by the examples in it (8 clients x n_max = 12).
    a, b = adapter(noisy_and_noiseless / "noisy1"), adapter(noisy_and_noiseless / "noiseless")
    diff = np.concatenate([(a[k].astype(np.float64) - b[k]).ravel() for k in a if "lora_" in k])
    expected_std = 1.0 * 0.05 * 12 / (8 * 12)  # z * C * weight / examples
    assert diff.size > 1000
    assert np.std(diff) == pytest.approx(expected_std, rel=0.1)
    assert abs(np.mean(diff)) < 5 * expected_std / np.sqrt(diff.size)


def test_resume_carries_the_privacy_spent(tmp_path, short_run):
    cfg = short_run(*DP_LAPTOPS, "privacy.noise_multiplier=1.0", "federation.fraction=0.5", "federation.rounds=3")
    with pytest.raises(KeyboardInterrupt):
        run_federation(cfg, tmp_path / "run", InProcessTransport(8, stage_fault=crash_in_round(3)))
    run_federation(cfg, tmp_path / "run", InProcessTransport(8), resume=True)
    rounds = report.read_rounds(tmp_path / "run")
    assert [r["dp"]["rounds_accounted"] for r in rounds] == [1, 2, 3]
    rdp = sum(compute_rdp(r["dp"]["sample_rate"], 1.0, 1, DEFAULT_ORDERS) for r in rounds)
    assert rounds[-1]["dp"]["epsilon"] == pytest.approx(rdp_to_epsilon(DEFAULT_ORDERS, rdp, 1e-5)[0], rel=1e-9)
