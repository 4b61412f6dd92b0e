"""Secure aggregation inside federated rounds: what each role does with real messages.

- cloud (:class:`SecureRound`, one per round): publishes the signed registry, issues one
  :class:`~fedlora.secure.messages.SignedHeader` per neighbourhood cell, holds the round's
  :class:`~fedlora.secure.unmasker.Unmasker` (one per sub-urban cell when
  ``privacy.unmasker=suburban``), adds the cells' masked sums up the tree
  (:func:`~fedlora.secure.tiers.add_masked`), unmasks, decodes, and hands the strategy an
  ordinary :class:`~fedlora.aggregate.sums.WeightedSum`.
- neighbourhood aggregator: :func:`run_secure_cells` (called by ``fedlora.roles.neighbourhood.run_cells``)
  drives the :class:`~fedlora.secure.aggregator.NeighbourhoodAggregator` of each cell over a
  transport: train+advertise, share keys, masked input, unmask -- one exchange per stage
  for all cells of the round. It forwards only the masked sum and the sealed unmask bundle.
- END client: :func:`client_step` runs one stage of the :class:`~fedlora.secure.client.CellClient`
  and returns its reply and its state as bytes (kept on the device between messages).

The example count and the training loss travel as masked coordinates of the encoded
update (``LOSS_KEY`` is the loss tensor), so aggregators learn only sums; the training
time stays in clear for the network model.

Identities and secret randomness come from a :class:`~fedlora.secure.identities.Identities`:
in simulation derived from the run seed (SIMULATION ONLY -- anyone who knows the seed can
sign as any device); in a deployment each machine's own Ed25519 key and the plan's registry
from its node folder, and ``os.urandom`` (:class:`~fedlora.secure.identities.PlannedIdentities`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from fedlora import transcript, wire
from fedlora.secure import shamir
from fedlora.secure.aggregator import NeighbourhoodAggregator
from fedlora.secure.bounds import sum_violation
from fedlora.secure.client import CellClient
from fedlora.secure.encoding import EncodingConfig, TensorLayout, adapter_digest, decode_sum
from fedlora.secure.errors import CellAborted, RejectedMessage, SecAggError
from fedlora.secure.identities import Identities
from fedlora.secure.keys import DeviceRegistry, IdentityKey
from fedlora.secure.messages import (
    AdvertiseKeys,
    CellHeader,
    CellMask,
    DeliveredShare,
    EncryptedShare,
    MaskedInput,
    MaskedSum,
    Roster,
    ShareDelivery,
    ShareKeys,
    SignedHeader,
    Stage,
    UnmaskBundle,
    UnmaskRequest,
    UnmaskResponse,
)
from fedlora.secure.tiers import add_masked
from fedlora.secure.unmasker import Unmasker, remove_masks
from fedlora.wire import Checked

CLOUD_ID = "cloud"
# The masked training-loss coordinate, a one-value "tensor" after every adapter tensor.
LOSS_KEY = "~train_loss"
# Stages as messages to the clients, in order (the first also trains).
STAGES = (Stage.ADVERTISE.value, Stage.SHARE_KEYS.value, Stage.MASKED_INPUT.value, Stage.UNMASK.value)

# A client's status in a cell's result, the one spelling for every tier (fedlora.roles.neighbourhood,
# fedlora.roles.cloud, server/edge.py): in the cell's sum, valid but past the deadline, or left out.
ACCEPTED, LATE, DROPPED = "accepted", "late", "dropped"
# The reasons the tiers give for a dropped client: no reply at all; a cell the protocol ended
# ("cell aborted: <why>"); a cell the cloud could not start ("cell refused: <why>").
NO_REPLY = "no reply before the round timeout"
CELL_ABORTED, CELL_REFUSED = "cell aborted", "cell refused"
# The fewest clients a secure session runs with: the unmasker learns the sum, so one client's is its update.
MIN_SESSION_CLIENTS = 2
# A cell whose decoded sum is out of what its clients could send (privacy.bound_check): "out of bounds: <why>".
BOUND_REFUSED = "out of bounds"


def device_id(client: int) -> str:
    return f"device-{int(client)}"


def aggregator_id(cell: str) -> str:
    return f"aggregator/{cell}"


@dataclass(frozen=True)
class SignedRegistry(Checked):
    """The cloud's registry (device id -> Ed25519 public key) for one round, signed by the cloud.

    Aggregators and clients take the registry only from here and check the signature
    against the cloud key they were provisioned with.
    """

    run_id: str
    server_round: int
    keys: dict[str, bytes]
    signature: bytes

    @staticmethod
    def signed_bytes(run_id: str, server_round: int, keys: Mapping[str, bytes]) -> bytes:
        return transcript.encode("registry", run_id, server_round, tuple((k, keys[k]) for k in sorted(keys)))

    def verify(self, cloud_key: bytes, cloud_id: str = CLOUD_ID) -> DeviceRegistry:
        pinned = DeviceRegistry({cloud_id: cloud_key})
        if not isinstance(self.keys, dict) or not all(isinstance(k, str) and isinstance(v, bytes) for k, v in self.keys.items()):
            raise RejectedMessage("registry is malformed")
        pinned.check(cloud_id, self.signed_bytes(self.run_id, self.server_round, self.keys), self.signature, "registry")
        if self.keys.get(cloud_id) != cloud_key:
            raise RejectedMessage("registry carries another key for the cloud")
        return DeviceRegistry(dict(self.keys))


@dataclass
class SecureCell(Checked):
    """``CellRequest.secure``: the cloud's signed header and registry for one cell and round."""

    header: SignedHeader
    registry: SignedRegistry
    # END client id -> its device id in the registry.
    devices: dict[int, str]


@dataclass
class Join(Checked):
    """The first stage's payload to a client: train, then advertise keys for this header."""

    header: SignedHeader
    registry: SignedRegistry
    device: str


@dataclass
class SecureOutcome(Checked):
    """``CellResult.secure``: what the neighbourhood aggregator hands upward for one cell."""

    masked: MaskedSum | None = None
    bundle: UnmaskBundle | None = None
    aborted: str | None = None
    survivors: list[int] = field(default_factory=list)
    # Stage -> clients that were asked at that stage and sent nothing usable.
    dropped: dict[str, list[int]] = field(default_factory=dict)


wire.register(SignedRegistry, SecureCell, Join, SecureOutcome, CellHeader, SignedHeader, TensorLayout, EncodingConfig,
              AdvertiseKeys, Roster, ShareKeys, EncryptedShare, ShareDelivery, DeliveredShare, MaskedInput, MaskedSum,
              UnmaskRequest, UnmaskResponse, UnmaskBundle, CellMask, shamir.Share, Stage)


def message(value: object) -> bytes:
    return wire.dumps(value, "secagg-message")


def read_message(data: bytes, cls: type) -> object:
    """A message of type ``cls`` from bytes; RejectedMessage for anything else."""
    try:
        value = wire.loads(data, "secagg-message")
    except wire.WireError as exc:
        raise RejectedMessage(f"malformed message: {exc}") from None
    if not isinstance(value, cls):
        raise RejectedMessage(f"expected a {cls.__name__}, got a {type(value).__name__}")
    return value


# --------------------------------------------------------------------------- END client


Train = Callable[[], tuple[Mapping[str, np.ndarray], dict]]


def client_step(stage: str, payload: bytes, state: bytes | None, *, identity: IdentityKey, cloud_key: bytes,
                rng, train: Train | None = None, arrays: Mapping[str, np.ndarray] | None = None
                ) -> tuple[bytes, bytes, dict]:
    """One stage of an END client: (reply, new state, clear metrics). Raises on a bad message.

    ``advertise`` trains (``train()`` -> delta, metrics), checks the header names the adapter
    received (``arrays``), encodes the update with its loss and count as masked coordinates,
    and answers with signed fresh keys. Later stages restore the client from ``state``.
    """
    if stage == Stage.ADVERTISE.value:
        join = read_message(payload, Join)
        registry = join.registry.verify(cloud_key)
        client = CellClient(join.device, identity, registry, cloud_id=CLOUD_ID, rng=rng)
        delta, metrics = train()
        update = dict(delta)
        update[LOSS_KEY] = np.array([float(metrics["train_loss"])], dtype=np.float32)
        advert = client.advertise(join.header, arrays)
        encoded = client.encode(update, int(metrics["num_examples"]))
        clear = {"train_seconds": float(metrics.get("train_seconds", 0.0))}
        return message(advert), _pack(client, registry, encoded), clear
    if state is None:
        raise RejectedMessage(f"stage {stage!r} before this device joined the round")
    saved = wire.loads(state, "secagg-device-state")
    registry = DeviceRegistry(saved["registry"])
    client = CellClient.restore(saved["client"], identity, registry, cloud_id=CLOUD_ID, rng=rng)
    encoded = saved["encoded"]
    if stage == Stage.SHARE_KEYS.value:
        reply = client.share_keys(read_message(payload, Roster))
    elif stage == Stage.MASKED_INPUT.value:
        reply = client.masked_input(read_message(payload, ShareDelivery), encoded)
    elif stage == Stage.UNMASK.value:
        reply = client.unmask(read_message(payload, UnmaskRequest))
        encoded = None  # uploaded and unmasked: nothing to keep
    else:
        raise ValueError(f"unknown secure-aggregation stage {stage!r}")
    return message(reply), _pack(client, registry, encoded), {}


def _pack(client: CellClient, registry: DeviceRegistry, encoded: np.ndarray | None) -> bytes:
    return wire.dumps({"client": client.export_state(), "registry": {k: registry.public_key(k) for k in registry},
                       "encoded": encoded}, "secagg-device-state")


# --------------------------------------------------------------------------- neighbourhood aggregator


# exchange(stage, cell requests, payloads {client: bytes}) -> {client: reply} where a reply has
# ``.update`` (bytes), ``.metrics``, ``.error``, ``.bytes_up``; provided by fedlora.roles.neighbourhood over a
# Transport, or in process by fedlora.secure.session.
Exchange = Callable[[str, list, dict], dict]
# A client's reply in the neighbourhood aggregator's hands, fed to the aggregator role.
Receive = Callable[["CellRun", int, object], None]


@dataclass
class CellRun:
    """One cell's session as its neighbourhood aggregator drives it: the state between stages.

    ``clients`` are END clients as the exchange names them; ``status[client]`` is
    (status, reason, first-stage reply), every client DROPPED with NO_REPLY until it does better.
    """

    cell: str
    clients: list
    request: object = None  # what the exchange is handed for this cell (a CellRequest; None in process)
    aggregator: NeighbourhoodAggregator | None = None
    of: dict = field(default_factory=dict)  # device id -> END client
    joins: dict = field(default_factory=dict)  # END client -> its first-stage payload
    outcome: SecureOutcome = field(default_factory=SecureOutcome)
    status: dict = field(default_factory=dict)
    abort: CellAborted | None = None  # why the protocol ended the cell (outcome.aborted holds it as text)
    adverts: dict = field(default_factory=dict)
    roster: Roster | None = None
    deliveries: dict | None = None
    unmask_request: UnmaskRequest | None = None

    def __post_init__(self):
        self.status = self.status or {c: (DROPPED, NO_REPLY, None) for c in self.clients}

    @property
    def live(self) -> bool:
        return self.aggregator is not None and self.outcome.aborted is None

    def fail(self, reason: str | CellAborted) -> None:
        self.outcome.aborted = str(reason)
        if isinstance(reason, CellAborted):
            self.abort = reason

    def close(self, action: Callable[[NeighbourhoodAggregator], object]):
        """``action(aggregator)`` (a stage's close), or None once it aborted the cell."""
        try:
            return action(self.aggregator)
        except CellAborted as exc:
            self.fail(exc)
            return None


def run_secure_cells(requests: list, exchange: Exchange, *, aggregator_identity: Callable[[str], IdentityKey],
                     cloud_key: bytes, late=None, upload_bytes: Callable[[object], int] = lambda r: 0) -> dict:
    """Stages 2-5 of every cell of one round; -> {cell: (SecureOutcome, {client: (status, reason, reply)})}.

    ``status`` is ACCEPTED (in the masked sum), LATE (deadline) or DROPPED; ``reply`` the
    client's first-stage reply (for its clear training time), if any.
    """
    runs = [open_cell(req, aggregator_identity=aggregator_identity, cloud_key=cloud_key) for req in requests]
    drive_cells(runs, exchange, late=late, upload_bytes=upload_bytes)
    return {run.cell: (run.outcome, _settle(run)) for run in runs}


def open_cell(req, *, aggregator_identity: Callable[[str], IdentityKey], cloud_key: bytes) -> CellRun:
    """The aggregator's session for ``req`` (its ``.cell``, ``.clients``, ``.secure`` :class:`SecureCell`),
    aborted at once with the reason when the request does not check out."""
    run = CellRun(req.cell, list(req.clients), request=req)
    try:
        sec: SecureCell = req.secure
        registry = sec.registry.verify(cloud_key)
        header = sec.header.header
        run.aggregator = NeighbourhoodAggregator(header.aggregator, aggregator_identity(header.aggregator), registry,
                                                 sec.header, cloud_id=CLOUD_ID)
        run.of = {sec.devices[c]: c for c in req.clients}
        if sorted(run.of.values()) != sorted(req.clients):
            raise RejectedMessage("the request's device map does not cover its clients")
    except (SecAggError, KeyError, AttributeError, TypeError, ValueError) as exc:
        run.fail(f"cell request refused: {exc}")
    if run.live:
        run.joins = {c: message(Join(sec.header, sec.registry, sec.devices[c])) for c in req.clients}
    return run


def drive_cells(runs: list[CellRun], exchange: Exchange, *, late=None,
                upload_bytes: Callable[[object], int] = lambda r: 0) -> None:
    """Every stage of the live cells of ``runs``, one exchange per stage for all of them.

    ``late(usable first-stage replies)`` -> {client: reason} names the stragglers (the network
    model); ``upload_bytes(request)`` is what each client's upload weighs, for that model.
    """
    _advertise(runs, exchange, late, upload_bytes)
    _share_keys(runs, exchange)
    _masked_input(runs, exchange)
    _unmask(runs, exchange)


def _ask(exchange: Exchange, stage: str, sends: list[tuple[CellRun, dict]], receive: Receive) -> None:
    """Send one stage's payloads ({client: bytes} per cell); feed each usable reply to ``receive``."""
    flat = {c: p for _, sent in sends for c, p in sent.items()}
    replies = exchange(stage, [run.request for run, _ in sends], flat) if flat else {}
    for run, sent in sends:
        for client in sorted(sent):
            reply = replies.get(client)
            why = "no reply" if reply is None else reply.error
            if why is None:
                try:
                    receive(run, client, reply)
                    continue
                except (RejectedMessage, TypeError, ValueError, AttributeError, KeyError) as exc:
                    why = f"rejected: {exc}"
            run.outcome.dropped.setdefault(stage, []).append(client)
            if why != "no reply":
                run.status[client] = (DROPPED, f"secagg {stage}: {why}", run.status[client][2])


def _live(runs: list[CellRun]) -> list[CellRun]:
    return [run for run in runs if run.live]


def _advertise(runs: list[CellRun], exchange: Exchange, late, upload_bytes: Callable[[object], int]) -> None:
    """Stage 1: clients train and advertise keys; stragglers are LATE; the roster closes."""
    def receive(run: CellRun, client: int, reply) -> None:
        run.status[client] = (DROPPED, NO_REPLY, reply)
        advert = read_message(reply.update, AdvertiseKeys)
        if run.of.get(advert.sender) != client:
            raise RejectedMessage(f"client {client} advertised as {advert.sender!r}, not its own device")
        run.adverts[client] = advert

    _ask(exchange, STAGES[0], [(run, run.joins) for run in _live(runs)], receive)
    for run in _live(runs):
        adverts, run.adverts = run.adverts, {}
        usable = {c: run.status[c][2] for c in adverts}
        for reply in usable.values():
            reply.bytes_up = upload_bytes(run.request)
        stragglers = dict(late(usable)) if late is not None and usable else {}
        for client, advert in sorted(adverts.items()):
            if client in stragglers:
                run.status[client] = (LATE, stragglers[client], usable[client])
                continue
            try:
                run.aggregator.receive_advert(advert)
            except RejectedMessage as exc:
                run.status[client] = (DROPPED, f"secagg advertise: rejected: {exc}", usable[client])
        run.roster = run.close(lambda a: a.close_advertising())


def _share_keys(runs: list[CellRun], exchange: Exchange) -> None:
    """Stage 2: the roster to its members, their encrypted shares back; deliveries close."""
    _ask(exchange, STAGES[1], [(run, {run.of[u]: message(run.roster) for u in run.roster.members}) for run in _live(runs)],
         lambda run, c, r: run.aggregator.receive_shares(_from(run, c, read_message(r.update, ShareKeys))))
    for run in _live(runs):
        run.deliveries = run.close(lambda a: a.close_sharing())


def _masked_input(runs: list[CellRun], exchange: Exchange) -> None:
    """Stage 3: each member's share delivery, its masked input back; the upload closes."""
    _ask(exchange, STAGES[2], [(run, {run.of[u]: message(d) for u, d in run.deliveries.items()}) for run in _live(runs)],
         lambda run, c, r: run.aggregator.receive_masked_input(_from(run, c, read_message(r.update, MaskedInput))))
    for run in _live(runs):
        upload = run.close(lambda a: a.close_upload())
        if upload is not None:
            run.unmask_request, run.outcome.masked = upload
            run.outcome.survivors = sorted(run.of[u] for u in run.unmask_request.survivors)


def _unmask(runs: list[CellRun], exchange: Exchange) -> None:
    """Stage 4: the unmask request to the survivors, their sealed responses back; the bundle closes."""
    _ask(exchange, STAGES[3],
         [(run, {run.of[u]: message(run.unmask_request) for u in run.unmask_request.survivors}) for run in _live(runs)],
         lambda run, c, r: run.aggregator.receive_unmask_response(_from(run, c, read_message(r.update, UnmaskResponse))))
    for run in _live(runs):
        bundle = run.close(lambda a: a.close_unmask())
        if bundle is not None:
            run.outcome.bundle = bundle


def _settle(run: CellRun) -> dict:
    """The cell's final client statuses; an aborted cell forwards nothing partial."""
    outcome, status = run.outcome, run.status
    for c in outcome.survivors if outcome.aborted is None else ():
        status[c] = (ACCEPTED, None, status[c][2])
    if outcome.aborted is not None:
        outcome.masked = outcome.bundle = None
        for c, (st, why, reply) in status.items():
            if st == ACCEPTED or why == NO_REPLY and reply is not None:
                status[c] = (DROPPED, f"{CELL_ABORTED}: {outcome.aborted}", reply)
    for c, (st, why, reply) in status.items():
        if st == DROPPED and why == NO_REPLY and reply is not None:
            stage = next((s for s in STAGES[1:] if c in outcome.dropped.get(s, [])), "a later stage")
            status[c] = (DROPPED, f"secagg: no reply at {stage}", reply)
    return status


def _from(run: CellRun, client: int, msg):
    if run.of.get(msg.sender) != client:
        raise RejectedMessage(f"client {client} sent a message as {msg.sender!r}")
    return msg


# --------------------------------------------------------------------------- cloud


@dataclass
class SecureSettings:
    """The privacy settings the cloud needs (from ``PrivacyConfig``)."""

    encoding: EncodingConfig
    threshold: float
    unmasker: str  # cloud | suburban
    prg: str
    complete_graph_up_to: int
    # Refuse a cell whose decoded sum its clients' clipped updates could not add up to (fedlora/secure/bounds.py);
    # norm_bound > 0: the L2 norm every honest update is clipped to, checked too.
    bound_check: bool = False
    norm_bound: float = 0.0
    # off: masked vectors travel as 32-bit words; auto: packed in a ring sized to the round's
    # sums (fedlora.secure.packing; the same decoded sums, fewer bytes).
    packing: str = "off"


def threshold_for(n: int, fraction: float, complete_up_to: int) -> int:
    """t for a cell of n clients: ceil(fraction * n), at least 2, and more than n/2 in a complete graph."""
    t = max(2, math.ceil(fraction * n - 1e-9))
    if n <= complete_up_to:
        t = max(t, n // 2 + 1)
    return min(t, n)


class SecureRound:
    """The cloud's side of one secure round."""

    def __init__(self, *, identities: Identities, run_id: str, server_round: int, clients: list[int],
                 cells_above: Mapping[str, str], settings: SecureSettings, layout: TensorLayout,
                 sum_clients: int | None = None):
        """``sum_clients`` (packing only): the most client inputs one unmasked sum of the round
        holds -- the round's training clients when the cells' sums are added up the tree, 0
        when each cell is unmasked on its own (HierFAVG); None: every client in ``clients``."""
        self.ids, self.run_id, self.server_round, self.settings, self.layout = identities, run_id, server_round, settings, layout
        self.sum_clients = len(clients) if sum_clients is None else int(sum_clients)
        self.encodings: dict[str, EncodingConfig] = {}  # cell -> the encoding its header names
        self.cloud = identities.own(CLOUD_ID)
        self.cells_above = dict(cells_above)  # neighbourhood -> its sub-urban cell ("cloud" when flat)
        keys = {CLOUD_ID: self.cloud.public_bytes}
        # A device the registry does not know is left out: the protocol then refuses its messages.
        devices = [device_id(c) for c in clients]
        keys.update({uid: key for uid in devices if (key := identities.public(uid)) is not None})
        for cell in self.cells_above:  # a cell without a registered edge is aggregated by the cloud itself
            uid = aggregator_id(cell)
            keys[uid] = identities.public(uid) or identities.local(uid).public_bytes
        self.registry = DeviceRegistry(keys)
        self.signed_registry = SignedRegistry(run_id, server_round, keys, self.cloud.sign(
            SignedRegistry.signed_bytes(run_id, server_round, keys)))
        self.unmaskers: dict[str, Unmasker] = {}

    @property
    def cloud_key(self) -> bytes:
        return self.cloud.public_bytes

    def unmasker_for(self, cell: str) -> Unmasker:
        uid = self.cells_above[cell] if self.settings.unmasker == "suburban" else CLOUD_ID
        if uid not in self.unmaskers:
            if uid != CLOUD_ID:
                self.registry.enroll(uid, self.ids.local(uid).public_bytes)
            self.unmaskers[uid] = Unmasker(uid, self.registry, cloud_id=CLOUD_ID,
                                           rng=self.ids.rng("unmasker", uid, self.run_id, self.server_round))
        return self.unmaskers[uid]

    def cell(self, cell: str, clients: list[int], arrays: Mapping[str, np.ndarray]) -> SecureCell | str:
        """The signed per-cell data, or why the cell cannot run a secure session."""
        n = len(clients)
        if n < MIN_SESSION_CLIENTS:
            return f"{n} client(s) in the cell; secure aggregation needs at least {MIN_SESSION_CLIENTS}"
        s = self.settings
        self.encodings[cell] = self.encoding_for(n)
        header = CellHeader(
            run_id=self.run_id, server_round=self.server_round, cell=cell, aggregator=aggregator_id(cell),
            unmasker=self.unmasker_for(cell).device_id, unmasker_key=self.unmasker_for(cell).public_key,
            global_adapter_digest=adapter_digest(arrays), layout=self.layout, encoding=self.encodings[cell],
            threshold=threshold_for(n, s.threshold, s.complete_graph_up_to), max_clients=n,
            graph_seed=self.ids.rng("graph", self.run_id, self.server_round, cell)(32),
            complete_graph_up_to=s.complete_graph_up_to, prg=s.prg)
        return SecureCell(SignedHeader.sign(header, self.cloud, CLOUD_ID), self.signed_registry,
                          {c: device_id(c) for c in clients})

    def encoding_for(self, n: int) -> EncodingConfig:
        """The encoding of a cell of ``n`` clients: the settings', packed (``packing=auto``) in a
        ring for ``max(n, sum_clients)`` inputs -- never fewer than the cell itself holds."""
        if self.settings.packing == "off":
            return self.settings.encoding
        return replace(self.settings.encoding, sum_clients=max(n, self.sum_clients))

    def unmask(self, outcomes: Mapping[str, SecureOutcome], *, per_cell: bool):
        """Unmask and decode: ({cell or "cloud": DecodedSum}, {cell: abort reason}).

        ``per_cell``: one sum per neighbourhood (HierFAVG needs them); else the cells' masked
        sums are added up the tree (sub-urban, then cloud) and only the total is unmasked.
        With ``bound_check``, and whenever the total cannot be decoded (e.g. an example count beyond what
        its clients can have), each cell's own sum is checked first and a cell out of bounds is left out.
        """
        masks: dict[str, CellMask] = {}
        aborted: dict[str, str] = {}
        for cell, outcome in sorted(outcomes.items()):
            if outcome.aborted is not None or outcome.bundle is None or outcome.masked is None:
                aborted[cell] = outcome.aborted or "no masked sum"
                continue
            try:
                masks[cell] = self.unmasker_for(cell).unmask_cell(outcome.bundle)
            except CellAborted as exc:
                aborted[cell] = str(exc)
        if self.settings.bound_check:
            self._leave_out_of_bounds(outcomes, masks, aborted)
        try:
            return self._decode(outcomes, masks, per_cell), aborted
        except ValueError:  # one cell's impossible sum would fail the whole round: find it, decode the rest
            if self.settings.bound_check:
                raise
            self._leave_out_of_bounds(outcomes, masks, aborted)
            return self._decode(outcomes, masks, per_cell), aborted

    def _leave_out_of_bounds(self, outcomes: Mapping[str, SecureOutcome], masks: dict[str, CellMask],
                             aborted: dict[str, str]) -> None:
        """Move every cell whose own sum is out of bounds (:meth:`out_of_bounds`) from ``masks`` to ``aborted``."""
        for cell in sorted(masks):
            why = self.out_of_bounds(outcomes[cell].masked, masks[cell])
            if why is not None:  # the cell leaves the sum; the other cells go on
                aborted[cell] = why
                del masks[cell]

    def _decode(self, outcomes: Mapping[str, SecureOutcome], masks: Mapping[str, CellMask], per_cell: bool) -> dict:
        if per_cell:
            groups = {cell: [outcomes[cell].masked] for cell in masks}
        else:
            by_suburb: dict[str, list[MaskedSum]] = {}
            for cell in masks:  # sub-urban tier: add its neighbourhoods' masked sums
                by_suburb.setdefault(self.cells_above[cell], []).append(outcomes[cell].masked)
            parts = [add_masked(p, self._encoding_of(p)) for _, p in sorted(by_suburb.items())]
            groups = {CLOUD_ID: parts} if parts else {}
        sums = {}
        for key, parts in groups.items():
            enc = self._encoding_of(parts)
            total = add_masked(parts, enc)
            plain = remove_masks(total, [masks[c] for c in sorted(total.cells)])
            sums[key] = decode_sum(plain.vector, self.layout, enc, plain.clients)
        return sums

    def out_of_bounds(self, masked: MaskedSum, mask: CellMask) -> str | None:
        """Why one cell's sum (its masked sum less its mask, decoded) cannot come from honest clients, or None
        (:func:`fedlora.secure.bounds.sum_violation`)."""
        try:
            enc = self._encoding_of([masked])
            plain = remove_masks(add_masked([masked], enc), [mask])
            decoded = decode_sum(plain.vector, self.layout, enc, plain.clients)
        except (ValueError, SecAggError) as exc:  # e.g. a count no k clients can have
            return f"{BOUND_REFUSED}: {exc}"
        why = sum_violation(decoded, norm_bound=self.settings.norm_bound, unbounded=(LOSS_KEY,))
        return None if why is None else f"{BOUND_REFUSED}: {why}"

    def _encoding_of(self, parts: list[MaskedSum]) -> EncodingConfig:
        """The one encoding of the cells in ``parts`` (sums in different rings cannot be added)."""
        encodings = {self.encodings.get(cell, self.settings.encoding) for part in parts for cell in part.cells}
        if len(encodings) != 1:
            raise ValueError(f"cells {sorted(c for p in parts for c in p.cells)} were encoded in different rings; "
                             "their masked sums cannot be added")
        return encodings.pop()


def secure_layout(expected: Mapping[str, tuple[int, ...]]) -> TensorLayout:
    """The encoded vector's layout: the adapter tensors, then the loss coordinate."""
    tensors = dict(expected)
    tensors[LOSS_KEY] = (1,)
    return TensorLayout(tuple(sorted((k, tuple(v)) for k, v in tensors.items())))
