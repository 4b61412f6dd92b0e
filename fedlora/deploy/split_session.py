"""Split learning in a deployed round: the edge process and its split devices over the split stream.

In simulation a split client's two halves run in one process (:func:`fedlora.roles.split.split_round`).
In a deployment the cell's round runs on the edge (``server/edge.py``) and each split device trains
in its own resident process (:mod:`fedlora.deploy.resident`); the per-step exchange between them is
the split stream (:mod:`fedlora.deploy.stream`, docs/split_stream.md), never a Flower message per step:

1. the edge (:class:`StreamedSplit`, the cell round's ``split`` and ``secure_split``) loads its copy of
   the model with the round's adapter, opens the round's stream for that device with an ``EdgeHalf``
   behind it, and sends the device its usual training message (plain, or the secure session's first
   stage) with a :class:`SplitOrder` beside it: the cut, the edge to dial (its plan node name) and the
   session id both ends bind the stream's handshake to;
2. the device (:func:`train_split`, from its resident process) looks the edge up among the edges its
   own plan folder names (its upstream edge or a candidate cell's), dials it (TLS with the plan's CA, the
   signed handshake with the plan's keys), trains its blocks with the edge's in between, closes the
   stream and replies with the delta of ITS OWN tensors only (and, in a secure session, its masked
   input: zeros for the edge's blocks);
3. the edge closes the stream, takes the delta of its blocks for that device from its model and hands
   both to the cell's round (:func:`fedlora.roles.neighbourhood.run_cells`), exactly as in simulation:
   plain, the edge's part is summed with the device's example count; secure, it is added into the cell's
   masked sum for the devices in it.

The device tells its edge its example count in clear (``split_examples``): the edge weighs its part of
the device's update with it; it already sees every batch the device trains (split learning is not secure
aggregation: the edge sees every step's activations, docs/split_learning.md).

Any failure -- the device unreachable or not connected, the stream refused or broken, a wrong answer --
makes that device a dropout of the round (an error reply); the cell's other devices go on. A cell's split
devices train one after another: the edge has one copy of the model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedlora import adapters
from fedlora.adapters import AdapterState
from fedlora.deploy.plan import NodeFolder, protocol_id
from fedlora.deploy.stream_protocol import parse_address, stream_port
from fedlora.round_settings import RoundSettings
from fedlora.secure.rounds import STAGES, device_id
from fedlora.world.splitplan import SplitCut, edge_keys

log = logging.getLogger("fedlora")
EXAMPLES = "split_examples"


class SplitOrderError(ValueError):
    """A split order a device cannot follow (malformed, or for an edge its plan does not name)."""


@dataclass(frozen=True)
class SplitOrder:
    """What the edge tells a split device with its training message."""

    k: int  # decoder blocks on the device before the edge
    m: int  # decoder blocks on the device after the edge, before the head
    edge: str  # the edge's plan node name (``edge-<cell>``): whom to dial, whose key signs the stream
    session: str  # the run id both ends bind the stream's handshake to (the cell request's)

    def __post_init__(self) -> None:
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (self.k, self.m))
        ok = ok and isinstance(self.edge, str) and self.edge.startswith("edge-") and isinstance(self.session, str)
        if not ok or self.k < 1 or self.m < 0 or not self.session or len(self.edge) > 200 or len(self.session) > 200:
            raise SplitOrderError(f"malformed split order: k={self.k!r} m={self.m!r} edge={self.edge!r} "
                                  f"session={self.session!r}")

    @property
    def cut(self) -> SplitCut:
        return SplitCut(self.k, self.m)

    def to_json(self) -> str:
        return json.dumps({"k": self.k, "m": self.m, "edge": self.edge, "session": self.session}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SplitOrder:
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise SplitOrderError(f"the split order is not JSON: {exc}") from None
        if not isinstance(doc, dict) or set(doc) != {"k", "m", "edge", "session"}:
            raise SplitOrderError("a split order has exactly the keys edge, k, m, session")
        return cls(doc["k"], doc["m"], doc["edge"], doc["session"])


# --- the device ----------------------------------------------------------------------------------


def edge_address(node: NodeFolder, edge: str) -> tuple[str, int]:
    """Where device ``node`` reaches ``edge``'s split stream: the host of that edge's SuperLink in the
    device's own plan folder (its upstream edge, or one of its candidate cells'), the stream's port."""
    known = {}
    supernode = node.doc.get("supernode") or {}
    if supernode.get("upstream"):
        known[str(supernode["upstream"])] = str(supernode["superlink"])
    for entry in (node.doc.get("candidate_cells") or {}).values():
        known[str(entry["edge"])] = str(entry["superlink"])
    if edge not in known:
        raise SplitOrderError(f"split order for edge {edge!r}, which is none of this device's edges "
                              f"({', '.join(sorted(known)) or 'none'}); refusing to dial it")
    host, port = parse_address(known[edge])
    return host, stream_port(port)


def train_split(node: NodeFolder, order: SplitOrder, settings: RoundSettings, global_state: AdapterState,
                partition_id: int, *, local=None, connect: Callable[..., Any] | None = None
                ) -> tuple[AdapterState, dict[str, float]]:
    """Train this round split with the edge ``order`` names: -> (the delta of the device's own tensors,
    metrics with the split record and ``split_examples``). Raises (a dropout) when the stream fails."""
    # torch and the training code load only where a device trains split (the edge's relay and the ClientApp stay torch-free)
    from fedlora.deploy.split_link import StreamSplitLink
    from fedlora.deploy.stream import StreamCredentials, StreamLink
    from fedlora.roles.device import train_round
    from fedlora.split import DeviceHalf, check_cut, num_layers

    cut = order.cut
    address = edge_address(node, order.edge)
    open_link = connect or StreamLink.connect
    credentials = StreamCredentials.from_node(node)
    seen: dict[str, Any] = {}
    with contextlib.ExitStack() as streams:

        def half(model) -> DeviceHalf:
            # dialled once the model is built and the data tokenized: the edge waits for steps, not for a model load
            seen["layers"] = num_layers(model)
            check_cut(cut, seen["layers"], settings.train.split.min_k)
            stream = streams.enter_context(open_link(credentials, address, edge=protocol_id(order.edge),
                                                     run_id=order.session, server_round=settings.round,
                                                     limits=stream_limits(settings)))
            seen["link"] = StreamSplitLink(stream)
            return DeviceHalf(model, cut, seen["link"])

        delta, metrics = train_round(settings, global_state, partition_id, local=local, split=half)
    link = seen["link"]
    on_edge = set(edge_keys(delta, cut, seen["layers"]))
    own = {k: v for k, v in delta.items() if k not in on_edge}
    record = {"split_k": cut.k, "split_m": cut.m, "split_exchanges": link.exchanges, "split_steps": link.steps,
              "split_bytes_up": link.tensor_bytes_up, "split_bytes_down": link.tensor_bytes_down,
              EXAMPLES: metrics["num_examples"]}
    return own, {**metrics, **{k: float(v) for k, v in record.items()}}


def stream_limits(settings: RoundSettings):
    """Both ends' stream limits for a round: a step may take up to the round's timeout (a slow device's
    own blocks, loss and optimiser step lie between two of its edge calls)."""
    from fedlora.deploy.stream_protocol import StreamLimits  # kept beside its one use (the module imports no stream code)

    return StreamLimits(step_timeout_s=max(StreamLimits.step_timeout_s, float(settings.round_timeout_s)))


def device_trainer(node: NodeFolder, partition_id: int, local=None) -> Callable[[str, RoundSettings, AdapterState], Any]:
    """A planned device's split training for its resident process (:class:`fedlora.roles.warm_device.WarmDevice`):
    ``(order JSON, settings, global adapter) -> (own delta, metrics)``."""

    def train(order_json: str, settings: RoundSettings, arrays: AdapterState):
        return train_split(node, SplitOrder.from_json(order_json), settings, arrays, partition_id, local=local)

    return train


# --- the edge --------------------------------------------------------------------------------------


class StreamedSplit:
    """A deployed edge's split clients of one cell request: the round's ``split`` trainer (plain) and its
    ``secure_split`` sessions (:class:`fedlora.roles.neighbourhood.SecureSplit`).

    ``transport``: the edge's children (``ChildTransport``; its ``train``/``exchange`` take ``split=``,
    client -> order JSON); ``credentials``: the edge's stream credentials; ``listen``: the stream's
    address (the edge's SuperLink bind host, :func:`stream_port` of its port); ``edge``: this edge's plan
    node name; ``session``: the request's run id."""

    def __init__(self, transport, credentials, listen: tuple[str, int], *, edge: str, session: str,
                 limits=None, server_factory: Callable[..., Any] | None = None):
        self.transport, self.credentials, self.listen = transport, credentials, listen
        self.edge_name, self.session, self.limits = edge, session, limits
        self.server_factory = server_factory
        self.edge: dict[int, tuple[AdapterState, float]] = {}  # client -> (edge's delta of its blocks, examples)

    def order(self, cut: SplitCut) -> SplitOrder:
        return SplitOrder(cut.k, cut.m, self.edge_name, self.session)

    # plain mode: fedlora.roles.neighbourhood.SplitTrainer
    def __call__(self, settings: RoundSettings, arrays: AdapterState, client: int, cut: SplitCut
                 ) -> tuple[AdapterState, dict[str, Any], AdapterState]:
        order = {client: self.order(cut).to_json()}
        delta, seconds, reply = self._with_stream(settings, arrays, client, cut, lambda: self.transport.train(
            settings.round, [client], arrays, settings, _ignore, split=order))
        return reply.update, {**reply.metrics, "edge_seconds": seconds}, delta

    # secure mode: fedlora.roles.neighbourhood.SecureSplit
    def step(self, stage: str, payload: bytes, settings: RoundSettings, arrays: AdapterState, client: int,
             cut: SplitCut, expected: dict[str, tuple[int, ...]]) -> tuple[bytes, dict[str, Any]]:
        if stage != STAGES[0]:  # no training: the stage's message only
            reply = _one(self.transport.exchange(settings.round, stage, {client: payload}, None, settings, _ignore),
                         client)
            return reply.update, dict(reply.metrics)
        order = {client: self.order(cut).to_json()}
        delta, seconds, reply = self._with_stream(settings, arrays, client, cut, lambda: self.transport.exchange(
            settings.round, stage, {client: payload}, arrays, settings, _ignore, split=order))
        examples = reply.metrics.get(EXAMPLES)
        if examples is None:
            raise ValueError(f"split device {client} did not say how many examples it trained on ({EXAMPLES})")
        self.edge[client] = (delta, float(examples))
        return reply.update, {**reply.metrics, "edge_seconds": seconds}

    def _with_stream(self, settings: RoundSettings, arrays: AdapterState, client: int, cut: SplitCut, ask
                     ) -> tuple[AdapterState, float, Any]:
        """Open ``client``'s stream with an EdgeHalf on this edge's model, ``ask()`` the device to train,
        close the stream: (the edge's delta of its blocks, its compute seconds, the device's reply)."""
        # torch loads only on an edge that has split devices this round
        from fedlora.deploy.split_link import edge_half_handler
        from fedlora.deploy.stream import SplitStreamServer
        from fedlora.split import EdgeHalf, check_cut, num_layers

        model = edge_model(settings, arrays, client)
        layers = num_layers(model)
        check_cut(cut, layers, settings.train.split.min_k)
        start = adapters.get_state(model, trainable_only=True)
        half = EdgeHalf(model, cut, settings.train, proximal_mu=settings.proximal_mu)
        device = device_id(client)
        factory = self.server_factory or SplitStreamServer
        server = factory(self.credentials, self.listen, run_id=self.session, server_round=settings.round,
                         devices=[device], handler_for=lambda d: edge_half_handler(half),
                         limits=self.limits or stream_limits(settings))
        t0 = time.perf_counter()
        server.start()
        try:
            reply = _one(ask(), client)
        finally:
            streams = server.close()
        outcome = streams.outcomes.get(device)
        if outcome is None or not outcome.completed:
            why = outcome.reason if outcome is not None else "it never opened its stream"
            raise RuntimeError(f"split device {client} replied, but its stream with this edge did not complete: {why}")
        after = adapters.get_state(model, trainable_only=True)
        keys = edge_keys(after, cut, layers)
        delta = adapters.subtract({k: after[k] for k in keys}, {k: start[k] for k in keys})
        log.info("split device %d: %d step(s) with this edge at cut k=%d m=%d in %.1fs (edge compute %.1fs)",
                 client, outcome.steps, cut.k, cut.m, time.perf_counter() - t0, half.seconds)
        return delta, half.seconds, reply


def edge_model(settings: RoundSettings, arrays: AdapterState, client: int):
    """This edge's one LoRA-wrapped model (built once per process), holding the round's adapter."""
    # torch and the model load only on an edge that has split devices
    import torch

    from fedlora.roles.device import initial_adapter, lora_model

    if settings.lora_ranks.get(str(client), settings.lora.r) != settings.lora.r:
        raise ValueError(f"split device {client} trains LoRA rank {settings.lora_ranks[str(client)]}, not the "
                         f"global {settings.lora.r}: a split device trains the global rank")
    if settings.personal != "none":
        raise ValueError(f"split training under a personal strategy ({settings.personal}) is not supported")
    model, _ = lora_model(settings, freeze_a=settings.freeze_a)
    if torch.get_num_threads() != settings.threads:
        torch.set_num_threads(settings.threads)
    adapters.set_state(model, initial_adapter(settings, freeze_a=settings.freeze_a))
    adapters.set_state(model, arrays)
    return model


def _one(replies, client: int):
    """``client``'s reply among ``replies``; raises with its error (the device drops for the round)."""
    for reply in replies:
        if reply.client == client:
            if reply.error:
                raise RuntimeError(reply.error)
            return reply
    raise RuntimeError(f"split device {client} did not reply")


def _ignore(reply) -> None:
    pass
