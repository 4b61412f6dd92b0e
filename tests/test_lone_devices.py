"""A device alone in its neighbourhood joins another cell's secure session (privacy.lone_devices=merge)."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file
from test_secure_rounds import RecordingTransport, stage_dropper

from fedlora import wire
from fedlora.config import ConfigError, TopologyConfig
from fedlora.roles.cloud import run_federation
from fedlora.roles.local import InProcessTransport, LocalCellRunner
from fedlora.roles.lone import host_lone_devices, left_out
from fedlora.roles.neighbourhood import ClientStatus
from fedlora.runs import report
from fedlora.secure.rounds import CELL_ABORTED, CELL_REFUSED, DROPPED, NO_REPLY
from fedlora.world.topology import build_tree

# Eight always-available laptops on small6g, all of them in round 1. The tree puts clients 3 and 7 in
# neighbourhood-1-1; the trace moves 7 to its sibling neighbourhood-1-0, leaving 3 alone.
EIGHT_LAPTOPS = ("topology=small6g", "federation.num_clients=8", "federation.rounds=1", "federation.fraction=1.0",
                 "topology.profile_mix={rpi4: 0, phone: 0, car: 0, laptop: 1.0}", "topology.profiles.laptop.availability=1.0",
                 "privacy=secagg")
LONE, LONE_CELL, HOST = 3, "neighbourhood-1-1", "neighbourhood-1-0"


@pytest.fixture
def lone_run(tmp_path, short_run):
    trace = tmp_path / "trace.csv"
    trace.write_text(f"round,client,cell\n1,7,{HOST}\n")

    def compose(*overrides):
        return short_run(*EIGHT_LAPTOPS, "topology.mobility.model=trace", f"topology.mobility.trace_path={trace}", *overrides)

    return compose


def groups_of(tree, cell_of, clients, start="global"):
    groups = {}
    for c in clients:
        groups.setdefault(tree.neighbourhood_of(cell_of[c]), []).append(c)
    return [(cell, group, start) for cell, group in sorted(groups.items())]


# --------------------------------------------------------------------------- choosing the host (pure)


def test_a_lone_device_joins_its_smallest_sibling_that_is_not_alone():
    tree = build_tree(TopologyConfig(kind="tree", suburban_cells=2, neighbourhoods_per_suburban=3), 30, seed=0)
    a, b, c = tree.cells["suburban-0"].children
    far = tree.cells["suburban-1"].children[0]
    groups = [(a, [1], "A"), (b, [2, 3, 4], "B"), (c, [5, 6], "C"), (far, [7, 8], "F")]
    merged, hosted = host_lone_devices(groups, tree)
    assert hosted == {1: (a, c)}  # the smaller sibling, not the far cell
    assert merged == [(b, [2, 3, 4], "B"), (c, [1, 5, 6], "C"), (far, [7, 8], "F")]  # the host's start adapter


def test_lone_siblings_pair_up_and_a_cell_without_siblings_goes_far():
    tree = build_tree(TopologyConfig(kind="tree", suburban_cells=2, neighbourhoods_per_suburban=2), 16, seed=0)
    (a, b), (c, d) = tree.cells["suburban-0"].children, tree.cells["suburban-1"].children
    merged, hosted = host_lone_devices([(a, [1], 0), (b, [2], 0)], tree)
    assert hosted == {1: (a, b)} and merged == [(b, [1, 2], 0)]
    merged, hosted = host_lone_devices([(a, [1], 0), (c, [4, 5], 0)], tree)  # no sibling of a trains this round
    assert hosted == {1: (a, c)} and merged == [(c, [1, 4, 5], 0)]
    merged, hosted = host_lone_devices([(a, [1], 0), (c, [4, 5], 0), (d, [6], 0)], tree)
    assert hosted == {1: (a, c), 6: (d, c)} and merged == [(c, [1, 4, 5, 6], 0)]


def test_a_round_with_one_cell_keeps_it_and_every_client_stays_in_one_group():
    tree = build_tree(TopologyConfig(kind="tree"), 8, seed=0)
    cell = tree.tier("neighbourhood")[0]
    assert host_lone_devices([(cell, [1], 0)], tree) == ([(cell, [1], 0)], {})
    flat = build_tree(TopologyConfig(kind="flat"), 8, seed=0)
    assert host_lone_devices([("cloud", [1], 0)], flat) == ([("cloud", [1], 0)], {})
    with pytest.raises(ValueError, match="two groups"):
        host_lone_devices([(cell, [1], 0), (cell, [2], 0)], tree)
    rng = np.random.default_rng(0)
    for _ in range(50):  # random rounds of a city-sized tree: nobody lost or doubled, nobody alone if avoidable
        topo = TopologyConfig(kind="tree", suburban_cells=3, neighbourhoods_per_suburban=4)
        big = build_tree(topo, 40, seed=int(rng.integers(99)))
        clients = sorted(int(c) for c in rng.choice(40, size=int(rng.integers(2, 12)), replace=False))
        merged, hosted = host_lone_devices(groups_of(big, big.initial, clients), big)
        placed = [c for _, group, _ in merged for c in group]
        assert sorted(placed) == clients and len(set(placed)) == len(placed)
        assert all(len(group) >= 2 for _, group, _ in merged)
        assert all(big.neighbourhood_of(big.initial[c]) == own != host for c, (own, host) in hosted.items())


def test_left_out_names_only_devices_that_did_not_drop_out_themselves():
    statuses = {1: ClientStatus(1, DROPPED, f"{CELL_REFUSED}: 1 client(s) in the cell"),
                2: ClientStatus(2, DROPPED, f"{CELL_ABORTED}: 1 survivor(s), t=2"),
                3: ClientStatus(3, DROPPED, NO_REPLY), 4: ClientStatus(4, "accepted"),
                5: ClientStatus(5, DROPPED, "secagg: no reply at share-keys")}
    assert [d["client"] for d in left_out(statuses)] == [1, 2]


def test_lone_devices_setting_is_checked(short_run):
    assert short_run().privacy.lone_devices == "merge"
    with pytest.raises(ConfigError, match="privacy.lone_devices"):
        short_run("privacy.lone_devices=maybe")


# --------------------------------------------------------------------------- in real rounds


def test_a_lone_device_counts_and_refusing_it_is_counted(tmp_path, lone_run):
    merged = run_federation(lone_run(), tmp_path / "merge", InProcessTransport(8))
    refused = run_federation(lone_run("privacy.lone_devices=refuse"), tmp_path / "refuse", InProcessTransport(8))
    rm, rr = report.read_rounds(tmp_path / "merge")[0], report.read_rounds(tmp_path / "refuse")[0]
    assert rm["cell_of"][str(LONE)] == LONE_CELL  # it did not move: it only joined another session
    assert rm["participants"] == list(range(8)) and "left_out" not in rm and rm["dropped"] == []
    assert rm["secure"]["hosted"] == {str(LONE): {"cell": LONE_CELL, "session": HOST}}
    assert LONE_CELL not in rm["secure"]["cells"] and rm["secure"]["cells"][HOST]["survivors"] == [0, 2, LONE, 7]
    assert rm["secure"]["clients_in_sum"] == 8  # counted once: 8 clients, 8 in the sum
    assert merged["left_out_total"] == 0 and merged["sampled_total"] == 8
    assert LONE not in rr["participants"] and "hosted" not in rr["secure"]
    assert rr["left_out"] == [{"client": LONE, "reason": f"{CELL_REFUSED}: 1 client(s) in the cell; secure aggregation "
                                                        "needs at least 2"}]
    assert refused["left_out_total"] == 1 and refused["sampled_total"] == 8
    assert rm["num_examples"] > rr["num_examples"]


def test_the_merged_session_matches_the_plain_mean_of_all_eight(tmp_path, lone_run):
    run_federation(lone_run("privacy.clip=1.0"), tmp_path / "s", InProcessTransport(8))
    run_federation(lone_run("privacy=none"), tmp_path / "p", InProcessTransport(8))
    rs, rp = report.read_rounds(tmp_path / "s")[0], report.read_rounds(tmp_path / "p")[0]
    assert rs["participants"] == rp["participants"] == list(range(8)) and rs["num_examples"] == rp["num_examples"]
    a = load_file(str(tmp_path / "p" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "s" / "adapter" / "adapter_model.safetensors"))
    assert max(float(np.max(np.abs(a[k] - b[k]))) for k in a) <= rs["secure"]["decode_error_bound"] + 1e-6


def test_a_lone_split_device_trains_with_its_host_cells_edge_and_the_sum_stays_exact(tmp_path, lone_run):
    split = ("train.mode=split", "train.split.k=1", "train.split.m=0", "privacy.clip=1.0")
    run_federation(lone_run(*split), tmp_path / "s", InProcessTransport(8))
    run_federation(lone_run("privacy=none"), tmp_path / "p", InProcessTransport(8))
    rs, rp = report.read_rounds(tmp_path / "s")[0], report.read_rounds(tmp_path / "p")[0]
    assert rs["participants"] == rp["participants"] == list(range(8)) and rs["num_examples"] == rp["num_examples"]
    assert rs["secure"]["hosted"] == {str(LONE): {"cell": LONE_CELL, "session": HOST}}
    assert rs["split"]["clients"][str(LONE)]["edge"] == HOST and rs["split"]["clients"]["1"]["edge"] != HOST
    a = load_file(str(tmp_path / "p" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "s" / "adapter" / "adapter_model.safetensors"))
    assert max(float(np.max(np.abs(a[k] - b[k]))) for k in a) <= rs["secure"]["decode_error_bound"] + 1e-6


def test_the_aggregators_and_unmasker_see_the_lone_device_only_inside_the_sum(tmp_path, lone_run, monkeypatch):
    """The lone device is in exactly one cell request, its host's; the host's session is signed for
    the merged roster (n = 4, t = 3); what the aggregator holds and hands up, and what the unmasker
    is given, never holds its plain update; the unmasker's only output is the session's sum of 4
    (HierFAVG: one unmasked sum per cell, the finest the cloud ever gets)."""
    import fedlora.secure.rounds as rounds
    from fedlora.roles.device import train_round

    requests, results, unmasked = [], [], []
    real_run, real_remove = LocalCellRunner.run, rounds.remove_masks

    def spy_run(self, reqs, **kw):
        requests.extend(reqs)
        out = real_run(self, reqs, **kw)
        results.extend(r.to_bytes() for r in out)
        return out

    def spy_remove(total, masks):
        plain = real_remove(total, masks)
        unmasked.append((total.cells, total.clients, [m.cell for m in masks], plain.clients))
        return plain

    monkeypatch.setattr(LocalCellRunner, "run", spy_run)
    monkeypatch.setattr(rounds, "remove_masks", spy_remove)
    transport = RecordingTransport(8)
    run_federation(lone_run("topology.cloud_sync_every=2"), tmp_path / "r", transport)
    host = [r for r in requests if LONE in r.clients]
    assert len(host) == 1 and all(r.cell != LONE_CELL for r in requests)  # one session, no request for its own cell
    header = host[0].secure.header.header
    assert (header.cell, header.max_clients, header.threshold) == (host[0].cell, 4, 3)
    assert sorted(host[0].clients) == sorted(host[0].secure.devices) and len(host[0].clients) == 4
    # the unmasker removed masks from whole sessions' sums only, the merged one holding 4 clients
    assert sorted(cells for cells, *_ in unmasked) == sorted(frozenset({r.cell}) for r in requests)
    assert all(clients >= 2 and plain == clients and masks == sorted(cells) for cells, clients, masks, plain in unmasked)
    assert [clients for cells, clients, *_ in unmasked if host[0].cell in cells] == [4]
    delta, metrics = train_round(transport.settings, transport.arrays, LONE)
    blob = b"".join(results + transport.payloads)
    for v in delta.values():
        nonzero = v[np.abs(v) > 1e-6]
        assert nonzero.size and nonzero.tobytes()[:64] not in blob
    assert np.float32(metrics["train_loss"]).tobytes() not in blob
    for data in results:
        result = wire.loads(data, "cell-result")
        assert result.plain is None and result.metrics == {}
        assert all(st.train_loss is None and st.num_examples is None for st in result.clients.values())


@pytest.mark.parametrize("who, stage, counted", [
    (LONE, "masked-input", False),  # it left before uploading: the host's others are unmasked without it
    (LONE, "unmask", True),  # it uploaded: the others' shares remove its masks
    (2, "share-keys", False),  # a host member drops: the merged session goes on (n = 4, t = 3)
])
def test_dropout_recovery_covers_the_merged_session(tmp_path, lone_run, who, stage, counted):
    run_federation(lone_run(), tmp_path / "r", InProcessTransport(8, stage_fault=stage_dropper({(who, stage)})))
    rec = report.read_rounds(tmp_path / "r")[0]
    cell = rec["secure"]["cells"][HOST]
    assert cell["ok"] and cell["dropped"] == {stage: [who]} and rec["aggregated"]
    assert (who in rec["participants"]) == counted and len(rec["participants"]) == 8 - (not counted)
    assert "left_out" not in rec  # a real dropout is a dropout, not a device left out
    assert rec["secure"]["clients_in_sum"] == len(rec["participants"])


def test_runners_that_cannot_reach_other_cells_refuse_and_say_why(tmp_path, lone_run):
    class EdgeLike(LocalCellRunner):
        hosts_lone_devices = False  # like the edge processes of a deployment (server/edge.py)

    transport = InProcessTransport(8)
    run_federation(lone_run(), tmp_path / "r", transport, runner=EdgeLike(transport))
    rec = report.read_rounds(tmp_path / "r")[0]
    assert [d["client"] for d in rec["left_out"]] == [LONE]
    assert "edge processes cannot merge a lone device" in rec["left_out"][0]["reason"]
    from server.edge import EdgeCellRunner  # Flower only for this check

    assert EdgeCellRunner.hosts_lone_devices is False and LocalCellRunner.hosts_lone_devices is True


def test_under_hierfavg_the_lone_device_trains_from_its_hosts_cell_model(tmp_path, lone_run):
    run_federation(lone_run("topology.cloud_sync_every=2", "federation.rounds=2"), tmp_path / "r", InProcessTransport(8))
    r1, r2 = report.read_rounds(tmp_path / "r")
    assert r1["secure"]["hosted"] == {str(LONE): {"cell": LONE_CELL, "session": HOST}} and not r1["cloud_sync"]
    assert r1["participants"] == r2["participants"] == list(range(8)) and r2["cloud_sync"]
