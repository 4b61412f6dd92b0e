"""The client (END device) side of one cell session, as a state machine.

One :class:`CellClient` per device per round. Stages must come in order:

    NEW --advertise--> ADVERTISED --share_keys--> SHARED --masked_input--> UPLOADED --unmask--> DONE

Each stage checks everything it is given before changing any state: a message that fails a
check raises :class:`RejectedMessage` and leaves the client as it was (the round loop may
treat the client as dropped). An unmask request that would reveal both secrets of one peer
raises :class:`ShareRequestRefused` and the client aborts for good: an honest server never
asks that, so the client assumes it is under attack.

Privacy promises of the client: it only ever sends its input masked; it reveals a share of
a peer's self-mask seed only for peers the request says survived, and a share of a peer's
mask key only for peers it says dropped, never both for one peer in one session (the
ledger), and only if at least t clients survived.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from enum import Enum

import numpy as np

from fedlora import wire
from fedlora.secure import aead, shamir
from fedlora.secure.encoding import adapter_digest, check_encoded, encode_update
from fedlora.secure.errors import ProtocolStateError, RejectedMessage, ShareRequestRefused
from fedlora.secure.graph import NeighbourGraph
from fedlora.secure.keys import SHARE_TRANSPORT, UNMASK_TRANSPORT, AgreementKey, DeviceRegistry, IdentityKey, pair_key
from fedlora.secure.masks import mask_input, pair_seed
from fedlora.secure.messages import (
    MASK_KEY,
    SELF_MASK,
    AdvertiseKeys,
    CellHeader,
    EncryptedShare,
    MaskedInput,
    RevealedShare,
    Roster,
    ShareDelivery,
    ShareKeys,
    SharePayload,
    SignedHeader,
    UnmaskRequest,
    UnmaskResponse,
    compute_session_id,
    encode_revealed,
    share_associated_data,
    unmask_associated_data,
)
from fedlora.secure.packing import pack
from fedlora.secure.prg import SEED_BYTES, Randomness, SeededStream


class ClientState(str, Enum):
    NEW = "new"
    ADVERTISED = "advertised"
    SHARED = "shared"
    UPLOADED = "uploaded"
    DONE = "done"
    ABORTED = "aborted"


class CellClient:
    """One END device in one cell session.

    ``registry`` is the cloud's published registry (public keys only); ``cloud_id`` is the
    one device allowed to issue headers. ``rng`` supplies every secret (keys, seeds, share
    polynomials, nonces, rounding): ``os.urandom`` in production, a SeededStream in tests.
    """

    def __init__(self, device_id: str, identity: IdentityKey, registry: DeviceRegistry, *, cloud_id: str = "cloud",
                 rng: Randomness = os.urandom):
        self.device_id = device_id
        self.state = ClientState.NEW
        self._identity = identity
        self._registry = registry
        self._cloud_id = cloud_id
        self._rng = rng
        self._header: CellHeader | None = None
        self._header_digest = b""
        self._share_key: AgreementKey | None = None
        self._mask_key: AgreementKey | None = None
        self._roster: Roster | None = None
        self._graph: NeighbourGraph | None = None
        self._sid = b""
        self._self_seed = b""
        self._own_shares: tuple[shamir.Share, shamir.Share] | None = None
        # Peer -> (its share of b_peer, its share of s_peer) held by this client, from U2 neighbours.
        self._held: dict[str, tuple[shamir.Share, shamir.Share]] = {}
        # Peer -> which of its secrets this client has revealed a share of (SELF_MASK or MASK_KEY).
        self._ledger: dict[str, str] = {}

    @property
    def header(self) -> CellHeader:
        if self._header is None:
            raise ProtocolStateError(f"{self.device_id}: no header yet (call advertise first)")
        return self._header

    # ------------------------------------------------------------------ 2. advertise keys

    def advertise(self, signed_header: SignedHeader, global_adapter: Mapping[str, np.ndarray] | None = None) -> AdvertiseKeys:
        """Check the cloud's header (and, if given, that ``global_adapter`` is the one it
        names) and answer with two fresh X25519 public keys, signed."""
        self._expect(ClientState.NEW, "advertise")
        header = signed_header.verify(self._registry, self._cloud_id)
        if global_adapter is not None and adapter_digest(global_adapter) != header.global_adapter_digest:
            raise RejectedMessage(f"{self.device_id}: the global adapter received differs from the one the header of "
                                  f"cell {header.cell!r} names (digest mismatch)")
        digest = header.digest()
        share_key, mask_key = AgreementKey.generate(self._rng), AgreementKey.generate(self._rng)
        signature = self._identity.sign(AdvertiseKeys.signed_bytes(digest, self.device_id, share_key.public_bytes,
                                                                   mask_key.public_bytes))
        self._header, self._header_digest = header, digest
        self._share_key, self._mask_key = share_key, mask_key
        self.state = ClientState.ADVERTISED
        return AdvertiseKeys(digest, self.device_id, share_key.public_bytes, mask_key.public_bytes, signature)

    # ------------------------------------------------------------------ 3. share keys

    def share_keys(self, roster: Roster) -> ShareKeys:
        """Fix the session (sid, neighbour graph) from ``roster`` and send Shamir shares of
        b_u and s_u to each neighbour, each sealed to it with AD = (sid, sender, receiver)."""
        self._expect(ClientState.ADVERTISED, "share_keys")
        header = self.header
        roster.verify(self._registry, self._header_digest)
        me = self.device_id
        try:
            mine = roster.advert(me)
        except KeyError:
            raise RejectedMessage(f"{me}: the roster of cell {header.cell!r} leaves me out") from None
        if (mine.share_key, mine.mask_key) != (self._share_key.public_bytes, self._mask_key.public_bytes):
            raise RejectedMessage(f"{me}: the roster carries keys for me that I did not advertise")
        if len(roster.adverts) > header.max_clients:
            raise RejectedMessage(f"{me}: roster has {len(roster.adverts)} clients, the header allows {header.max_clients}")
        graph = header.neighbour_graph(roster.members)
        try:
            graph.check_threshold(header.threshold)
        except ValueError as exc:
            raise RejectedMessage(f"{me}: unsafe session: {exc}") from None
        sid = compute_session_id(header, roster)
        holders = graph.holders(me)
        xs = [graph.share_x(h) for h in holders]
        self_seed = self._rng(SEED_BYTES)
        b_shares = shamir.split_bytes(self_seed, header.threshold, xs, self._rng)
        s_shares = shamir.split_bytes(self._mask_key.private_bytes(), header.threshold, xs, self._rng)
        sealed, own = [], None
        for holder, b_share, s_share in zip(holders, b_shares, s_shares):
            if holder == me:
                own = (b_share, s_share)
                continue
            key = pair_key(self._share_key, roster.advert(holder).share_key, sid=sid, purpose=SHARE_TRANSPORT,
                           me=me, peer=holder)
            payload = SharePayload(sid, me, holder, b_share.x, b_share.y, s_share.y).encode()
            sealed.append(EncryptedShare(holder, aead.seal(key, payload, share_associated_data(sid, me, holder), self._rng)))
        shares = tuple(sealed)
        signature = self._identity.sign(ShareKeys.signed_bytes(sid, me, shares))
        self._roster, self._graph, self._sid = roster, graph, sid
        self._self_seed, self._own_shares = self_seed, own
        self.state = ClientState.SHARED
        return ShareKeys(sid, me, shares, signature)

    # ------------------------------------------------------------------ 4. masked input

    def encode(self, update: Mapping[str, np.ndarray], num_examples: int) -> np.ndarray:
        """``q_u``: the update encoded as the header says, rounded with fresh secret randomness."""
        header = self.header
        return encode_update(update, num_examples, header.layout, header.encoding, SeededStream(self._rng(SEED_BYTES)))

    def masked_input(self, delivery: ShareDelivery, encoded: np.ndarray) -> MaskedInput:
        """Open the shares addressed to this client, then mask ``encoded`` (from :meth:`encode`)
        with the self mask and one pair mask per neighbour whose shares arrived, pack it as the
        header's encoding says (:mod:`~fedlora.secure.packing`), and sign."""
        self._expect(ClientState.SHARED, "masked_input")
        header, graph, roster, sid, me = self.header, self._graph, self._roster, self._sid, self.device_id
        check_encoded(encoded, header.layout, header.encoding)
        if delivery.sid != sid:
            raise RejectedMessage(f"{me}: share delivery is for another session (sid differs)")
        if delivery.receiver != me:
            raise RejectedMessage(f"{me}: share delivery is addressed to {delivery.receiver!r}")
        held: dict[str, tuple[shamir.Share, shamir.Share]] = {}
        my_x = graph.share_x(me)
        for item in delivery.shares:
            sender = item.sender
            if sender == me or sender not in graph.neighbours(me):
                raise RejectedMessage(f"{me}: share delivery holds a share from {sender!r}, who is not my neighbour")
            if sender in held:
                raise RejectedMessage(f"{me}: share delivery holds two shares from {sender!r}")
            key = pair_key(self._share_key, roster.advert(sender).share_key, sid=sid, purpose=SHARE_TRANSPORT,
                           me=me, peer=sender)
            plain = aead.open_sealed(key, item.ciphertext, share_associated_data(sid, sender, me),
                                     f"{me}: share from {sender!r}")
            payload = SharePayload.decode(plain)
            if (payload.sid, payload.sender, payload.receiver, payload.x) != (sid, sender, me, my_x):
                raise RejectedMessage(f"{me}: share from {sender!r} names another session, sender, receiver or x")
            if not (0 <= payload.self_mask_y < shamir.PRIME and 0 <= payload.mask_key_y < shamir.PRIME):
                raise RejectedMessage(f"{me}: share from {sender!r} is not a field element")
            held[sender] = (shamir.Share(my_x, payload.self_mask_y), shamir.Share(my_x, payload.mask_key_y))
        seeds = {peer: pair_seed(self._mask_key, roster.advert(peer).mask_key, sid=sid, owner=me, peer=peer)
                 for peer in held}
        vector = pack(mask_input(encoded, self._self_seed, seeds, me, header.prg), header.layout, header.encoding)
        signature = self._identity.sign(MaskedInput.signed_bytes(sid, me, vector))
        self._held = held
        self.state = ClientState.UPLOADED
        return MaskedInput(sid, me, vector, signature)

    # ------------------------------------------------------------------ 5. unmask

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Reveal, sealed to the unmasker, shares of b_v for survivors v and of s_v for
        dropped v -- after checking the request is the aggregator's, for this session, names
        at least t survivors including this client, and never asks for both secrets of one v."""
        if self.state not in (ClientState.UPLOADED, ClientState.DONE):
            self._expect(ClientState.UPLOADED, "unmask")
        header, sid, me = self.header, self._sid, self.device_id
        if request.sid != sid:
            raise RejectedMessage(f"{me}: unmask request is for another session (sid differs)")
        if request.signer != header.aggregator:
            raise RejectedMessage(f"{me}: unmask request signed by {request.signer!r}, not the cell aggregator "
                                  f"{header.aggregator!r}")
        self._registry.check(request.signer, UnmaskRequest.signed_bytes(sid, request.survivors, request.dropped),
                             request.signature, f"{me}: unmask request")
        survivors, dropped = set(request.survivors), set(request.dropped)
        unknown = sorted((survivors | dropped) - set(self._roster.members))
        if unknown:
            raise RejectedMessage(f"{me}: unmask request names {unknown}, who are not in the roster")
        both = sorted(survivors & dropped)
        if both:
            self._refuse(f"unmask request names {both} both as survivors and as dropped; revealing both secrets "
                         "would expose their inputs")
        if me not in survivors:
            self._refuse("unmask request does not list me as a survivor, but I uploaded; revealing my mask key "
                         "would expose my input")
        if len(survivors) < header.threshold:
            self._refuse(f"unmask request names {len(survivors)} survivors, fewer than t={header.threshold}; "
                         "the sum would cover too few clients")
        conflicts = sorted([v for v in survivors if self._ledger.get(v) == MASK_KEY]
                           + [v for v in dropped if self._ledger.get(v) == SELF_MASK])
        if conflicts:
            self._refuse(f"unmask request asks for the other secret of {conflicts}, whose other share I already "
                         "revealed in this session")
        revealed: list[RevealedShare] = []
        held = dict(self._held)
        held[me] = self._own_shares
        # Peers this client holds nothing of (not neighbours, or their shares never came) are skipped.
        for v in sorted(survivors & held.keys()):
            share = held[v][0]
            revealed.append(RevealedShare(v, SELF_MASK, share.x, share.y))
        for v in sorted(dropped & held.keys()):
            share = held[v][1]
            revealed.append(RevealedShare(v, MASK_KEY, share.x, share.y))
        key = pair_key(self._share_key, header.unmasker_key, sid=sid, purpose=UNMASK_TRANSPORT, me=me,
                       peer=header.unmasker)
        blob = aead.seal(key, encode_revealed(sid, me, tuple(revealed)), unmask_associated_data(sid, me, header.unmasker),
                         self._rng)
        for share in revealed:
            self._ledger[share.owner] = share.kind
        self.state = ClientState.DONE
        return UnmaskResponse(sid, me, blob)

    # ------------------------------------------------------------------ persistence

    def export_state(self) -> bytes:
        """This client's session state as bytes, for a device that handles each message in a
        new process (Flower deployment: kept in the node's ``context.state``). It holds the
        round's X25519 private keys, self-mask seed and shares: it must never leave the device."""
        keys = [k.private_bytes() if k is not None else None for k in (self._share_key, self._mask_key)]
        return wire.dumps({"device": self.device_id, "state": self.state.value, "header": self._header,
                           "keys": keys, "roster": self._roster, "sid": self._sid, "self_seed": self._self_seed,
                           "own": self._own_shares, "held": self._held, "ledger": self._ledger}, "secagg-client-state")

    @classmethod
    def restore(cls, data: bytes, identity: IdentityKey, registry: DeviceRegistry, *, cloud_id: str = "cloud",
                rng: Randomness = os.urandom) -> CellClient:
        """The client :meth:`export_state` saved, with its identity, registry and a fresh ``rng``."""
        s = wire.loads(data, "secagg-client-state")
        client = cls(s["device"], identity, registry, cloud_id=cloud_id, rng=rng)
        client.state = ClientState(s["state"])
        client._header = s["header"]
        client._header_digest = client._header.digest() if client._header is not None else b""
        share, mask = s["keys"]
        client._share_key = AgreementKey.from_private_bytes(share) if share is not None else None
        client._mask_key = AgreementKey.from_private_bytes(mask) if mask is not None else None
        client._roster, client._sid, client._self_seed = s["roster"], s["sid"], s["self_seed"]
        client._graph = client._header.neighbour_graph(client._roster.members) if client._roster is not None else None
        client._own_shares, client._held, client._ledger = s["own"], s["held"], s["ledger"]
        return client

    # ------------------------------------------------------------------ helpers

    def _expect(self, state: ClientState, stage: str) -> None:
        if self.state != state:
            raise ProtocolStateError(f"{self.device_id}: {stage} called in state {self.state.value}, "
                                     f"needs state {state.value}")

    def _refuse(self, why: str) -> None:
        self.state = ClientState.ABORTED
        raise ShareRequestRefused(f"{self.device_id}: {why}")

