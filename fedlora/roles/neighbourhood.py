"""One neighbourhood cell's part of a round, as one call: the unit the cloud hands out.

The cloud decides who trains where (:class:`CellRequest`: round, cell, END clients, the
adapter they start from, the round settings); :func:`run_cell` asks those clients to train
through a :class:`Transport`, drops every reply that is an error or malformed (with the
reason), drops stragglers the network model names (``late``), and sums what is left. The
:class:`CellResult` carries only what the cell forwards upward: the cell's
:class:`~fedlora.aggregate.sums.WeightedSum` and per-client status (plain mode).

The same call runs in the server process (simulation: ``federation.LocalCellRunner``) or in
a separate edge-aggregator process (deployment), which receives the request and returns
the result as bytes: :meth:`CellRequest.to_bytes` / :meth:`CellResult.to_bytes` use the safe
encoding of :mod:`fedlora.wire` (no pickle; malformed bytes raise :class:`CellWireError`).

:func:`run_cells` runs several cells at once, sending each stage of all of them as one
exchange (one ``Transport.train`` call for every cell that starts from the same adapter),
so the clients of different cells train concurrently exactly as before the cell split.

Pure: no Flower, Ray or sockets.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedlora import adapters, transcript, wire
from fedlora.adapters import AdapterState
from fedlora.aggregate.robust import cell_sum, is_robust
from fedlora.aggregate.sums import WeightedSum
from fedlora.config import DataConfig, LoraConfig, ModelConfig, SplitConfig, TinyModelConfig, TrainConfig
from fedlora.round_settings import RoundSettings
from fedlora.secure.encoding import encode_update
from fedlora.secure.messages import MaskedSum
from fedlora.secure.packing import packed_size, reduce
from fedlora.secure.prg import SeededStream
from fedlora.secure.rounds import ACCEPTED, CLOUD_ID, DROPPED, LATE, NO_REPLY, STAGES, run_secure_cells
from fedlora.world.splitplan import SplitCut, tensor_layer

# (settings, adapter to start from, client, its cut) -> (device's update, metrics, edge's delta of its blocks):
# how an edge trains a split client with it (fedlora.roles.split.split_round in-process).
SplitTrainer = Callable[[RoundSettings, AdapterState, int, SplitCut], tuple[AdapterState, dict[str, Any], AdapterState]]


class SecureSplit(Protocol):
    """Secure aggregation: this edge's split clients' sessions (:class:`fedlora.roles.split.SecureSplitDevices`
    in-process). ``step`` runs one stage of a split client's secure session, the first training it split with
    this edge, -> (its reply, clear metrics); ``edge[client]`` then holds (the edge's delta of its blocks, the
    client's example count), which the edge adds into the cell's masked sum for the clients in it."""

    edge: dict[int, tuple[AdapterState, float]]

    def step(self, stage: str, payload: bytes, settings: RoundSettings, arrays: AdapterState, client: int,
             cut: SplitCut, expected: dict[str, tuple[int, ...]]) -> tuple[bytes, dict[str, Any]]: ...


class CellWireError(wire.WireError):
    """Bytes that are not a valid cell request/result."""


@dataclass
class ClientReply:
    """What came back from one client: its update and metrics, or why there is none."""

    client: int
    update: Any = None
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    bytes_up: int = 0
    # A split client's round (trained in this process with the cell's edge): the edge's delta of its blocks.
    edge_update: Any = None


ReplyCallback = Callable[[ClientReply], None]


class Transport(Protocol):
    def clients(self) -> list[int]:
        """Ids (partition ids) of the clients that can be asked to train."""

    def train(
        self, server_round: int, clients: list[int], arrays: AdapterState, settings: RoundSettings, on_reply: ReplyCallback
    ) -> list[ClientReply]:
        """Ask each client to train from ``arrays``; return the replies that arrived."""

    def exchange(
        self, server_round: int, stage: str, payloads: dict[int, bytes], arrays: AdapterState | None, settings: RoundSettings,
        on_reply: ReplyCallback,
    ) -> list[ClientReply]:
        """One stage of a secure session: send each client its payload (and, at the first
        stage, the adapter to train from); replies carry the client's answer as bytes in
        ``update``. A client keeps its own session state between stages."""


def reject_reason(reply: ClientReply, expected: Mapping[str, tuple[int, ...]]) -> str | None:
    """Why a reply cannot be aggregated, or None when it can."""
    if reply.error:
        return reply.error
    return adapters.check_count(reply.metrics.get("num_examples")) or adapters.check_update(reply.update, dict(expected))


@dataclass
class CellRequest:
    """What the cloud asks of one neighbourhood cell in one round."""

    run_id: str
    server_round: int
    # Neighbourhood cell id (``cloud`` when the topology is flat).
    cell: str
    # END clients to train, in id order.
    clients: list[int]
    # The adapter they start from (the global one, or the cell model under HierFAVG).
    arrays: AdapterState
    # Round settings for the clients (``RunSettings.round_settings``).
    settings: RoundSettings
    # Tensor name -> shape every update must have.
    expected: dict[str, tuple[int, ...]]
    # Per-cell secure-session data (privacy=secagg), None in plain mode.
    secure: Any = None
    # Split learning: client -> its cut (k, m); these train U-shaped with this cell's edge (train.mode).
    split: dict[int, tuple[int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(isinstance(self.run_id, str) and isinstance(self.cell, str) and bool(self.cell), "run_id/cell must be strings")
        _check(_is_int(self.server_round) and self.server_round >= 1, f"server_round={self.server_round!r} must be >= 1")
        _check(isinstance(self.clients, list) and all(_is_int(c) and c >= 0 for c in self.clients),
               "clients must be a list of client ids")
        _check(isinstance(self.settings, RoundSettings) and self.settings.round == self.server_round,
               "settings must be round settings of this round")
        _check(_is_state(self.arrays), "arrays must map tensor names to arrays")
        _check(isinstance(self.expected, dict) and all(isinstance(k, str) and isinstance(v, tuple)
                                                       for k, v in self.expected.items()), "expected must map names to shapes")
        _check(isinstance(self.split, dict) and all(c in self.clients and isinstance(v, tuple) and len(v) == 2
                                                    and all(_is_int(x) for x in v) for c, v in self.split.items()),
               "split must map clients of the request to cuts (k, m)")

    def expected_of(self, client: int) -> dict[str, tuple[int, ...]]:
        """The tensors ``client``'s update must carry: all, or a split client's own (not its edge's blocks)."""
        if client not in self.split:
            return self.expected
        cut = SplitCut(*self.split[client])
        return {k: v for k, v in self.expected.items() if not cut.on_edge(tensor_layer(k), self.num_layers)}

    def edge_expected_of(self, client: int) -> dict[str, tuple[int, ...]]:
        """The tensors a split client's edge trains with it (its blocks; none for a client that is not split)."""
        own = self.expected_of(client)
        return {k: v for k, v in self.expected.items() if k not in own}

    @property
    def num_layers(self) -> int:
        """Decoder blocks of the model (from the tensor names; 0 without any)."""
        layers = [tensor_layer(k) for k in self.expected]
        return 1 + max((x for x in layers if x is not None), default=-1)

    def to_bytes(self) -> bytes:
        return wire.dumps(self, "cell-request")

    @classmethod
    def from_bytes(cls, data: bytes) -> CellRequest:
        return _loads(data, "cell-request", cls)


@dataclass
class ClientStatus(wire.Checked):
    """What happened to one END client of the cell this round."""

    client: int
    # ACCEPTED (in the sum), LATE (valid but past the deadline) or DROPPED (with ``reason``).
    status: str
    reason: str | None = None
    # Measured local training time; None without a usable reply.
    train_seconds: float | None = None
    bytes_up: int = 0
    # Plain mode only: in secure mode these never leave the device in clear.
    train_loss: float | None = None
    num_examples: float | None = None
    # A split client: its cut, the link's exchanges and bytes, the edge's compute seconds.
    split: dict[str, float] | None = None


@dataclass
class CellResult:
    """What one cell hands upward after a round."""

    cell: str
    # Client -> what happened to it, every client of the request present.
    clients: dict[int, ClientStatus]
    # Plain mode: sum(n_u * delta_u), sum(n_u) over the accepted clients (None if none).
    plain: WeightedSum | None = None
    # Sums over the accepted clients: num_examples and train_loss * num_examples (plain mode).
    metrics: dict[str, float] = field(default_factory=dict)
    # Secure mode: the session's outcome (masked sum, unmask bundle, what happened per stage).
    secure: Any = None
    # Split learning, plain mode: the edge's part of its accepted split clients' updates (its blocks' tensors,
    # each weighted by the client's examples; WeightedSum.add_tensors); None without split clients. (Secure
    # mode: the edge's part is inside the masked sum, see _add_edge_parts.)
    edge: WeightedSum | None = None

    def __post_init__(self) -> None:
        wire.check_fields(self)
        _check(isinstance(self.cell, str) and bool(self.cell), "cell must be a non-empty string")
        _check(isinstance(self.clients, dict) and all(isinstance(s, ClientStatus) and s.client == c
                                                      for c, s in self.clients.items()), "clients must map ids to statuses")
        _check(self.plain is None or (isinstance(self.plain, WeightedSum) and _is_state(self.plain.total)),
               "plain must be a weighted sum")
        _check(isinstance(self.metrics, dict) and all(isinstance(v, float) for v in self.metrics.values()),
               "metrics must map names to floats")

    @property
    def accepted(self) -> list[int]:
        return sorted(c for c, s in self.clients.items() if s.status == ACCEPTED)

    def to_bytes(self) -> bytes:
        return wire.dumps(self, "cell-result")

    @classmethod
    def from_bytes(cls, data: bytes) -> CellResult:
        return _loads(data, "cell-result", cls)


wire.register(CellRequest, CellResult, ClientStatus, WeightedSum,
              RoundSettings, ModelConfig, TinyModelConfig, LoraConfig, TrainConfig, SplitConfig, DataConfig)

# ``late(usable)``: the network model's verdict on the cell's usable replies -> client -> reason.
LateCallback = Callable[[Mapping[int, ClientReply]], Mapping[int, str]]


@dataclass
class AggregatorKeys:
    """What a neighbourhood aggregator needs for secure cells: its Ed25519 identity (by its
    device id) and the cloud's public key it trusts (signed headers and registries)."""

    identity: Callable[[str], Any]
    cloud_key: bytes

    @classmethod
    def of(cls, identities, *, cloud: bool = False) -> AggregatorKeys:
        """From a :class:`fedlora.secure.identities.Identities`: a deployed edge's own key, or
        (``cloud=True``) the keys of the cells the cloud aggregates itself (in-process)."""
        cloud_key = identities.public(CLOUD_ID)
        if cloud_key is None:
            raise ValueError("the registry has no key for the cloud")
        return cls(identities.local if cloud else identities.own, cloud_key)


def run_cell(request: CellRequest, transport: Transport, *, late: LateCallback | None = None,
             on_reply: ReplyCallback | None = None, keys: AggregatorKeys | None = None,
             split: SplitTrainer | None = None, secure_split: SecureSplit | None = None) -> CellResult:
    """Run one cell's round: train, check, drop stragglers, sum (plain) or run the secure
    session (``request.secure``; needs ``keys``). Never raises for a bad client.
    ``split``: how this edge trains its split clients (``request.split``) with them
    (:func:`fedlora.roles.split.split_round` in-process); ``secure_split`` the same in a secure session
    (:class:`fedlora.roles.split.SecureSplitDevices`); without it they are dropped."""
    return run_cells([request], transport, late=late, on_reply=on_reply, keys=keys, split=split,
                     secure_split=secure_split)[0]


def run_cells(requests: list[CellRequest], transport: Transport, *, late: LateCallback | None = None,
              on_reply: ReplyCallback | None = None, keys: AggregatorKeys | None = None,
              split: SplitTrainer | None = None, secure_split: SecureSplit | None = None) -> list[CellResult]:
    """:func:`run_cell` for several cells of one round, their clients asked together."""
    if not requests:
        return []
    rounds = {r.server_round for r in requests}
    if len(rounds) != 1:
        raise ValueError(f"cells of different rounds {sorted(rounds)} cannot run together")
    seen: set[int] = set()
    for r in requests:
        if seen & set(r.clients):
            raise ValueError(f"clients {sorted(seen & set(r.clients))} are in two cells this round")
        seen |= set(r.clients)
    server_round = rounds.pop()
    if any(r.secure is not None for r in requests):
        if keys is None:
            raise ValueError("secure cells need the aggregator's keys (keys=AggregatorKeys(...))")
        return _secure_results(requests, transport, server_round, late, on_reply or (lambda reply: None), keys,
                               secure_split)
    replies = _train(requests, transport, server_round, on_reply or (lambda reply: None), split)
    return [_plain_result(r, {c: replies[c] for c in r.clients if c in replies}, late) for r in requests]


def _train(requests: list[CellRequest], transport: Transport, server_round: int, on_reply: ReplyCallback,
           split: SplitTrainer | None = None) -> dict[int, ClientReply]:
    """Every cell's clients asked to train; cells starting from the same adapter in one exchange; split
    clients trained with this edge (``split``), one after another."""
    replies: dict[int, ClientReply] = {}
    for r in requests:
        for c in sorted(r.split):
            replies[c] = _split_reply(r, c, split)
            on_reply(replies[c])
    for group in _same_start(requests):
        clients = sorted(c for r in group for c in r.clients if c not in r.split)
        if not clients:
            continue
        for reply in transport.train(server_round, clients, group[0].arrays, group[0].settings, on_reply):
            if reply.client in clients and reply.client not in replies:  # one reply per client counts
                replies[reply.client] = reply
    return replies


def _split_reply(request: CellRequest, client: int, split: SplitTrainer | None) -> ClientReply:
    """A split client's round with this edge, as a reply (an error reply when it fails)."""
    if split is None:
        return ClientReply(client, error=NO_SPLIT)
    try:
        update, metrics, edge = split(request.settings, request.arrays, client, SplitCut(*request.split[client]))
    except Exception as exc:  # a failing split session is a dropped client, not a failed cell
        return ClientReply(client, error=f"split session failed: {type(exc).__name__}: {exc}")
    return ClientReply(client, update, metrics, bytes_up=adapters.nbytes(update), edge_update=edge)


NO_SPLIT = "split client, but this edge cannot train split devices"


def _secure_split_reply(request: CellRequest, client: int, stage: str, payload: bytes,
                        secure_split: SecureSplit | None) -> ClientReply:
    """One stage of a split client's secure session with this edge, as a reply (an error reply when it fails:
    the protocol then treats the client as a dropout). The first stage's edge part is checked here."""
    if secure_split is None:
        return ClientReply(client, error=NO_SPLIT)
    try:
        data, metrics = secure_split.step(stage, payload, request.settings, request.arrays, client,
                                          SplitCut(*request.split[client]), request.expected)
        if stage == STAGES[0]:
            why = adapters.check_update(secure_split.edge[client][0], request.edge_expected_of(client)) or \
                adapters.check_count(secure_split.edge[client][1])
            if why is not None:
                raise ValueError(f"the edge's part: {why}")
    except Exception as exc:  # a failing split session is a dropped client, not a failed cell
        return ClientReply(client, error=f"split session failed: {type(exc).__name__}: {exc}")
    return ClientReply(client, data, metrics, bytes_up=len(data))


def _same_start(requests: list[CellRequest]) -> list[list[CellRequest]]:
    """Cells grouped by the adapter object they start from (one message batch per group)."""
    groups: dict[int, list[CellRequest]] = {}
    for r in requests:
        groups.setdefault(id(r.arrays), []).append(r)
    return list(groups.values())


def _secure_results(requests, transport, server_round, late, on_reply, keys, secure_split=None) -> list[CellResult]:
    def exchange(stage: str, reqs: list[CellRequest], payloads: dict[int, bytes]) -> dict[int, ClientReply]:
        out: dict[int, ClientReply] = {}
        callback = on_reply if stage == STAGES[0] else (lambda reply: None)
        for r in reqs:  # split clients: their sessions run with this edge, one after another
            for c in sorted(c for c in r.split if c in payloads):
                out[c] = _secure_split_reply(r, c, stage, payloads[c], secure_split)
                callback(out[c])
        for group in _same_start(reqs):
            sent = {c: payloads[c] for r in group for c in r.clients if c in payloads and c not in r.split}
            if not sent:
                continue
            arrays = group[0].arrays if stage == STAGES[0] else None
            for reply in transport.exchange(server_round, stage, sent, arrays, group[0].settings, callback):
                if reply.client in sent and reply.client not in out:
                    if reply.error is None and not isinstance(reply.update, (bytes, bytearray)):
                        reply = ClientReply(reply.client, error="malformed reply: not a secure-aggregation message")
                    out[reply.client] = reply
        return out

    def upload_bytes(req: CellRequest) -> int:
        header = req.secure.header.header
        return packed_size(header.layout, header.encoding)  # the masked vector: uint32 words, or packed

    done = run_secure_cells(requests, exchange, aggregator_identity=keys.identity, cloud_key=keys.cloud_key,
                            late=late, upload_bytes=upload_bytes)
    results = []
    for r in requests:
        outcome, status = done[r.cell]
        clients = {}
        for c in r.clients:
            st, why, reply = status[c]
            seconds = None if reply is None or reply.error else _float(reply.metrics.get("train_seconds"))
            record = split_status(reply.metrics) if c in r.split and reply is not None else None
            clients[c] = ClientStatus(c, st, why, seconds, reply.bytes_up if reply is not None else 0, split=record)
        _add_edge_parts(r, outcome, secure_split)
        results.append(CellResult(r.cell, clients, secure=outcome))
    return results


def _add_edge_parts(request: CellRequest, outcome, secure_split: SecureSplit | None) -> None:
    """Add this edge's part of every split client in the cell's masked sum into that sum: the client's delta of
    the edge's blocks, encoded as its own masked input would have encoded it (clip, weight min(n, n_max) / n_max,
    stochastic rounding) with a zero count (the client's masked input counts its examples). The edge adds it
    in plain -- it trained it -- and inside the masked sum no tier above can tell it from the devices' inputs.
    A split client's masked input holds zeros there, so every tensor of the sum weighs the sum's count."""
    if outcome.aborted is not None or outcome.masked is None or secure_split is None:
        return
    header = request.secure.header.header
    layout, vector = header.layout, outcome.masked.vector.copy()
    for c in outcome.survivors:
        if c in request.split:
            delta, n = secure_split.edge[c]
            rounding = SeededStream(hashlib.sha256(transcript.encode("edge-part", header.run_id, header.server_round,
                                                                     header.cell, c)).digest())
            part = encode_update(adapters.filled(delta, dict(layout.tensors)), int(n), layout, header.encoding, rounding)
            part[layout.count_index] = 0
            vector = reduce(np.add(vector, part, out=vector), header.encoding)
    outcome.masked = MaskedSum(outcome.masked.cells, outcome.masked.clients, vector)


def _plain_result(request: CellRequest, replies: Mapping[int, ClientReply], late: LateCallback | None) -> CellResult:
    statuses: dict[int, ClientStatus] = {}
    usable: dict[int, ClientReply] = {}
    for cid in request.clients:
        reply = replies.get(cid)
        if reply is None:
            statuses[cid] = ClientStatus(cid, DROPPED, NO_REPLY)
            continue
        reason = reject_reason(reply, request.expected_of(cid))
        if reason is None and cid in request.split:
            reason = adapters.check_update(reply.edge_update, request.edge_expected_of(cid))
        seconds = None if reply.error else _float(reply.metrics.get("train_seconds"))
        statuses[cid] = ClientStatus(cid, DROPPED, reason, seconds, reply.bytes_up,
                                     split=split_status(reply.metrics) if cid in request.split else None)
        if reason is None:
            usable[cid] = reply
    stragglers = dict(late(usable)) if late is not None and usable else {}
    total, examples, loss = WeightedSum(), 0.0, 0.0
    s = request.settings
    robust = is_robust(s.aggregation, s.norm_bound)
    kept: list[tuple[AdapterState, float]] = []  # the accepted updates, summed by the robust rule below
    edge: WeightedSum | None = None
    for cid in sorted(usable):
        status = statuses[cid]
        if cid in stragglers:
            status.status, status.reason = LATE, stragglers[cid]
            continue
        reply = usable[cid]
        n = float(reply.metrics["num_examples"])
        status.status, status.num_examples = ACCEPTED, n
        status.train_loss = _float(reply.metrics.get("train_loss"))
        if robust:
            kept.append((reply.update, n))
        else:
            total.add(reply.update, n)
        if cid in request.split:
            edge = edge or WeightedSum()
            edge.add_tensors(reply.edge_update, n)
        examples += n
        loss += (status.train_loss if status.train_loss is not None else float("nan")) * n
    if kept:  # fedlora/aggregate/robust.py: median / trimmed mean / norm bounding of the cell's updates
        total = cell_sum(kept, rule=s.aggregation, trim_fraction=s.trim_fraction, norm_bound=s.norm_bound,
                         max_examples=s.max_examples)
    metrics = {"num_examples": examples, "train_loss": loss} if total.count else {}
    return CellResult(request.cell, statuses, total if total.count else None, metrics, edge=edge)


SPLIT_METRICS = ("split_k", "split_m", "split_exchanges", "split_steps", "split_bytes_up", "split_bytes_down",
                 "edge_seconds")


def split_status(metrics: Mapping[str, Any]) -> dict[str, float] | None:
    """A split client's record from its reply's metrics (k, m, exchanges, steps, bytes each way, edge
    seconds); None when they are not all there (not a split reply)."""
    values = {k[len("split_"):] if k.startswith("split_") else k: _float(metrics.get(k)) for k in SPLIT_METRICS}
    return None if any(v is None for v in values.values()) else values  # type: ignore[return-value]


class _Malformed(ValueError):
    pass


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise _Malformed(what)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_state(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in value.items())


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _loads(data: bytes, kind: str, cls: type) -> Any:
    try:
        value = wire.loads(data, kind)
    except wire.WireError as exc:
        raise CellWireError(str(exc)) from None
    if not isinstance(value, cls):
        raise CellWireError(f"a {kind} holds a {type(value).__name__}, not a {cls.__name__}")
    return value
