"""The messages of one cell's session, what each one signs, and the session id.

======================  ==========================================  =====================
stage                   who -> whom                                 message
======================  ==========================================  =====================
1 header                cloud -> aggregator -> clients              :class:`SignedHeader`
2 advertise keys        client -> aggregator                        :class:`AdvertiseKeys`
                        aggregator -> clients                       :class:`Roster`
3 share keys            client -> aggregator                        :class:`ShareKeys`
                        aggregator -> each client                   :class:`ShareDelivery`
4 masked input          client -> aggregator                        :class:`MaskedInput`
                        aggregator -> upper tiers (added there)     :class:`MaskedSum`
5 unmask                aggregator -> survivors                     :class:`UnmaskRequest`
                        survivor -> aggregator (sealed to unmasker) :class:`UnmaskResponse`
                        aggregator -> unmasker                      :class:`UnmaskBundle`
6 remove masks          unmasker -> cloud                           :class:`CellMask`
======================  ==========================================  =====================

Everything a signature or AEAD tag covers is built with :mod:`~fedlora.transcript`
and starts with a domain string naming the message, so no message can pass for another.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import Enum

import numpy as np

from fedlora import transcript
from fedlora.secure.encoding import EncodingConfig, TensorLayout
from fedlora.secure.errors import RejectedMessage
from fedlora.secure.graph import DEFAULT_COMPLETE_UP_TO, NeighbourGraph, cell_graph
from fedlora.secure.keys import PUBLIC_KEY_BYTES, DeviceRegistry, IdentityKey
from fedlora.secure.prg import AES128_CTR, PRG_KINDS, SEED_BYTES
from fedlora.wire import Checked, check_fields

DIGEST_BYTES = 32
SELF_MASK = "self-mask"  # a share of b_u, the seed of u's self mask
MASK_KEY = "mask-key"  # a share of s_u, u's X25519 mask key (rebuilds u's pair masks)


class Stage(str, Enum):
    """Stages of a cell session, in order; a client that drops "at" a stage sends nothing from it on."""

    ADVERTISE = "advertise"
    SHARE_KEYS = "share-keys"
    MASKED_INPUT = "masked-input"
    UNMASK = "unmask"


# --------------------------------------------------------------------------- 1. header


@dataclass(frozen=True)
class CellHeader:
    """What the cloud fixes for one cell and round, before any client speaks."""

    run_id: str
    server_round: int
    cell: str
    # Device id of the neighbourhood aggregator (it signs unmask requests).
    aggregator: str
    # Device id of the unmasking tier (cloud by default, a sub-urban cell optionally) and
    # its X25519 key for this round: unmask responses are sealed to it.
    unmasker: str
    unmasker_key: bytes
    # SHA-256 of the round's global adapter (encoding.adapter_digest): all train from the same one.
    global_adapter_digest: bytes
    layout: TensorLayout
    encoding: EncodingConfig
    # t: shares needed to rebuild a secret, and the fewest clients any released sum covers.
    threshold: int
    # The most clients the cell accepts (bounds the sum for the overflow guard).
    max_clients: int
    # Seed of the neighbour graph (ring order of the Harary graph), fresh per round.
    graph_seed: bytes
    complete_graph_up_to: int = DEFAULT_COMPLETE_UP_TO
    # Harary degree k for big cells; None = graph.secagg_plus_parameters.
    graph_degree: int | None = None
    prg: str = AES128_CTR

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("run_id", "cell", "aggregator", "unmasker"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"header {name} must be a non-empty string, got {getattr(self, name)!r}")
        if not isinstance(self.server_round, int) or self.server_round < 1:
            raise ValueError(f"header server_round={self.server_round} must be an integer >= 1")
        for name, size in (("unmasker_key", PUBLIC_KEY_BYTES), ("global_adapter_digest", DIGEST_BYTES),
                           ("graph_seed", SEED_BYTES)):
            if not isinstance(getattr(self, name), bytes) or len(getattr(self, name)) != size:
                raise ValueError(f"header {name} must be {size} bytes")
        if self.prg not in PRG_KINDS:
            raise ValueError(f"header prg={self.prg!r} is not one of {PRG_KINDS}")
        if not 2 <= self.threshold <= self.max_clients:
            raise ValueError(f"header threshold t={self.threshold} must be in 2..max_clients={self.max_clients}")
        if self.max_clients <= self.complete_graph_up_to and 2 * self.threshold <= self.max_clients:
            raise ValueError(f"header threshold t={self.threshold} must be more than half of max_clients={self.max_clients} "
                             f"(t >= {self.max_clients // 2 + 1}) for a complete-graph cell")
        if self.complete_graph_up_to < 0:
            raise ValueError(f"header complete_graph_up_to={self.complete_graph_up_to} must be >= 0")
        if self.graph_degree is not None and self.graph_degree < 2:
            raise ValueError(f"header graph_degree={self.graph_degree} must be >= 2 or None")
        self.encoding.check_capacity(self.max_clients)

    def fields(self) -> tuple:
        return ("cell-header", self.run_id, self.server_round, self.cell, self.aggregator, self.unmasker,
                self.unmasker_key, self.global_adapter_digest, self.layout.fields(), self.encoding.fields(),
                self.threshold, self.max_clients, self.graph_seed, self.complete_graph_up_to,
                () if self.graph_degree is None else (self.graph_degree,), self.prg)

    def digest(self) -> bytes:
        return transcript.digest(*self.fields())

    def neighbour_graph(self, members: tuple[str, ...]) -> NeighbourGraph:
        """The cell's neighbour graph over ``members``, as every party computes it."""
        return cell_graph(members, self.graph_seed, complete_up_to=self.complete_graph_up_to, degree=self.graph_degree)


@dataclass(frozen=True)
class SignedHeader(Checked):
    header: CellHeader
    signer: str
    signature: bytes

    @classmethod
    def sign(cls, header: CellHeader, identity: IdentityKey, signer: str) -> SignedHeader:
        return cls(header, signer, identity.sign(transcript.encode(*header.fields())))

    def verify(self, registry: DeviceRegistry, issuer: str) -> CellHeader:
        """The header, once its signature by ``issuer`` (the cloud) checks out."""
        if self.signer != issuer:
            raise RejectedMessage(f"header of cell {self.header.cell!r} is signed by {self.signer!r}; "
                                  f"only {issuer!r} issues headers")
        registry.check(issuer, transcript.encode(*self.header.fields()), self.signature, f"header of cell {self.header.cell!r}")
        return self.header


# --------------------------------------------------------------------------- 2. advertise


@dataclass(frozen=True)
class AdvertiseKeys(Checked):
    """A client's two fresh X25519 public keys for this session, signed with its identity."""

    header_digest: bytes
    sender: str
    share_key: bytes  # c_u: encrypts shares to and from u, and u's unmask response
    mask_key: bytes  # s_u: agrees u's pairwise mask seeds
    signature: bytes

    @staticmethod
    def signed_bytes(header_digest: bytes, sender: str, share_key: bytes, mask_key: bytes) -> bytes:
        return transcript.encode("advertise-keys", header_digest, sender, share_key, mask_key)

    def verify(self, registry: DeviceRegistry, header_digest: bytes) -> None:
        """Raise unless this advertisement is for ``header_digest`` and signed by its sender."""
        what = f"key advertisement of {self.sender!r}"
        if self.header_digest != header_digest:
            raise RejectedMessage(f"{what} is for another cell/round (header digest differs)")
        if len(self.share_key) != PUBLIC_KEY_BYTES or len(self.mask_key) != PUBLIC_KEY_BYTES:
            raise RejectedMessage(f"{what}: X25519 keys must be {PUBLIC_KEY_BYTES} bytes")
        if self.share_key == self.mask_key:
            raise RejectedMessage(f"{what}: the share key and the mask key must differ")
        registry.check(self.sender, self.signed_bytes(header_digest, self.sender, self.share_key, self.mask_key),
                       self.signature, what)


@dataclass(frozen=True)
class Roster(Checked):
    """The clients of the session (U1) with their signed keys, sorted by id."""

    header_digest: bytes
    adverts: tuple[AdvertiseKeys, ...]

    @property
    def members(self) -> tuple[str, ...]:
        return tuple(a.sender for a in self.adverts)

    def advert(self, client: str) -> AdvertiseKeys:
        for a in self.adverts:
            if a.sender == client:
                return a
        raise KeyError(f"{client!r} is not in the roster")

    def verify(self, registry: DeviceRegistry, header_digest: bytes) -> None:
        """Raise unless the roster is sorted, without repeats, and every advert checks out."""
        if self.header_digest != header_digest:
            raise RejectedMessage("roster is for another cell/round (header digest differs)")
        members = self.members
        if list(members) != sorted(set(members)):
            raise RejectedMessage("roster must list each client once, sorted by id")
        for advert in self.adverts:
            advert.verify(registry, header_digest)


def compute_session_id(header: CellHeader, roster: Roster) -> bytes:
    """sid = H(run, round, cell, unmasker, t, roster with keys), bound to the whole header.

    Every later signature, derived key and associated datum includes sid, so nothing from
    another round, cell or roster verifies or decrypts here.
    """
    return transcript.digest("session-id", header.digest(), header.run_id, header.server_round, header.cell,
                             header.unmasker, header.threshold,
                             tuple((a.sender, a.share_key, a.mask_key) for a in roster.adverts))


# --------------------------------------------------------------------------- 3. share keys


@dataclass(frozen=True)
class EncryptedShare(Checked):
    receiver: str
    ciphertext: bytes


@dataclass(frozen=True)
class ShareKeys(Checked):
    """A client's shares of b_u and s_u, one sealed ciphertext per neighbour, signed."""

    sid: bytes
    sender: str
    shares: tuple[EncryptedShare, ...]
    signature: bytes

    @staticmethod
    def signed_bytes(sid: bytes, sender: str, shares: tuple[EncryptedShare, ...]) -> bytes:
        return transcript.encode("share-keys", sid, sender, tuple((s.receiver, s.ciphertext) for s in shares))


@dataclass(frozen=True)
class SharePayload:
    """The plaintext inside one :class:`EncryptedShare`."""

    sid: bytes
    sender: str
    receiver: str
    x: int
    self_mask_y: int
    mask_key_y: int

    def encode(self) -> bytes:
        return transcript.encode("share-payload", self.sid, self.sender, self.receiver, self.x, self.self_mask_y,
                                 self.mask_key_y)

    @classmethod
    def decode(cls, data: bytes) -> SharePayload:
        try:
            tag, sid, sender, receiver, x, b_y, s_y = transcript.decode(data)
        except ValueError as exc:
            raise RejectedMessage(f"share payload is malformed ({exc})") from None
        if tag != "share-payload" or not all(isinstance(v, int) for v in (x, b_y, s_y)):
            raise RejectedMessage("share payload is malformed")
        return cls(sid, sender, receiver, x, b_y, s_y)


def share_associated_data(sid: bytes, sender: str, receiver: str) -> bytes:
    return transcript.encode("share", sid, sender, receiver)


@dataclass(frozen=True)
class DeliveredShare(Checked):
    sender: str
    ciphertext: bytes


@dataclass(frozen=True)
class ShareDelivery(Checked):
    """The ciphertexts addressed to ``receiver``, from every neighbour whose shares arrived (U2)."""

    sid: bytes
    receiver: str
    shares: tuple[DeliveredShare, ...]


# --------------------------------------------------------------------------- 4. masked input


def vector_digest(vector: np.ndarray) -> bytes:
    """SHA-256 of a masked vector as it travels: uint32 words, or the packed bytes (uint8,
    :mod:`~fedlora.secure.packing`; tagged, so no packed vector hashes like a uint32 one)."""
    if isinstance(vector, np.ndarray) and vector.dtype == np.uint8:
        return hashlib.sha256(b"fedlora/packed-vector/v1" + vector.tobytes()).digest()
    return hashlib.sha256(np.ascontiguousarray(vector, dtype="<u4").tobytes()).digest()


@dataclass(frozen=True, eq=False)
class MaskedInput(Checked):
    """y_u = q_u + PRG(b_u) + sum_{v>u} PRG(s_uv) - sum_{v<u} PRG(s_uv) mod 2^32, signed with sid.

    ``vector`` is the uint32 vector, or under packing (``EncodingConfig.sum_clients``) its
    packed bytes (:func:`~fedlora.secure.packing.pack`: value coordinates mod 2^k)."""

    sid: bytes
    sender: str
    vector: np.ndarray
    signature: bytes

    @staticmethod
    def signed_bytes(sid: bytes, sender: str, vector: np.ndarray) -> bytes:
        return transcript.encode("masked-input", sid, sender, len(vector), vector_digest(vector))


@dataclass(frozen=True, eq=False)
class MaskedSum(Checked):
    """A masked sum as the tiers above a neighbourhood see it: which cells are in it, how
    many client inputs, and the uint32 vector (uniformly random to anyone without the masks)."""

    cells: frozenset[str]
    clients: int
    vector: np.ndarray


# --------------------------------------------------------------------------- 5. unmask


@dataclass(frozen=True)
class UnmaskRequest(Checked):
    """Who uploaded (survivors, U3) and who shared keys but did not upload (dropped, U2 \\ U3)."""

    sid: bytes
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    signer: str
    signature: bytes

    @staticmethod
    def signed_bytes(sid: bytes, survivors: tuple[str, ...], dropped: tuple[str, ...]) -> bytes:
        return transcript.encode("unmask-request", sid, tuple(survivors), tuple(dropped))


@dataclass(frozen=True)
class RevealedShare:
    """One share a survivor reveals: of ``owner``'s self-mask seed or of its mask key."""

    owner: str
    kind: str  # SELF_MASK or MASK_KEY
    x: int
    y: int


def encode_revealed(sid: bytes, sender: str, shares: tuple[RevealedShare, ...]) -> bytes:
    return transcript.encode("unmask-payload", sid, sender, tuple((s.owner, s.kind, s.x, s.y) for s in shares))


def decode_revealed(data: bytes) -> tuple[bytes, str, tuple[RevealedShare, ...]]:
    """(sid, sender, shares) of an unmask payload; RejectedMessage if malformed."""
    try:
        tag, sid, sender, items = transcript.decode(data)
        shares = tuple(RevealedShare(o, k, x, y) for o, k, x, y in items)
    except (ValueError, TypeError) as exc:
        raise RejectedMessage(f"unmask payload is malformed ({exc})") from None
    if tag != "unmask-payload" or not all(isinstance(s.owner, str) and s.kind in (SELF_MASK, MASK_KEY)
                                          and isinstance(s.x, int) and isinstance(s.y, int) for s in shares):
        raise RejectedMessage("unmask payload is malformed")
    return sid, sender, shares


def unmask_associated_data(sid: bytes, sender: str, unmasker: str) -> bytes:
    return transcript.encode("unmask-response", sid, sender, unmasker)


@dataclass(frozen=True)
class UnmaskResponse(Checked):
    """A survivor's revealed shares, sealed to the unmasker (the aggregator cannot read them)."""

    sid: bytes
    sender: str
    ciphertext: bytes


@dataclass(frozen=True)
class UnmaskBundle(Checked):
    """Everything the unmasker needs for one cell; it re-checks all of it itself."""

    header: SignedHeader
    roster: Roster
    # U2: the clients whose shares were delivered (and with whom survivors masked).
    shared: tuple[str, ...]
    request: UnmaskRequest
    responses: tuple[UnmaskResponse, ...]


# --------------------------------------------------------------------------- 6. remove masks


@dataclass(frozen=True, eq=False)
class CellMask(Checked):
    """The total mask left in one cell's masked sum: masked sum - mask = plain sum."""

    cell: str
    sid: bytes
    clients: int
    vector: np.ndarray


@dataclass(frozen=True, eq=False)
class UnmaskedSum(Checked):
    """A plain quantised sum (masks removed) over ``clients`` inputs of ``cells``; decode it
    with :func:`~fedlora.secure.encoding.decode_sum`."""

    cells: frozenset[str]
    clients: int
    vector: np.ndarray
