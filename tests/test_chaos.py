"""The chaos soak's pure half (fedlora.deploy.chaos): the seeded fault schedule, when a fault is due,
the checks of a run's records and the namespace/netem command lines -- no processes, no network."""

from __future__ import annotations

import copy

import pytest

from fedlora.deploy import chaos

MACHINES = chaos.Machines("cloud", ["edge-a", "edge-b"], [f"end-{i}" for i in range(6)])


def test_schedule_is_seeded_and_keeps_tier_kills_apart_and_out_of_the_last_round():
    s = chaos.ChaosSettings(seed=3, rounds=10)
    faults = chaos.fault_schedule(s, MACHINES)
    assert faults == chaos.fault_schedule(s, MACHINES)
    assert faults != chaos.fault_schedule(chaos.ChaosSettings(seed=4, rounds=10), MACHINES)
    kinds = [f.kind for f in faults]
    assert kinds.count(chaos.KILL) == s.device_kills + s.edge_kills + s.cloud_kills
    assert kinds.count(chaos.KILL_RESIDENT) == s.resident_kills
    assert kinds.count(chaos.NETEM) == s.netems and kinds.count(chaos.PARTITION) == s.partitions
    tier = [f for f in faults if f.kind == chaos.KILL and not f.target.startswith("end-")]
    assert sum(f.target == "cloud" for f in tier) == s.cloud_kills
    assert len({f.round for f in tier}) == len(tier) and all(f.round < s.rounds for f in tier)
    assert all(1 <= f.round <= s.rounds and 0 <= f.at < s.spread for f in faults)
    assert all(f.trigger in chaos.STAGES and f.target.startswith("end-") for f in faults if f.kind == chaos.KILL_RESIDENT)
    assert all(f.target != "cloud" for f in faults if f.kind in (chaos.NETEM, chaos.PARTITION))
    assert [f.id for f in faults] == list(range(len(faults)))
    assert [(f.round, f.at) for f in faults] == sorted((f.round, f.at) for f in faults)


@pytest.mark.parametrize("bad, match", [({"rounds": 1}, "at least 2 rounds"), ({"rounds": 3, "cloud_kills": 3}, "distinct"),
                                        ({"netems": -1}, "netems=-1")])
def test_schedule_refuses_what_it_cannot_do(bad, match):
    with pytest.raises(chaos.ChaosError, match=match):
        chaos.fault_schedule(chaos.ChaosSettings(**bad), MACHINES)


def test_due_by_time_and_by_stage():
    timed = chaos.Fault(0, chaos.KILL, "end-1", 3, chaos.TIME, 0.4, 5.0)
    assert not chaos.due(timed, 2, 9.0, {}) and not chaos.due(timed, 3, 0.39, {})
    assert chaos.due(timed, 3, 0.4, {}) and chaos.due(timed, 4, 0.0, {})  # round 3 ended first: at once
    staged = chaos.Fault(1, chaos.KILL_RESIDENT, "end-1", 3, "masked-input", 0.0, 0.0)
    assert not chaos.due(staged, 3, 0.9, {"end-1": (3, "share-keys")})
    assert not chaos.due(staged, 3, 0.9, {"end-2": (3, "masked-input")})
    assert chaos.due(staged, 3, 0.0, {"end-1": (3, "masked-input")})
    assert chaos.due(staged, 4, 0.0, {"end-1": (4, "advertise")})  # missed in its round: the next stage seen


def _round(n, participants, dropped=(), cells=None, examples=None):
    record = {"round": n, "participants": list(participants), "dropped": [{"client": c, "reason": "gone"} for c in dropped],
              "num_examples": float(examples if examples is not None else 12 * len(participants))}
    if cells is not None:
        record["secure"] = {"cells": {k: {"ok": bool(v), "survivors": v} for k, v in cells.items()}}
    return record


ASKED = {r: list(range(6)) for r in range(1, 4)}
GOOD = [_round(1, range(6), cells={"a": [0, 1, 2], "b": [3, 4, 5]}),
        _round(2, [0, 1, 3, 4, 5], [2], cells={"a": [0, 1], "b": [3, 4, 5]}),
        _round(3, [3, 4, 5], [0, 1, 2], cells={"a": [], "b": [3, 4, 5]})]
EXAMPLES = {c: 12.0 for c in range(6)}


def test_a_sound_run_passes():
    assert chaos.check_rounds(GOOD, expected_rounds=3, asked=ASKED, examples_of=EXAMPLES) == []


@pytest.mark.parametrize("mutate, match", [
    (lambda rs: rs.pop(1), "not 1..3 once each"),
    (lambda rs: rs.insert(2, copy.deepcopy(rs[1])), "not 1..3 once each"),
    (lambda rs: rs[1]["dropped"].clear(), r"asked client\(s\) \[2\] neither joined nor dropped"),
    (lambda rs: rs[1]["dropped"][0].update(reason=""), "dropped without a reason"),
    (lambda rs: rs[0]["participants"].append(5), "listed twice"),
    (lambda rs: rs[1]["participants"].append(2), "both joined and dropped"),
    (lambda rs: rs[0]["secure"]["cells"]["b"]["survivors"].append(0), "survivors"),
    (lambda rs: rs[0].update(num_examples=84.0), "counted twice"),
    (lambda rs: rs[2]["secure"]["cells"]["a"].update(survivors=[0]), "aborted but counts"),
    (lambda rs: rs[0]["participants"].append(7), r"\[7\] recorded but not asked"),
])
def test_each_broken_promise_is_named(mutate, match):
    rounds = copy.deepcopy(GOOD)
    mutate(rounds)
    problems = chaos.check_rounds(rounds, expected_rounds=3, asked=ASKED, examples_of=EXAMPLES)
    assert any(__import__("re").search(match, p) for p in problems), problems


def test_survival_counts_injected_survived_and_recovered():
    machines = chaos.Machines("cloud", ["edge-a", "edge-b"], [f"end-{i}" for i in range(6)],
                              {f"end-{i}": "edge-a" if i < 3 else "edge-b" for i in range(6)})
    log = [{"kind": chaos.KILL, "target": "end-2", "fired_round": 1, "restored_round": 2},  # joins again in round 3? no
           {"kind": chaos.KILL, "target": "end-3", "fired_round": 1, "restored_round": 1},  # back in round 2
           {"kind": chaos.KILL, "target": "edge-b", "fired_round": 1, "restored_round": 2},  # its cell whole in round 3
           {"kind": chaos.KILL, "target": "cloud", "fired_round": 2, "restored_round": 2},
           {"kind": chaos.KILL, "target": "end-0", "fired_round": None},
           {"kind": chaos.NETEM, "target": "end-1", "fired_round": 3, "restored_round": 4}]  # put back after the run
    out = chaos.survival(log, GOOD, completed=True, machines=machines)
    assert out["by_kind"][chaos.KILL] == {"scheduled": 5, "injected": 4, "survived": 4, "recovered": 3, "unobservable": 0}
    assert out["by_kind"][chaos.NETEM] == {"scheduled": 1, "injected": 1, "survived": 1, "recovered": 0, "unobservable": 1}
    failed = chaos.survival(log, GOOD, completed=False, machines=machines)
    assert failed["survived"] == failed["recovered"] == 0


def test_namespace_commands_make_and_delete_the_same_names():
    made = chaos.netns_argvs("t", 120, 3)
    created = {a[3] for a in made if a[:3] == ["ip", "netns", "add"]}
    deleted = {a[3] for a in chaos.netns_cleanup_argvs("t", 3)}
    assert created == deleted == {"flc-t-hub", "flc-t-0", "flc-t-1", "flc-t-2"}
    addresses = [a[5] for a in made if "addr" in a]
    assert addresses == ["10.120.0.2/16", "10.120.0.3/16", "10.120.0.4/16"]
    link = chaos.Degrade(80, 10, 3, 512)
    netem = chaos.degrade_argvs("t", 1, link, netem=True)
    assert [a[3] for a in netem] == ["flc-t-1", "flc-t-hub"] and netem[0][-6:] == ["netem", "delay", "80ms", "10ms", "loss", "3%"]
    shaped = chaos.degrade_argvs("t", 1, link, netem=False)
    assert [a[4:7] for a in shaped[:2]] == [["tc", "qdisc", "replace"]] * 2 and "512kbit" in shaped[0]
    rules = [a for a in shaped if a[4:7] == ["nft", "add", "rule"]]
    assert [r[-9:] for r in rules] == [[iface, '"eth0"', "numgen", "random", "mod", "100", "<", "3", "drop"]
                                        for iface in ("oifname", "iifname")]
    cut = chaos.partition_argvs("t", 1)
    assert [r[-3:] for r in cut if "rule" in r] == [["oifname", '"eth0"', "drop"], ["iifname", '"eth0"', "drop"]]
    assert {tuple(a[4:7]) for a in chaos.restore_argvs("t", 1)} == {("tc", "qdisc", "del"), ("nft", "delete", "table")}


def test_process_group_kill_crashes_a_whole_tree_or_signals_only_its_head(tmp_path):
    import signal
    import time

    from fedlora.deploy.processes import ProcessGroup, _alive

    with ProcessGroup(tmp_path) as group:
        group.start("crash", ["bash", "-c", "sleep 60 & sleep 60 & wait"], {"PATH": "/usr/bin:/bin"})
        group.start("stop", ["bash", "-c", "trap 'kill $!; exit 0' TERM; sleep 60 & wait"], {"PATH": "/usr/bin:/bin"})
        time.sleep(0.5)
        crashed = group.kill("crash")
        assert len(crashed) == 3 and group.procs["crash"].wait(5) == -signal.SIGKILL
        stopped = group.kill("stop", signal.SIGTERM)
        assert group.procs["stop"].wait(5) == 0
        time.sleep(0.2)
        assert not any(_alive(p) for p in crashed + stopped)  # SIGTERM: the head stopped its own child
    assert group.leftovers() == []


def test_an_error_the_superlink_sends_for_a_node_is_that_nodes_reply(monkeypatch):
    """Found by the soak: Flower answers for a node that stopped beating (or a message that expired)
    itself, from SUPERLINK_NODE_ID; that answer must drop the node at once with Flower's reason,
    not be ignored as from an unknown node (the node then waited for as "no reply before the timeout")."""
    import time

    from flwr.app import RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from server.transport import FlowerTransport

    for name in ("_task_id", "_run_id", "_node_id"):  # what a ServerApp process has set when it builds a Message
        monkeypatch.setattr(TaskIdentity, name, 1)

    class Meta:  # like Flower's Metadata: read-only properties over __dict__ (which _exchange sets)
        src_node_id = property(lambda self: self.__dict__["_src_node_id"])
        reply_to_message_id = property(lambda self: self.__dict__["_reply_to_message_id"])

    class Reply:
        error = type("Error", (), {"reason": "Error: Node Unavailable - The destination node failed to report a heartbeat"})

        def __init__(self, src, reply_to):
            self.metadata = Meta()
            self.metadata.__dict__.update(_src_node_id=src, _reply_to_message_id=reply_to)

        def has_error(self):
            return True

    class Grid:
        def push_messages(self, messages):
            self.ids = [f"m{i}" for i in range(len(messages))]
            return self.ids

        def pull_messages(self, ids):  # both answered by the SuperLink itself
            return [Reply(SUPERLINK_NODE_ID, mid) for mid in self.ids if mid in ids]

    transport = FlowerTransport(Grid(), expected_clients=2, timeout_s=30)
    transport.node_of = {3: 30, 4: 40}
    t0 = time.time()
    replies = transport._ask({3: RecordDict(), 4: RecordDict()}, "train", "1", lambda reply: None, secure=False)
    assert time.time() - t0 < 5  # not the 30 s timeout
    assert sorted(r.client for r in replies) == [3, 4] and all("Node Unavailable" in r.error for r in replies), replies
