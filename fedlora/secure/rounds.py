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

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from fedlora import transcript, wire
from fedlora.secure import shamir
from fedlora.secure.aggregator import NeighbourhoodAggregator
from fedlora.secure.client import CellClient
from fedlora.secure.encoding import EncodingConfig, TensorLayout, adapter_digest, decode_sum
from fedlora.secure.errors import CellAborted, RejectedMessage, SecAggError
from fedlora.secure.identities import Identities
from fedlora.secure.keys import DeviceRegistry, IdentityKey
from fedlora.secure.messages import (AdvertiseKeys, CellHeader, CellMask, DeliveredShare, EncryptedShare, MaskedInput,
                                     MaskedSum, Roster, ShareDelivery, ShareKeys, SignedHeader, Stage, UnmaskBundle,
                                     UnmaskRequest, UnmaskResponse)
from fedlora.secure.prg import SeededStream
from fedlora.secure.tiers import add_masked
from fedlora.secure.unmasker import Unmasker, remove_masks

CLOUD_ID = "cloud"
# The masked training-loss coordinate, a one-value "tensor" after every adapter tensor.
LOSS_KEY = "~train_loss"
# Stages as messages to the clients, in order (the first also trains).
STAGES = (Stage.ADVERTISE.value, Stage.SHARE_KEYS.value, Stage.MASKED_INPUT.value, Stage.UNMASK.value)


def device_id(client: int) -> str:
    return f"device-{int(client)}"


def aggregator_id(cell: str) -> str:
    return f"aggregator/{cell}"


def _derive(seed: int, *purpose: object) -> bytes:
    return hashlib.sha256(transcript.encode("fedlora/simulation", str(seed), tuple(str(p) for p in purpose))).digest()


def simulated_identity(seed: int, device: str) -> IdentityKey:
    """SIMULATION ONLY: the Ed25519 identity of ``device`` derived from the run seed."""
    return IdentityKey.from_seed(_derive(seed, "identity", device))


def simulated_rng(seed: int, *purpose: object) -> SeededStream:
    """SIMULATION ONLY: reproducible secret randomness for one purpose (e.g. device, round, stage)."""
    return SeededStream(_derive(seed, "rng", *purpose))


@dataclass(frozen=True)
class SignedRegistry:
    """The cloud's registry (device id -> Ed25519 public key) for one round, signed by the cloud.

    Aggregators and clients take the registry only from here and check the signature
    against the cloud key they were provisioned with.
    """

    run_id: str
    server_round: int
    keys: dict
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
class SecureCell:
    """``CellRequest.secure``: the cloud's signed header and registry for one cell and round."""

    header: SignedHeader
    registry: SignedRegistry
    # END client id -> its device id in the registry.
    devices: dict


@dataclass
class Join:
    """The first stage's payload to a client: train, then advertise keys for this header."""

    header: SignedHeader
    registry: SignedRegistry
    device: str


@dataclass
class SecureOutcome:
    """``CellResult.secure``: what the neighbourhood aggregator hands upward for one cell."""

    masked: MaskedSum | None = None
    bundle: UnmaskBundle | None = None
    aborted: str | None = None
    survivors: list = field(default_factory=list)
    # Stage -> clients that were asked at that stage and sent nothing usable.
    dropped: dict = field(default_factory=dict)


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
# ``.update`` (bytes), ``.metrics``, ``.error``; provided by fedlora.roles.neighbourhood over a Transport.
Exchange = Callable[[str, list, dict], dict]


def run_secure_cells(requests: list, exchange: Exchange, *, aggregator_identity: Callable[[str], IdentityKey],
                     cloud_key: bytes, late=None, upload_bytes: Callable[[object], int] = lambda r: 0) -> dict:
    """Stages 2-5 of every cell of one round; -> {cell: (SecureOutcome, {client: (status, reason, reply)})}.

    ``status`` is "accepted" (in the masked sum), "late" (deadline) or "dropped"; ``reply`` the
    client's first-stage reply (for its clear training time), if any.
    """
    cells: dict[str, dict] = {}
    for req in requests:
        info = {"req": req, "status": {c: ("dropped", "no reply before the round timeout", None) for c in req.clients},
                "outcome": SecureOutcome(), "agg": None, "of": {}}
        cells[req.cell] = info
        try:
            sec: SecureCell = req.secure
            registry = sec.registry.verify(cloud_key)
            header = sec.header.header
            info["agg"] = NeighbourhoodAggregator(header.aggregator, aggregator_identity(header.aggregator), registry,
                                                  sec.header, cloud_id=CLOUD_ID)
            info["of"] = {sec.devices[c]: c for c in req.clients}
            if sorted(info["of"].values()) != sorted(req.clients):
                raise RejectedMessage("the request's device map does not cover its clients")
        except (SecAggError, KeyError, AttributeError, TypeError, ValueError) as exc:
            _abort(info, f"cell request refused: {exc}")

    def live() -> list[dict]:
        return [i for i in cells.values() if i["agg"] is not None and i["outcome"].aborted is None]

    def ask(stage: str, payloads: dict[str, dict[int, bytes]], receive: Callable) -> None:
        """Send one stage's payloads for every live cell; feed the replies to ``receive``."""
        flat = {c: p for cell in payloads.values() for c, p in cell.items()}
        replies = exchange(stage, [cells[c]["req"] for c in payloads], flat) if flat else {}
        for cell, sent in payloads.items():
            info = cells[cell]
            for client in sorted(sent):
                reply = replies.get(client)
                why = "no reply" if reply is None else reply.error
                if why is None:
                    try:
                        receive(info, client, reply)
                        continue
                    except (RejectedMessage, TypeError, ValueError, AttributeError, KeyError) as exc:
                        why = f"rejected: {exc}"
                info["outcome"].dropped.setdefault(stage, []).append(client)
                if why != "no reply":
                    info["status"][client] = ("dropped", f"secagg {stage}: {why}", info["status"][client][2])

    def advertise(info, client, reply):
        info["status"][client] = ("dropped", "no reply before the round timeout", reply)
        advert = read_message(reply.update, AdvertiseKeys)
        if info["of"].get(advert.sender) != client:
            raise RejectedMessage(f"client {client} advertised as {advert.sender!r}, not its own device")
        info["adverts"] = info.get("adverts", {})
        info["adverts"][client] = advert

    ask(STAGES[0], {i["req"].cell: {c: message(Join(i["req"].secure.header, i["req"].secure.registry,
                                                    i["req"].secure.devices[c])) for c in i["req"].clients}
                    for i in live()}, advertise)
    for info in live():
        adverts = info.pop("adverts", {})
        usable = {c: info["status"][c][2] for c in adverts}
        for reply in usable.values():
            reply.bytes_up = upload_bytes(info["req"])
        stragglers = dict(late(usable)) if late is not None and usable else {}
        for client, advert in sorted(adverts.items()):
            if client in stragglers:
                info["status"][client] = ("late", stragglers[client], usable[client])
                continue
            try:
                info["agg"].receive_advert(advert)
            except RejectedMessage as exc:
                info["status"][client] = ("dropped", f"secagg advertise: rejected: {exc}", usable[client])
        _close(info, lambda a: a.close_advertising(), "roster")

    ask(STAGES[1], {i["req"].cell: {i["of"][u]: message(i["roster"]) for u in i["roster"].members} for i in live()},
        lambda info, c, r: info["agg"].receive_shares(_from(info, c, read_message(r.update, ShareKeys))))
    for info in live():
        _close(info, lambda a: a.close_sharing(), "deliveries")
    ask(STAGES[2], {i["req"].cell: {i["of"][u]: message(d) for u, d in i["deliveries"].items()} for i in live()},
        lambda info, c, r: info["agg"].receive_masked_input(_from(info, c, read_message(r.update, MaskedInput))))
    for info in live():
        if _close(info, lambda a: a.close_upload(), "upload"):
            request, info["outcome"].masked = info.pop("upload")
            info["request"] = request
            info["outcome"].survivors = sorted(info["of"][u] for u in request.survivors)
    ask(STAGES[3], {i["req"].cell: {i["of"][u]: message(i["request"]) for u in i["request"].survivors} for i in live()},
        lambda info, c, r: info["agg"].receive_unmask_response(_from(info, c, read_message(r.update, UnmaskResponse))))
    for info in live():
        if _close(info, lambda a: a.close_unmask(), "bundle"):
            info["outcome"].bundle = info.pop("bundle")
    out = {}
    for cell, info in cells.items():
        outcome = info["outcome"]
        for c in outcome.survivors if outcome.aborted is None else ():
            info["status"][c] = ("accepted", None, info["status"][c][2])
        if outcome.aborted is not None:
            outcome.masked = outcome.bundle = None  # nothing partial leaves an aborted cell
            for c, (st, why, reply) in info["status"].items():
                if st == "accepted" or why == "no reply before the round timeout" and reply is not None:
                    info["status"][c] = ("dropped", f"cell aborted: {outcome.aborted}", reply)
        for c, (st, why, reply) in info["status"].items():
            if st == "dropped" and why == "no reply before the round timeout" and reply is not None:
                stage = next((s for s in STAGES[1:] if c in outcome.dropped.get(s, [])), "a later stage")
                info["status"][c] = ("dropped", f"secagg: no reply at {stage}", reply)
        out[cell] = (outcome, info["status"])
    return out


def _from(info: dict, client: int, msg):
    if info["of"].get(msg.sender) != client:
        raise RejectedMessage(f"client {client} sent a message as {msg.sender!r}")
    return msg


def _close(info: dict, action, key: str) -> bool:
    try:
        info[key] = action(info["agg"])
        return True
    except CellAborted as exc:
        _abort(info, str(exc))
        return False


def _abort(info: dict, reason: str) -> None:
    info["outcome"].aborted = reason


# --------------------------------------------------------------------------- cloud


@dataclass
class SecureSettings:
    """The privacy settings the cloud needs (from ``PrivacyConfig``)."""

    encoding: EncodingConfig
    threshold: float
    unmasker: str  # cloud | suburban
    prg: str
    complete_graph_up_to: int


def threshold_for(n: int, fraction: float, complete_up_to: int) -> int:
    """t for a cell of n clients: ceil(fraction * n), at least 2, and more than n/2 in a complete graph."""
    t = max(2, math.ceil(fraction * n - 1e-9))
    if n <= complete_up_to:
        t = max(t, n // 2 + 1)
    return min(t, n)


class SecureRound:
    """The cloud's side of one secure round."""

    def __init__(self, *, identities: Identities, run_id: str, server_round: int, clients: list[int],
                 cells_above: Mapping[str, str], settings: SecureSettings, layout: TensorLayout):
        self.ids, self.run_id, self.server_round, self.settings, self.layout = identities, run_id, server_round, settings, layout
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
        if n < 2:
            return f"{n} client(s) in the cell; secure aggregation needs at least 2"
        s = self.settings
        header = CellHeader(
            run_id=self.run_id, server_round=self.server_round, cell=cell, aggregator=aggregator_id(cell),
            unmasker=self.unmasker_for(cell).device_id, unmasker_key=self.unmasker_for(cell).public_key,
            global_adapter_digest=adapter_digest(arrays), layout=self.layout, encoding=s.encoding,
            threshold=threshold_for(n, s.threshold, s.complete_graph_up_to), max_clients=n,
            graph_seed=self.ids.rng("graph", self.run_id, self.server_round, cell)(32),
            complete_graph_up_to=s.complete_graph_up_to, prg=s.prg)
        return SecureCell(SignedHeader.sign(header, self.cloud, CLOUD_ID), self.signed_registry,
                          {c: device_id(c) for c in clients})

    def unmask(self, outcomes: Mapping[str, SecureOutcome], *, per_cell: bool):
        """Unmask and decode: ({cell or "cloud": DecodedSum}, {cell: abort reason}).

        ``per_cell``: one sum per neighbourhood (HierFAVG needs them); else the cells' masked
        sums are added up the tree (sub-urban, then cloud) and only the total is unmasked.
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
        enc = self.settings.encoding
        if per_cell:
            groups = {cell: [outcomes[cell].masked] for cell in masks}
        else:
            by_suburb: dict[str, list[MaskedSum]] = {}
            for cell in masks:  # sub-urban tier: add its neighbourhoods' masked sums
                by_suburb.setdefault(self.cells_above[cell], []).append(outcomes[cell].masked)
            parts = [add_masked(p, enc) for _, p in sorted(by_suburb.items())]
            groups = {CLOUD_ID: parts} if parts else {}
        sums = {}
        for key, parts in groups.items():
            total = add_masked(parts, enc)
            plain = remove_masks(total, [masks[c] for c in sorted(total.cells)])
            sums[key] = decode_sum(plain.vector, self.layout, enc, plain.clients)
        return sums, aborted


def secure_layout(expected: Mapping[str, tuple[int, ...]]) -> TensorLayout:
    """The encoded vector's layout: the adapter tensors, then the loss coordinate."""
    tensors = dict(expected)
    tensors[LOSS_KEY] = (1,)
    return TensorLayout(tuple(sorted((k, tuple(v)) for k, v in tensors.items())))
