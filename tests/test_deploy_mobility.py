"""Devices that move between edges in a deployment (issue 11).

Pure parts first (no Flower, no sockets): where the edges' reports place each device
(:mod:`fedlora.world.attachments`), the candidate cells a plan gives a device and the edges
that register it, the device's choice of edge and its moves (:mod:`fedlora.deploy.attach`),
and the cloud's round loop placing a moving device by the reports (in-process, secure
aggregation). Then one loopback deployment from a plan (marked slow and flower; TLS, node
auth, secure aggregation, 2 edges, 5 END devices): a device moves to the other edge between
round 1 and round 2 and is counted once, in its new cell, in round 2. Run it under the Flower
lock: ``flock /tmp/fedlora-flower.lock python -m pytest -q tests/test_deploy_mobility.py``.
"""

from __future__ import annotations

import json
import sys

import pytest
import yaml
from test_deployment import OVERRIDES, _logs, _online, _rounds, _wait

from fedlora.config import compose
from fedlora.deploy.attach import ATTACHMENT_FILE, CELL_FILE, Attachment, candidates
from fedlora.deploy.plan import DeploySettings, PlanError, read_node, write_plan
from fedlora.deploy.processes import ProcessGroup, free_port_run, placement
from fedlora.world.attachments import EdgeReport, candidate_cells, place_devices, tracks_devices
from fedlora.world.topology import build_tree

A, B = "neighbourhood-0-0", "neighbourhood-0-1"
TWO_CELLS = ["topology=small6g", "topology.suburban_cells=1", "topology.neighbourhoods_per_suburban=2"]
ROAMING = ["topology.mobility.model=random_walk", "topology.mobility.handover_prob=0.5", "topology.mobility.far_prob=0"]
ALWAYS_ON = [f"topology.profiles.{p}.availability=1.0" for p in ("rpi4", "phone", "car", "laptop")]  # no simulated dropouts


def _tree(*overrides: str, n: int = 6):
    cfg = compose(["model=tiny", *TWO_CELLS, f"federation.num_clients={n}", *overrides])
    return build_tree(cfg.topology, n, cfg.seed)


# -- where the edges' reports put each device -------------------------------------------------


def test_each_device_is_placed_once_in_the_cell_that_reports_it():
    tree = _tree(*ROAMING)
    home = dict(tree.initial)
    mover = min(c for c, cell in home.items() if cell == A)
    reports = [EdgeReport(A, {c: 1 for c, cell in home.items() if cell == A and c != mover}),
               EdgeReport(B, {**{c: 1 for c, cell in home.items() if cell == B}, mover: 2})]
    placed = place_devices(tree, home, reports)
    assert placed.cell_of == {**home, mover: B}
    assert placed.moved == {mover: (A, B)} and placed.unreported == [] and placed.several == {}
    # Nobody reported: everyone stays where they were (their edge waits for them, or drops them).
    assert place_devices(tree, home, []).cell_of == home
    assert place_devices(tree, home, []).unreported == sorted(home)
    # Unknown clients in a report are ignored; a report for a cell of another topology is an error.
    assert place_devices(tree, home, [EdgeReport(B, {99: 1})]).cell_of == home
    with pytest.raises(ValueError, match="no neighbourhood cell"):
        place_devices(tree, home, [EdgeReport("neighbourhood-7-7", {})])


def test_a_device_reported_by_two_edges_is_placed_by_its_newest_attachment():
    tree = _tree(*ROAMING)
    home = dict(tree.initial)
    c = min(c for c, cell in home.items() if cell == A)
    # Its old edge has not seen it leave yet: the newer attachment wins, whichever cell that is.
    placed = place_devices(tree, home, [EdgeReport(A, {c: 3}), EdgeReport(B, {c: 2})])
    assert placed.cell_of[c] == A and placed.several == {c: [A, B]} and placed.moved == {}
    assert place_devices(tree, home, [EdgeReport(A, {c: 2}), EdgeReport(B, {c: 3})]).cell_of[c] == B
    # Devices that do not count (by hand, --insecure): the cell it was not in (it moved there).
    assert place_devices(tree, home, [EdgeReport(A, {c: 0}), EdgeReport(B, {c: 0})]).cell_of[c] == B


def test_a_passenger_keeps_its_vehicle_in_its_own_neighbourhood_and_leaves_it_elsewhere():
    tree = _tree(*ROAMING, "topology.femto.per_neighbourhood=1", "topology.femto.passenger_fraction=1.0")
    rider = min(tree.initial)
    leaf = tree.initial[rider]
    here = tree.neighbourhood_of(leaf)
    other = B if here == A else A
    assert leaf.startswith("femto-")
    assert place_devices(tree, tree.initial, [EdgeReport(here, {rider: 1})]).cell_of[rider] == leaf
    assert place_devices(tree, tree.initial, [EdgeReport(other, {rider: 1})]).cell_of[rider] == other


def test_candidate_cells_follow_the_mobility_model(tmp_path):
    assert not tracks_devices(_tree("topology.mobility.model=none"))
    assert not tracks_devices(_tree("topology=flat"))
    for overrides, others in [(["topology.mobility.model=none"], False), (ROAMING, True),
                              (["topology.mobility.model=random_walk", "topology.mobility.handover_prob=0"], False)]:
        tree = _tree(*overrides)
        for c, leaf in tree.initial.items():
            other = B if leaf == A else A
            assert candidate_cells(tree, c) == ([leaf, other] if others else [leaf]), overrides
    # Four cells under two sub-urban cells: siblings only, or every cell when far handovers may happen.
    cfg = compose(["model=tiny", "topology=small6g", "federation.num_clients=8", *ROAMING])
    tree = build_tree(cfg.topology, 8, cfg.seed)
    c = min(c for c, leaf in tree.initial.items() if leaf == "neighbourhood-1-0")
    assert candidate_cells(tree, c) == ["neighbourhood-1-0", "neighbourhood-1-1"]
    far = build_tree(compose(["model=tiny", "topology=small6g", "federation.num_clients=8", *ROAMING,
                              "topology.mobility.far_prob=0.2"]).topology, 8, cfg.seed)
    assert candidate_cells(far, c) == ["neighbourhood-1-0", "neighbourhood-0-0", "neighbourhood-0-1", "neighbourhood-1-1"]
    trace = tmp_path / "trace.csv"
    trace.write_text(f"round,client,cell\n3,{c},neighbourhood-0-1\n5,{c},neighbourhood-1-0\n")
    traced = build_tree(compose(["model=tiny", "topology=small6g", "federation.num_clients=8",
                                 "topology.mobility.model=trace", f"topology.mobility.trace_path={trace}"]).topology,
                        8, cfg.seed)
    assert candidate_cells(traced, c) == ["neighbourhood-1-0", "neighbourhood-0-1"]


# -- the plan: candidate cells, registered with every candidate edge --------------------------


def test_plan_registers_a_roaming_device_with_every_candidate_edge(tmp_path):
    cfg = compose(["model=tiny", *TWO_CELLS, "federation.num_clients=4", *ROAMING])
    nodes = write_plan(cfg, tmp_path / "p")
    out = tmp_path / "p"
    for name, node in nodes.items():
        if node.role != "end":
            continue
        doc = yaml.safe_load((out / name / "node.yaml").read_text())
        home = doc["supernode"]["upstream"]
        listed = doc["candidate_cells"]
        assert list(listed) == [home[len("edge-"):], *(c for c in (A, B) if f"edge-{c}" != home)]
        for cell, edge in listed.items():
            edge_doc = yaml.safe_load((out / f"edge-{cell}" / "node.yaml").read_text())
            assert edge["edge"] == f"edge-{cell}" and edge["superlink"] == edge_doc["superlink"]["address"]
            # That edge admits this device's SuperNode key under its name.
            assert (out / f"edge-{cell}" / "supernodes" / f"{name}.pub").read_bytes() == \
                (out / name / "auth" / "supernode_key.pub").read_bytes()
            assert edge_doc["superlink"]["registered_supernodes"][name] == f"supernodes/{name}.pub"
        assert candidates(read_node(out / name)) == {c: e["superlink"] for c, e in listed.items()}
    assert json.loads((out / "plan.json").read_text())["nodes"]["end-0"]["candidate_cells"]


def test_plan_without_mobility_keeps_each_device_with_its_home_edge(tmp_path):
    cfg = compose(["model=tiny", *TWO_CELLS, "federation.num_clients=4", "topology.mobility.model=none"])
    nodes = write_plan(cfg, tmp_path / "p")
    for cell, clients in placement(cfg).items():
        assert sorted(nodes[f"edge-{cell}"].children) == sorted(f"end-{c}" for c in clients)
        for c in clients:
            assert list(candidates(read_node(tmp_path / "p" / f"end-{c}"))) == [cell]
    with pytest.raises(PlanError, match="topology.mobility.model"):
        write_plan(cfg, tmp_path / "q", DeploySettings(candidate_cells="all"))
    with pytest.raises(PlanError, match="--candidate-cells"):
        write_plan(cfg, tmp_path / "r", DeploySettings(candidate_cells="some"))
    cfg = compose(["model=tiny", "topology=small6g", "federation.num_clients=8", *ROAMING])
    nodes = write_plan(cfg, tmp_path / "s", DeploySettings(candidate_cells="all"))
    assert all(len(n.children) == 8 for n in nodes.values() if n.role == "edge")


# -- the device: which edge it attaches to, and its moves -------------------------------------


def test_a_device_attaches_to_one_candidate_edge_and_moves_when_state_cell_says(tmp_path, caplog):
    cfg = compose(["model=tiny", *TWO_CELLS, "federation.num_clients=4", *ROAMING])
    write_plan(cfg, tmp_path / "p")
    node = read_node(tmp_path / "p" / "end-0")
    cells = candidates(node)
    home, other = list(cells)
    attached = Attachment(node)
    assert (attached.cell, attached.superlink, attached.node_config()) == (home, cells[home], {"attachment": 1})
    assert attached.poll() is None
    node.path(CELL_FILE).write_text(other + "\n")
    assert attached.poll() == (cells[other], {"attachment": 2})
    assert attached.cell == other and attached.poll() is None
    assert json.loads(node.path(ATTACHMENT_FILE).read_text()) == {"cell": other, "attachment": 2}
    node.path(CELL_FILE).write_text("neighbourhood-9-9\n")  # no candidate: it stays, and says so once
    assert attached.poll() is None and attached.poll() is None and attached.cell == other
    assert sum("none of its candidate cells" in r.message for r in caplog.records) == 1
    # A restarted launcher: --cell chooses (and is remembered in state/cell); the count goes on.
    again = Attachment(node, home)
    assert again.cell == home and again.node_config() == {"attachment": 3}
    assert node.path(CELL_FILE).read_text().strip() == home and Attachment(node).cell == home
    with pytest.raises(PlanError, match="none of this device's candidate cells"):
        Attachment(node, "neighbourhood-9-9")
    # Without mobility a device has one edge and tells it nothing new.
    write_plan(compose(["model=tiny", *TWO_CELLS, "federation.num_clients=4", "topology.mobility.model=none"]),
               tmp_path / "q")
    fixed = Attachment(read_node(tmp_path / "q" / "end-0"))
    assert not fixed.roams and fixed.node_config() == {}


def test_cli_candidate_cells_and_cell_options(tmp_path, capsys):
    from fedlora.cli import main

    main(["deploy", "plan", str(tmp_path / "p"), "model=tiny", "topology=small6g", "federation.num_clients=8", *ROAMING,
          "--candidate-cells", "all"])
    assert len(candidates(read_node(tmp_path / "p" / "end-0"))) == 4
    for argv, message in [
        (["deploy", "plan", str(tmp_path / "q"), "model=tiny", "topology.mobility.model=none", "--candidate-cells", "all"],
         "topology.mobility.model"),
        (["client", "--insecure", "--partition-id", "0", "--num-partitions", "2", "--edge", "h:1", "--cell", A],
         "use it with --config"),
        (["client", "--config", str(tmp_path / "p" / "end-0"), "--cell", "neighbourhood-9-9"], "candidate cells"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_process_of_a_group_is_replaced_with_its_descendants(tmp_path):
    """How a moving device's SuperNode is restarted towards its new edge (ProcessGroup.replace)."""
    sleeper = [sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
               "'import time; time.sleep(60)']); time.sleep(60)"]
    with ProcessGroup(tmp_path / "logs") as group:
        first = group.start("supernode", sleeper, {})
        _wait(lambda: len(group.tree()) == 2, 30, "the process and its child")
        old = group.tree()
        second = group.replace("supernode", [*sleeper[:-1], sleeper[-1].replace("60", "61")])
        assert first.poll() is not None and second.poll() is None and not set(old) & set(group.tree())
    assert group.leftovers() == []


# -- the cloud's round loop with the edges' reports (in-process) ------------------------------


def test_the_cloud_places_a_moved_device_in_the_cell_its_edge_reports(short_run, tmp_path):
    from fedlora.roles.cloud import run_federation
    from fedlora.roles.local import InProcessTransport

    cfg = short_run(*TWO_CELLS, *ROAMING, *ALWAYS_ON, "privacy=secagg",
                    "federation.num_clients=5", "federation.fraction=1.0", "federation.rounds=2", "train.local_steps=1",
                    "train.max_seq_len=64", "data.records_per_client=8", "data.max_eval_examples=4")
    home = build_tree(cfg.topology, 5, cfg.seed).initial
    ends_a = sorted(c for c, cell in home.items() if cell == A)
    assert len(ends_a) == 3
    mover = ends_a[0]

    class Edges:  # the edges' reports: the mover is attached to B from round 2 on
        asked: list[int] = []

        def reports(self, server_round):
            self.asked.append(server_round)
            now = {**home, mover: B} if server_round >= 2 else dict(home)
            return [EdgeReport(cell, {c: 1 + (c == mover and server_round >= 2) for c, at in now.items() if at == cell})
                    for cell in (A, B)]

    locator = Edges()
    run_federation(cfg, tmp_path / "run", InProcessTransport(5), locator=locator)
    assert locator.asked == [1, 2]
    rounds = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    _counted_once_in_its_new_cell(rounds, mover, list(range(5)))


def _counted_once_in_its_new_cell(rounds: list[dict], mover: int, everyone: list[int]) -> None:
    """Round 1 in its home cell A, round 2 in B: a participant once, in B's secure sum, not A's."""
    first, second = rounds
    for record in rounds:
        assert record["participants"] == everyone and record["dropped"] == [], record
        assert record["secure"]["clients_in_sum"] == len(everyone)
        assert all(cell["ok"] for cell in record["secure"]["cells"].values()), record["secure"]
    assert first["cell_of"][str(mover)] == A and mover in first["secure"]["cells"][A]["survivors"]
    assert second["cell_of"][str(mover)] == B
    cells = second["secure"]["cells"]
    assert mover in cells[B]["survivors"] and mover not in cells[A]["survivors"]
    assert sorted(cells[A]["survivors"] + cells[B]["survivors"]) == everyone


# -- a loopback deployment: a device moves to the other edge between rounds -------------------


FEDLORA = [sys.executable, "-m", "fedlora.cli"]
# two rounds (one move between them), whatever the deployment test's own count
DEPLOYED = [o for o in OVERRIDES if not o.startswith(("topology.mobility.", "federation.num_clients=", "federation.rounds="))] + \
    ["federation.num_clients=5", "federation.rounds=2", *ROAMING, *ALWAYS_ON]


@pytest.mark.flower
@pytest.mark.slow
def test_a_device_moves_to_the_other_edge_between_rounds_and_is_counted_once_there(tmp_path, env):
    cfg = compose(DEPLOYED)
    cells = placement(cfg)
    assert sorted(cells) == [A, B] and [len(cells[A]), len(cells[B])] == [3, 2]
    out = tmp_path / "plan"
    write_plan(cfg, out, DeploySettings(base_port=free_port_run(3), runtime_port_base=free_port_run(7)), overrides=DEPLOYED)
    env = dict(env, PYTHONUNBUFFERED="1")
    mover = cells[A][0]
    everyone = sorted(cells[A] + cells[B])
    run_dir = out / "cloud" / "run"
    with ProcessGroup(tmp_path / "logs") as group:
        try:
            for cell in (A, B):
                group.start(f"edge-{cell}", [*FEDLORA, "edge", "--config", str(out / f"edge-{cell}")], env)
            for c in everyone:
                group.start(f"end-{c}", [*FEDLORA, "client", "--config", str(out / f"end-{c}")], env)
            for cell in (A, B):
                n = len(cells[cell])
                _wait(lambda e=out / f"edge-{cell}", n=n: _online(e, env) == n, 240, f"edge-{cell}'s devices", group)
            cloud = group.start("cloud", [*FEDLORA, "cloud", "--config", str(out / "cloud")], env)
            _wait(lambda: len(_rounds(run_dir)) >= 1, 420, "round 1", group)

            # Between rounds (federation.round_pause_s) the device hands over to B's edge.
            (out / f"end-{mover}" / CELL_FILE).write_text(B + "\n")
            _wait(lambda: _online(out / f"edge-{A}", env) == 2 and _online(out / f"edge-{B}", env) == 3, 60,
                  f"end-{mover} to leave edge A and join edge B", group)
            assert len(_rounds(run_dir)) == 1, "the move took longer than federation.round_pause_s"

            assert cloud.wait(timeout=600) == 0, _logs(out / "cloud" / "logs", group.log_dir)
        except BaseException:
            print(_logs(out / "cloud" / "logs", out / f"edge-{A}" / "logs", out / f"edge-{B}" / "logs", group.log_dir))
            raise
    assert group.leftovers() == [], "processes left running"
    _counted_once_in_its_new_cell(_rounds(run_dir), mover, everyone)
    assert f"moving from {A} to {B}" in (tmp_path / "logs" / f"end-{mover}.log").read_text()
    assert json.loads((out / f"end-{mover}" / ATTACHMENT_FILE).read_text()) == {"cell": B, "attachment": 2}
    service = (out / f"edge-{B}" / "spool" / "service.log").read_text()
    assert f"3 device(s) connected: {sorted(cells[B] + [mover])}" in service, service[-3000:]
    assert f"client {mover} moved from {A} to {B}" in (out / "cloud" / "logs" / "run.log").read_text()


# -- the edges' reports over a Grid (a stand-in for Flower's, no processes) -------------------


class _Reply:
    def __init__(self, src: int, reply_to: str, content: dict):
        self.metadata = type("Meta", (), {"src_node_id": src, "reply_to_message_id": reply_to})()
        self.content = content

    def has_error(self):
        return False


class _Grid:
    """Answers each pushed message at once with ``answer(node, message_type)`` (a dict of records)."""

    def __init__(self, nodes, answer):
        self.nodes, self.answer, self.replies, self.sent = list(nodes), answer, [], []

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            ids.append(f"m{len(self.sent)}-{i}")
            self.sent.append(msg.metadata.message_type)
            self.replies.append(_Reply(msg.metadata.dst_node_id, ids[-1], self.answer(msg.metadata.dst_node_id,
                                                                                       msg.metadata.message_type)))
        return ids

    def pull_messages(self, ids):
        out, self.replies = [r for r in self.replies if r.metadata.reply_to_message_id in ids], []
        return out


def test_an_edge_reports_its_connected_devices_and_the_cloud_reads_the_reports(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora import protocol
    from server.edge import ChildTransport, EdgeCellRunner

    for name in ("_task_id", "_run_id", "_node_id"):  # what a ServerApp process has set when it builds a Message
        monkeypatch.setattr(TaskIdentity, name, 1)

    # The edge: END devices 3 (second attachment) and 4 (by hand, no count) on nodes 30 and 40.
    def end(node, kind):
        record = {protocol.CLIENT_ID_KEY: node // 10}
        if node == 30:
            record[protocol.ATTACHMENT_KEY] = 2
        return {protocol.IDENTITY: record}

    grid = _Grid([30, 40], end)
    children = ChildTransport(grid)
    assert children.report() == {3: 2, 4: 0}
    grid.nodes = [40]  # device 3 left for another edge
    assert children.report() == {4: 0} and grid.sent.count("query") == 2  # nobody is asked twice

    # The cloud: edges of A and B on nodes 1 and 2; each answers a report query with its devices.
    def edge(node, kind):
        cell = A if node == 1 else B
        if kind == "query":
            return {protocol.IDENTITY: {protocol.ROLE_KEY: protocol.EDGE_ROLE, protocol.CELL_KEY: cell}}
        assert kind == f"query.{protocol.REPORT}"
        return {protocol.REPORT: {protocol.REPORT_KEY: json.dumps({"0": 1} if node == 1 else {"3": 2, "4": 0})}}

    tree = _tree(*ROAMING)
    runner = EdgeCellRunner(_Grid([1, 2], edge), tree, timeout_s=5, connect_timeout_s=5, track_devices=True)
    assert runner.clients() == tree.clients  # a roaming device may train wherever it is reported
    reports = sorted(runner.reports(1), key=lambda r: r.cell)
    assert reports == [EdgeReport(A, {0: 1}), EdgeReport(B, {3: 2, 4: 0})]
    fixed = EdgeCellRunner(_Grid([1], edge), tree, timeout_s=5, connect_timeout_s=1)
    assert fixed.clients() == sorted(c for c, cell in tree.initial.items() if cell == A)  # only A's edge is there


def test_an_idle_edge_identifies_devices_that_join_before_any_request(monkeypatch, tmp_path):
    """A device that (re)joins between rounds is identified while the edge is idle, so the next
    round finds it at once; a stop file ends the service loop."""
    import threading
    import time

    from flwr.supercore.task_identity import TaskIdentity

    from fedlora import protocol
    from fedlora.deploy.spool import Spool
    from server import edge

    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    monkeypatch.setattr(edge, "IDLE_FIND_S", 0.05)
    grid = _Grid([], lambda node, kind: {protocol.IDENTITY: {protocol.CLIENT_ID_KEY: node // 10}})
    children = edge.ChildTransport(grid, connect_timeout_s=5)
    spool = Spool(tmp_path / "spool")
    served = []
    loop = threading.Thread(target=lambda: served.append(edge._serve_loop(A, spool, children, None)))
    loop.start()
    try:
        grid.nodes = [30, 50]  # two devices join; no request has come
        deadline = time.time() + 10
        while set(children.node_of) != {3, 5} and time.time() < deadline:
            time.sleep(0.05)
        assert children.node_of == {3: 30, 5: 50}
        assert grid.sent == ["query", "query"]  # each identified once, however often the edge looks
    finally:
        (spool.root / "stop").touch()
        loop.join(10)
    assert not loop.is_alive() and served == [0]


def test_a_freshly_started_edge_waits_longer_for_its_rejoining_devices():
    from server import edge

    children = edge.ChildTransport(_Grid([], None), connect_timeout_s=30)
    assert edge.REJOIN_S - 1 < children.find_wait_s() <= edge.REJOIN_S  # just started: devices still rejoining
    children.started -= edge.REJOIN_S
    assert children.find_wait_s() == 30  # long after: the usual wait
    assert edge.RELAY_MARGIN_S > edge.REJOIN_S and edge.CLOUD_MARGIN_S > edge.RELAY_MARGIN_S  # nobody gives up first
