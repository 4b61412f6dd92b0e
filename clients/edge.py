"""The edge aggregator's SuperNode side: relay the parent's cell request to the edge service.

A SuperNode whose node config says ``role="edge"`` (``fedlora edge`` starts one, connected
upward to its parent's SuperLink) is no END device: ``clients/app.py`` hands its messages
here. :func:`identity` tells the parent which neighbourhood cell it aggregates;
:func:`relay` drops the parent's cell request bytes in the edge's *spool* directory
(:mod:`fedlora.deploy.spool`) and answers with the result bytes the edge service
(``server/edge.py``, a long-lived run on the edge's own SuperLink) leaves there;
:func:`report` likewise answers the parent's question which END devices are connected to
this edge (devices moving between edges, :mod:`fedlora.world.attachments`). A failure
raises, so the parent gets an error reply and drops that cell's clients with the reason.

Light on purpose: Flower starts a new ClientApp process for every message, and the relay
needs neither torch nor the model (importing them would cost seconds per round).
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, RecordDict

from fedlora import protocol
from fedlora.deploy.spool import REPORT_JOB, Spool

REPORT_TIMEOUT_S = 60.0  # the edge service identifies new devices first (up to its FIND_S)


def is_edge(node_config) -> bool:
    return str(node_config.get(protocol.ROLE_KEY, "")) == protocol.EDGE_ROLE


def _edge_setting(node_config, key: str) -> str:
    value = str(node_config.get(key, "") or "")
    if not value:
        raise ValueError(f"this edge SuperNode has no {key!r} in its node config (--node-config '{key}=...')")
    return value


def identity(msg: Message, node_config) -> Message:
    """An edge tells its parent which cell it aggregates."""
    record = ConfigRecord({protocol.ROLE_KEY: protocol.EDGE_ROLE, protocol.CELL_KEY: _edge_setting(node_config, "cell")})
    return Message(RecordDict({protocol.IDENTITY: record}), reply_to=msg)


def relay(msg: Message, node_config) -> Message:
    """Hand the parent's cell request to this edge's service; answer with the cell's result."""
    spool = Spool(_edge_setting(node_config, "spool"))
    record = msg.content[protocol.CELL]
    data = bytes(record[protocol.CELL_REQUEST_KEY])
    timeout_s = float(record[protocol.CELL_TIMEOUT_KEY])
    key = f"{msg.metadata.run_id}-{msg.metadata.message_id[:16]}"
    spool.submit(key, data)
    result = spool.wait(key, timeout_s)
    return Message(RecordDict({protocol.CELL: ConfigRecord({protocol.CELL_RESULT_KEY: result})}), reply_to=msg)


def report(msg: Message, node_config) -> Message:
    """Ask this edge's service which END devices are connected to it; answer with its JSON."""
    spool = Spool(_edge_setting(node_config, "spool"))
    key = f"{REPORT_JOB}{msg.metadata.run_id}-{msg.metadata.message_id[:16]}"
    spool.submit(key, b"")
    devices = spool.wait(key, REPORT_TIMEOUT_S).decode()
    return Message(RecordDict({protocol.REPORT: ConfigRecord({protocol.REPORT_KEY: devices})}), reply_to=msg)
