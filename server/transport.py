"""Flower's Grid as a fedlora Transport: requests out, replies (or their absence) back."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid

from fedlora import protocol
from fedlora.adapters import AdapterState
from fedlora.roles.cloud import ClientReply, FederationError, ReplyCallback
from fedlora.round_settings import RoundSettings

log = logging.getLogger("fedlora")
POLL_S = 0.05


class FlowerTransport:
    """Sends training requests through a Flower Grid and collects replies as they arrive."""

    def __init__(self, grid: Grid, *, expected_clients: int, timeout_s: float, connect_timeout_s: float = 120.0):
        self.grid = grid
        self.expected = expected_clients
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.node_of: dict[int, int] = {}  # client id -> Flower node id
        self.attachment_of: dict[int, int] = {}  # client id -> the attachment count it told (roaming devices)

    def clients(self) -> list[int]:
        """Wait for the SuperNodes, ask each which client it is, return the client ids."""
        deadline = time.time() + self.connect_timeout_s
        nodes = list(self.grid.get_node_ids())
        while len(nodes) < self.expected and time.time() < deadline:
            time.sleep(0.5)
            nodes = list(self.grid.get_node_ids())
        if len(nodes) < self.expected:
            log.warning("only %d of %d SuperNodes connected; going on with them", len(nodes), self.expected)
        self.identify(nodes)
        if not self.node_of:
            raise FederationError("no SuperNode identified itself as a client")
        return sorted(self.node_of)

    def identities(self, nodes: list[int]) -> dict[int, ConfigRecord]:
        """Ask ``nodes`` who they are: node id -> its identity record (failures logged, left out)."""
        queries = [Message(RecordDict(), node, MessageType.QUERY) for node in nodes]
        out = {}
        for reply in self._exchange(queries, self.connect_timeout_s, None):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("node %d did not identify itself: %s", node, reply.error.reason)
                continue
            try:
                out[node] = reply.content[protocol.IDENTITY]
            except Exception as exc:  # a node answering nonsense is left out, not fatal
                log.warning("node %d sent a malformed identity: %s", node, exc)
        return out

    def identify(self, nodes: list[int]) -> set[int]:
        """Add the END clients among ``nodes`` to ``node_of`` (client id -> node id); return
        the nodes that answered at all."""
        answered = self.identities(nodes)
        for node, record in answered.items():
            try:
                cid = int(record[protocol.CLIENT_ID_KEY])
                attachment = int(record.get(protocol.ATTACHMENT_KEY, 0) or 0)
            except Exception as exc:  # a node answering nonsense is left out, not fatal
                log.warning("node %d sent a malformed identity: %s", node, exc)
                continue
            if cid in self.node_of:
                log.warning("client id %d claimed by nodes %d and %d; keeping the first", cid, self.node_of[cid], node)
                continue
            self.node_of[cid] = node
            self.attachment_of[cid] = attachment
        return set(answered)

    def train(self, server_round: int, clients: list[int], arrays: AdapterState, settings: RoundSettings,
              on_reply: ReplyCallback, *, split: Mapping[int, str] | None = None) -> list[ClientReply]:
        """``split``: client -> its split order (JSON, :class:`fedlora.deploy.split_session.SplitOrder`)."""
        contents = {cid: RecordDict({protocol.ADAPTER: _adapter_record(arrays), protocol.SETTINGS: _settings_record(settings)})
                    for cid in clients}
        _add_split(contents, split)
        return self._ask(contents, MessageType.TRAIN, str(server_round), on_reply, secure=False)

    def exchange(self, server_round: int, stage: str, payloads: dict[int, bytes], arrays: AdapterState | None,
                 settings: RoundSettings, on_reply: ReplyCallback, *, split: Mapping[int, str] | None = None
                 ) -> list[ClientReply]:
        """One secure-aggregation stage: message type ``train.secagg``, the stage, round and
        payload in a ConfigRecord, the adapter only when ``arrays`` is given (first stage);
        ``split``: as for :meth:`train` (first stage)."""
        contents = {}
        for cid, payload in payloads.items():
            request = ConfigRecord({protocol.STAGE_KEY: stage, protocol.ROUND_KEY: int(server_round),
                                    protocol.PAYLOAD_KEY: bytes(payload)})
            content = RecordDict({protocol.SECAGG: request, protocol.SETTINGS: _settings_record(settings)})
            if arrays is not None:
                content[protocol.ADAPTER] = _adapter_record(arrays)
            contents[cid] = content
        _add_split(contents, split)
        return self._ask(contents, f"{MessageType.TRAIN}.{protocol.SECAGG}", f"{server_round}/{stage}", on_reply, secure=True)

    def _ask(self, contents: dict[int, RecordDict], message_type: str, group_id: str, on_reply: ReplyCallback, *,
             secure: bool) -> list[ClientReply]:
        """Send each client its content, decode the replies as they arrive."""
        client_of = {self.node_of[c]: c for c in contents}
        messages = [Message(content, self.node_of[cid], message_type, group_id=group_id) for cid, content in contents.items()]
        replies = []

        def collect(msg: Message) -> None:
            cid = client_of.get(msg.metadata.src_node_id)
            if cid is None:
                log.warning("ignoring a reply from unexpected node %d", msg.metadata.src_node_id)
                return
            reply = decode_reply(cid, msg, secure=secure)
            replies.append(reply)
            on_reply(reply)

        self._exchange(messages, self.timeout_s, collect)
        return replies

    def _exchange(self, messages: list[Message], timeout_s: float, on_message) -> list[Message]:
        """Push messages, pull replies until all arrived or the timeout; one reply per node.

        An error the SuperLink answers in a node's place (the node stopped beating, the message
        expired: Flower sends it from ``SUPERLINK_NODE_ID``) counts as that node's reply, so the
        node is dropped at once with Flower's reason, not after the timeout as "no reply"."""
        ids = list(self.grid.push_messages(messages))
        dst_of = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages)}
        pending = set(ids)
        seen_nodes: set[int] = set()
        out = []
        deadline = time.time() + timeout_s
        while pending and time.time() < deadline:
            for msg in self.grid.pull_messages(pending):
                pending.discard(msg.metadata.reply_to_message_id)
                if msg.metadata.src_node_id == SUPERLINK_NODE_ID and msg.metadata.reply_to_message_id in dst_of:
                    # Flower's own way of naming a message's sender (it sets the message id the same way)
                    msg.metadata.__dict__["_src_node_id"] = dst_of[msg.metadata.reply_to_message_id]
                if msg.metadata.src_node_id in seen_nodes:
                    continue
                seen_nodes.add(msg.metadata.src_node_id)
                out.append(msg)
                if on_message is not None:
                    on_message(msg)
            if pending:
                time.sleep(POLL_S)
        return out


def decode_reply(cid: int, msg: Message, *, secure: bool = False) -> ClientReply:
    """A reply as plain arrays (``secure``: the stage's answer as bytes) and metrics; anything
    undecodable becomes an error reply."""
    if msg.has_error():
        return ClientReply(cid, error=f"client error: {short_reason(msg.error.reason)}")
    try:
        metrics = dict(msg.content[protocol.METRICS])
        if secure:
            update = msg.content[protocol.SECAGG][protocol.REPLY_KEY]
            if not isinstance(update, bytes):
                raise TypeError(f"the secure-aggregation answer is a {type(update).__name__}, not bytes")
            bytes_up = len(update)
        else:
            update = {k: a.numpy() for k, a in msg.content[protocol.ADAPTER].items()}
            bytes_up = sum(v.nbytes for v in update.values())  # payload, as counted downlink
    except Exception as exc:  # malformed or malicious content must not stop the run
        return ClientReply(cid, error=f"malformed reply: {type(exc).__name__}: {exc}")
    return ClientReply(cid, update, metrics, bytes_up=bytes_up)


def _add_split(contents: dict[int, RecordDict], split: Mapping[int, str] | None) -> None:
    for cid, order in (split or {}).items():
        if cid in contents:
            contents[cid][protocol.SPLIT] = ConfigRecord({protocol.SPLIT_KEY: str(order)})


def _adapter_record(arrays: AdapterState) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def _settings_record(settings: RoundSettings) -> ConfigRecord:
    return ConfigRecord({protocol.SETTINGS_KEY: protocol.encode_settings(settings)})


def short_reason(reason: str, limit: int = 300) -> str:
    """The last meaningful line of a (Ray) traceback, without terminal colour codes."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", reason or "").replace("\\n", "\n")
    lines = [line.strip(" '\">") for line in text.splitlines() if line.strip(" '\">")]
    last = lines[-1] if lines else "unknown error"
    return last if len(last) <= limit else last[: limit - 3] + "..."
