"""Every role in one process: the cells run here, each END client runs here in turn.

:class:`LocalCellRunner` runs the round's neighbourhood cells in the cloud's own process
(simulation, tests, a single server); :class:`InProcessTransport` runs each END client's
round in this process, one after another (tests, benchmarks, debugging). A deployment
replaces them with real processes (``server/edge.py``, ``server/transport.py``).
"""

from __future__ import annotations

from typing import Callable

from fedlora import adapters
from fedlora.roles.device import secure_step, train_round
from fedlora.roles.neighbourhood import ClientReply, ReplyCallback, SecureSplit, Transport, run_cells
from fedlora.roles.split import SecureSplitDevices, split_round
from fedlora.secure.identities import Identities


class LocalCellRunner:
    """Every cell in this process over one transport (simulation, tests, a single server); split
    clients train with their cell's edge half in this process too (:func:`fedlora.roles.split.split_round`;
    in a secure session :class:`fedlora.roles.split.SecureSplitDevices`, one per round)."""

    # Every client is reachable from here, so a cell may hold a device from another neighbourhood.
    hosts_lone_devices = True

    def __init__(self, transport: Transport, secure_split: Callable[[], SecureSplit] = SecureSplitDevices):
        self.transport = transport
        self.secure_split = secure_split  # a round's split devices in secure sessions (tests may replace them)

    def clients(self) -> list[int]:
        return self.transport.clients()

    def run(self, requests, *, late=None, on_reply=None, keys=None):
        return run_cells(requests, self.transport, late=late, on_reply=on_reply, keys=keys, split=split_round,
                         secure_split=self.secure_split())


class InProcessTransport:
    """Runs every client in this process, one after another (tests, debugging)."""

    def __init__(self, num_clients: int, fault: Callable[[int, ClientReply], ClientReply] | None = None,
                 stage_fault: Callable[[int, str, ClientReply], ClientReply | None] | None = None,
                 identities: Callable[[int], Identities] | None = None):
        self.num_clients = num_clients
        self.identities = identities  # client -> its keys (default: derived from the seed)
        self.fault = fault  # lets tests corrupt or drop replies
        self.stage_fault = stage_fault  # the same for secure-aggregation stages
        self.device_state: dict[int, tuple[str, bytes]] = {}  # each client's own secure-session state

    def exchange(self, server_round, stage, payloads, arrays, settings, on_reply):
        def step(cid: int) -> ClientReply:
            ids = self.identities(cid) if self.identities is not None else None
            data, self.device_state[cid], metrics = secure_step(stage, payloads[cid], self.device_state.get(cid),
                                                                settings, arrays, cid, identities=ids)
            return ClientReply(cid, data, metrics, bytes_up=len(data))

        fault = None if self.stage_fault is None else (lambda reply: self.stage_fault(server_round, stage, reply))
        return _each(sorted(payloads), step, fault, on_reply)

    def clients(self) -> list[int]:
        return list(range(self.num_clients))

    def train(self, server_round, clients, arrays, settings, on_reply):
        def step(cid: int) -> ClientReply:
            delta, metrics = train_round(settings, arrays, cid)
            return ClientReply(cid, delta, metrics, bytes_up=adapters.nbytes(delta))

        fault = None if self.fault is None else (lambda reply: self.fault(server_round, reply))
        return _each(clients, step, fault, on_reply)


def _each(clients: list[int], step: Callable[[int], ClientReply], fault, on_reply: ReplyCallback) -> list[ClientReply]:
    """Run ``step`` for each client in turn; a raising client becomes an error reply; ``fault``
    (tests) may replace or drop (None) a reply before it is reported."""
    replies = []
    for cid in clients:
        try:
            reply = step(cid)
        except Exception as exc:  # a failing client is a dropped client, not a failed run
            reply = ClientReply(cid, error=f"{type(exc).__name__}: {exc}")
        if fault is not None:
            reply = fault(reply)
            if reply is None:
                continue
        on_reply(reply)
        replies.append(reply)
    return replies
