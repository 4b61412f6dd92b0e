"""privacy=secagg through the Flower message path without Flower processes.

``FlowerTransport`` talks to an in-memory Grid that hands each message to the real
``clients.app`` ClientApp with that node's Context, serialised to protobuf and back between
messages the way a SuperNode keeps it for a fresh ClientApp process; an exception in the
ClientApp becomes an error reply, as in Flower.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.serde import context_from_proto, context_to_proto
from flwr.supercore.task_identity import TaskIdentity
from safetensors.numpy import load_file

from clients.app import app as client_app
from fedlora import protocol
from fedlora.config import compose
from fedlora.roles.cloud import run_federation
from fedlora.roles.local import InProcessTransport
from fedlora.runs import report
from server.transport import FlowerTransport, decode_reply


class MemoryGrid:
    """The part of flwr's Grid FlowerTransport uses, running clients.app in this process."""

    def __init__(self, num_nodes: int, run_id: int = 7):
        self.contexts = {node: context_to_proto(Context(run_id, node, {"partition-id": node - 100}, RecordDict(), {}))
                         for node in range(100, 100 + num_nodes)}
        self.ids = itertools.count()
        self.outbox: list[Message] = []

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = mid = f"m{next(self.ids)}"
            ids.append(mid)
            self.outbox.append(self.deliver(msg))
        return ids

    def deliver(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        context = context_from_proto(self.contexts[node])  # a fresh process: only the kept context
        try:
            reply = client_app(msg, context)
        except Exception as exc:  # Flower answers a failing ClientApp with an error message
            return Message(Error(0, f"{type(exc).__name__}: {exc}"), reply_to=msg)
        self.contexts[node] = context_to_proto(context)
        return reply

    def pull_messages(self, ids):
        ids = set(ids)
        out = [m for m in self.outbox if m.metadata.reply_to_message_id in ids]
        self.outbox = [m for m in self.outbox if m not in out]
        return out

    def state(self, node: int) -> RecordDict:
        return context_from_proto(self.contexts[node]).state


@pytest.fixture(scope="module", autouse=True)
def server_identity():
    """Who creates messages in this process (Flower sets it in a ServerApp process)."""
    saved = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


# Eight clients on the small6g tree, all of them in each of two secure rounds.
SECURE8 = ("topology=small6g", "federation.num_clients=8", "federation.rounds=2", "federation.fraction=1.0", "privacy=secagg")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, short_run):
    base = tmp_path_factory.mktemp("runs")
    run_federation(short_run(*SECURE8), base / "inprocess", InProcessTransport(8))
    grid = MemoryGrid(8)
    run_federation(short_run(*SECURE8), base / "messages", FlowerTransport(grid, expected_clients=8, timeout_s=60))
    return base / "inprocess", base / "messages", grid


def test_secure_rounds_over_flower_messages_equal_the_in_process_run(runs):
    inprocess, messages, _ = runs
    a = load_file(str(inprocess / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(messages / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    for ra, rb in zip(report.read_rounds(inprocess), report.read_rounds(messages), strict=True):
        assert rb["aggregated"] and rb["secure"]["cells"] and all(c["ok"] for c in rb["secure"]["cells"].values())
        assert ra["secure"]["cells"] == rb["secure"]["cells"] and ra["participants"] == rb["participants"]
        assert ra["eval_loss"] == rb["eval_loss"]


def secure_message(node: int, stage: str, server_round: int, payload: bytes = b"") -> Message:
    from fedlora.run_settings import resolve_run

    settings = resolve_run(compose(["model=tiny", "seed=42"])).round_settings(server_round, {"proximal_mu": 0.0,
                                                                                           "freeze_a": False})
    content = RecordDict({
        protocol.SECAGG: ConfigRecord({protocol.STAGE_KEY: stage, protocol.ROUND_KEY: server_round,
                                       protocol.PAYLOAD_KEY: payload}),
        protocol.SETTINGS: ConfigRecord({protocol.SETTINGS_KEY: protocol.encode_settings(settings)}),
    })
    return Message(content, node, f"{MessageType.TRAIN}.{protocol.SECAGG}")


def test_the_kept_state_is_keyed_by_run_and_round_and_a_stale_one_is_refused(runs):
    *_, grid = runs
    node = 100
    kept = grid.state(node)[protocol.SECAGG_STATE]
    assert kept["session"] == "7/round-2" and len(kept["state"]) > 0  # the last round's, on the device only
    (stale,) = grid.pull_messages(grid.push_messages([secure_message(node, "share-keys", 3)]))
    reply = decode_reply(0, stale, secure=True)
    assert "StaleSessionState" in reply.error and "7/round-2" in reply.error and "7/round-3" in reply.error
    assert grid.state(node)[protocol.SECAGG_STATE]["session"] == "7/round-2"  # refused, nothing overwritten
    fresh = MemoryGrid(1)
    (none,) = fresh.pull_messages(fresh.push_messages([secure_message(100, "masked-input", 1)]))
    assert "holds no secure-aggregation state" in decode_reply(0, none, secure=True).error


@pytest.mark.parametrize("content", [
    RecordDict({protocol.METRICS: MetricRecord({})}),  # no answer at all
    RecordDict({protocol.SECAGG: ConfigRecord({protocol.REPLY_KEY: "text"}), protocol.METRICS: MetricRecord({})}),
    RecordDict({protocol.SECAGG: ConfigRecord({protocol.REPLY_KEY: b"x"})}),  # no metrics
])
def test_a_malformed_secure_reply_is_an_error_reply_with_a_reason(content):
    request = secure_message(100, "advertise", 1)
    request.metadata.__dict__["_message_id"] = "m0"
    reply = decode_reply(3, Message(content, reply_to=request), secure=True)
    assert reply.client == 3 and reply.update is None and reply.error.startswith("malformed reply:")
