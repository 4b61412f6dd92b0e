"""Mobility between rounds: deterministic, at the configured rate, nobody lost or doubled."""

import json
import os

import numpy as np
import pytest

from fedlora.aggregate.sums import WeightedSum
from fedlora.config import ConfigError, FemtoConfig, MobilityConfig, TopologyConfig
from fedlora.roles.suburban import aggregate_tree
from fedlora.world.mobility import assignment_at, next_assignment, read_trace
from fedlora.world.topology import build_tree


def walking_tree(clients=1000, handover_prob=0.2, far_prob=0.1, femto=0, seed=0):
    topo = TopologyConfig(
        kind="tree", suburban_cells=4, neighbourhoods_per_suburban=5,
        femto=FemtoConfig(per_neighbourhood=femto, passenger_fraction=0.3 if femto else 0.0),
        mobility=MobilityConfig(model="random_walk", handover_prob=handover_prob, far_prob=far_prob),
    )
    return build_tree(topo, clients, seed)


def trace_tree(path):
    topo = TopologyConfig(kind="tree", mobility=MobilityConfig(model="trace", trace_path=str(path)))
    return build_tree(topo, 8, seed=0)


def assert_each_client_in_one_leaf(tree, cell_of):
    assert sorted(cell_of) == tree.clients
    assert set(cell_of.values()) <= set(tree.leaf_cells)


def test_none_keeps_everyone_in_place():
    tree = build_tree(TopologyConfig(kind="tree"), 8, seed=0)
    assert next_assignment(tree, tree.initial, 2, seed=0) == tree.initial
    assert assignment_at(tree, 5, seed=0) == tree.initial


def test_random_walk_is_deterministic_and_moves_at_the_configured_rate():
    tree = walking_tree()
    a = next_assignment(tree, tree.initial, 2, seed=3)
    assert a == next_assignment(tree, dict(tree.initial), 2, seed=3)
    assert a != next_assignment(tree, tree.initial, 2, seed=4)
    assert next_assignment(tree, tree.initial, 1, seed=3) == tree.initial  # round 1 is the initial placement
    cell_of, moved = tree.initial, []
    for r in range(2, 7):
        nxt = next_assignment(tree, cell_of, r, seed=3)
        assert_each_client_in_one_leaf(tree, nxt)
        moved.append(sum(nxt[c] != cell_of[c] for c in tree.clients) / len(tree.clients))
        cell_of = nxt
    assert 0.17 < np.mean(moved) < 0.23  # handover_prob = 0.2, 5 x 1000 draws
    assert cell_of == assignment_at(tree, 6, seed=3)


def test_random_walk_prefers_siblings():
    tree = walking_tree(far_prob=0.0)
    after = next_assignment(tree, tree.initial, 2, seed=0)
    moves = [c for c in tree.clients if after[c] != tree.initial[c]]
    assert moves
    assert all(tree.cells[after[c]].parent == tree.cells[tree.initial[c]].parent for c in moves)
    far = walking_tree(far_prob=1.0)
    after = next_assignment(far, far.initial, 2, seed=0)
    assert any(far.cells[after[c]].parent != far.cells[far.initial[c]].parent for c in far.clients)


def test_random_walk_with_vehicles_keeps_passengers_in_their_new_neighbourhood():
    tree = walking_tree(femto=2, handover_prob=0.5)
    after = next_assignment(tree, tree.initial, 2, seed=0)
    assert_each_client_in_one_leaf(tree, after)
    tiers = {tree.cells[cell].tier for cell in after.values()}
    assert tiers == {"neighbourhood", "femto"}
    moved = [c for c in tree.clients if tree.neighbourhood_of(after[c]) != tree.neighbourhood_of(tree.initial[c])]
    assert 0.4 < len(moved) / 1000 < 0.6


def test_after_moves_every_update_is_counted_once_in_the_cell_it_uploads_from():
    tree = walking_tree(clients=200, handover_prob=0.5, femto=1)
    cell_of = assignment_at(tree, 4, seed=9)
    rng = np.random.default_rng(0)
    updates = {c: ({"w": rng.normal(size=(5,)).astype(np.float32)}, float(rng.integers(1, 20))) for c in tree.clients}
    sums = aggregate_tree(tree, updates, cell_of)
    flat = WeightedSum()
    for c in tree.clients:
        flat.add(*updates[c])
    assert sums.cloud.count == 200
    assert sums.cloud.weight == pytest.approx(flat.weight)
    np.testing.assert_allclose(sums.cloud.mean()["w"], flat.mean()["w"], rtol=1e-6, atol=1e-7)
    for cell in tree.leaf_cells:
        here = [c for c in tree.clients if cell_of[c] == cell]
        direct = len(here)
        below = sum(sums.cells[v].count for v in tree.cells[cell].children if v in sums.cells)
        assert (sums.cells[cell].count if cell in sums.cells else 0) == direct + below


def test_trace_moves_clients_from_csv_and_json(tmp_path):
    csv_path = tmp_path / "moves.csv"
    csv_path.write_text("round,client,cell\n2,0,neighbourhood-1-1\n3,0,neighbourhood-0-0\n1,5,neighbourhood-0-1\n")
    tree = trace_tree(csv_path)
    r1 = assignment_at(tree, 1, seed=0)
    assert r1[5] == "neighbourhood-0-1"
    assert assignment_at(tree, 2, seed=0)[0] == "neighbourhood-1-1"
    r3 = assignment_at(tree, 3, seed=0)
    assert r3[0] == "neighbourhood-0-0"
    assert_each_client_in_one_leaf(tree, r3)
    assert {c: r3[c] for c in tree.clients if c not in (0, 5)} == {c: tree.initial[c] for c in tree.clients if c not in (0, 5)}
    json_path = tmp_path / "moves.json"
    json_path.write_text(json.dumps([{"round": 2, "client": 0, "cell": "neighbourhood-1-1"}]))
    assert assignment_at(trace_tree(json_path), 2, seed=0)[0] == "neighbourhood-1-1"


@pytest.mark.parametrize(
    "content,needle",
    [
        ("round,client,cell\n2,0,neighbourhood-7-7\n", "line 2: unknown cell 'neighbourhood-7-7'"),
        ("round,client,cell\n2,0,suburban-0\n", "unknown cell 'suburban-0'"),
        ("round,client,cell\n2,99,neighbourhood-0-0\n", "client 99 is not in 0..7"),
        ("round,client,cell\n2,x,neighbourhood-0-0\n", "round and client must be integers"),
        ("round,client,cell\n0,1,neighbourhood-0-0\n", "round 0 must be >= 1"),
        ("round,client,cell\n2,1,neighbourhood-0-0\n2,1,neighbourhood-0-1\n",
         "client 1 is already in 'neighbourhood-0-0' in round 2"),
        ("round,device,cell\n2,1,neighbourhood-0-0\n", "header lacks client"),
    ],
)
def test_bad_trace_rows_are_errors_naming_the_setting_and_row(tmp_path, content, needle):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        assignment_at(trace_tree(path), 3, seed=0)
    assert "topology.mobility.trace_path" in str(info.value) and needle in str(info.value)


def test_missing_or_malformed_trace_files(tmp_path):
    with pytest.raises(ConfigError, match="topology.mobility.trace_path='.*nope.csv' does not exist"):
        assignment_at(trace_tree(tmp_path / "nope.csv"), 2, seed=0)
    with pytest.raises(ConfigError, match="does not exist"):
        read_trace(tmp_path / "nope.csv")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_trace(bad)
    bad.write_text(json.dumps({"round": 1}))
    with pytest.raises(ConfigError, match="expected a JSON list"):
        read_trace(bad)
    bad.write_text(json.dumps([{"round": 1, "client": 0}]))
    with pytest.raises(ConfigError, match="item 0: needs round, client and cell"):
        read_trace(bad)


def test_an_edited_trace_is_read_again(tmp_path):
    path = tmp_path / "moves.csv"
    path.write_text("round,client,cell\n2,0,neighbourhood-1-1\n")
    tree = trace_tree(path)
    assert assignment_at(tree, 2, seed=0)[0] == "neighbourhood-1-1"
    path.write_text("round,client,cell\n2,0,neighbourhood-0-1\n")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert assignment_at(tree, 2, seed=0)[0] == "neighbourhood-0-1"
