"""Flower ClientApp for END devices: decode a request, train locally, reply with the delta.

The device's identity is its ``partition-id`` node setting (in simulation Flower sets it;
on a real device, ``flower-supernode --node-config "partition-id=3 num-partitions=8"``).
All the work is :func:`fedlora.roles.device.train_round`, and under ``privacy=secagg``
:func:`fedlora.roles.device.secure_step` (one message per stage; the session state stays in this
node's ``context.state``, since a SuperNode starts a new ClientApp process per message).
A SuperNode whose node config says ``role="edge"`` is an edge aggregator, not a device: its
messages go to ``clients/edge.py``.

A device started from a deployment plan (``fedlora client --config FOLDER``,
``fedlora/deploy/launcher.py``) also has in its node config:

- ``node-dir``: its folder -- its own Ed25519 key and the plan's registry for secure
  aggregation (never keys derived from the seed);
- ``device-settings``: how this device trains (:data:`fedlora.round_settings.LOCAL_KEYS`, picked
  from its memory by the launcher), and ``data-file``: its own examples, if any;
- ``audit-dir``: when set, a copy of every reply this device sends is written there
  (what leaves the device, for its owner to inspect; :func:`audit`);
- ``state-dir``: its folder's ``state/``, where it keeps what a personal strategy leaves on the
  device across rounds (``state/personal/``; never sent).
- ``device-socket``: the device's resident process (:mod:`fedlora.deploy.resident`, the default
  of ``fedlora client --config``): train and secure-aggregation messages are forwarded to it
  (:func:`fedlora.deploy.channel.call`) and this process stays torch-free; the secure session's
  state then lives in the resident process. An unreachable or failing resident process raises:
  an error reply, the device is a dropout of that round.
"""

import base64
import json
import time
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.edge import identity as edge_identity
from clients.edge import is_edge, relay
from clients.edge import report as edge_report
from fedlora import protocol
from fedlora.deploy import channel
from fedlora.runs.progress import quiet_libraries

quiet_libraries()

app = ClientApp()


def _client_id(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError("this SuperNode has no partition-id in its node config (--node-config 'partition-id=N')")
    return int(context.node_config["partition-id"])


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Tell the server which client (data partition) this node is."""
    if is_edge(context.node_config):
        return edge_identity(msg, context.node_config)
    record = ConfigRecord({protocol.CLIENT_ID_KEY: _client_id(context)})
    if "attachment" in context.node_config:  # a device that moves between edges: which attachment this is
        record[protocol.ATTACHMENT_KEY] = int(context.node_config["attachment"])
    return audit(context, Message(RecordDict({protocol.IDENTITY: record}), reply_to=msg), "identify")


@app.query(protocol.REPORT)
def report(msg: Message, context: Context) -> Message:
    """An edge tells its parent which END devices are connected to it (devices moving between edges)."""
    if not is_edge(context.node_config):
        raise ValueError("only an edge aggregator reports its connected devices; this SuperNode is an END device")
    return edge_report(msg, context.node_config)


def _deployed(context: Context):
    """(identities, device-local settings) of a device started from a plan folder, else (None, None);
    a device with only a ``state-dir`` gets (None, its local settings): it keeps its own state there."""
    node_dir = str(context.node_config.get("node-dir", "") or "")
    state_dir = str(context.node_config.get("state-dir", "") or "")
    if not node_dir and not state_dir:
        return None, None
    # torch (fedlora.roles.device) and the plan reader load on a planned END device only, never in an
    # edge's relay (Flower: one process per message)
    from fedlora.deploy.plan import read_node
    from fedlora.roles.device import DeviceLocal

    local = DeviceLocal(str(context.node_config.get("device-settings", "") or ""),
                        str(context.node_config.get("data-file", "") or ""), state_dir)
    return (read_node(node_dir).identities() if node_dir else None), local


def audit(context: Context, reply: Message, what: str) -> Message:
    """Keep a copy of ``reply``'s content in the node's ``audit-dir`` (if set): every record,
    arrays as dtype/shape/base64 bytes, bytes values as base64."""
    folder = str(context.node_config.get("audit-dir", "") or "")
    if not folder:
        return reply
    doc = {"what": what, "run": int(context.run_id), "records": {}}
    for name, record in reply.content.items():
        if isinstance(record, ArrayRecord):
            items = {k: {"dtype": str(a.numpy().dtype), "shape": list(a.numpy().shape),
                         "b64": base64.b64encode(a.numpy().tobytes()).decode()} for k, a in record.items()}
            doc["records"][name] = {"kind": "arrays", "items": items}
        else:
            items = {k: {"b64": base64.b64encode(bytes(v)).decode()} if isinstance(v, bytes) else v for k, v in record.items()}
            doc["records"][name] = {"kind": type(record).__name__, "items": items}
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{time.time_ns()}-{what}.json").write_text(json.dumps(doc))
    return reply


def _resident(context: Context) -> Path | None:
    """The socket of this device's resident process, if it has one."""
    path = str(context.node_config.get("device-socket", "") or "")
    return Path(path) if path else None


def _forward(socket: Path, settings_json: str, kind: str, arrays, **secure) -> dict:
    """One message's work done by the resident process; ChannelError (an error reply) if it cannot."""
    timeout_s = protocol.decode_settings(settings_json).round_timeout_s
    return channel.call(socket, channel.encode_request(kind, settings_json, arrays, **secure), timeout_s=timeout_s)


def _split_order(msg: Message, socket: Path | None) -> str:
    """The edge's split order in ``msg`` ("" when the device trains the whole model); split training
    runs in the resident process only (it holds the stream with the edge)."""
    if protocol.SPLIT not in msg.content:
        return ""
    if socket is None:
        raise ValueError("the edge asks this device to train split, which needs its resident process "
                         "(`fedlora client --config FOLDER` starts it)")
    return str(msg.content[protocol.SPLIT][protocol.SPLIT_KEY])


@app.train()
def train(msg: Message, context: Context) -> Message:
    if is_edge(context.node_config):
        return relay(msg, context.node_config)
    settings_json = str(msg.content[protocol.SETTINGS][protocol.SETTINGS_KEY])
    global_state = {k: a.numpy() for k, a in msg.content[protocol.ADAPTER].items()}
    socket = _resident(context)
    split = _split_order(msg, socket)
    if socket is not None:
        answer = _forward(socket, settings_json, "train", global_state, split=split)
        delta, metrics = answer["arrays"], answer["metrics"]
    else:
        from fedlora.roles.device import train_round  # torch only where training happens (Flower: one process per message)

        _, local = _deployed(context)
        delta, metrics = train_round(protocol.decode_settings(settings_json), global_state, _client_id(context), local=local)
    content = RecordDict(
        {
            protocol.ADAPTER: ArrayRecord({k: Array(v) for k, v in delta.items()}),
            protocol.METRICS: MetricRecord({k: float(v) for k, v in metrics.items()}),
        }
    )
    return audit(context, Message(content, reply_to=msg), "train")


@app.train(protocol.SECAGG)
def secagg(msg: Message, context: Context) -> Message:
    """One secure-aggregation stage; the state between stages never leaves this node."""
    request = msg.content[protocol.SECAGG]
    settings_json = str(msg.content[protocol.SETTINGS][protocol.SETTINGS_KEY])
    settings = protocol.decode_settings(settings_json)
    if int(request[protocol.ROUND_KEY]) != settings.round:
        raise ValueError(f"secure stage for round {request[protocol.ROUND_KEY]} carries settings of round {settings.round}")
    arrays = {k: a.numpy() for k, a in msg.content[protocol.ADAPTER].items()} if protocol.ADAPTER in msg.content else None
    stage = str(request[protocol.STAGE_KEY])
    socket = _resident(context)
    split = _split_order(msg, socket)
    if socket is not None:  # the resident process keeps the session state
        answer = _forward(socket, settings_json, "secagg", arrays, run=int(context.run_id), stage=stage,
                          round=settings.round, payload=bytes(request[protocol.PAYLOAD_KEY]), split=split)
        reply, metrics = answer["reply"], answer["metrics"]
    else:
        from fedlora.roles.device import secure_step  # torch only on devices (Flower: one process per message)

        kept = context.state.get(protocol.SECAGG_STATE)
        stored = (str(kept["session"]), bytes(kept["state"])) if kept is not None else None
        identities, local = _deployed(context)
        reply, (session, state), metrics = secure_step(stage, bytes(request[protocol.PAYLOAD_KEY]), stored, settings, arrays,
                                                       _client_id(context), run=context.run_id, identities=identities,
                                                       local=local)
        context.state[protocol.SECAGG_STATE] = ConfigRecord({"session": session, "state": state})
    content = RecordDict({protocol.SECAGG: ConfigRecord({protocol.REPLY_KEY: reply}),
                          protocol.METRICS: MetricRecord({k: float(v) for k, v in metrics.items()})})
    return audit(context, Message(content, reply_to=msg), f"secagg-{stage}")
