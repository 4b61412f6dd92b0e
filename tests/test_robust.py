"""Bounded poisoning: robust cell sums in plain mode, bound checks on decoded sums under secure aggregation.

The malicious device comes from bench/poisoning.py (a transport fault in plain mode, its own session state
under secure aggregation); nothing of it is in fedlora/.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg

from fedlora.aggregate.robust import cell_sum, coordinate_median, trimmed_mean
from fedlora.aggregate.sums import WeightedSum
from fedlora.config import ConfigError, compose
from fedlora.roles.cloud import run_federation
from fedlora.roles.device import private_update
from fedlora.roles.neighbourhood import CellRequest, ClientReply, run_cell
from fedlora.round_settings import RoundSettings, RoundSettingsError
from fedlora.run_settings import resolve_run
from fedlora.runs import report
from fedlora.secure.bounds import sum_violation
from fedlora.secure.encoding import EncodingConfig, TensorLayout, decode_sum, encode_update, from_ring, to_ring
from fedlora.secure.prg import SeededStream

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
# A bench script that cannot be imported is a broken benchmark: an error here, never a skip.
import poisoning  # noqa: E402 (importable only once bench/ is on sys.path)

STRATEGY = {"proximal_mu": 0.0, "freeze_a": False}
SHAPES = {"a": (3, 4), "b": (5,)}


def updates(k: int, seed: int = 0, scale: float = 1e-2) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{n: (rng.standard_normal(s) * scale).astype(np.float32) for n, s in SHAPES.items()} for _ in range(k)]


# -- plain mode: the rules ------------------------------------------------------------------------------------------


def test_median_and_trimmed_mean_equal_flowers_fedmedian_and_fedtrimmedavg():
    ups = updates(7)
    results = [([u["a"], u["b"]], 10 + i) for i, u in enumerate(ups)]
    for ours, theirs in ((coordinate_median(ups), aggregate_median(results)),
                         (trimmed_mean(ups, 0.2), aggregate_trimmed_avg(results, 0.2)),
                         (trimmed_mean(ups, 0.45), aggregate_trimmed_avg(results, 0.45))):
        np.testing.assert_allclose(ours["a"], theirs[0], rtol=1e-5, atol=1e-9)  # Flower means in float32
        np.testing.assert_allclose(ours["b"], theirs[1], rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="trim_fraction"):
        trimmed_mean(ups, 0.5)
    with pytest.raises(ValueError, match="same tensors"):
        coordinate_median([ups[0], {"a": ups[1]["a"]}])


def test_cell_sum_mean_is_the_plain_weighted_sum_and_the_robust_rules_bound_one_outlier():
    ups, counts = updates(5), [3.0, 4.0, 5.0, 6.0, 7.0]
    plain = WeightedSum()
    for u, n in zip(ups, counts):
        plain.add(u, n)
    same = cell_sum(list(zip(ups, counts)), rule="mean")
    assert same.weight == plain.weight and same.count == plain.count
    for k in SHAPES:
        np.testing.assert_array_equal(same.total[k], plain.total[k])  # bit-identical: the default path
    honest = coordinate_median(ups[1:])
    poisoned = [({k: v * 1e4 for k, v in ups[0].items()}, 1e6)] + list(zip(ups[1:], counts[1:]))
    for rule in ("median", "trimmed_mean"):
        robust = cell_sum(poisoned, rule=rule, trim_fraction=0.2, max_examples=12)
        assert robust.weight == 12 + sum(counts[1:]) and robust.count == 5  # the inflated count capped at n_max
        worst = max(float(np.max(np.abs(robust.mean()[k] - honest[k]))) for k in SHAPES)
        assert worst < 0.05  # the honest updates' spread, not the outlier's 1e2
    clipped = cell_sum(poisoned, rule="mean", norm_bound=0.1, max_examples=12)
    norm = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in clipped.mean().values()))
    assert norm <= 0.1 + 1e-9 and clipped.weight == 12 + sum(counts[1:])
    with pytest.raises(ValueError, match="rule"):
        cell_sum(poisoned, rule="mode")


class FixedReplies:
    """A transport whose clients answer with given updates (no model)."""

    def __init__(self, replies: dict[int, tuple[dict, int]]):
        self.replies = replies

    def clients(self):
        return sorted(self.replies)

    def train(self, server_round, clients, arrays, settings, on_reply):
        return [ClientReply(c, self.replies[c][0], {"num_examples": self.replies[c][1], "train_loss": 1.0}) for c in clients]


def test_a_plain_cell_sums_by_the_round_settings_rule(tiny_config):
    ups = updates(5, seed=1)
    replies = {0: ({k: v * 100 for k, v in ups[0].items()}, 10_000)} | {c: (ups[c], 10) for c in range(1, 5)}
    expected = {k: s for k, s in SHAPES.items()}
    arrays = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}

    def cell_mean(*overrides):
        settings = resolve_run(tiny_config("topology=flat", "data.records_per_client=12", *overrides)).round_settings(1, STRATEGY)
        res = run_cell(CellRequest("run", 1, "cloud", list(range(5)), arrays, settings, expected), FixedReplies(replies))
        assert res.accepted == list(range(5))
        return res.plain

    fedavg, median = cell_mean(), cell_mean("strategy=fedmedian")
    assert fedavg.weight == 10_040 and median.weight == 12 + 40  # n_max = data.records_per_client (12)
    np.testing.assert_allclose(median.mean()["a"], coordinate_median([{k: v * (100 if c == 0 else 1) for k, v in u.items()}
                                                                      for c, u in enumerate(ups)])["a"], rtol=1e-6)
    assert np.max(np.abs(fedavg.mean()["a"])) > 0.5 > np.max(np.abs(median.mean()["a"]))
    bounded = cell_mean("strategy.norm_bound=0.05")
    assert np.linalg.norm(np.concatenate([v.ravel() for v in bounded.mean().values()])) <= 0.05 + 1e-6


def test_robust_settings_travel_to_the_cells_and_refuse_what_cannot_work(tiny_config):
    s = resolve_run(tiny_config("topology=flat", "strategy=fedtrimmedavg", "strategy.trim_fraction=0.3",
                                "strategy.norm_bound=0.5")).round_settings(1, STRATEGY)
    assert (s.aggregation, s.trim_fraction, s.norm_bound) == ("trimmed_mean", 0.3, 0.5)
    assert RoundSettings.from_dict(s.to_dict()) == s
    with pytest.raises(RoundSettingsError, match="aggregation='mode'"):
        RoundSettings.from_dict({**s.to_dict(), "aggregation": "mode"})
    default = resolve_run(tiny_config()).round_settings(1, STRATEGY)
    assert (default.aggregation, default.norm_bound) == ("mean", 0.0)  # off by default
    # a median needs each update: refused under secure aggregation, also when privacy=auto picks it (small6g)
    for overrides in (["strategy=fedmedian"], ["strategy=fedmedian", "privacy=secagg"],
                      ["strategy=fedtrimmedavg", "privacy=secagg_dp"]):
        with pytest.raises(ConfigError, match="secure aggregation hides"):
            resolve_run(tiny_config(*overrides))
    resolve_run(tiny_config("strategy=fedmedian", "privacy=none"))  # the hierarchy, plain: median per cell
    with pytest.raises(ConfigError, match="train.mode=split"):
        resolve_run(tiny_config("strategy.norm_bound=1.0", "privacy=none", "train.mode=split"))
    with pytest.raises(ConfigError, match="trim_fraction"):
        compose(["model=tiny", "strategy=fedtrimmedavg", "strategy.trim_fraction=0.5"])
    secure = resolve_run(tiny_config("privacy=secagg_dp", "privacy.clip_norm=2.0", "strategy.norm_bound=0.5",
                                     "privacy.bound_check=true")).secure_settings({"a": (2,)})
    assert secure.bound_check and secure.norm_bound == 0.5


def test_an_honest_device_clips_its_update_to_the_norm_bound_under_secure_aggregation(tiny_config):
    delta = {"a": np.full((4,), 1.0, np.float32)}  # norm 2
    metrics = {"num_examples": 5, "train_loss": 1.0}
    for privacy, norm in (("secagg", 0.5), ("none", 2.0)):  # plain: the cell clips, the device sends it as it is
        s = resolve_run(tiny_config("topology=flat", f"privacy={privacy}", "strategy.norm_bound=0.5")).round_settings(1, STRATEGY)
        out, m = private_update(delta, metrics, s)
        assert float(np.linalg.norm(out["a"])) == pytest.approx(norm) and m["num_examples"] == 5


# -- secure mode: what the unmasker can check ------------------------------------------------------------------------


def encoded_sum(ups, counts, config, layout, *, poison=None):
    """The plain (unmasked) ring sum of the encoded updates, client 0's vector replaced by ``poison(q_0)``."""
    vectors = [encode_update(u, n, layout, config, SeededStream(bytes([i]) * 32)) for i, (u, n) in enumerate(zip(ups, counts))]
    if poison is not None:
        vectors[0] = poison(vectors[0])
    total = vectors[0].copy()
    for v in vectors[1:]:
        np.add(total, v, out=total)
    return total


def test_honest_sums_never_break_the_bounds_even_at_the_clip_and_the_norm_bound():
    config, layout = EncodingConfig(bits=16, clip=0.05, max_examples=12), TensorLayout.of(updates(1)[0])
    for seed in range(20):
        ups = updates(6, seed=seed, scale=0.2)  # most values beyond the clip: encoded at +-L
        for u in ups:  # norm-bounded to 0.3 as an honest device does
            norm = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in u.values()))
            for k in u:
                u[k] = (u[k] * min(1.0, 0.3 / norm)).astype(np.float32)
        counts = list(np.random.default_rng(seed).integers(1, 30, size=6))
        decoded = decode_sum(encoded_sum(ups, counts, config, layout), layout, config, 6)
        assert sum_violation(decoded, norm_bound=0.3) is None


@pytest.mark.parametrize("attack, what", [("scale100", "more than 4 clients' clipped"), ("random", "impossible|more than"),
                                          ("count", "impossible"), ("signflip", None)])
def test_a_poisoned_sum_is_refused_unless_it_stays_within_the_bounds(attack, what):
    config, layout = EncodingConfig(bits=16, clip=0.05, max_examples=12), TensorLayout.of(updates(1)[0])
    ups = updates(4, seed=3, scale=0.02)
    rng = np.random.default_rng(0)
    plain = encoded_sum(ups, [12] * 4, config, layout, poison=lambda q: poisoning.poison_encoded(q, attack, rng))
    try:
        why = sum_violation(decode_sum(plain, layout, config, 4))
    except ValueError as exc:  # decode_sum's own count check
        why = str(exc)
    if what is None:
        assert why is None  # a within-bound sign flip: what secure mode cannot see
    else:
        assert why is not None and any(w in why for w in what.split("|")), why


def test_the_l2_bound_catches_a_scaled_update_the_coordinate_bound_lets_through():
    config, layout = EncodingConfig(bits=16, clip=0.05, max_examples=12), TensorLayout.of(updates(1)[0])
    ups = updates(4, seed=5, scale=1e-3)  # norm ~4e-3 each
    plain = encoded_sum(ups, [12] * 4, config, layout,
                        poison=lambda q: to_ring(from_ring(q) * 0 + np.where(np.arange(q.size) % 2, 1, -1) * 30000))
    plain[-1] = 48  # the count slot left honest-looking
    decoded = decode_sum(plain, layout, config, 4)
    assert sum_violation(decoded) is None  # every coordinate within 4 clients' clip...
    assert "L2 norm" in sum_violation(decoded, norm_bound=0.01)  # ...but far beyond 4 updates of norm <= 0.01


# -- federations with one malicious device (tiny model) ------------------------------------------------------------

EIGHT = ("federation.num_clients=8", "federation.rounds=1", "federation.fraction=1.0", "topology.mobility.model=none",
         "topology.profile_mix={rpi4: 0, phone: 0, car: 0, laptop: 1.0}", "topology.profiles.laptop.availability=1.0")


def test_plain_median_keeps_a_scaled_device_from_moving_the_global_adapter(tmp_path, short_run):
    runs = {}
    for name, overrides, attack in (("honest", [], "none"), ("fedavg", [], "scale100"),
                                    ("median", ["strategy=fedmedian"], "scale100")):
        cfg = short_run(*EIGHT, "topology=flat", "privacy=none", *overrides)
        run_federation(cfg, tmp_path / name, poisoning.malicious_transport(8, 0, attack))
        runs[name] = report.load_checkpoint(tmp_path / name)[1]

    def dist(a, b):
        return math.sqrt(sum(float(np.sum((runs[a][k].astype(np.float64) - runs[b][k]) ** 2))
                             for k in runs[a] if k.startswith("adapter/")))
    assert dist("fedavg", "honest") > 10 * dist("median", "honest")


def test_secure_bound_check_drops_the_poisoned_cell_with_the_reason_and_the_round_goes_on(tmp_path, short_run):
    honest = short_run(*EIGHT, "privacy=secagg")
    run_federation(honest, tmp_path / "off", poisoning.malicious_transport(8, 0, "none"))
    run_federation(short_run(*EIGHT, "privacy=secagg", "privacy.bound_check=true"), tmp_path / "on",
                   poisoning.malicious_transport(8, 0, "none"))
    a, b = report.load_checkpoint(tmp_path / "off")[1], report.load_checkpoint(tmp_path / "on")[1]
    assert all(np.array_equal(a[k], b[k]) for k in a)  # honest devices never trip it: the same adapter
    run_federation(short_run(*EIGHT, "privacy=secagg", "privacy.bound_check=true"), tmp_path / "poisoned",
                   poisoning.malicious_transport(8, 0, "random"))
    rec = report.read_rounds(tmp_path / "poisoned")[0]
    cells = rec["secure"]["cells"]
    bad = [c for c, v in cells.items() if not v["ok"]]
    assert len(bad) == 1 and "out of bounds" in cells[bad[0]]["reason"]
    reasons = {d["client"]: d["reason"] for d in rec["dropped"]}
    assert 0 in reasons and "out of bounds" in reasons[0] and 0 not in rec["participants"]
    assert rec["aggregated"] and len(rec["participants"]) >= 5  # the other cells are in the sum


def test_an_impossible_example_count_drops_its_cell_even_without_the_bound_check(tmp_path, short_run):
    # the count slot x1000: no k clients with <= n_max examples each can sum to it; before, the whole round failed
    run_federation(short_run(*EIGHT, "privacy=secagg"), tmp_path / "r", poisoning.malicious_transport(8, 0, "count"))
    rec = report.read_rounds(tmp_path / "r")[0]
    reasons = {d["client"]: d["reason"] for d in rec["dropped"]}
    assert "impossible" in reasons[0] and "out of bounds" in reasons[0]
    assert rec["aggregated"] and len(rec["participants"]) >= 5
