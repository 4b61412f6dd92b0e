"""Secure aggregation of adapter updates over the cell tree (SecAgg / SecAgg+).

No aggregator ever sees one client's update: clients upload masked vectors in Z_2^32,
neighbourhood and upper tiers only add them, and the unmasking tier (the cloud by default)
removes the masks of whole cells from shares that at least t survivors reveal. See
``docs/secure_aggregation.md`` for the protocol (roles, stages, who sees what). Pure Python +
numpy + ``cryptography``: no Flower, Ray, torch or sockets.

Primitives (one file each):
    transcript   canonical bytes for signatures, hashes, HKDF info, AEAD associated data
    prg          AES-128-CTR / ChaCha20 seed -> uint32 mask vector; seeded CSPRNG stream
    keys         Ed25519 identities + device registry, X25519 agreement, HKDF-SHA256
    aead         AES-GCM sealing of shares and unmask responses
    shamir       t-of-n secret sharing over GF(2^521 - 1)
    graph        complete / Harary neighbour graphs, thresholds
    encoding     clip, weight, fixed point, stochastic rounding, two's complement, decode
    masks        self and pairwise masks and their signs
Protocol:
    messages     every message (dataclasses), what each signs, the session id
    client       END device state machine
    aggregator   neighbourhood aggregator state machine (verify, route, add)
    unmasker     unmasking tier: rebuild seeds, cell masks, remove_masks
    tiers        upper tiers: add masked sums of cells
Drivers (import them from their modules: they send messages through ``fedlora.wire``, which
imports this package, so exporting them here would be an import cycle):
    rounds       secure rounds over real messages; the one driver of a cell's stages
    session      one cell's session in one process, the same driver over an in-memory exchange
    simulation   enrolled identities and signed headers for in-process runs and tests
"""

from fedlora.secure.aggregator import NeighbourhoodAggregator
from fedlora.secure.client import CellClient
from fedlora.secure.encoding import DecodedSum, EncodingConfig, TensorLayout, calibrate_clip, decode_sum, encode_update
from fedlora.secure.errors import (
                                   CellAborted,
                                   ProtocolStateError,
                                   RejectedMessage,
                                   SecAggError,
                                   ShareRequestRefused,
                                   UnknownDevice,
                                   UnsafeEncoding,
)
from fedlora.secure.keys import DeviceRegistry, IdentityKey
from fedlora.secure.messages import CellHeader, CellMask, MaskedSum, SignedHeader, Stage, UnmaskedSum
from fedlora.secure.tiers import add_masked
from fedlora.secure.unmasker import Unmasker, remove_masks

__all__ = [
    "CellAborted", "CellClient", "CellHeader", "CellMask", "DecodedSum", "DeviceRegistry",
    "EncodingConfig", "IdentityKey", "MaskedSum", "NeighbourhoodAggregator", "ProtocolStateError", "RejectedMessage",
    "SecAggError", "ShareRequestRefused", "SignedHeader", "Stage", "TensorLayout", "UnknownDevice", "Unmasker",
    "UnmaskedSum", "UnsafeEncoding", "add_masked", "calibrate_clip", "decode_sum", "encode_update", "remove_masks",
]
