"""Flower ClientApp for END devices: decode a request, train locally, reply with the delta.

The device's identity is its ``partition-id`` node setting (in simulation Flower sets it;
on a real device, ``flower-supernode --node-config "partition-id=3 num-partitions=8"``).
All the work is :func:`fedlora.device.train_round`, and under ``privacy=secagg``
:func:`fedlora.device.secure_step` (one message per stage; the session state stays in this
node's ``context.state``, since a SuperNode starts a new ClientApp process per message).
A SuperNode whose node config says ``role="edge"`` is an edge aggregator, not a device: its
messages go to ``clients/edge.py``.
"""

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.edge import identity as edge_identity
from clients.edge import is_edge, relay
from fedlora import protocol
from fedlora.progress import quiet_libraries

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
    return Message(RecordDict({protocol.IDENTITY: record}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    if is_edge(context.node_config):
        return relay(msg, context.node_config)
    from fedlora.device import train_round  # torch only where training happens (Flower: one process per message)

    settings = protocol.decode_settings(str(msg.content[protocol.SETTINGS][protocol.SETTINGS_KEY]))
    global_state = {k: a.numpy() for k, a in msg.content[protocol.ADAPTER].items()}
    delta, metrics = train_round(settings, global_state, _client_id(context))
    content = RecordDict(
        {
            protocol.ADAPTER: ArrayRecord({k: Array(v) for k, v in delta.items()}),
            protocol.METRICS: MetricRecord({k: float(v) for k, v in metrics.items()}),
        }
    )
    return Message(content, reply_to=msg)


@app.train(protocol.SECAGG)
def secagg(msg: Message, context: Context) -> Message:
    """One secure-aggregation stage; the state between stages never leaves this node."""
    from fedlora.device import secure_step  # torch only on devices (Flower: one process per message)

    request = msg.content[protocol.SECAGG]
    settings = protocol.decode_settings(str(msg.content[protocol.SETTINGS][protocol.SETTINGS_KEY]))
    if int(request[protocol.ROUND_KEY]) != int(settings["round"]):
        raise ValueError(f"secure stage for round {request[protocol.ROUND_KEY]} carries settings of round {settings['round']}")
    arrays = {k: a.numpy() for k, a in msg.content[protocol.ADAPTER].items()} if protocol.ADAPTER in msg.content else None
    kept = context.state.get(protocol.SECAGG_STATE)
    stored = (str(kept["session"]), bytes(kept["state"])) if kept is not None else None
    reply, (session, state), metrics = secure_step(str(request[protocol.STAGE_KEY]), bytes(request[protocol.PAYLOAD_KEY]),
                                                   stored, settings, arrays, _client_id(context), run=context.run_id)
    context.state[protocol.SECAGG_STATE] = ConfigRecord({"session": session, "state": state})
    content = RecordDict({protocol.SECAGG: ConfigRecord({protocol.REPLY_KEY: reply}),
                          protocol.METRICS: MetricRecord({k: float(v) for k, v in metrics.items()})})
    return Message(content, reply_to=msg)
