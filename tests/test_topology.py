"""The 6G cell tree: construction, determinism, paths, tree aggregation, HierFAVG periods,
and the topology settings' validation."""

from collections import Counter

import numpy as np
import pytest

from fedlora.aggregate.strategies import Strategy
from fedlora.aggregate.sums import WeightedSum
from fedlora.config import (
    ConfigError,
    DeviceProfileConfig,
    FemtoConfig,
    StrategyConfig,
    TopologyConfig,
    compose,
    to_typed,
)
from fedlora.roles.hierfavg import CellModels
from fedlora.roles.suburban import aggregate_tree
from fedlora.world.topology import build_tree


def tree_cfg(**kw) -> TopologyConfig:
    return TopologyConfig(kind="tree", **kw)


def random_updates(clients, seed=0, shape=(3, 4)):
    rng = np.random.default_rng(seed)
    return {
        c: ({"a": rng.normal(size=shape).astype(np.float32), "b": rng.normal(size=(2,)).astype(np.float32)},
            float(rng.integers(1, 50)))
        for c in clients
    }


def flat_mean(updates):
    total = WeightedSum()
    for c in sorted(updates):
        total.add(*updates[c])
    return total


def test_small6g_is_one_cloud_two_suburban_two_neighbourhoods_each_two_clients_per_cell():
    tree = build_tree(compose(["topology=small6g"]).topology, 8, seed=42)
    assert tree.tier("cloud") == ["cloud"]
    assert tree.tier("suburban") == ["suburban-0", "suburban-1"]
    assert tree.tier("neighbourhood") == ["neighbourhood-0-0", "neighbourhood-0-1", "neighbourhood-1-0", "neighbourhood-1-1"]
    assert tree.cells["neighbourhood-1-0"].parent == "suburban-1"
    assert tree.cells["suburban-1"].parent == "cloud" and tree.cells["cloud"].parent is None
    assert sorted(Counter(tree.initial.values()).values()) == [2, 2, 2, 2]
    # profile_mix {rpi4: .4, phone: .4, car: .1, laptop: .1} of 8 clients: exact counts 3/3/1/1.
    assert Counter(tree.profile_of.values()) == {"rpi4": 3, "phone": 3, "car": 1, "laptop": 1}
    assert set(tree.links) == {"end->neighbourhood", "neighbourhood->suburban", "suburban->cloud"}
    assert tree.links["suburban->cloud"].bandwidth_mbps == 40000


def test_tree_is_deterministic_in_seed_and_changes_with_it():
    cfg = compose(["topology=small6g"]).topology
    a, b, c = build_tree(cfg, 8, seed=1), build_tree(cfg, 8, seed=1), build_tree(cfg, 8, seed=2)
    assert a == b
    assert (a.initial, a.profile_of) != (c.initial, c.profile_of)


def test_every_client_is_in_exactly_one_leaf_cell_and_sizes_follow_weights():
    tree = build_tree(tree_cfg(suburban_cells=1, neighbourhoods_per_suburban=3, neighbourhood_weights=[1, 2, 1]), 40, seed=3)
    assert sorted(tree.initial) == list(range(40))
    assert set(tree.initial.values()) <= set(tree.leaf_cells)
    assert Counter(tree.initial.values()) == {"neighbourhood-0-0": 10, "neighbourhood-0-1": 20, "neighbourhood-0-2": 10}
    uneven = build_tree(tree_cfg(suburban_cells=2, neighbourhoods_per_suburban=2), 11, seed=3)
    assert sorted(Counter(uneven.initial.values()).values()) == [2, 3, 3, 3]


def test_city_has_over_a_thousand_clients_in_forty_cells_with_vehicles():
    cfg = compose(["topology=city", "federation.num_clients=1000"])
    tree = build_tree(cfg.topology, cfg.federation.num_clients, cfg.seed)
    assert len(tree.tier("suburban")) == 4 and len(tree.tier("neighbourhood")) == 40 and len(tree.tier("femto")) == 80
    per_hood = Counter(tree.neighbourhood_of(cell) for cell in tree.initial.values())
    assert set(per_hood.values()) == {25}
    passengers = sum(tree.cells[cell].tier == "femto" for cell in tree.initial.values())
    assert 0.10 < passengers / 1000 < 0.20  # femto.passenger_fraction = 0.15
    assert tree.deadline_s == 600


def test_paths_name_the_links_bottom_to_top():
    flat = build_tree(TopologyConfig(), 4, seed=0)
    assert flat.leaf_cells == ["cloud"] and set(flat.initial.values()) == {"cloud"}
    assert flat.path("cloud") == ["end->cloud"]
    tree = build_tree(tree_cfg(femto=FemtoConfig(per_neighbourhood=1, passenger_fraction=0.5)), 8, seed=0)
    assert tree.path("neighbourhood-1-0") == ["end->neighbourhood", "neighbourhood->suburban", "suburban->cloud"]
    assert tree.path("femto-1-0-0") == ["end->femto", "femto->neighbourhood", "neighbourhood->suburban", "suburban->cloud"]
    assert tree.chain("femto-1-0-0") == ["femto-1-0-0", "neighbourhood-1-0", "suburban-1", "cloud"]
    assert tree.neighbourhood_of("femto-1-0-0") == "neighbourhood-1-0"
    with pytest.raises(KeyError, match="unknown cell 'neighbourhood-9-9'"):
        tree.path("neighbourhood-9-9")


def test_empty_profile_mix_makes_every_client_the_reference_machine():
    tree = build_tree(TopologyConfig(), 5, seed=0)
    assert set(tree.profile_of.values()) == {"reference"}
    assert tree.profile(0).compute_speed == 1.0


@pytest.mark.parametrize("femto", [0, 2])
def test_tree_aggregation_counts_each_update_once_and_equals_the_flat_mean(femto):
    topo = tree_cfg(suburban_cells=2, neighbourhoods_per_suburban=3,
                    femto=FemtoConfig(per_neighbourhood=femto, passenger_fraction=0.4))
    tree = build_tree(topo, 30, seed=5)
    updates = random_updates(tree.clients)
    sums = aggregate_tree(tree, updates, tree.initial)
    flat = flat_mean(updates)
    assert sums.cloud.count == 30
    assert sums.cloud.weight == pytest.approx(sum(w for _, w in updates.values()))
    for key, value in flat.mean().items():
        np.testing.assert_allclose(sums.cloud.mean()[key], value, rtol=1e-6, atol=1e-7)
    # Each cell's sum holds exactly the clients below it.
    for cell, total in sums.cells.items():
        below = [c for c, leaf in tree.initial.items() if cell in tree.chain(leaf)]
        assert total.count == len(below)
        assert total.weight == pytest.approx(sum(updates[c][1] for c in below))
    assert sum(s.count for s in sums.tier(tree, "suburban").values()) == 30


def test_tree_aggregation_to_the_neighbourhoods_only_stops_there():
    tree = build_tree(tree_cfg(), 8, seed=0)
    sums = aggregate_tree(tree, random_updates([0, 1, 2]), tree.initial, to_cloud=False)
    assert sums.cloud is None
    assert {tree.cells[c].tier for c in sums.cells} == {"neighbourhood"}
    assert sum(s.count for s in sums.cells.values()) == 3


def test_flat_aggregation_goes_to_the_cloud():
    tree = build_tree(TopologyConfig(), 4, seed=0)
    updates = random_updates(range(4))
    sums = aggregate_tree(tree, updates, tree.initial, to_cloud=False)
    assert sums.cloud.count == 4 and sums.cells == {}


def test_tree_aggregation_rejects_unplaced_clients_and_inner_cells():
    tree = build_tree(tree_cfg(), 8, seed=0)
    updates = random_updates([0])
    with pytest.raises(KeyError, match="client 0"):
        aggregate_tree(tree, updates, {})
    with pytest.raises(ValueError, match="suburban-0"):
        aggregate_tree(tree, updates, {0: "suburban-0"})


def _run_rounds(tree, rounds, global_state, participants_per_round):
    """A miniature round loop over CellModels with FedAvg; each client's delta is a
    deterministic function of the adapter it starts from (a pull towards a target)."""
    strategy = Strategy(StrategyConfig())
    models = CellModels(tree)
    rng = np.random.default_rng(0)
    targets = {c: {k: rng.normal(size=v.shape) for k, v in global_state.items()} for c in tree.clients}
    for r in range(1, rounds + 1):
        updates = {}
        for c in participants_per_round(r):
            start = models.start_from(tree.initial[c], global_state)
            updates[c] = ({k: (0.5 * (targets[c][k] - start[k])).astype(np.float32) for k in start}, float(c + 1))
        models.absorb(aggregate_tree(tree, updates, tree.initial, to_cloud=False), global_state)
        if tree.syncs_with_cloud(r):
            global_state = strategy.apply(global_state, models.sync(global_state).mean())
    return global_state, targets


def test_cell_models_with_sync_every_round_equal_flat_fedavg():
    tree = build_tree(tree_cfg(), 8, seed=0)
    start = {"a": np.zeros((2, 3), np.float32), "b": np.ones((4,), np.float32)}
    pick = lambda r: [c for c in tree.clients if (c + r) % 3]  # noqa: E731
    hier, targets = _run_rounds(tree, 3, start, pick)
    strategy, flat = Strategy(StrategyConfig()), start
    for r in range(1, 4):
        total = WeightedSum()
        for c in pick(r):
            total.add({k: (0.5 * (targets[c][k] - flat[k])).astype(np.float32) for k in flat}, float(c + 1))
        flat = strategy.apply(flat, total.mean())
    for key in start:
        np.testing.assert_allclose(hier[key], flat[key], rtol=1e-5, atol=1e-6)


def test_cell_models_with_a_period_keep_cells_apart_until_the_sync():
    tree = build_tree(tree_cfg(cloud_sync_every=2), 8, seed=0)
    assert [tree.syncs_with_cloud(r) for r in (1, 2, 3, 4)] == [False, True, False, True]
    assert [tree.global_download(r) for r in (1, 2, 3)] == [True, False, True]
    g = {"a": np.zeros((2,), np.float32)}
    models = CellModels(tree)
    by_cell = {}
    for c, cell in tree.initial.items():
        by_cell.setdefault(cell, []).append(c)
    hood0, hood1 = tree.tier("neighbourhood")[:2]
    updates = {by_cell[hood0][0]: ({"a": np.array([1.0, 0.0], np.float32)}, 1.0),
               by_cell[hood1][0]: ({"a": np.array([0.0, 3.0], np.float32)}, 3.0)}
    models.absorb(aggregate_tree(tree, updates, tree.initial, to_cloud=False), g)
    np.testing.assert_allclose(models.start_from(hood0, g)["a"], [1.0, 0.0])
    np.testing.assert_allclose(models.start_from(hood1, g)["a"], [0.0, 3.0])
    np.testing.assert_allclose(models.start_from(tree.tier("neighbourhood")[3], g)["a"], [0.0, 0.0])
    # Round 2: hood0 moves again from its cell model; then the cloud sync.
    models.absorb(aggregate_tree(tree, {by_cell[hood0][1]: ({"a": np.array([1.0, 0.0], np.float32)}, 1.0)}, tree.initial,
                                 to_cloud=False), g)
    saved = models.state()
    restored = CellModels(tree)
    restored.load_state(saved)
    cloud = models.sync(g)
    # hood0 drifted by [2, 0] with weight 2, hood1 by [0, 3] with weight 3.
    assert cloud.count == 3 and cloud.weight == 5.0
    np.testing.assert_allclose(cloud.mean()["a"], [4 / 5, 9 / 5])
    assert models.models == {}
    np.testing.assert_allclose(restored.sync(g).mean()["a"], [4 / 5, 9 / 5])


def test_cell_models_keep_per_tensor_weights_through_the_period_a_checkpoint_and_the_sync():
    """Split learning: a tensor's cell mean and its drift weigh whoever trained it (hand-computed)."""
    from fedlora.roles.suburban import TreeSums

    tree = build_tree(tree_cfg(cloud_sync_every=2), 8, seed=0)
    hood0, hood1 = tree.tier("neighbourhood")[:2]
    g = {"a": np.zeros((1,), np.float32), "b": np.zeros((1,), np.float32)}
    one = lambda a, b=None: {"a": np.array([a], np.float32), **({"b": np.array([b], np.float32)} if b is not None else {})}  # noqa: E731
    mixed = WeightedSum()  # hood0, round 1: a device with both tensors (weight 2), one with "a" only (weight 1)
    mixed.add(one(1.0, 2.0), 2.0)
    mixed.add(one(4.0), 1.0)
    assert mixed.tensor_weight == {"a": 3.0, "b": 2.0}
    uniform = WeightedSum()
    uniform.add(one(1.0, 1.0), 2.0)
    models = CellModels(tree)
    models.absorb(TreeSums(cells={hood0: mixed, hood1: uniform}), g)
    np.testing.assert_allclose(models.start_from(hood0, g)["a"], [2.0])  # (2*1 + 1*4) / 3
    np.testing.assert_allclose(models.start_from(hood0, g)["b"], [2.0])  # only the first trained b
    assert models.tensor_weights == {hood0: {"a": 3.0, "b": 2.0}}  # hood1 keeps one weight
    later = WeightedSum()  # hood0, round 2: one full device (weight 1) from the cell model
    later.add(one(0.0, 3.0), 1.0)
    models.absorb(TreeSums(cells={hood0: later}), g)
    np.testing.assert_allclose(models.start_from(hood0, g)["b"], [5.0])
    assert models.tensor_weights[hood0] == {"a": 4.0, "b": 3.0} and models.weights[hood0] == 4.0
    saved = models.state()
    restored, old = CellModels(tree), CellModels(tree)
    restored.load_state(saved)
    old.load_state({k: v for k, v in saved.items() if "#tensor_weight/" not in k})  # a checkpoint from before
    cloud = models.sync(g)
    # drift a: 2 weighing 4 (hood0), 1 weighing 2 (hood1); b: 5 weighing 3, 1 weighing 2
    assert cloud.count == 4 and cloud.weight == 6.0 and cloud.tensor_weight == {"a": 6.0, "b": 5.0}
    np.testing.assert_allclose(cloud.mean()["a"], [(2 * 4 + 1 * 2) / 6])
    np.testing.assert_allclose(cloud.mean()["b"], [(5 * 3 + 1 * 2) / 5])
    assert models.models == {} and models.tensor_weights == {}
    back = restored.sync(g)
    assert back.tensor_weight == cloud.tensor_weight
    np.testing.assert_array_equal(back.mean()["b"], cloud.mean()["b"])
    np.testing.assert_allclose(old.sync(g).mean()["b"], [(5 * 4 + 1 * 2) / 6])  # every tensor weighs the cell's 4


@pytest.mark.parametrize(
    "topology,needle",
    [
        ({"kind": "ring"}, "topology.kind='ring' is not one of"),
        ({"profile_mix": {"tablet": 1.0}}, "topology.profile_mix names unknown profile 'tablet'"),
        ({"profiles": {"phone": {}}, "profile_mix": {"phone": 0.5, "reference": 0.4}}, "topology.profile_mix shares sum to 0.9"),
        ({"profile_mix": {"reference": -1.0}}, "topology.profile_mix.reference=-1.0 must be >= 0"),
        ({"links": {"end_neighbourhood": {"bandwidth_mbps": -5}}},
         "topology.links.end_neighbourhood.bandwidth_mbps=-5.0 must be > 0"),
        ({"links": {"suburban_cloud": {"latency_ms": -1}}}, "topology.links.suburban_cloud.latency_ms"),
        ({"links": {"end_femto": {"shared": "maybe"}}}, "topology.links.end_femto.shared: Value 'maybe' is not a valid bool"),
        ({"profiles": {"phone": {"availability": 1.5}}}, "topology.profiles.phone.availability=1.5 must be in [0, 1]"),
        ({"profiles": {"pi": {"compute_speed": 0}}}, "topology.profiles.pi.compute_speed=0.0 must be > 0"),
        ({"deadline_s": -1}, "topology.deadline_s"),
        ({"cloud_sync_every": 2}, "topology.cloud_sync_every=2 needs edge tiers"),
        ({"kind": "tree", "cloud_sync_every": 0}, "topology.cloud_sync_every=0 must be > 0"),
        ({"mobility": {"model": "random_walk"}}, "topology.mobility.model=random_walk needs cells"),
        ({"kind": "tree", "mobility": {"model": "teleport"}}, "topology.mobility.model='teleport'"),
        ({"kind": "tree", "mobility": {"handover_prob": 2}}, "topology.mobility.handover_prob"),
        ({"kind": "tree", "mobility": {"model": "trace"}}, "topology.mobility.trace_path must name"),
        ({"kind": "tree", "mobility": {"model": "trace", "trace_path": "/no/such.csv"}},
         "topology.mobility.trace_path='/no/such.csv'"),
        ({"kind": "tree", "suburban_cells": 0}, "topology.suburban_cells=0 must be > 0"),
        ({"kind": "tree", "neighbourhood_weights": [1, 2]}, "topology.neighbourhood_weights has 2 entries; the tree has 4"),
        ({"kind": "tree", "suburban_cells": 3, "neighbourhoods_per_suburban": 3}, "federation.num_clients=8 is fewer than the 9"),
        ({"kind": "tree", "femto": {"passenger_fraction": 1.2}}, "topology.femto.passenger_fraction"),
        ({"femto": {"per_neighbourhood": 1}}, "topology.femto.per_neighbourhood must be 0 when topology.kind=flat"),
    ],
)
def test_bad_topology_values_name_the_setting(topology, needle):
    with pytest.raises(ConfigError) as info:
        to_typed({"topology": topology})
    assert needle in str(info.value)


def test_a_misspelt_topology_key_is_an_error():
    with pytest.raises(ConfigError, match="bandwith_mbps"):
        to_typed({"topology": {"links": {"end_cloud": {"bandwith_mbps": 10}}}})
    with pytest.raises(ConfigError, match="end_cluod"):
        to_typed({"topology": {"links": {"end_cluod": {"bandwidth_mbps": 10}}}})


def test_shipped_topologies_compose_and_small6g_is_the_default():
    default = compose([]).topology
    assert default.kind == "tree" and default.suburban_cells == 2 and default.neighbourhoods_per_suburban == 2
    for name in ("flat", "small6g"):
        topo = compose([f"topology={name}"]).topology
        assert abs(sum(topo.profile_mix.values()) - 1) < 1e-9
        assert set(topo.profile_mix) <= set(topo.profiles)
    assert compose(["topology=city", "federation.num_clients=1000"]).topology.kind == "tree"
    # Overriding the mix merges entries: zero the others to switch to one profile.
    one = compose(["topology=small6g"]
                  + [f"topology.profile_mix.{p}={int(p == 'phone')}" for p in ("rpi4", "phone", "car", "laptop")])
    assert set(build_tree(one.topology, 8, 0).profile_of.values()) == {"phone"}
    assert isinstance(one.topology.profiles["phone"], DeviceProfileConfig)
