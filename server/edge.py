"""Edge (neighbourhood) aggregators as real processes: the edge service and the cloud's runner.

An edge for neighbourhood cell X is a SuperNode of its parent's SuperLink and, at the same
time, the SuperLink of its END children (``fedlora/deploy/processes.py`` starts both). Its two halves
meet in a *spool* directory on the edge machine (:mod:`fedlora.deploy.spool`):

- ``clients/edge.py`` (the edge SuperNode's ClientApp, ``role="edge"``): takes the cloud's
  cell request bytes, drops them in the spool and answers with the result bytes the edge
  service leaves there (or an error the cloud turns into "cell dropped").
- :func:`serve` (a long-lived ``mode="edge"`` run of the ServerApp on the edge's own
  SuperLink): takes each request from the spool and runs it with
  :func:`fedlora.roles.neighbourhood.run_cell` over its Grid (:class:`ChildTransport`) -- the same call the
  simulation makes in-process -- so the cell's sum is formed on the edge and only one
  message per cell crosses the backhaul. A long-lived run pays Flower's run start (FAB
  install, ``flwr-serverapp`` process, imports) once, not every round, and identifies
  its children once (new ones as they connect).
- :class:`EdgeCellRunner` (the cloud ServerApp, ``mode="cloud"``): a
  :class:`fedlora.roles.cloud.CellRunner` that sends each cell's request to the SuperNode of
  that cell's edge and decodes the replies. A missing, failed or malformed edge reply drops
  that cell's clients with the reason; the round goes on with the other cells.

Under ``privacy=secagg`` the edge is the cell's neighbourhood aggregator: it runs the cell's
secure session with its END children (:meth:`ChildTransport.exchange`) and sends up only the
masked sum and the unmask bundle; the cloud checks their shape (:func:`check_result`) and
unmasks. Its keys are its node folder's when it runs from a deployment plan (``fedlora edge
--config``: its own Ed25519 key, the plan's registry), else derived from the run seed in the
request, as the devices' are (simulation-style; ``fedlora edge --insecure`` on a lab network).

Which END clients sit under which edge: without a mobility model (``topology.mobility.model=none``)
the topology's (``build_tree`` with the run's seed), as in simulation. With one, devices move
between edges themselves (a planned device knows its candidate cells' edges and attaches to
one at a time): before each round :meth:`EdgeCellRunner.reports` asks every edge which END
devices are connected to its SuperLink (the edge service identifies new ones and answers,
:meth:`ChildTransport.report`), and the cloud places each device in the cell that reports it
(:func:`fedlora.world.attachments.place_devices`), so its update is counted once, in the cell
it uploads from; the cell's secure session includes it (the registry holds every device's
key, and the plan registers its SuperNode key with every candidate edge). Either way an END
client not connected to the edge it is asked through is dropped ("not connected"). The
network model's simulated deadline (``topology.deadline_s``) is a simulation concept and is
not applied here: a deployment has the real round timeout.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlora import protocol
from fedlora.deploy.plan import read_node
from fedlora.deploy.spool import HEARTBEAT_S, REPORT_JOB, EdgeError, Spool
from fedlora.roles.neighbourhood import AggregatorKeys, CellRequest, CellResult, ClientReply, ClientStatus, run_cell
from fedlora.secure.identities import SimulatedIdentities
from fedlora.secure.messages import MaskedSum, UnmaskBundle
from fedlora.secure.rounds import DROPPED, SecureOutcome
from fedlora.world.attachments import EdgeReport
from fedlora.world.topology import CellTree
from server.transport import POLL_S, FlowerTransport, short_reason

log = logging.getLogger("fedlora")
# Beyond the round timeout (``federation.round_timeout_s``, which bounds the END clients'
# training): the edge waits up to FIND_S for requested children that have not connected
# (up to REJOIN_S from its own start, see below), its relay waits RELAY_MARGIN_S more for the
# service, the cloud CLOUD_MARGIN_S more.
FIND_S = 30.0
# An edge that has just (re)started: its devices' SuperNodes notice only at their next retry
# (Flower backs off up to 20 s), are refused by the new SuperLink (it does not know their node
# ids), are started again by `fedlora client` and identify themselves (a ClientApp start): on a
# loaded 2-core machine ~50 s. Requests in that window wait for their devices until REJOIN_S
# after the edge service started.
REJOIN_S = 75.0
RELAY_MARGIN_S = REJOIN_S + 30.0
CLOUD_MARGIN_S = RELAY_MARGIN_S + 30.0
# The cloud waits this long for the edges' reports of their devices (a report identifies new devices,
# up to FIND_S; the relay gives it 60 s, clients/edge.py): not tied to the rejoin window, which no report waits for.
REPORT_S = FIND_S + 60.0
IDLE_FIND_S = 2.0  # between requests the edge looks for newly connected devices this often
# request -> its split devices' sessions with this edge (fedlora.deploy.split_session.StreamedSplit)
SplitSessions = Callable[[CellRequest], Any]


# --- edge service: the long-lived ServerApp run on the edge's own SuperLink -----------------


class ChildTransport(FlowerTransport):
    """The edge's END children through its Grid; they may connect and leave at any time."""

    def __init__(self, grid: Grid, *, timeout_s: float = 600.0, connect_timeout_s: float = 60.0):
        super().__init__(grid, expected_clients=0, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s)
        self.others: set[int] = set()  # nodes that answered but are no END client
        self.started = time.monotonic()

    def find_wait_s(self) -> float:
        """How long a request waits for requested children: ``connect_timeout_s``, or longer
        while the edge is within REJOIN_S of its start (its devices are still rejoining)."""
        return max(self.connect_timeout_s, self.started + REJOIN_S - time.monotonic())

    def find(self, wanted: list[int], wait_s: float) -> None:
        """Identify newly connected nodes until every wanted client is known or ``wait_s`` passed."""
        deadline = time.time() + wait_s
        while True:
            nodes = set(self.grid.get_node_ids())
            self.node_of = {c: n for c, n in self.node_of.items() if n in nodes}
            new = sorted(nodes - set(self.node_of.values()) - self.others)
            if new:  # a node that did not answer is asked again next time
                self.others |= self.identify(new) - set(self.node_of.values())
            if set(wanted) <= set(self.node_of) or time.time() >= deadline:
                return
            time.sleep(0.5)

    def report(self) -> dict[int, int]:
        """The END devices connected now (new ones identified first): client -> attachment count."""
        self.find([], 0.0)
        return {c: self.attachment_of.get(c, 0) for c in sorted(self.node_of)}

    def train(self, server_round, clients, arrays, settings, on_reply, *, split=None):
        here = [c for c in clients if c in self.node_of]
        replies = super().train(server_round, here, arrays, settings, on_reply, split=split) if here else []
        return replies + self._absent(clients, on_reply)

    def exchange(self, server_round, stage, payloads, arrays, settings, on_reply, *, split=None):
        here = {c: p for c, p in payloads.items() if c in self.node_of}
        replies = super().exchange(server_round, stage, here, arrays, settings, on_reply, split=split) if here else []
        return replies + self._absent(payloads, on_reply)

    def _absent(self, clients, on_reply) -> list[ClientReply]:
        """An error reply for each of ``clients`` not connected here."""
        replies = []
        for cid in clients:
            if cid not in self.node_of:
                reply = ClientReply(cid, error="not connected to this edge's SuperLink")
                on_reply(reply)
                replies.append(reply)
        return replies


def serve(grid: Grid, cell: str, spool_dir: str | Path, *, connect_timeout_s: float = FIND_S, node_dir: str = "") -> int:
    """Run cell requests from the spool until a ``stop`` file appears; return how many ran.

    ``node_dir``: this edge's folder of a deployment plan; its Ed25519 key and the plan's
    registry are the secure sessions' keys (else they are derived from each request's seed,
    simulation-style)."""
    if not cell or not str(spool_dir):
        raise ValueError("mode=edge needs the run config keys cell and spool (fedlora edge sets them)")
    keys, node = None, None
    if node_dir:
        node = read_node(node_dir)
        keys = AggregatorKeys.of(node.identities())
    spool = Spool(spool_dir)
    # Flower keeps a ServerApp's output to itself (`flwr log`); the edge's own log file:
    handler = logging.FileHandler(spool.root / "service.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    transport = ChildTransport(grid, connect_timeout_s=connect_timeout_s)
    log.info("edge %s: serving cell requests from %s", cell, spool.root)
    done = threading.Event()

    def heartbeat() -> None:  # alive while busy with a long cell round, too
        while not done.wait(HEARTBEAT_S):
            spool.beat()

    spool.beat()
    beating = threading.Thread(target=heartbeat, name="edge-heartbeat", daemon=True)
    beating.start()
    served = 0
    spool.started()
    try:
        served = _serve_loop(cell, spool, transport, keys, split_sessions(node, transport) if node else None)
    except Exception as exc:  # said where the relays and the deployment look, then Flower's run fails
        spool.fail(f"{type(exc).__name__}: {exc}")
        log.error("edge %s: the service stopped on %s: %s", cell, type(exc).__name__, exc)
        raise
    finally:
        done.set()
        beating.join()  # its last beat before the heartbeat goes, never after
        (spool.root / "heartbeat").unlink(missing_ok=True)  # waiting relays fail at once
        log.info("edge %s: stopped after %d request(s)", cell, served)
        log.removeHandler(handler)
    return served


def _serve_loop(cell: str, spool: Spool, transport: ChildTransport, keys: AggregatorKeys | None,
                split_for: SplitSessions | None = None) -> int:
    served = 0
    idle_since = 0.0
    while not spool.stopping():
        job = spool.claim()
        if job is None:
            if time.monotonic() - idle_since >= IDLE_FIND_S:
                _identify_while_idle(cell, transport)
                idle_since = time.monotonic()
            time.sleep(POLL_S)
            continue
        key, data = job
        if key.startswith(REPORT_JOB):  # the cloud asks which devices are connected here
            _answer_report(cell, spool, key, transport)
            continue
        t0 = time.perf_counter()
        try:
            request = CellRequest.from_bytes(data)
            result = run_request(request, cell, transport, keys, split_for=split_for)
        except Exception as exc:  # a bad request fails that request, not the edge
            log.warning("edge %s: request %s failed: %s: %s", cell, key, type(exc).__name__, exc)
            spool.answer(key, error=f"edge {cell}: {type(exc).__name__}: {exc}")
            continue
        spool.answer(key, result.to_bytes())
        served += 1
        log.info("edge %s: round %d done in %.1fs: %d of %d client(s) accepted", cell, request.server_round,
                 time.perf_counter() - t0, len(result.accepted), len(result.clients))
    return served


def _identify_while_idle(cell: str, transport: ChildTransport) -> None:
    """Identify END devices that connected since the last look, between requests: a device that
    (re)joins after a restart of this edge or of itself is known before the next round asks for it,
    and its identification (a ClientApp start on the device) is off the round's critical path."""
    try:
        transport.find([], 0.0)
    except Exception as exc:  # the SuperLink busy or restarting: look again later
        log.debug("edge %s: idle identification failed: %s: %s", cell, type(exc).__name__, exc)


def _answer_report(cell: str, spool: Spool, key: str, transport: ChildTransport) -> None:
    try:
        devices = transport.report()
    except Exception as exc:  # a failed report fails that report, not the edge
        log.warning("edge %s: report %s failed: %s: %s", cell, key, type(exc).__name__, exc)
        spool.answer(key, error=f"edge {cell}: {type(exc).__name__}: {exc}")
        return
    spool.answer(key, json.dumps({str(c): n for c, n in devices.items()}).encode())
    log.info("edge %s: %d device(s) connected: %s", cell, len(devices), sorted(devices))


def split_sessions(node, transport: ChildTransport) -> SplitSessions:
    """How this planned edge trains a request's split devices with them: over the split stream
    (fedlora/deploy/split_session.py) on its SuperLink's bind host, port + 10000, with its plan keys."""
    # only a planned edge needs the split stream's code
    from fedlora.deploy.split_session import StreamedSplit
    from fedlora.deploy.stream import StreamCredentials
    from fedlora.deploy.stream_protocol import parse_address, stream_port

    # Resolved at the first split request: an edge without split devices needs neither the keys nor a
    # stream port (its SuperLink may listen above 55535; a split request then fails with the port's error).
    stream: list = []

    def for_request(request: CellRequest) -> StreamedSplit:
        if not stream:
            host, port = parse_address(str(node.doc["superlink"]["listen"]))
            stream.append(((host, stream_port(port)), StreamCredentials.from_node(node)))
        listen, credentials = stream[0]
        return StreamedSplit(transport, credentials, listen, edge=node.name, session=request.run_id)

    return for_request


def run_request(request: CellRequest, cell: str, transport: ChildTransport, keys: AggregatorKeys | None = None, *,
                split_for: SplitSessions | None = None) -> CellResult:
    """One cell round on this edge; ``keys``: the edge's own (deployment), else derived from the seed;
    ``split_for(request)``: how it trains the request's split devices (a planned edge: :func:`split_sessions`;
    without it they are dropped, "this edge cannot train split devices")."""
    if request.cell != cell:
        raise EdgeError(f"asked for cell {request.cell!r}, but this edge aggregates {cell!r}")
    transport.timeout_s = request.settings.round_timeout_s
    t0 = time.perf_counter()
    transport.find(request.clients, transport.find_wait_s())
    t1 = time.perf_counter()
    if request.secure is not None and keys is None:  # this edge is the cell's aggregator: it sees masked inputs only
        keys = AggregatorKeys.of(SimulatedIdentities(request.settings.seed))
    split = split_for(request) if split_for is not None and request.split else None
    result = run_cell(request, transport, keys=keys, split=split, secure_split=split)
    if result.secure is not None:
        log.info("edge %s: round %d: secure session %s", cell, request.server_round, result.secure.aborted or "ok")
    log.info("edge %s: round %d: children found in %.1fs, cell run in %.1fs", cell, request.server_round,
             t1 - t0, time.perf_counter() - t1)
    return result


# --- cloud side ------------------------------------------------------------------------------


class EdgeCellRunner:
    """The cloud's CellRunner when the neighbourhood cells are edge processes (``mode="cloud"``).

    Also the cloud's client list: the END clients the topology places under a connected edge
    (every client when devices move between edges), and with ``track_devices`` the cloud's
    :class:`fedlora.roles.cloud.DeviceLocator`: each edge's report of its connected devices.
    """

    # An edge reaches only the devices attached to it: a device alone in its cell cannot join another
    # edge's secure session (fedlora.roles.lone); the cloud refuses its cell and says why.
    hosts_lone_devices = False

    def __init__(self, grid: Grid, tree: CellTree, *, timeout_s: float, connect_timeout_s: float = 120.0,
                 rejoin_s: float = 60.0, track_devices: bool = False):
        self.tree = tree
        # Devices move between edges (fedlora.world.attachments.tracks_devices): every client
        # may train, wherever its edge reports it (:meth:`reports`).
        self.track_devices = track_devices
        self.rejoined_round = -1  # the round whose missing edges were last waited for
        self.rejoin_s = rejoin_s  # each round waits this long for an edge that left to come back
        self.others: set[int] = set()  # nodes that answered but are no edge of this topology
        self.link = FlowerTransport(grid, expected_clients=0, timeout_s=timeout_s + CLOUD_MARGIN_S,
                                    connect_timeout_s=connect_timeout_s)
        self.grid = grid
        self.round_timeout_s = timeout_s
        self.node_of: dict[str, int] = {}  # neighbourhood cell -> edge SuperNode

    def find_edges(self, wait_s: float | None = None) -> None:
        """Identify the connected edges; wait up to ``wait_s`` (default the connect timeout)
        until every neighbourhood cell has one. An edge that left and came back (a restarted
        edge process, same or new node id) is found again."""
        cells = set(self.tree.tier("neighbourhood"))
        if not cells:
            raise EdgeError("mode=cloud needs a tree topology with neighbourhood cells (topology=small6g or city)")
        deadline = time.time() + (self.link.connect_timeout_s if wait_s is None else wait_s)
        while True:
            nodes = set(self.grid.get_node_ids())
            self.node_of = {c: n for c, n in self.node_of.items() if n in nodes}
            new = sorted(nodes - set(self.node_of.values()) - self.others)
            for node, record in (self.link.identities(new) if new else {}).items():
                try:
                    role, cell = str(record[protocol.ROLE_KEY]), str(record[protocol.CELL_KEY])
                except Exception:
                    role, cell = "", ""
                if role != protocol.EDGE_ROLE or cell not in cells:
                    self.others.add(node)
                    log.warning("node %d is not an edge of this topology (role %r, cell %r); ignored", node, role, cell)
                elif cell in self.node_of:
                    log.warning("cell %s claimed by edges %d and %d; keeping the first", cell, self.node_of[cell], node)
                else:
                    self.node_of[cell] = node
            if set(self.node_of) >= cells or time.time() >= deadline:
                break
            time.sleep(0.5)
        missing = sorted(cells - set(self.node_of))
        if missing:
            log.warning("no edge connected for cell(s) %s; their clients cannot train", ", ".join(missing))
        log.info("edges: %s", ", ".join(f"{c} (node {n})" for c, n in sorted(self.node_of.items())) or "none")

    def clients(self) -> list[int]:
        self.find_edges()
        return [c for c, leaf in sorted(self.tree.initial.items())
                if (self.track_devices and self.node_of) or self.tree.neighbourhood_of(leaf) in self.node_of]

    def rejoin(self, server_round: int, cells) -> None:
        """Once per round: when an edge of ``cells`` is unknown or offline, wait up to
        ``rejoin_s`` for the edges to (re)join."""
        online = set(self.grid.get_node_ids())
        if self.rejoined_round == server_round or all(c in self.node_of and self.node_of[c] in online for c in cells):
            return
        self.rejoined_round = server_round
        before = dict(self.node_of)
        self.find_edges(self.rejoin_s)
        for cell in sorted(set(self.node_of) - set(before)):
            log.info("round %d: edge of %s (re)joined", server_round, cell)

    def reports(self, server_round: int) -> list[EdgeReport]:
        """Ask every connected edge which END devices are connected to it (one ``query.report``
        message each); an edge that fails or does not answer in time sends no report."""
        self.rejoin(server_round, self.tree.tier("neighbourhood"))
        cell_of_node = {n: c for c, n in self.node_of.items()}
        messages = [Message(RecordDict(), n, f"{MessageType.QUERY}.{protocol.REPORT}") for n in sorted(cell_of_node)]
        out = []
        for msg in self.link._exchange(messages, REPORT_S, None) if messages else []:
            cell = cell_of_node.get(msg.metadata.src_node_id)
            try:
                if msg.has_error():
                    raise EdgeError(short_reason(msg.error.reason))
                doc = json.loads(str(msg.content[protocol.REPORT][protocol.REPORT_KEY]))
                out.append(EdgeReport(cell, {int(c): int(n) for c, n in doc.items()}))
            except Exception as exc:  # a broken report is no report: the devices stay in their last cells
                log.warning("round %d: edge of %s sent no usable report of its devices: %s", server_round, cell, exc)
        log.info("round %d: devices per edge: %s", server_round,
                 "; ".join(f"{r.cell}: {sorted(r.devices)}" for r in sorted(out, key=lambda r: r.cell)) or "none")
        return out

    def run(self, requests: list[CellRequest], *, late=None, on_reply=None, keys=None) -> list[CellResult]:
        """Each cell's request to its edge, in one exchange. ``late`` (the network model's
        simulated deadline) does not apply to real processes; ``keys`` (the aggregator's
        secure-session keys) are the edge's own: under privacy=secagg the edge runs the cell's
        secure session and sends up its masked sum and unmask bundle, which the cloud unmasks."""
        self.rejoin(requests[0].server_round if requests else 0, [r.cell for r in requests])
        results: dict[str, CellResult] = {}
        messages, cell_of_node = [], {}
        for request in requests:
            node = self.node_of.get(request.cell)
            if node is None:
                results[request.cell] = dropped(request, f"no edge connected for cell {request.cell}")
                continue
            record = ConfigRecord({protocol.CELL_REQUEST_KEY: request.to_bytes(),
                                   protocol.CELL_TIMEOUT_KEY: float(self.round_timeout_s + RELAY_MARGIN_S)})
            messages.append(Message(RecordDict({protocol.CELL: record}), node, MessageType.TRAIN,
                                    group_id=str(request.server_round)))
            cell_of_node[node] = request
        for msg in self.link._exchange(messages, self.link.timeout_s, None) if messages else []:
            request = cell_of_node.get(msg.metadata.src_node_id)
            if request is not None:
                results[request.cell] = decode_result(request, msg)
        out = []
        for request in requests:
            result = results.get(request.cell) or dropped(request, f"edge {request.cell}: no reply before the timeout")
            for cid, status in sorted(result.clients.items()):
                if on_reply is not None and status.status == DROPPED:
                    on_reply(ClientReply(cid, error=status.reason))
            out.append(result)
        return out


def dropped(request: CellRequest, reason: str) -> CellResult:
    """A cell whose edge gave no usable answer: every client dropped with ``reason``."""
    log.warning("round %d: %s", request.server_round, reason)
    secure = None
    if request.secure is not None:  # the cloud reads an aborted secure session for the cell
        secure = SecureOutcome(aborted=reason)
    return CellResult(request.cell, {c: ClientStatus(c, DROPPED, reason) for c in request.clients}, secure=secure)


def decode_result(request: CellRequest, msg: Message) -> CellResult:
    """An edge's reply as a CellResult; an error or anything malformed drops the cell's clients."""
    if msg.has_error():
        return dropped(request, f"edge {request.cell} failed: {short_reason(msg.error.reason)}")
    try:
        result = CellResult.from_bytes(bytes(msg.content[protocol.CELL][protocol.CELL_RESULT_KEY]))
    except Exception as exc:  # malformed or malicious bytes must not stop the run
        return dropped(request, f"edge {request.cell} sent a malformed result: {type(exc).__name__}: {exc}")
    reason = check_result(request, result)
    return dropped(request, f"edge {request.cell} sent an unusable result: {reason}") if reason else result


def check_result(request: CellRequest, result: CellResult) -> str | None:
    """Why an edge's result cannot be merged into the tree sum, or None when it can."""
    if result.cell != request.cell or sorted(result.clients) != sorted(request.clients):
        return f"it is for cell {result.cell!r} / clients {sorted(result.clients)}, not the ones asked"
    accepted = [result.clients[c] for c in result.accepted]
    if request.secure is not None or result.secure is not None:
        return _check_secure(request, result)
    if result.plain is None:
        return "accepted clients but no sum" if accepted else None
    total = result.plain
    if total.count != len(accepted):
        return f"the sum counts {total.count} update(s) but {len(accepted)} client(s) are accepted"
    examples = sum(s.num_examples or 0.0 for s in accepted)
    if not (total.weight > 0 and math.isclose(total.weight, examples, rel_tol=1e-9)):
        return f"the sum's weight {total.weight!r} is not the accepted clients' {examples!r} examples"
    if sorted(total.total) != sorted(request.expected):
        return "the sum's tensors are not the adapter's"
    for key, shape in request.expected.items():
        value = total.total[key]
        if tuple(value.shape) != tuple(shape) or value.dtype.kind != "f" or not np.isfinite(value).all():
            return f"tensor {key!r} has shape {value.shape}, dtype {value.dtype} or non-finite values"
    return None


def _check_secure(request: CellRequest, result: CellResult) -> str | None:
    """The shape of a secure cell's result; its cryptography (signed header and roster, the
    shares) the cloud's unmasker checks itself."""
    if request.secure is None or result.plain is not None or result.metrics:
        return "a secure cell must send its masked sum only, no plain sum or clear metrics"
    outcome = result.secure
    if not isinstance(outcome, SecureOutcome):
        return "no secure-aggregation outcome"
    # dropped's types (stage name -> client ids) are checked when the reply is decoded (wire.Checked)
    if not all(set(v) <= set(request.clients) for v in outcome.dropped.values()):
        return "the session's dropped clients are not the cell's"
    if outcome.aborted is not None:
        return None if isinstance(outcome.aborted, str) and not result.accepted else "an aborted cell accepted clients"
    masked, bundle = outcome.masked, outcome.bundle
    size = request.secure.header.header.layout.size
    if not isinstance(masked, MaskedSum) or not isinstance(bundle, UnmaskBundle):
        return "a masked sum and an unmask bundle are needed"
    if masked.cells != frozenset({request.cell}) or bundle.header.header.cell != request.cell:
        return f"the masked sum or bundle is for cell(s) {sorted(masked.cells)}, not {request.cell!r}"
    if masked.clients != len(result.accepted):
        return f"the masked sum counts {masked.clients} input(s) but {len(result.accepted)} client(s) are accepted"
    vector = masked.vector
    if not isinstance(vector, np.ndarray) or vector.dtype != np.uint32 or vector.shape != (size,):
        return f"the masked vector is not uint32 of shape ({size},)"
    if sorted(outcome.survivors) != result.accepted:
        return "the session's survivors are not the accepted clients"
    return None
