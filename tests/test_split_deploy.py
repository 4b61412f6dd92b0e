"""Split learning wired into a deployed round (fedlora/deploy/split_session.py), without Flower.

The cell rounds run exactly as a planned edge runs them (``server.edge.run_request`` with
``split_sessions``: its plan keys, its stream on loopback TLS with the plan's CA), and each END
device is a :class:`~fedlora.roles.warm_device.WarmDevice` with its plan folder, reached through the
device channel's own encoding -- only Flower's message transport is replaced by a stand-in
(``_Children``). The deployed split rounds must give the in-process simulation's adapter; a broken
stream, a device that cannot reach its edge and an edge that goes away mid-step are dropouts of
that round only.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedlora import protocol
from fedlora.deploy import channel
from fedlora.deploy.plan import DeploySettings, PlanError, read_node, write_plan
from fedlora.deploy.processes import free_port_run
from fedlora.deploy.split_session import SplitOrder, SplitOrderError, device_trainer, edge_address
from fedlora.deploy.stream import SplitStreamServer
from fedlora.roles.cloud import run_federation
from fedlora.roles.local import InProcessTransport
from fedlora.roles.neighbourhood import AggregatorKeys, ClientReply
from fedlora.roles.warm_device import WarmDevice
from fedlora.run_settings import resolve_run
from server.edge import run_request, split_sessions

pytestmark = pytest.mark.slow

# One neighbourhood edge, three END devices: clients 1 and 2 are phones too small to train the tiny model
# whole (they split under train.mode=auto), client 0 is a laptop that trains it whole.
CELL = ("topology=small6g", "topology.suburban_cells=1", "topology.neighbourhoods_per_suburban=1",
        "topology.mobility.model=none", "federation.num_clients=3", "federation.fraction=1.0",
        "topology.profile_mix={rpi4: 0, phone: 0.67, car: 0, laptop: 0.33}", "topology.profiles.phone.availability=1.0",
        "topology.profiles.laptop.availability=1.0", "topology.profiles.phone.memory_gb=0.216",
        "train.split.runtime_mb=0", "train.mode=auto", "federation.rounds=2", "model.tiny.num_hidden_layers=4",
        "lora.target_modules=[q_proj,v_proj,down_proj]", "lora.dropout=0.0")
SPLIT, FULL = [1, 2], [0]


class _Children:
    """The edge's END devices without Flower: each message goes, encoded as the ClientApp encodes it for
    the device's resident process, to that device's WarmDevice (its plan folder, keys and split stream)."""

    def __init__(self, devices: dict[int, WarmDevice], absent=()):
        self.devices, self.absent = devices, set(absent)
        self.timeout_s = 60.0
        self.orders: list[tuple[int, dict]] = []  # (client, split order) as the devices received them

    def find(self, wanted, wait_s) -> None:
        pass

    def find_wait_s(self) -> float:
        return 0.0

    def _ask(self, client: int, kind: str, settings, arrays, split, **secure) -> ClientReply:
        if client in self.absent:
            return ClientReply(client, error="not connected to this edge's SuperLink")
        order = (split or {}).get(client, "")
        if order:
            self.orders.append((client, json.loads(order)))
        request = channel.encode_request(kind, protocol.encode_settings(settings), arrays, split=order, **secure)
        try:
            answer = self.devices[client].handle(channel.decode_request(request))
        except Exception as exc:  # as the ClientApp: an error reply
            return ClientReply(client, error=f"client error: {type(exc).__name__}: {exc}")
        if kind == "train":
            nbytes = sum(v.nbytes for v in answer["arrays"].values())
            return ClientReply(client, answer["arrays"], answer["metrics"], bytes_up=nbytes)
        return ClientReply(client, answer["reply"], answer["metrics"], bytes_up=len(answer["reply"]))

    def train(self, server_round, clients, arrays, settings, on_reply, *, split=None):
        return [self._reply(self._ask(c, "train", settings, arrays, split), on_reply) for c in clients]

    def exchange(self, server_round, stage, payloads, arrays, settings, on_reply, *, split=None):
        return [self._reply(self._ask(c, "secagg", settings, arrays, split, run=7, stage=stage, round=server_round,
                                      payload=payloads[c]), on_reply) for c in sorted(payloads)]

    @staticmethod
    def _reply(reply: ClientReply, on_reply) -> ClientReply:
        on_reply(reply)
        return reply


class _PlannedEdges:
    """The cloud's cell runner: every cell request runs as its planned edge runs it (server.edge.run_request)."""

    hosts_lone_devices = False

    def __init__(self, plan: Path, children: _Children, server_factory=None):
        self.plan, self.children, self.server_factory = plan, children, server_factory

    def run(self, requests, *, late=None, on_reply=None, keys=None):
        out = []
        for request in requests:
            edge = read_node(self.plan / f"edge-{request.cell}")
            split_for = split_sessions(edge, self.children)
            if self.server_factory is not None:
                def split_for(r, inner=split_for):
                    s = inner(r)
                    s.server_factory = self.server_factory
                    return s
            out.append(run_request(request, request.cell, self.children, AggregatorKeys.of(edge.identities()),
                                   split_for=split_for))
        return out


def _plan(tmp_path: Path, cfg) -> Path:
    out = tmp_path / "plan"
    write_plan(cfg, out, DeploySettings(base_port=free_port_run(3, also=10000), runtime_port_base=free_port_run(4)))
    return out


def _devices(plan: Path, n: int) -> dict[int, WarmDevice]:
    nodes = {c: read_node(plan / f"end-{c}") for c in range(n)}
    return {c: WarmDevice(c, identities=node.identities(), split_trainer=device_trainer(node, c))
            for c, node in nodes.items()}


def _deployed(tmp_path: Path, cfg, *, absent=(), server_factory=None) -> tuple[Path, _Children]:
    plan = _plan(tmp_path, cfg)
    children = _Children(_devices(plan, 3), absent)
    run_dir = tmp_path / "deployed"
    run_federation(cfg, run_dir, InProcessTransport(3), runner=_PlannedEdges(plan, children, server_factory),
                   identities=read_node(plan / "cloud").identities())
    return run_dir, children


def _rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


def _adapter(run_dir: Path) -> dict:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _check_split_record(rounds: list[dict]) -> None:
    for r in rounds:
        assert r["split"]["split_clients"] == SPLIT, r["split"]
        for c in SPLIT:
            entry = r["split"]["clients"][str(c)]
            assert entry["mode"] == "split" and entry["k"] >= 1 and entry["exchanges"] > 0 and entry["bytes_up"] > 0
        assert r["split"]["clients"]["0"]["mode"] == "full"


def test_deployed_split_rounds_equal_the_simulation_plain(tmp_path, short_run):
    """Plain cells: two split devices stream with their planned edge, one trains whole; the adapter after two
    rounds is the in-process simulation's, and every split device got its order for this edge and session."""
    cfg = short_run(*CELL, "privacy=none")
    sim = tmp_path / "sim"
    run_federation(cfg, sim, InProcessTransport(3))
    run_dir, children = _deployed(tmp_path, cfg)
    rounds = _rounds(run_dir)
    assert [r["participants"] for r in rounds] == [[0, 1, 2], [0, 1, 2]] and all(not r["dropped"] for r in rounds)
    _check_split_record(rounds)
    assert sorted({c for c, _ in children.orders}) == SPLIT and len(children.orders) == 4  # 2 devices x 2 rounds
    edge = f"edge-{resolve_run(cfg).tree.neighbourhood_of(resolve_run(cfg).tree.initial[1])}"
    assert all(o["edge"] == edge and o["session"] == run_dir.resolve().name for _, o in children.orders)
    a, b = _adapter(sim), _adapter(run_dir)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7, err_msg=k)
    for r, s in zip(rounds, _rounds(sim)):
        assert r["train_loss"] == pytest.approx(s["train_loss"], rel=1e-5)


def test_deployed_split_rounds_under_secure_aggregation(tmp_path, short_run):
    """Secure cells with the plan's keys: each split device's masked input holds its own tensors, the edge adds
    its part into the masked sum; the round gives the simulation's adapter within the encoding's error (both
    runs round stochastically, each within the bound; measured 1.67e-6 for a bound of 1.66e-6). (Two secure
    rounds with split devices: the next test.)"""
    cfg = short_run(*CELL, "privacy=secagg", "federation.rounds=1")
    sim = tmp_path / "sim"
    run_federation(cfg, sim, InProcessTransport(3))
    run_dir, children = _deployed(tmp_path, cfg)
    rounds = _rounds(run_dir)
    assert [r["participants"] for r in rounds] == [[0, 1, 2]], rounds
    assert rounds[0]["secure"]["clients_in_sum"] == 3
    _check_split_record(rounds)
    assert len(children.orders) == 2  # the order travels with the first stage only
    bound = rounds[0]["secure"]["decode_error_bound"]
    a, b = _adapter(sim), _adapter(run_dir)
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert 0 < worst <= 2 * bound, (worst, bound)


def test_a_split_device_whose_stream_breaks_is_a_dropout_of_that_round_only(tmp_path, short_run):
    """The edge going away mid-step (its stream server stops answering device 2 in round 1): device 2 drops
    from round 1, the cell's secure session completes with the others, and device 2 is back in round 2."""
    cfg = short_run(*CELL, "privacy=secagg")
    calls = {"n": 0}

    class _DyingEdge(SplitStreamServer):
        def __init__(self, *args, handler_for, devices, server_round, **kw):
            inner = handler_for

            def handler_for_device(device):
                handler = inner(device)

                def dying(kind, payload):
                    if server_round == 1 and device == "device-2":
                        calls["n"] += 1
                        if calls["n"] == 2:  # the edge dies in the middle of its second call
                            raise ConnectionAbortedError("edge process went away")
                    return handler(kind, payload)

                return dying

            super().__init__(*args, handler_for=handler_for_device, devices=devices, server_round=server_round, **kw)

    run_dir, _ = _deployed(tmp_path, cfg, server_factory=_DyingEdge)
    rounds = _rounds(run_dir)
    assert rounds[0]["participants"] == [0, 1] and [d["client"] for d in rounds[0]["dropped"]] == [2], rounds[0]
    assert "split session failed" in rounds[0]["dropped"][0]["reason"], rounds[0]["dropped"]
    assert rounds[0]["secure"]["clients_in_sum"] == 2 and rounds[0]["aggregated"]
    assert rounds[1]["participants"] == [0, 1, 2]


def test_a_split_device_not_connected_drops_and_the_cell_goes_on(tmp_path, short_run):
    cfg = short_run(*CELL, "privacy=none", "federation.rounds=1")
    run_dir, children = _deployed(tmp_path, cfg, absent=[1])
    (r,) = _rounds(run_dir)
    assert r["participants"] == [0, 2] and [d["client"] for d in r["dropped"]] == [1]
    assert "not connected" in r["dropped"][0]["reason"]


def test_split_orders_are_checked_and_name_only_the_devices_own_edges(tmp_path, tiny_config):
    order = SplitOrder(1, 1, "edge-neighbourhood-0-0", "run-x")
    assert SplitOrder.from_json(order.to_json()) == order
    for bad in ('{"k": 0, "m": 1, "edge": "edge-a", "session": "s"}', '{"k": 1, "m": -1, "edge": "edge-a", "session": "s"}',
                '{"k": 1, "m": 1, "edge": "cloud", "session": "s"}', '{"k": 1, "m": 1, "edge": "edge-a", "session": ""}',
                '{"k": true, "m": 1, "edge": "edge-a", "session": "s"}', '{"k": 1, "m": 1, "edge": "edge-a"}', "[1]", "{"):
        with pytest.raises(SplitOrderError):
            SplitOrder.from_json(bad)
    cfg = tiny_config(*CELL[:5])
    plan = _plan(tmp_path, cfg)
    device = read_node(plan / "end-0")
    upstream = device.doc["supernode"]["upstream"]
    host, port = edge_address(device, upstream)
    edge_port = int(read_node(plan / upstream).doc["superlink"]["address"].rsplit(":", 1)[1])
    assert (host, port) == ("127.0.0.1", edge_port + 10000)
    with pytest.raises(SplitOrderError, match="none of this device's edges"):
        edge_address(device, "edge-elsewhere")
    # a device that may move finds every candidate cell's edge in its folder (a split order follows it there)
    roaming = tmp_path / "roaming"
    write_plan(tiny_config(*CELL[:2], "topology.neighbourhoods_per_suburban=2", "federation.num_clients=4"), roaming,
               DeploySettings(base_port=free_port_run(4, also=10000), candidate_cells="all"))
    device = read_node(roaming / "end-0")
    edges = sorted(e["edge"] for e in device.doc["candidate_cells"].values())
    assert len(edges) == 2 and device.doc["supernode"]["upstream"] in edges
    for edge in edges:
        port = int(read_node(roaming / edge).doc["superlink"]["address"].rsplit(":", 1)[1])
        assert edge_address(device, edge) == ("127.0.0.1", port + 10000)
    # an edge's stream port is its SuperLink's + 10000: a plan with split devices refuses a base port too high
    with pytest.raises(PlanError, match="split stream's port"):
        write_plan(tiny_config(*CELL[:5], "train.mode=auto"), tmp_path / "high", DeploySettings(base_port=60000))
    write_plan(tiny_config(*CELL[:5], "train.mode=full"), tmp_path / "high-full", DeploySettings(base_port=60000))
    # ... and such an edge serves its full devices: the stream port is resolved at its first split request only
    # (it once was at the service's start, which killed every edge listening above 55535: CI's chaos soak)
    sessions = split_sessions(read_node(tmp_path / "high-full" / "edge-neighbourhood-0-0"), _Children({}))
    with pytest.raises(ValueError, match="stream port 7"):
        sessions(SimpleNamespace(run_id="run-x"))
