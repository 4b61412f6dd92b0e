"""Edge aggregators as real processes: a cloud, two neighbourhood edges and four END clients
on loopback, each tier its own Flower SuperLink/SuperNode processes started through
``fedlora cloud|edge|end``; one round must give the simulation's adapter, and every process
started must be gone afterwards (also when the test fails: the fixture's finalizer stops
the whole process tree).

The pure parts (spool, checking an edge's result) are tested without Flower below.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedlora import protocol
from fedlora.aggregate.sums import WeightedSum
from fedlora.config import compose
from fedlora.deploy.processes import DeployError, ProcessGroup, placement, plan, start_loopback_tiers
from fedlora.deploy.spool import EdgeError, Spool
from fedlora.roles.cloud import run_federation
from fedlora.roles.local import InProcessTransport
from fedlora.roles.neighbourhood import CellRequest, CellResult, ClientStatus
from fedlora.secure.identities import SimulatedIdentities
from fedlora.secure.rounds import ACCEPTED, DROPPED
from server.edge import check_result, decode_result

OVERRIDES = [
    "model=tiny",
    "topology=small6g",
    "topology.suburban_cells=1",
    "topology.neighbourhoods_per_suburban=2",
    "topology.mobility.model=none",
    "privacy=none",
    "federation.num_clients=4",
    "federation.fraction=1.0",
    "federation.rounds=1",
    "train.local_steps=2",
    "train.max_seq_len=128",
    "data.records_per_client=12",
    "data.max_eval_examples=8",
    "progress=false",
]


# --- pure parts ------------------------------------------------------------------------------


def _settings(seed: int = 42):
    """Round 1's settings of a tiny run with this seed."""
    from fedlora.run_settings import resolve_run

    return resolve_run(compose(["model=tiny", f"seed={seed}"])).round_settings(1, {"proximal_mu": 0.0, "freeze_a": False})


def _request(clients=(0, 1)) -> CellRequest:
    arrays = {"a": np.zeros((2, 3), np.float32)}
    return CellRequest("run", 1, "neighbourhood-0-0", list(clients), arrays, _settings(), {"a": (2, 3)})


def _result(request: CellRequest, total=None, weight=5.0, count=1, cell=None) -> CellResult:
    plain = WeightedSum({"a": np.ones((2, 3)) if total is None else total}, weight, count)
    statuses = {0: ClientStatus(0, ACCEPTED, num_examples=5.0), 1: ClientStatus(1, DROPPED, "client error: boom")}
    return CellResult(cell or request.cell, statuses, plain, {"num_examples": 5.0, "train_loss": 5.0})


def test_check_result_accepts_a_consistent_cell_sum():
    request = _request()
    assert check_result(request, _result(request)) is None
    assert check_result(request, CellResult.from_bytes(_result(request).to_bytes())) is None


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"cell": "neighbourhood-0-1"}, "not the ones asked"),
        ({"count": 2}, "counts 2 update(s)"),
        ({"weight": 7.0}, "weight"),
        ({"total": np.ones((3, 2))}, "shape"),
        ({"total": np.full((2, 3), np.nan)}, "non-finite"),
    ],
)
def test_check_result_names_what_is_wrong_with_an_edge_sum(kwargs, needle):
    request = _request()
    reason = check_result(request, _result(request, **kwargs))
    assert reason is not None and needle in reason


class _Reply:
    """Just what decode_result reads of a Flower reply message."""

    def __init__(self, content=None, error=None):
        self.content, self.error = content, error

    def has_error(self):
        return self.error is not None


class _Error:
    reason = "<class 'fedlora.deploy.spool.EdgeError'>:<'no cell result within 660s'>"


@pytest.mark.parametrize(
    "reply,needle",
    [
        (_Reply(error=_Error()), "failed: "),
        (_Reply({}), "malformed result"),
        (_Reply({protocol.CELL: {protocol.CELL_RESULT_KEY: b"not a cell result"}}), "malformed result"),
    ],
)
def test_a_failed_or_malformed_edge_reply_drops_the_cells_clients(reply, needle):
    result = decode_result(_request(), reply)
    assert sorted(result.clients) == [0, 1] and result.plain is None and result.accepted == []
    assert all(s.status == DROPPED and needle in s.reason for s in result.clients.values())


def test_a_good_edge_reply_is_the_edges_result():
    request = _request()
    sent = _result(request)
    got = decode_result(request, _Reply({protocol.CELL: {protocol.CELL_RESULT_KEY: sent.to_bytes()}}))
    assert got.accepted == [0] and got.plain.count == 1
    np.testing.assert_array_equal(got.plain.total["a"], sent.plain.total["a"])
    lying = _result(request, count=2)
    got = decode_result(request, _Reply({protocol.CELL: {protocol.CELL_RESULT_KEY: lying.to_bytes()}}))
    assert got.accepted == [] and "unusable" in got.clients[0].reason


# A secure cell as an edge runs it: three devices answering each stage in-process (fixed
# updates instead of training), the edge's own keys from the request's seed.
SEED, CELL = 7, "neighbourhood-0-0"


class _Devices:
    """Stands in for an edge's ChildTransport: END devices running the real secure stages."""

    connect_timeout_s, timeout_s = 0.0, 0.0

    def __init__(self):
        self.state = {}

    def find(self, wanted, wait_s):
        pass

    def find_wait_s(self):
        return self.connect_timeout_s

    def exchange(self, server_round, stage, payloads, arrays, settings, on_reply):
        from fedlora.roles.neighbourhood import ClientReply
        from fedlora.secure.rounds import CLOUD_ID, client_step, device_id

        replies = []
        for c, payload in payloads.items():
            me = device_id(c)
            update = ({"a": np.full((2, 3), 0.01 * (c + 1), np.float32)}, {"train_loss": 1.0, "num_examples": 5})
            reply, self.state[c], metrics = client_step(
                stage, payload, self.state.get(c), identity=SimulatedIdentities(SEED).own(me),
                cloud_key=SimulatedIdentities(SEED).public(CLOUD_ID), rng=SimulatedIdentities(SEED).rng("device", me, stage),
                train=lambda update=update: update, arrays=arrays)
            replies.append(ClientReply(c, reply, metrics, bytes_up=len(reply)))
            on_reply(replies[-1])
        return replies


@pytest.fixture(scope="module")
def secure_cell():
    """(cloud's SecureRound, the request, the edge's result via server.edge.run_request)."""
    from fedlora.secure.encoding import EncodingConfig
    from fedlora.secure.rounds import SecureRound, SecureSettings, secure_layout
    from server.edge import run_request

    clients, arrays = [0, 1, 2], {"a": np.zeros((2, 3), np.float32)}
    sr = SecureRound(identities=SimulatedIdentities(SEED), run_id="run", server_round=1, clients=clients,
                     cells_above={CELL: "suburban-0"},
                     settings=SecureSettings(EncodingConfig(bits=16, clip=0.05, max_examples=5), 0.6, "cloud",
                                             "aes128-ctr", 100),
                     layout=secure_layout({"a": (2, 3)}))
    request = CellRequest("run", 1, CELL, clients, arrays, _settings(SEED), {"a": (2, 3)},
                          sr.cell(CELL, clients, arrays))
    return sr, request, run_request(CellRequest.from_bytes(request.to_bytes()), CELL, _Devices())


def test_an_edge_runs_a_secure_cell_the_cloud_can_unmask(secure_cell):
    sr, request, result = secure_cell
    assert result.accepted == [0, 1, 2] and result.plain is None and result.metrics == {}
    sent = CellResult.from_bytes(result.to_bytes())  # the backhaul
    assert check_result(request, sent) is None
    sums, aborted = sr.unmask({CELL: sent.secure}, per_cell=True)
    assert aborted == {} and sums[CELL].clients == 3
    np.testing.assert_allclose(sums[CELL].total["a"], np.full((2, 3), 5 * (0.01 + 0.02 + 0.03)), atol=1e-4)


def _tampered(result, **changes):
    import copy
    import dataclasses

    bad = copy.deepcopy(result)
    for name, value in changes.items():
        if name in ("cells", "clients", "vector"):
            bad.secure.masked = dataclasses.replace(bad.secure.masked, **{name: value})
        else:
            setattr(bad.secure, name, value)
    return bad


@pytest.mark.parametrize(
    "changes,needle",
    [
        ({"cells": frozenset({"neighbourhood-0-1"})}, "not 'neighbourhood-0-0'"),
        ({"clients": 2}, "counts 2 input(s)"),
        ({"vector": np.zeros(3, np.uint32)}, "uint32 of shape"),
        ({"vector": np.zeros(1, np.float32)}, "uint32 of shape"),
        ({"survivors": [0, 1]}, "survivors"),
        ({"bundle": None}, "unmask bundle"),
        ({"dropped": {"advertise": [9]}}, "dropped clients"),
    ],
)
def test_check_result_names_what_is_wrong_with_an_edge_secure_result(secure_cell, changes, needle):
    _, request, result = secure_cell
    reason = check_result(request, _tampered(result, **changes))
    assert reason is not None and needle in reason, reason


def test_a_failed_secure_edge_is_an_aborted_cell_for_the_cloud(secure_cell):
    sr, request, _ = secure_cell
    result = decode_result(request, _Reply(error=_Error()))
    assert result.accepted == [] and result.secure.aborted.startswith(f"edge {CELL} failed")
    assert sr.unmask({CELL: result.secure}, per_cell=True) == ({}, {CELL: result.secure.aborted})


def test_an_edge_answers_for_secure_clients_not_connected_to_it():
    from server.edge import ChildTransport

    seen = []
    replies = ChildTransport(None).exchange(1, "advertise", {3: b"x"}, None, {}, seen.append)
    assert [r.client for r in replies] == [3] == [r.client for r in seen]
    assert "not connected" in replies[0].error


def test_plan_puts_every_client_under_exactly_one_edge():
    cfg = compose(OVERRIDES)
    cells = placement(cfg)
    assert sorted(cells) == ["neighbourhood-0-0", "neighbourhood-0-1"]
    assert sorted(c for clients in cells.values() for c in clients) == [0, 1, 2, 3]
    text = plan(cfg, "cloud:9100", OVERRIDES)
    assert text.count("fedlora edge ") == 2 and text.count("fedlora end ") == 4
    assert "--parent cloud:9100" in text and "fedlora cloud --insecure --listen cloud:9100 model=tiny" in text
    with pytest.raises(DeployError, match="tree topology"):
        placement(compose(["topology=flat"]))


def test_spool_relays_a_request_and_its_result(tmp_path):
    relay_side, service_side = Spool(tmp_path), Spool(tmp_path)
    service_side.beat()
    relay_side.submit("k1", b"request")
    assert service_side.claim() == ("k1", b"request")
    assert service_side.claim() is None
    service_side.answer("k1", b"result")
    assert relay_side.wait("k1", 5) == b"result"
    relay_side.submit("k2", b"bad")
    service_side.claim()
    service_side.answer("k2", error="edge n0: CellWireError: truncated")
    with pytest.raises(EdgeError, match="truncated"):
        relay_side.wait("k2", 5)


def test_spool_relay_gives_up_on_a_dead_or_slow_service(tmp_path):
    spool = Spool(tmp_path)
    with pytest.raises(EdgeError, match="not running"):
        spool.wait("k", 5)  # no heartbeat at all
    spool.beat()
    spool.submit("k", b"x")
    with pytest.raises(EdgeError, match="no cell result"):
        spool.wait("k", 0.3)
    assert spool.claim() is None  # the timed-out request was withdrawn


def test_an_edge_service_that_stops_on_an_error_says_why_to_its_relays(tmp_path, monkeypatch):
    import server.edge

    def broken(*args, **kwargs):
        raise ValueError("stream port 70001 is not in 1024..65535")

    monkeypatch.setattr(server.edge, "_serve_loop", broken)
    with pytest.raises(ValueError, match="stream port"):
        server.edge.serve(None, "n0", tmp_path)
    spool = Spool(tmp_path)
    assert not spool.alive()  # its heartbeat went with it
    with pytest.raises(EdgeError, match="not running .* it stopped on: ValueError: stream port 70001"):
        spool.wait("k", 5)
    spool.started()  # a new service run: the old failure says nothing any more
    assert spool.failure() is None


# --- the processes ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    """The same round in-process (simulation's cell runner), without Flower."""
    os.environ["FEDLORA_CACHE"] = env["FEDLORA_CACHE"]
    run_dir = tmp_path_factory.mktemp("inprocess")
    run_federation(compose(OVERRIDES), run_dir, InProcessTransport(4))
    return run_dir


@pytest.fixture(scope="module")
def tiers(tmp_path_factory, env, reference):
    """Two edges and four END clients (placed as the topology says), for every cloud run of
    this module (edges serve successive cloud runs); the whole tree stopped on teardown."""
    work = tmp_path_factory.mktemp("tiers")
    group = ProcessGroup(work / "logs")
    try:
        tiers = start_loopback_tiers(group, compose(OVERRIDES), work, env)
        assert len(tiers["edges"]) == 2 and len(group.procs) == 6
        yield {**tiers, "group": group, "work": work}
    finally:
        group.stop()
        assert group.leftovers() == [], "processes left running"


def run_cloud(tiers, env, run_dir: Path, overrides: list[str]) -> float:
    """`fedlora cloud` for one federation (in the fixture's group: a timeout or failure here
    still stops the cloud's processes); returns its wall time."""
    t0 = time.perf_counter()
    cloud = tiers["group"].start(f"cloud-{run_dir.parent.name}", [
        sys.executable, "-m", "fedlora.cli", "cloud", "--insecure", "--listen", tiers["cloud"], "--run-dir", str(run_dir),
        "--work-dir", str(run_dir.parent / "cloud"), *overrides], env)
    code = cloud.wait(timeout=400)
    assert code == 0, _logs(tiers["work"]) + _logs(run_dir.parent)
    return time.perf_counter() - t0


def same_round(run_dir: Path, reference: Path) -> tuple[dict, dict]:
    """The one round's records of a deployed and an in-process run: every client took part,
    and the adapters agree to 1e-6."""
    (record,) = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    (expected,) = [json.loads(line) for line in (reference / "rounds.jsonl").read_text().splitlines()]
    assert record["participants"] == expected["participants"] == [0, 1, 2, 3]
    got = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    want = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for key in got:
        np.testing.assert_allclose(got[key], want[key], atol=1e-6, rtol=1e-5)
    return record, expected


def _logs(path: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-1500:]}" for p in sorted(path.rglob("*.log")))


@pytest.mark.flower
@pytest.mark.slow
def test_cloud_two_edges_four_end_clients_match_the_simulation(tmp_path, env, reference, tiers):
    run_dir = tmp_path / "run"
    wall = run_cloud(tiers, env, run_dir, OVERRIDES)

    record, expected = same_round(run_dir, reference)
    assert record["dropped"] == []
    assert record["cell_of"] == expected["cell_of"]
    assert record["bytes"] == expected["bytes"]
    # Every edge served its cell's request in its own process.
    for cell in tiers["edges"]:
        assert f"edge {cell}: round 1 done" in (tiers["work"] / cell / "spool" / "service.log").read_text()
    print(f"\nloopback deployment: `fedlora cloud` {wall:.1f}s, round {record['wall_s']:.1f}s "
          f"(in-process round {expected['wall_s']:.1f}s)")


SECURE = [o if o != "privacy=none" else "privacy=secagg" for o in OVERRIDES]


@pytest.mark.flower
@pytest.mark.slow
def test_secagg_through_edge_processes_matches_the_in_process_secure_run(tmp_path, env, tiers):
    """privacy=secagg: each edge process runs its cell's secure session (it sees masked inputs
    only) and sends up the masked sum and unmask bundle; the cloud unmasks. Same adapter as
    the in-process secure run."""
    reference = tmp_path / "inprocess"
    run_federation(compose(SECURE), reference, InProcessTransport(4))
    run_dir = tmp_path / "run"
    wall = run_cloud(tiers, env, run_dir, SECURE)

    record, expected = same_round(run_dir, reference)
    assert record["dropped"] == [] and record["aggregated"] is True
    cells = record["secure"]["cells"]
    assert sorted(cells) == sorted(placement(compose(SECURE))) and all(c["ok"] for c in cells.values()), cells
    assert record["secure"]["clients_in_sum"] == 4
    assert record["secure"] == expected["secure"]
    for cell in tiers["edges"]:  # the session ran in the edge's own process
        assert f"edge {cell}: round 1: secure session ok" in (tiers["work"] / cell / "spool" / "service.log").read_text()
    print(f"\nloopback secagg deployment: `fedlora cloud` {wall:.1f}s, round {record['wall_s']:.1f}s "
          f"(in-process secure round {expected['wall_s']:.1f}s)")


@pytest.mark.flower
@pytest.mark.slow
def test_a_failed_edge_drops_its_cell_and_the_round_goes_on(tmp_path, env, tiers):
    """Stop one edge's service (its SuperNode stays up and relays): the next cloud run drops
    that cell's clients with the reason and aggregates the other cell; then the edge starts
    its service again by itself. Runs last."""
    cells = placement(compose(OVERRIDES))
    broken, healthy = sorted(cells)
    spool = Spool(tiers["work"] / broken / "spool")
    (spool.root / "stop").touch()
    deadline = time.time() + 60
    while spool.alive() and time.time() < deadline:
        time.sleep(0.2)
    assert not spool.alive(), "the edge service did not stop"
    run_dir = tmp_path / "run"
    run_cloud(tiers, env, run_dir, OVERRIDES)
    (record,) = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert record["participants"] == cells[healthy]
    assert record["aggregated"] is True
    assert sorted(d["client"] for d in record["dropped"]) == cells[broken]
    assert all(f"edge {broken} failed" in d["reason"] and "not running" in d["reason"] for d in record["dropped"])
    # Without the stop request, `fedlora edge` sees its service gone and starts a new one.
    (spool.root / "stop").unlink()
    deadline = time.time() + 180
    while not spool.alive() and time.time() < deadline:
        time.sleep(0.5)
    assert spool.alive(), "the edge did not start its service again"

