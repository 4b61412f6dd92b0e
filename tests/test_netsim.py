"""The network model: bytes per link, hand-computed round times, shared access links
(processor sharing), stragglers, availability."""

import pytest

from fedlora.config import DeviceProfileConfig, FemtoConfig, LinkConfig, LinksConfig, TopologyConfig
from fedlora.world.netsim import Transfer, fair_rates, is_available, share_link, simulate_round, unavailable
from fedlora.world.topology import Link, build_tree

MBIT = 125_000  # bytes
PROFILES = {
    "slow": DeviceProfileConfig(compute_speed=0.5, uplink_mbps=10, downlink_mbps=100, latency_ms=4),
    "fast": DeviceProfileConfig(compute_speed=2.0, uplink_mbps=1000, downlink_mbps=1000, latency_ms=0),
}
LINKS = LinksConfig(
    end_cloud=LinkConfig(100, 20, shared=False),
    end_neighbourhood=LinkConfig(100, 1),
    neighbourhood_suburban=LinkConfig(1000, 2),
    suburban_cloud=LinkConfig(1000, 5),
)


def tiny(kind="tree", **kw):
    """Two clients, one slow and one fast; as a tree: 1 sub-urban > 2 neighbourhoods, 1 client each."""
    topo = TopologyConfig(
        kind=kind, suburban_cells=1, neighbourhoods_per_suburban=2, profiles=dict(PROFILES),
        profile_mix={"slow": 0.5, "fast": 0.5}, links=LINKS, **kw,
    )
    tree = build_tree(topo, 2, seed=0)
    by_profile = {p: c for c, p in tree.profile_of.items()}
    return tree, by_profile["slow"], by_profile["fast"]


def run(tree, server_round=1, clients=None, train=10.0, adapter=10 * MBIT, **kw):
    clients = tree.clients if clients is None else clients
    return simulate_round(
        tree, tree.initial, server_round, selected=clients, train_s={c: train for c in clients}, adapter_bytes=adapter, seed=0,
        **kw
    )


def test_round_time_on_a_tiny_tree_matches_the_hand_computed_value():
    tree, slow, fast = tiny()
    assert tree.initial[slow] != tree.initial[fast]
    net = run(tree)
    # A 10 Mbit adapter. Down: backhaul 5 ms + 10 ms, metro 2 ms + 10 ms, access 100 Mbit/s
    # with the device's latency floor; compute 10 s / speed; up over the capped access
    # link; forward metro and backhaul again.
    slow_s = 0.015 + 0.012 + (0.1 + 0.004) + 10 / 0.5 + (10 / 10 + 0.004) + 0.012 + 0.015
    fast_s = 0.015 + 0.012 + (0.1 + 0.001) + 10 / 2.0 + (0.1 + 0.001) + 0.012 + 0.015
    assert net.path_s[slow] == pytest.approx(slow_s)
    assert net.path_s[fast] == pytest.approx(fast_s)
    assert net.sim_network_s == pytest.approx(slow_s)  # the slowest surviving path
    assert net.survivors == [0, 1] and net.stragglers == {} and net.cloud_sync
    adapter = 10 * MBIT
    expected = {"end->neighbourhood": 2 * adapter, "neighbourhood->suburban": 2 * adapter, "suburban->cloud": adapter}
    assert net.bytes_up == expected and net.bytes_down == expected
    assert net.record() == {"bytes": {"up": expected, "down": expected}, "sim_network_s": net.sim_network_s}


def test_flat_round_time_and_bytes():
    tree, slow, fast = tiny(kind="flat")
    net = run(tree)
    assert net.path_s[slow] == pytest.approx((0.1 + 0.02) + 20 + (1.0 + 0.02))
    assert net.path_s[fast] == pytest.approx((0.1 + 0.02) + 5 + (0.1 + 0.02))
    assert net.bytes_up == {"end->cloud": 20 * MBIT} and net.bytes_down == {"end->cloud": 20 * MBIT}


def test_deadline_drops_stragglers_from_the_uplink_and_the_round_time():
    tree, slow, fast = tiny(deadline_s=10.0)
    net = run(tree)
    assert list(net.stragglers) == [slow] and "topology.deadline_s=10" in net.stragglers[slow]
    assert net.survivors == [fast]
    assert net.sim_network_s == pytest.approx(net.path_s[fast])
    adapter = 10 * MBIT
    assert net.bytes_up == {"end->neighbourhood": adapter, "neighbourhood->suburban": adapter, "suburban->cloud": adapter}
    # The straggler still received the adapter.
    assert net.bytes_down["end->neighbourhood"] == 2 * adapter
    # Nobody in time: the aggregators waited until the deadline.
    assert run(tree, train=1000.0).sim_network_s == 10.0
    assert run(tree, clients=[]).sim_network_s == 0.0


@pytest.mark.parametrize("clients", [8, 40, 200])
def test_backhaul_carries_one_sum_per_suburban_cell_whatever_the_number_of_clients(clients):
    adapter = 3 * MBIT
    tree = build_tree(TopologyConfig(kind="tree", suburban_cells=2, neighbourhoods_per_suburban=2), clients, seed=1)
    net = run(tree, adapter=adapter)
    assert net.bytes_up["suburban->cloud"] == 2 * adapter
    assert net.bytes_up["neighbourhood->suburban"] == 4 * adapter
    assert net.bytes_up["end->neighbourhood"] == clients * adapter
    assert net.bytes_down["suburban->cloud"] == 2 * adapter
    flat = run(build_tree(TopologyConfig(), clients, seed=1), adapter=adapter)
    assert flat.bytes_up == {"end->cloud": clients * adapter}


def test_only_cells_with_participants_send_and_receive():
    tree = build_tree(TopologyConfig(kind="tree", suburban_cells=2, neighbourhoods_per_suburban=2), 8, seed=1)
    one = [c for c in tree.clients if tree.initial[c] == "neighbourhood-1-0"][:1]
    net = run(tree, clients=one, adapter=100)
    assert net.bytes_up == {"end->neighbourhood": 100, "neighbourhood->suburban": 100, "suburban->cloud": 100}
    assert net.bytes_down == net.bytes_up


def test_uplink_bytes_per_client_and_failed_replies():
    tree, slow, fast = tiny()
    net = simulate_round(
        tree, tree.initial, 1, selected=[slow, fast], train_s={fast: 1.0}, adapter_bytes=1000, up_bytes={fast: 400},
        aggregate_bytes=800, seed=0,
    )
    # slow downloaded but its reply failed: no uplink, no path time, not a survivor.
    assert net.survivors == [fast] and slow not in net.path_s and slow not in net.stragglers
    assert net.bytes_down == {"end->neighbourhood": 2000, "neighbourhood->suburban": 2000, "suburban->cloud": 1000}
    assert net.bytes_up == {"end->neighbourhood": 400, "neighbourhood->suburban": 800, "suburban->cloud": 800}
    with pytest.raises(ValueError, match="not selected"):
        simulate_round(tree, tree.initial, 1, selected=[slow], train_s={fast: 1.0}, adapter_bytes=1, seed=0)


def test_cloud_sync_period_changes_what_travels():
    tree, slow, fast = tiny(cloud_sync_every=2)
    adapter = 10 * MBIT
    first = run(tree, server_round=1)  # global adapter comes down; sums stop at the neighbourhoods
    assert not first.cloud_sync
    assert first.bytes_down == {"end->neighbourhood": 2 * adapter, "neighbourhood->suburban": 2 * adapter,
                                "suburban->cloud": adapter}
    assert first.bytes_up == {"end->neighbourhood": 2 * adapter, "neighbourhood->suburban": 0, "suburban->cloud": 0}
    assert first.path_s[fast] == pytest.approx(0.027 + 0.101 + 5 + 0.101)
    second = run(tree, server_round=2)  # cell models come from the neighbourhoods; sync to the cloud
    assert second.cloud_sync
    assert second.bytes_down == {"end->neighbourhood": 2 * adapter, "neighbourhood->suburban": 0, "suburban->cloud": 0}
    assert second.bytes_up == {"end->neighbourhood": 2 * adapter, "neighbourhood->suburban": 2 * adapter,
                               "suburban->cloud": adapter}
    assert second.path_s[fast] == pytest.approx(0.101 + 5 + 0.101 + 0.027)
    forced = run(tree, server_round=3, cloud_sync=True)  # e.g. the last round
    assert forced.cloud_sync and forced.bytes_up["suburban->cloud"] == adapter


def test_femto_passengers_go_through_their_vehicle():
    topo = TopologyConfig(kind="tree", suburban_cells=1, neighbourhoods_per_suburban=2, femto=FemtoConfig(1, 0.5))
    tree = build_tree(topo, 40, seed=2)
    passengers = [c for c in tree.clients if tree.cells[tree.initial[c]].tier == "femto"]
    vehicles = {tree.initial[c] for c in passengers}
    assert passengers and len(vehicles) == 2
    net = run(tree, adapter=10)
    assert net.bytes_up["end->femto"] == 10 * len(passengers)
    assert net.bytes_up["femto->neighbourhood"] == 10 * len(vehicles)
    assert net.bytes_up["end->neighbourhood"] == 10 * (40 - len(passengers))
    assert net.bytes_up["neighbourhood->suburban"] == 20 and net.bytes_up["suburban->cloud"] == 10
    assert net.bytes_down == net.bytes_up


def test_availability_draws_are_deterministic_and_follow_the_profile():
    topo = TopologyConfig(profiles={"flaky": DeviceProfileConfig(availability=0.3)}, profile_mix={"flaky": 1.0})
    tree = build_tree(topo, 2000, seed=0)
    off = unavailable(tree, tree.clients, 3, seed=7)
    assert off == unavailable(tree, reversed(tree.clients), 3, seed=7)  # order does not matter
    assert off != unavailable(tree, tree.clients, 4, seed=7) != unavailable(tree, tree.clients, 3, seed=8)
    assert 0.65 < len(off) / 2000 < 0.75
    assert all(not is_available(tree, c, 3, 7) for c in off)
    assert "availability 0.3" in next(iter(off.values()))
    net = simulate_round(tree, tree.initial, 3, selected=range(100), train_s={c: 1.0 for c in range(100)},
                         adapter_bytes=1, seed=7)
    assert set(net.stragglers) == set(unavailable(tree, range(100), 3, seed=7))
    assert net.bytes_down["end->cloud"] == 100 - len(net.stragglers)
    always = build_tree(TopologyConfig(), 50, seed=0)
    assert unavailable(always, always.clients, 1, seed=0) == {}
    never = build_tree(TopologyConfig(profiles={"off": DeviceProfileConfig(availability=0.0)}, profile_mix={"off": 1.0}), 50, 0)
    assert len(unavailable(never, never.clients, 1, seed=0)) == 50


# ------------------------------------------------------------------ shared access links


def test_fair_rates_water_fill_capped_transfers_first():
    assert fair_rates([100, 100], 100) == [50, 50]
    assert fair_rates([10, 1000, 1000], 100) == [10, 45, 45]  # the capped one frees its share
    assert fair_rates([10, 20], 100) == [10, 20]  # both under their equal share: capacity unused
    assert fair_rates([], 100) == []


def test_processor_sharing_finish_order_and_times():
    link = Link("end->neighbourhood", 100, 0.0)  # 100 Mbit/s
    # Two transfers start together: 1 and 3 Mbit. They share 50/50 until the small one
    # ends at 2 x 1 Mbit / 100 = 0.02 s; the large one has 2 Mbit left at the full rate.
    done = share_link(link, [Transfer("big", 0.0, 3 * MBIT), Transfer("small", 0.0, MBIT)])
    assert done["small"] == pytest.approx(0.02) and done["big"] == pytest.approx(0.04)
    # A late arrival slows the one in progress: A (2 Mbit) alone for 0.01 s (1 Mbit), then
    # A and B (2 Mbit) at 50 each: A's last Mbit takes 0.02 s, B has 1 Mbit left, alone.
    done = share_link(link, [Transfer("B", 0.01, 2 * MBIT), Transfer("A", 0.0, 2 * MBIT)])
    assert done["A"] == pytest.approx(0.03) and done["B"] == pytest.approx(0.04)
    # A device cap leaves the rest of the capacity to the others; latency (the larger of
    # link and device floor) comes once, after the last bit.
    link = Link("end->neighbourhood", 100, 1.0)
    done = share_link(link, [Transfer("pi", 0.0, MBIT, cap_mbps=10, floor_ms=5), Transfer("laptop", 0.0, 9 * MBIT)])
    assert done["laptop"] == pytest.approx(0.1 + 0.001)  # 90 Mbit/s while the Pi uses 10
    assert done["pi"] == pytest.approx(0.1 + 0.005)
    # Dedicated (per-message) link: everyone alone at the full rate.
    dedicated = Link("end->cloud", 100, 0.0, shared=False)
    assert share_link(dedicated, [Transfer(i, 0.0, MBIT) for i in range(5)]) == {i: pytest.approx(0.01) for i in range(5)}
    with pytest.raises(ValueError, match="duplicate"):
        share_link(link, [Transfer(1, 0.0, 1), Transfer(1, 0.0, 1)])


def one_cell(n, *, shared=True, deadline_s=0.0, profile=None):
    """n END clients in one neighbourhood cell whose access link is the bottleneck."""
    profiles = {"dev": profile or DeviceProfileConfig(compute_speed=1.0, uplink_mbps=1000, downlink_mbps=1000)}
    links = LinksConfig(
        end_neighbourhood=LinkConfig(100, 1, shared=shared),
        neighbourhood_suburban=LinkConfig(1000, 2),
        suburban_cloud=LinkConfig(1000, 5),
    )
    topo = TopologyConfig(kind="tree", suburban_cells=1, neighbourhoods_per_suburban=1, profiles=profiles,
                          profile_mix={"dev": 1.0}, links=links, deadline_s=deadline_s)
    return build_tree(topo, n, seed=0)


@pytest.mark.parametrize("n", [1, 2, 5, 20])
def test_round_time_grows_linearly_with_clients_on_a_shared_access_link(n):
    adapter = MBIT  # 1 Mbit: 0.01 s alone on the 100 Mbit/s access link
    net = run(one_cell(n), adapter=adapter, train=10.0)
    forward = 0.003 + 0.006  # metro + backhaul at 1 Gbit/s, one copy / one sum each
    # n downloads share the access link (n x 0.01 s), all train 10 s, n uploads share it again.
    expected = forward + (n * 0.01 + 0.001) + 10.0 + (n * 0.01 + 0.001) + forward
    assert net.sim_network_s == pytest.approx(expected)
    assert all(p == pytest.approx(expected) for p in net.path_s.values())
    # The per-message model does not grow: everyone as if alone.
    alone = run(one_cell(n, shared=False), adapter=adapter, train=10.0)
    assert alone.sim_network_s == pytest.approx(forward + 0.011 + 10.0 + 0.011 + forward)
    assert net.bytes_up == alone.bytes_up and net.bytes_down == alone.bytes_down  # sharing moves time, not bytes
    if n == 1:
        assert net.sim_network_s == pytest.approx(alone.sim_network_s)


def test_staggered_uploads_share_only_while_they_overlap():
    # Reference training 1 s for the first client, 1.05 s for the second: the second
    # upload starts half-way through the first (10 Mbit at 100 Mbit/s = 0.1 s alone).
    tree = one_cell(2, profile=DeviceProfileConfig(uplink_mbps=1000, downlink_mbps=1000))
    a, b = tree.clients
    net = simulate_round(tree, tree.initial, 1, selected=[a, b], train_s={a: 1.0, b: 1.05}, adapter_bytes=10 * MBIT, seed=0)
    down = 0.027 + 0.2 + 0.001  # both downloads share: 2 x 0.1 s
    # a alone 0.05 s (5 Mbit), then both at 50: a's last 5 Mbit 0.1 s; b sent 5, then alone 5 Mbit 0.05 s.
    assert net.path_s[a] == pytest.approx(down + 1.0 + 0.15 + 0.001 + 0.027)
    assert net.path_s[b] == pytest.approx(down + 1.0 + 0.2 + 0.001 + 0.027)
    assert net.path_s[a] < net.path_s[b]


def test_failed_replies_still_share_the_downlink():
    tree = one_cell(4)
    c = tree.clients
    net = simulate_round(tree, tree.initial, 1, selected=c, train_s={c[0]: 1.0}, adapter_bytes=MBIT, seed=0)
    # 4 downloads share the link (0.04 s), then c0 uploads alone (0.01 s).
    assert net.path_s == {c[0]: pytest.approx(0.009 + 0.041 + 1.0 + 0.011 + 0.009)}
    assert net.bytes_down["end->neighbourhood"] == 4 * MBIT and net.bytes_up["end->neighbourhood"] == MBIT


def test_deadline_stragglers_follow_the_shared_finish_times():
    # 10 clients with different training times; 10 Mbit uploads at 100 Mbit/s would take
    # 0.1 s alone. The per-message model keeps everyone under the deadline; on the shared
    # link the uploads pile up and the later ones miss it.
    n = 10
    tree = one_cell(n, deadline_s=2.8)
    train = {c: 1.0 + 0.05 * i for i, c in enumerate(tree.clients)}
    kw = dict(selected=tree.clients, train_s=train, adapter_bytes=10 * MBIT, seed=0)
    shared = simulate_round(tree, tree.initial, 1, **kw)
    alone = simulate_round(one_cell(n, shared=False, deadline_s=2.8), tree.initial, 1, **kw)
    assert alone.stragglers == {} and alone.sim_network_s == pytest.approx(0.027 + 0.101 + 1.45 + 0.101 + 0.027)
    # The link never idles once the first upload starts (at 0.027 + 1.001 + 1.0 s), so the
    # last upload ends when all 100 Mbit have crossed at 100 Mbit/s.
    assert max(shared.path_s.values()) == pytest.approx(0.027 + 1.001 + 1.0 + 1.0 + 0.001 + 0.027)
    late = [c for c in tree.clients if shared.path_s[c] > 2.8]
    assert 0 < len(late) < n
    assert sorted(shared.stragglers) == late
    assert all("past the deadline" in why for why in shared.stragglers.values())
    assert shared.survivors == [c for c in tree.clients if c not in late]
    assert shared.sim_network_s == pytest.approx(max(shared.path_s[c] for c in shared.survivors)) and shared.sim_network_s <= 2.8
    assert shared.bytes_up["end->neighbourhood"] == 10 * MBIT * len(shared.survivors)
    # Clients that trained longer finish later under processor sharing here (equal sizes).
    order = sorted(tree.clients, key=lambda c: shared.path_s[c])
    assert order == sorted(tree.clients, key=lambda c: train[c])


def test_cells_do_not_share_each_others_access_link():
    topo = TopologyConfig(kind="tree", suburban_cells=1, neighbourhoods_per_suburban=2, profiles=dict(PROFILES),
                          profile_mix={"fast": 1.0}, links=LINKS)
    two = build_tree(topo, 2, seed=0)  # one client per cell
    assert two.initial[0] != two.initial[1]
    both = run(two, adapter=10 * MBIT)
    only = run(two, clients=[0], adapter=10 * MBIT)
    assert both.path_s[0] == pytest.approx(only.path_s[0])
