"""Split learning in the rounds: per-tensor weights of mixed cells, a split run equals the same run
trained whole, the choice of who splits where, rounds.jsonl, the network model, mobility."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file
from test_secure_rounds import EIGHT_LAPTOPS, adapter

from fedlora.aggregate.sums import WeightedSum
from fedlora.config import ConfigError, DeviceProfileConfig, TopologyConfig, TrainConfig
from fedlora.roles.cloud import run_federation
from fedlora.roles.local import InProcessTransport, LocalCellRunner
from fedlora.roles.split import SecureSplitDevices
from fedlora.roles.suburban import merge_up
from fedlora.run_settings import resolve_run
from fedlora.runs.report import load_checkpoint
from fedlora.runs.status import render_text, run_status
from fedlora.world.netsim import SplitTraffic, simulate_round
from fedlora.world.splitplan import ModelShape, SplitCut, choose, device_memory_mb, plan_round
from fedlora.world.topology import Link, build_tree

TREE = ("topology=small6g", "privacy=none", "federation.num_clients=6", "federation.fraction=1.0",
        "federation.rounds=2", "model.tiny.num_hidden_layers=4", "topology.mobility.model=none",
        "lora.target_modules=[q_proj,v_proj,down_proj]", "lora.dropout=0.0")


def _key(layer: int, what: str = "q_proj.lora_A") -> str:
    return f"base_model.model.model.layers.{layer}.self_attn.{what}.weight"


def test_a_mixed_cell_s_aggregate_is_the_per_layer_weighted_sum():
    rng = np.random.default_rng(1)
    keys = [_key(i) for i in range(4)]
    full = {k: rng.normal(size=(2, 3)).astype(np.float32) for k in keys}  # a full device, 5 examples
    cut = SplitCut(1, 1)  # split device A (3 examples): layers 0, 3 on the device, 1, 2 on the edge
    dev_a = {k: rng.normal(size=(2, 3)).astype(np.float32) for k in (keys[0], keys[3])}
    edge_a = {k: rng.normal(size=(2, 3)).astype(np.float32) for k in (keys[1], keys[2])}
    dev_b = {k: rng.normal(size=(2, 3)).astype(np.float32) for k in keys[:2]}  # split B (2): k=2, m=0
    edge_b = {k: rng.normal(size=(2, 3)).astype(np.float32) for k in keys[2:]}
    assert [cut.on_edge(i, 4) for i in range(4)] == [False, True, True, False]
    cell = WeightedSum()
    cell.add(full, 5)
    cell.add(dev_a, 3)
    cell.add(dev_b, 2)
    edge = WeightedSum()
    edge.add_tensors(edge_a, 3)
    edge.add_tensors(edge_b, 2)
    other = WeightedSum()  # another cell with one full device
    other.add(full, 1)
    total = WeightedSum()
    for part in (cell, edge, other):
        total.merge(part)
    assert total.count == 4 and total.weight == 11
    mean = total.mean()

    def by_hand(contributions):
        return sum(w * d for w, d in contributions) / sum(w for w, _ in contributions)

    each = {0: [(5, full[keys[0]]), (3, dev_a[keys[0]]), (2, dev_b[keys[0]]), (1, full[keys[0]])],
            1: [(5, full[keys[1]]), (3, edge_a[keys[1]]), (2, dev_b[keys[1]]), (1, full[keys[1]])],
            2: [(5, full[keys[2]]), (3, edge_a[keys[2]]), (2, edge_b[keys[2]]), (1, full[keys[2]])],
            3: [(5, full[keys[3]]), (3, dev_a[keys[3]]), (2, edge_b[keys[3]]), (1, full[keys[3]])]}
    for layer, contributions in each.items():
        np.testing.assert_allclose(mean[keys[layer]], by_hand(contributions), rtol=1e-6)
    # the same through the tree, and a layer only the edge trained weighs only its devices
    only = WeightedSum()
    only.add({keys[0]: dev_a[keys[0]]}, 3)
    only_edge = WeightedSum()
    only_edge.add_tensors({keys[1]: edge_a[keys[1]]}, 3)
    tree = build_tree(TopologyConfig(kind="tree"), 8, 0)
    leaf = tree.leaf_cells[0]
    cell_sum = WeightedSum()
    cell_sum.merge(only)
    cell_sum.merge(only_edge)
    up = merge_up(tree, {leaf: cell_sum}).cloud
    np.testing.assert_allclose(up.mean()[keys[1]], edge_a[keys[1]], rtol=1e-6)


def test_default_sums_keep_a_single_weight():
    s = WeightedSum()
    s.add({"a": np.ones(2, np.float32)}, 2)
    s.add({"a": np.ones(2, np.float32)}, 3)
    parent = WeightedSum()
    parent.merge(s)
    assert s.tensor_weight == {} and parent.tensor_weight == {}


@pytest.fixture(scope="module")
def whole(tmp_path_factory, short_run):
    """The plain run every split run is compared with: (its directory, its summary)."""
    run_dir = tmp_path_factory.mktemp("whole")
    return run_dir, run_federation(short_run(*TREE), run_dir, InProcessTransport(6))


@pytest.mark.slow
def test_a_split_run_equals_the_same_run_trained_whole(tmp_path, short_run, whole):
    """Every split device's update (its own blocks + its edge's) is what it would have sent training
    the whole model, so the run's adapter is the plain run's to float tolerance."""
    full_dir, full = whole
    split = run_federation(short_run(*TREE, "train.mode=split", "train.split.k=1", "train.split.m=1"),
                           tmp_path / "split", InProcessTransport(6))
    a = load_file(str(full_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "split" / "adapter" / "adapter_model.safetensors"))
    assert set(a) == set(b)
    moved = 0
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert split["final_eval_loss"] == pytest.approx(full["final_eval_loss"], rel=1e-4)
    rounds = [json.loads(line) for line in (tmp_path / "split" / "rounds.jsonl").read_text().splitlines()]
    plain = [json.loads(line) for line in (full_dir / "rounds.jsonl").read_text().splitlines()]
    for r, p in zip(rounds, plain):
        sp = r["split"]
        assert "not secure aggregation" in sp["note"] and sp["split_clients"] == r["participants"]
        for c in r["participants"]:
            entry = sp["clients"][str(c)]
            assert (entry["mode"], entry["k"], entry["m"]) == ("split", 1, 1)
            assert entry["edge"] == r["cell_of"][str(c)] and entry["exchanges"] == 2 and entry["bytes_up"] > 0
            moved += 1
        act = sp["activation_bytes"]["up"]["end->neighbourhood"]
        assert act == sum(sp["clients"][str(c)]["bytes_up"] for c in r["participants"])
        # the access link carries the activations on top of the (smaller) device updates
        assert r["bytes"]["up"]["end->neighbourhood"] > act > 0
        assert all(sp["clients"][str(c)]["sim_split_s"] > 0 for c in r["participants"])
        assert "split" not in p
    assert moved == sum(len(r["participants"]) for r in rounds)
    text = render_text(run_status(tmp_path / "split"))
    assert f"{len(rounds[-1]['participants'])} device(s) trained split" in text and "not secure aggregation" in text
    assert f"client {rounds[-1]['participants'][0]}: k=1 m=1 with neighbourhood-" in text


@pytest.mark.slow
def test_auto_splits_only_devices_too_small_and_a_mixed_run_still_equals_whole(tmp_path, short_run, whole):
    # Phones (166 MB usable; SMALL_PHONES) cannot hold plain training of the tiny model (~172 MB by the
    # estimate, most of it one chunk of vocabulary logits), but can hold its ends (~160 MB).
    mixed = short_run(*TREE, *SMALL_PHONES, "train.mode=auto")
    run_federation(mixed, tmp_path / "auto", InProcessTransport(6))
    rounds = [json.loads(line) for line in (tmp_path / "auto" / "rounds.jsonl").read_text().splitlines()]
    tree = resolve_run(mixed).tree
    for r in rounds:
        sp = r["split"]["clients"]
        for c, entry in sp.items():
            assert (entry["mode"] == "split") == (tree.profile_of[int(c)] == "phone"), (c, entry)
            if entry["mode"] == "split":
                assert entry["k"] >= 1 and entry["fits"]
    assert any(r["split"]["split_clients"] for r in rounds)
    assert any(e["mode"] == "full" for r in rounds for e in r["split"]["clients"].values())
    a = load_file(str(whole[0] / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "auto" / "adapter" / "adapter_model.safetensors"))
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_mobility_a_split_device_continues_with_its_new_edge_and_counts_once(tmp_path, short_run, whole):
    cfg = short_run(*TREE, "federation.rounds=3", "topology.mobility.model=random_walk",
                    "topology.mobility.handover_prob=0.5", "train.mode=split", "train.split.k=1", "train.split.m=0")
    run_federation(cfg, tmp_path / "walk", InProcessTransport(6))
    rounds = [json.loads(line) for line in (tmp_path / "walk" / "rounds.jsonl").read_text().splitlines()]
    moved = 0
    for before, after in zip(rounds, rounds[1:]):
        for c in after["participants"]:
            if str(c) in before["cell_of"] and before["cell_of"][str(c)] != after["cell_of"][str(c)]:
                moved += 1
                assert after["split"]["clients"][str(c)]["edge"] == after["cell_of"][str(c)]
    assert moved > 0
    everyone = json.loads((whole[0] / "rounds.jsonl").read_text().splitlines()[0])  # unmoved, whole models
    per_client = everyone["num_examples"] / len(everyone["participants"])  # every client has as many examples
    for r in rounds:
        off = [d["client"] for d in r["dropped"]]
        assert all("unavailable" in d["reason"] for d in r["dropped"])
        assert sorted(r["participants"] + off) == list(range(6))  # each client once: in the sum, or off this round
        assert r["num_examples"] == per_client * len(r["participants"])
        assert r["split"]["split_clients"] == r["participants"] and r["aggregated"]
        # every split device's activations crossed its current cell's access link once
        assert sum(e["bytes_up"] for e in r["split"]["clients"].values()) == \
            r["split"]["activation_bytes"]["up"]["end->neighbourhood"]


HIERFAVG = ("topology.cloud_sync_every=2", "federation.rounds=3")
SMALL_PHONES = ("topology.profiles.phone.memory_gb=0.216", "train.split.runtime_mb=0")  # phones split under auto


@pytest.mark.slow
def test_hierfavg_with_split_devices_equals_it_trained_whole_and_resumes_mid_period(tmp_path, short_run):
    """Cell models between syncs hold split devices' updates with per-tensor weights: the adapter is the
    whole-model HierFAVG run's; a crash in round 2 (after round 1's cell models, before the sync) resumes
    to the uninterrupted run exactly."""
    whole_dir, split_dir, broken = tmp_path / "whole", tmp_path / "split", tmp_path / "broken"
    run_federation(short_run(*TREE, *HIERFAVG), whole_dir, InProcessTransport(6))
    cfg = short_run(*TREE, *HIERFAVG, *SMALL_PHONES, "train.mode=auto")
    run_federation(cfg, split_dir, InProcessTransport(6))
    rounds = [json.loads(line) for line in (split_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["cloud_sync"] for r in rounds] == [False, True, True]
    split = rounds[0]["split"]["split_clients"]
    assert split and set(split) <= set(rounds[0]["participants"])  # in round 1's cell models
    assert len(split) < len(rounds[0]["participants"])  # mixed with full devices
    a = load_file(str(whole_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(split_dir / "adapter" / "adapter_model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)

    def crash_in_round_2(server_round, reply):
        if server_round == 2:
            raise KeyboardInterrupt
        return reply

    with pytest.raises(KeyboardInterrupt):
        run_federation(cfg, broken, InProcessTransport(6, fault=crash_in_round_2))
    done, saved, _ = load_checkpoint(broken)
    # round 1's cell models, with their per-tensor weights
    assert done == 1 and any(k.startswith("cells/") and "#tensor_weight/" in k for k in saved)
    run_federation(cfg, broken, InProcessTransport(6), resume=True)
    c = load_file(str(broken / "adapter" / "adapter_model.safetensors"))
    for k in b:
        np.testing.assert_array_equal(c[k], b[k], err_msg=k)


def test_split_config_errors(short_run):
    with pytest.raises(ConfigError, match="privacy floor"):
        short_run("train.mode=split", "train.split.k=1", "train.split.min_k=2")
    with pytest.raises(ConfigError, match="min_k=0"):
        short_run("train.split.min_k=0")
    with pytest.raises(ConfigError, match="train.mode"):
        short_run("train.mode=half")
    with pytest.raises(ConfigError, match="privacy=secagg_dp.*clip_norm"):
        resolve_run(short_run("topology=small6g", "privacy=secagg_dp", "train.mode=split"))
    assert resolve_run(short_run("topology=small6g", "privacy=secagg", "train.mode=split")).secure
    assert resolve_run(short_run("topology=small6g", "train.mode=auto", "topology.cloud_sync_every=2")).secure


# Eight always-available laptops on the small6g tree, one round of all of them; secure with clip 1.0 (nothing
# clipped), every device split k=1, m=1 (layers 0 and 3 on the device, 1 and 2 on its edge).
LAPTOPS = (*EIGHT_LAPTOPS, "model.tiny.num_hidden_layers=4", "topology.mobility.model=none", "lora.dropout=0.0")
SECURE = ("privacy=secagg", "privacy.clip=1.0")
SPLIT = ("train.mode=split", "train.split.k=1", "train.split.m=1")


def _worst(a, b):
    assert set(a) == set(b)
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


@pytest.fixture(scope="module")
def plain_laptops(tmp_path_factory, short_run):
    """The plain runs a secure split run is compared with: {"full": dir, "split": dir}."""
    base = tmp_path_factory.mktemp("laptops")
    run_federation(short_run(*LAPTOPS, "privacy=none"), base / "full", InProcessTransport(8))
    run_federation(short_run(*LAPTOPS, "privacy=none", *SPLIT), base / "split", InProcessTransport(8))
    return {"full": base / "full", "split": base / "split"}


@pytest.mark.slow
@pytest.mark.parametrize("options", [(), ("privacy.packing=auto", "privacy.bits=12"), ("topology.cloud_sync_every=2",)],
                         ids=["words", "packed-12bit", "hierfavg-per-cell"])
def test_split_devices_under_secure_aggregation_equal_the_plain_split_run_to_the_decode_bound(
        tmp_path, short_run, plain_laptops, options):
    """A split device's own tensors enter the masked sum (zeros for its edge's blocks), its edge adds its part in
    plain: the secure run is the plain split run up to the secure decode bound, and so the run trained whole;
    packed in a smaller ring, and under HierFAVG (each cell unmasked alone; one round, so its sync is the mean)."""
    run_federation(short_run(*LAPTOPS, *SECURE, *SPLIT, *options), tmp_path / "s", InProcessTransport(8))
    (rs,) = [json.loads(line) for line in (tmp_path / "s" / "rounds.jsonl").read_text().splitlines()]
    (rp,) = [json.loads(line) for line in (plain_laptops["split"] / "rounds.jsonl").read_text().splitlines()]
    assert rs["participants"] == rp["participants"] == list(range(8)) and rs["aggregated"]
    assert rs["secure"]["clients_in_sum"] == 8 and all(c["ok"] for c in rs["secure"]["cells"].values())
    assert rs["num_examples"] == rp["num_examples"]  # split devices' counts travel masked, like any device's
    assert rs["split"]["split_clients"] == list(range(8))
    for c in range(8):  # the split record is there as in plain mode
        assert rs["split"]["clients"][str(c)]["exchanges"] == rp["split"]["clients"][str(c)]["exchanges"] == 2
    bound = rs["secure"]["decode_error_bound"]
    plain_split, plain_full, secure = (adapter(plain_laptops["split"]), adapter(plain_laptops["full"]),
                                       adapter(tmp_path / "s"))
    assert 0 < _worst(plain_split, secure) <= bound + 1e-6  # + float32 rounding of the stored adapters
    assert _worst(plain_full, secure) <= bound + 1e-6
    for k in plain_full:
        np.testing.assert_allclose(plain_split[k], plain_full[k], rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_auto_under_the_default_privacy_mixes_split_and_full_devices_in_secure_cells(tmp_path, short_run, plain_laptops):
    """The defaults on a tree: privacy=auto is secagg; train.mode=auto splits the phones only, so cells hold both."""
    mixed = ("privacy=auto", "privacy.clip=1.0", "topology.profile_mix={rpi4: 0, phone: 0.5, car: 0, laptop: 0.5}",
             "topology.profiles.phone.availability=1.0", *SMALL_PHONES, "train.mode=auto")
    cfg = short_run(*LAPTOPS, *mixed)
    tree = resolve_run(cfg).tree
    assert resolve_run(cfg).privacy == "secagg"
    run_federation(cfg, tmp_path / "s", InProcessTransport(8))
    (rs,) = [json.loads(line) for line in (tmp_path / "s" / "rounds.jsonl").read_text().splitlines()]
    assert rs["participants"] == list(range(8)) and rs["secure"]["clients_in_sum"] == 8
    split = set(rs["split"]["split_clients"])
    assert split == {c for c in range(8) if tree.profile_of[c] == "phone"}
    cells = {}
    for c, cell in rs["cell_of"].items():
        cells.setdefault(cell, set()).add(int(c) in split)
    assert any(kinds == {True, False} for kinds in cells.values())  # a cell with both
    assert _worst(adapter(plain_laptops["full"]), adapter(tmp_path / "s")) <= rs["secure"]["decode_error_bound"] + 1e-6


class _FailingSplitDevices(SecureSplitDevices):
    """Split devices whose session with the edge fails for some (client, stage)."""

    def __init__(self, fail):
        super().__init__()
        self.fail = fail

    def step(self, stage, payload, settings, arrays, client, cut, expected):
        if (client, stage) in self.fail:
            raise ConnectionError(f"edge lost client {client} at {stage}")
        return super().step(stage, payload, settings, arrays, client, cut, expected)


@pytest.mark.slow
def test_a_failed_split_session_under_secure_aggregation_is_a_dropout_and_the_sum_stays_exact(tmp_path, short_run):
    """One cell of 8 split devices (t = 5): client 3's split session fails while training, client 5's at its
    masked input (the others' shares remove its masks); the sum is the plain sum of the other six, edge parts
    of the two never added."""
    one_cell = ("topology.suburban_cells=1", "topology.neighbourhoods_per_suburban=1", "privacy.threshold=0.5")
    fail = {(3, "advertise"), (5, "masked-input")}
    handed_up = []

    class Runner(LocalCellRunner):
        def run(self, requests, **kw):
            handed_up.extend(results := super().run(requests, **kw))
            return results

    run_federation(short_run(*LAPTOPS, *one_cell, *SECURE, *SPLIT), tmp_path / "s", InProcessTransport(8),
                   runner=Runner(InProcessTransport(8), secure_split=lambda: _FailingSplitDevices(fail)))
    # the edge's part went into the masked sum: nothing of a split client leaves the cell in plain
    assert [(r.plain, r.edge) for r in handed_up] == [(None, None)] and handed_up[0].secure.masked is not None

    def drop_3_and_5(server_round, reply):
        return None if reply.client in (3, 5) else reply

    run_federation(short_run(*LAPTOPS, *one_cell, "privacy=none"), tmp_path / "p",
                   InProcessTransport(8, fault=drop_3_and_5))
    (rs,) = [json.loads(line) for line in (tmp_path / "s" / "rounds.jsonl").read_text().splitlines()]
    (rp,) = [json.loads(line) for line in (tmp_path / "p" / "rounds.jsonl").read_text().splitlines()]
    assert rs["participants"] == rp["participants"] == [0, 1, 2, 4, 6, 7]
    cell = rs["secure"]["cells"]["neighbourhood-0-0"]
    assert cell["ok"] and cell["dropped"] == {"advertise": [3], "masked-input": [5]}
    why = {d["client"]: d["reason"] for d in rs["dropped"]}
    assert "split session failed" in why[3] and "edge lost client 3" in why[3] and "masked-input" in why[5]
    assert rs["num_examples"] == rp["num_examples"]
    assert _worst(adapter(tmp_path / "p"), adapter(tmp_path / "s")) <= rs["secure"]["decode_error_bound"] + 1e-6


SMOL = ModelShape(num_layers=30, hidden=576, intermediate=1536, vocab=49152, heads=9, kv_heads=3, tied=True,
                  weight_bytes=2, lora_per_layer=2 * 8 * (576 + 576) // 2 + 8 * (576 + 192), lora_other=0)


def test_the_chosen_cut_fits_memory_keeps_the_floor_and_is_fastest():
    train = TrainConfig(gradient_checkpointing=True)
    access = Link("end->neighbourhood", 1000.0, 1.0)
    pi = DeviceProfileConfig(compute_speed=0.1, memory_gb=0.9, uplink_mbps=50, downlink_mbps=100, latency_ms=10)
    full = choose(SMOL, train, pi, access, split=False)
    assert not full.fits
    got = choose(SMOL, train, pi, access, split=True)
    assert got.fits and got.cut.k >= 1 and got.memory_mb <= 0.9 * 1024 * 0.75
    # a slow device gives the fast edge every block it can: the floor k=1 and nothing after
    assert (got.cut.k, got.cut.m) == (1, 0)
    # an edge busy with many split devices is slower than a laptop: the laptop keeps more blocks
    laptop = DeviceProfileConfig(compute_speed=2.0, memory_gb=16)
    busy = choose(SMOL, train, laptop, access, split=True, split_in_cell=40)
    assert busy.cut.k + busy.cut.m > 1
    assert device_memory_mb(SMOL, SplitCut(1, 0), train) < device_memory_mb(SMOL, SplitCut(10, 5), train)
    train_floor = TrainConfig()
    train_floor.split.min_k = 3
    assert choose(SMOL, train_floor, pi, access, split=True).cut.k >= 3


def test_plan_round_full_is_empty_and_split_plans_everyone(short_run):
    cfg = short_run(*TREE)
    tree = resolve_run(cfg).tree
    shape = ModelShape(4, 64, 128, 49152, 4, 2, True, 4, 100)
    assert plan_round(tree, tree.initial, tree.clients, shape, cfg.train) == {}
    cfg.train.mode = "split"
    plan = plan_round(tree, tree.initial, tree.clients, shape, cfg.train)
    assert sorted(plan) == tree.clients and all(p.cut is not None for p in plan.values())


def test_the_network_model_counts_every_per_step_round_trip(short_run):
    cfg = short_run(*TREE)
    tree = resolve_run(cfg).tree
    c = tree.clients[0]
    base = simulate_round(tree, tree.initial, 1, selected=[c], train_s={c: 1.0}, adapter_bytes=1000, seed=0)
    t = SplitTraffic(exchanges=10, bytes_up=10 * 2 * 10**6, bytes_down=10 * 2 * 10**6, edge_s=0.5, edge_speed=4.0)
    net = simulate_round(tree, tree.initial, 1, selected=[c], train_s={c: 1.0}, adapter_bytes=1000, seed=0,
                         split={c: t})
    p = tree.profile(c)
    link = tree.links["end->neighbourhood"]
    latency = max(link.latency_ms, p.latency_ms) / 1e3
    want = 0.5 / 4.0 + 40 * latency + t.bytes_up * 8 / (min(link.bandwidth_mbps, p.uplink_mbps) * 1e6) + \
        t.bytes_down * 8 / (min(link.bandwidth_mbps, p.downlink_mbps) * 1e6)
    assert net.split_s[c] == pytest.approx(want)
    assert net.sim_network_s == pytest.approx(base.sim_network_s + want)
    assert net.activation_up == {"end->neighbourhood": t.bytes_up}
    assert net.bytes_up["end->neighbourhood"] == base.bytes_up["end->neighbourhood"] + t.bytes_up


def test_a_failed_split_session_drops_that_client_only_and_a_cell_request_travels(short_run):
    from fedlora.roles.device import initial_adapter
    from fedlora.roles.neighbourhood import CellRequest, CellResult, run_cell
    from fedlora.roles.split import split_round

    cfg = short_run(*TREE, "federation.num_clients=3", "topology=flat")
    state = initial_adapter(cfg, freeze_a=False)
    expected = {k: v.shape for k, v in state.items()}
    settings = resolve_run(cfg).round_settings(1, {"proximal_mu": 0.0, "freeze_a": False})
    request = CellRequest("r", 1, "cloud", [0, 1, 2], state, settings, expected, split={1: (1, 1), 2: (1, 0)})
    assert CellRequest.from_bytes(request.to_bytes()).split == request.split
    assert set(request.expected_of(0)) == set(expected) and len(request.expected_of(1)) < len(expected)

    def edge_dies_for_2(settings, arrays, client, cut):
        if client == 2:
            raise ConnectionError("edge gone mid-step")
        return split_round(settings, arrays, client, cut)

    result = run_cell(request, InProcessTransport(3), split=edge_dies_for_2)
    assert result.accepted == [0, 1] and "edge gone mid-step" in result.clients[2].reason
    assert result.clients[1].split["k"] == 1 and result.clients[1].split["exchanges"] == 2
    assert result.edge is not None and set(result.edge.total) == set(expected) - set(request.expected_of(1))
    assert result.plain.count == 2 and result.edge.count == 0  # the edge's part adds tensors, not updates
    back = CellResult.from_bytes(result.to_bytes())
    assert back.edge.tensor_weight == result.edge.tensor_weight
    # a deployed edge without a split trainer drops its split clients, the others still count
    plain = run_cell(request, InProcessTransport(3))
    assert plain.accepted == [0] and "cannot train split" in plain.clients[1].reason
