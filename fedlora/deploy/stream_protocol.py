"""The split stream's protocol without sockets: messages, frames, the signed handshake, errors.

:mod:`fedlora.deploy.stream` moves these bytes over TLS between a split device and its edge;
everything that decides what is accepted lives here, so it is tested without a network.

- **Frames**: ``FLS1`` + a 4-byte big-endian body length + a :mod:`fedlora.wire` message of kind
  ``split-stream`` (no pickle; arrays with dtype and shape checked against their bytes). A length
  over the limit is refused from the header alone, before a byte of the body is read; handshake
  frames, sent before the device is known, have a small limit of their own.
- **Handshake** (after TLS): device -> :class:`Hello` (its id, the edge's id, run, round, a fresh
  nonce); edge -> :class:`Challenge` (its nonce, its Ed25519 signature); device ->
  :class:`Proof` (its signature); edge -> :class:`Admitted` or :class:`Refused`. Both sign the
  same transcript with their plan identity keys (``secagg/identity.pem``), each under its own
  role label: the label, the SHA-256 of the edge's TLS certificate as the device saw it, both
  ids, the run id, the round and both nonces. Each side checks the other's signature against the
  plan's registry, so a signature is useless on any other connection, round, run or edge.
- **Steps**: device -> :class:`Step` (``seq`` 0, 1, ..., ``kind``, payload); edge -> :class:`Reply`
  (same ``seq``) or :class:`Failed`; the device ends with :class:`Bye`.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Union

import numpy as np

from fedlora import transcript, wire
from fedlora.secure.identities import PlannedIdentities
from fedlora.secure.keys import verify_signature

KIND = "split-stream"
LABEL = "fedlora/split-stream/v1"
FRAME_MAGIC = b"FLS1"
_HEADER = struct.Struct(">4sI")
HEADER_BYTES = _HEADER.size
NONCE_BYTES = 32
SIGNATURE_BYTES = 64
# Handshake frames come before the device is known: small, so a stranger cannot make the edge
# allocate a big buffer.
HANDSHAKE_FRAME_BYTES = 4096
MAX_NAME_CHARS = 128
MAX_TENSORS = 16
# What a payload's arrays may be: activations and gradients (float32, float16, float64) and
# integer side inputs such as an attention mask or position ids.
PAYLOAD_DTYPES = frozenset(np.dtype(t) for t in ("float16", "float32", "float64", "int32", "int64", "uint8"))
DEVICE_PREFIX = "device-"
# Offset of an edge's stream port from its SuperLink port when the plan says nothing else
# (edge SuperLinks sit at base_port + 1 + i, SuperNode runtime ports from runtime_port_base).
DEFAULT_PORT_OFFSET = 10000

Payload = Union[np.ndarray, dict[str, np.ndarray]]
Handler = Callable[[str, Payload], Payload]

# ----------------------------------------------------------------------------- errors

class StreamError(Exception):
    """The split stream of this round is unusable; ``str(exc)`` is the reason. The caller counts the
    device as a dropout for the round (on the device: it does not report an update; on the edge:
    the device's session is over) and the run goes on."""


class PeerGone(StreamError):
    """The other end disconnected, reset, could not be reached, or sent nothing before a deadline."""


class HandshakeRefused(StreamError):
    """TLS or the identity check failed, or the stream is for another run, round or edge."""


class FrameError(StreamError):
    """A frame that is malformed, over the size limit, or not what the protocol expects next."""


class PeerFailed(StreamError):
    """The other end reported that it gave up (its handler failed, it refused one of our frames)."""


# --------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class StreamLimits:
    """Sizes and deadlines of one stream (both ends should use the same)."""

    # Largest frame either end sends or accepts, after the handshake. An activation frame is about
    # batch x seq x hidden x itemsize bytes (4 x 256 x 576 float32: 2.4 MB).
    max_frame_bytes: int = 256 * 2**20
    # The longest a device tries to reach its edge (retrying while refused: the edge may open the
    # round's stream a moment after the device starts) and then waits for TLS.
    connect_timeout_s: float = 10.0
    # The longest the handshake after TLS may take (each frame of it).
    handshake_timeout_s: float = 10.0
    # The longest either end waits for the other's next frame once the stream is open: the device
    # for the edge's reply (the edge computes the middle blocks), the edge for the device's next
    # step (the device computes its own blocks, loss and optimiser step in between).
    step_timeout_s: float = 120.0
    # How long closing the edge's round waits for each session's thread to end.
    close_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if not HANDSHAKE_FRAME_BYTES <= self.max_frame_bytes < 2**32:
            raise ValueError(f"max_frame_bytes={self.max_frame_bytes} must be in {HANDSHAKE_FRAME_BYTES}..2^32-1")
        for name in ("connect_timeout_s", "handshake_timeout_s", "step_timeout_s", "close_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0 seconds")


def stream_port(superlink_port: int, offset: int = DEFAULT_PORT_OFFSET) -> int:
    """The port an edge's split stream listens on, from its SuperLink's port in the plan."""
    port = int(superlink_port) + offset
    if not 1024 <= port <= 65535:
        raise ValueError(f"stream port {port} (SuperLink port {superlink_port} + {offset}) is not in 1024..65535")
    return port


def parse_address(address: str | tuple[str, int]) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``) or a (host, port) pair as a (host, port) pair (port 0: any free one)."""
    if isinstance(address, tuple):
        host, port = address
    else:
        host, sep, port_text = str(address).rpartition(":")
        if not sep or not port_text.isdigit():
            raise ValueError(f"{address!r} is not HOST:PORT")
        host, port = host.strip("[]"), int(port_text)
    if not host or not 0 <= int(port) < 65536:  # 0: a listener picks a free port
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host, int(port)


# --------------------------------------------------------------------------- messages

def _name(value: object, what: str) -> None:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_CHARS:
        raise ValueError(f"{what} must be a string of 1..{MAX_NAME_CHARS} characters, got {value!r}")


def _count(value: object, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")


def _text(value: object, what: str) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got a {type(value).__name__}")


def _signature(value: object) -> None:
    if not isinstance(value, bytes) or len(value) != SIGNATURE_BYTES:
        raise ValueError(f"an Ed25519 signature is {SIGNATURE_BYTES} bytes")


def _nonce(value: object, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != NONCE_BYTES:
        raise ValueError(f"{what} must be {NONCE_BYTES} bytes")


def check_payload(payload: object, what: str = "payload") -> None:
    """Raise ValueError unless ``payload`` is a numpy array or a dict of up to MAX_TENSORS named
    arrays (none: an answer that carries no tensor), each of a dtype in PAYLOAD_DTYPES."""
    if isinstance(payload, dict) and len(payload) <= MAX_TENSORS \
            and all(isinstance(k, str) and 0 < len(k) <= MAX_NAME_CHARS for k in payload):
        arrays = list(payload.values())
    elif isinstance(payload, np.ndarray):
        arrays = [payload]
    else:
        raise ValueError(f"a {what} is a numpy array or a dict of up to {MAX_TENSORS} named arrays, "
                         f"got {type(payload).__name__}")
    for array in arrays:
        if not isinstance(array, np.ndarray):
            raise ValueError(f"a {what} holds numpy arrays, got a {type(array).__name__}")
        if array.dtype.newbyteorder("=") not in PAYLOAD_DTYPES:
            raise ValueError(f"a {what} array of dtype {array.dtype} cannot go on the stream "
                             f"(one of {', '.join(sorted(str(d) for d in PAYLOAD_DTYPES))})")


@dataclass(frozen=True)
class Hello:
    """Device -> edge, first: who it is, which edge, run and round it wants, its nonce."""

    device: str
    edge: str
    run_id: str
    server_round: int
    nonce: bytes

    def __post_init__(self) -> None:
        _name(self.device, "device id")
        _name(self.edge, "edge id")
        _name(self.run_id, "run id")
        _count(self.server_round, "round")
        _nonce(self.nonce, "device nonce")


@dataclass(frozen=True)
class Challenge:
    """Edge -> device: its nonce and its signature of the transcript."""

    edge: str
    nonce: bytes
    signature: bytes

    def __post_init__(self) -> None:
        _name(self.edge, "edge id")
        _nonce(self.nonce, "edge nonce")
        _signature(self.signature)


@dataclass(frozen=True)
class Proof:
    """Device -> edge: its signature of the transcript."""

    signature: bytes

    def __post_init__(self) -> None:
        _signature(self.signature)


@dataclass(frozen=True)
class Admitted:
    """Edge -> device: the stream is open for steps."""


@dataclass(frozen=True)
class Refused:
    """Edge -> device: the handshake failed, and why."""

    reason: str

    def __post_init__(self) -> None:
        _text(self.reason, "a refusal's reason")


@dataclass(frozen=True)
class Step:
    """Device -> edge: step ``seq`` (0, 1, ...) of kind ``kind`` (e.g. forward, backward)."""

    seq: int
    kind: str
    payload: Payload

    def __post_init__(self) -> None:
        _count(self.seq, "a step number")
        _name(self.kind, "step kind")
        check_payload(self.payload, "step payload")


@dataclass(frozen=True)
class Reply:
    """Edge -> device: the answer to step ``seq``."""

    seq: int
    payload: Payload

    def __post_init__(self) -> None:
        _count(self.seq, "a step number")
        check_payload(self.payload, "reply payload")


@dataclass(frozen=True)
class Failed:
    """Either way: the sender gives up on this stream, and why (then it closes)."""

    reason: str

    def __post_init__(self) -> None:
        _text(self.reason, "a failure's reason")


@dataclass(frozen=True)
class Bye:
    """Device -> edge: the device is done with the round after ``steps`` steps."""

    steps: int

    def __post_init__(self) -> None:
        _count(self.steps, "a step count")


MESSAGES = (Hello, Challenge, Proof, Admitted, Refused, Step, Reply, Failed, Bye)
wire.register(*MESSAGES)


# ----------------------------------------------------------------------------- frames

def encode_frame(message: object, limit: int) -> bytes:
    """The frame of ``message``; :class:`FrameError` when it would exceed ``limit`` bytes of body."""
    return b"".join(frame_parts(message, limit))


def frame_parts(message: object, limit: int) -> tuple[bytes, bytes]:
    """:func:`encode_frame` as (header, body): a sender of a large frame writes both without
    first copying them into one buffer."""
    if not isinstance(message, MESSAGES):
        raise TypeError(f"a {type(message).__name__} is not a split-stream message")
    try:
        body = wire.dumps(message, KIND)
    except TypeError as exc:  # e.g. an array of a dtype the wire does not carry
        raise FrameError(f"cannot send a {type(message).__name__}: {exc}") from None
    if len(body) > limit:
        raise FrameError(f"a {type(message).__name__} frame of {len(body)} bytes exceeds the stream's limit of {limit} "
                         "bytes (StreamLimits.max_frame_bytes)")
    return _HEADER.pack(FRAME_MAGIC, len(body)), body


def frame_length(header: bytes, limit: int) -> int:
    """The body length a frame header announces; :class:`FrameError` for a foreign or oversized frame."""
    if len(header) != HEADER_BYTES:
        raise FrameError(f"a frame header is {HEADER_BYTES} bytes, got {len(header)}")
    magic, length = _HEADER.unpack(header)
    if magic != FRAME_MAGIC:
        raise FrameError(f"not a fedlora split-stream frame (starts with {magic!r}, expected {FRAME_MAGIC!r})")
    if length > limit:
        raise FrameError(f"refused a frame of {length} bytes: over the limit of {limit} bytes")
    return length


def decode_frame(body: bytes) -> object:
    """The message in a frame body; :class:`FrameError` for anything :func:`encode_frame` could not make."""
    try:
        message = wire.loads(body, KIND)
    except wire.WireError as exc:
        raise FrameError(f"malformed frame: {exc}") from None
    if not isinstance(message, MESSAGES):
        raise FrameError(f"a {type(message).__name__} is not a split-stream message")
    return message


def expect(message: object, kind: type, peer: str) -> object:
    """``message`` if it is a ``kind``; the peer's refusal or failure as an error; else FrameError."""
    if isinstance(message, kind):
        return message
    if isinstance(message, Refused):
        raise HandshakeRefused(f"{peer} refused the stream: {message.reason}")
    if isinstance(message, Failed):
        raise PeerFailed(f"{peer} gave up: {message.reason}")
    raise FrameError(f"{peer} sent a {type(message).__name__} where a {kind.__name__} was expected")


# -------------------------------------------------------------------------- handshake

def cert_digest(cert_der: bytes) -> bytes:
    """SHA-256 of the edge's server certificate (DER): binds the signatures to this TLS endpoint."""
    return hashlib.sha256(cert_der).digest()


def _transcript(role: str, cert_sha256: bytes, hello: Hello, edge_nonce: bytes) -> bytes:
    return transcript.encode(LABEL, role, cert_sha256, hello.edge, hello.device, hello.run_id, hello.server_round,
                             hello.nonce, edge_nonce)


class DeviceHandshake:
    """The device's half of the handshake (no IO): :meth:`hello`, then :meth:`prove` on the challenge."""

    def __init__(self, identities: PlannedIdentities, edge: str, run_id: str, server_round: int,
                 rng: Callable[[int], bytes] = os.urandom):
        self.identities, self.edge = identities, edge
        self._hello = Hello(identities.me, edge, run_id, server_round, rng(NONCE_BYTES))

    def hello(self) -> Hello:
        return self._hello

    def prove(self, challenge: Challenge, cert_der: bytes) -> Proof:
        """Check that the challenge is signed by the plan's key of the edge this device asked for,
        over the certificate TLS showed it; then sign the transcript with the device's key."""
        if challenge.edge != self.edge:
            raise HandshakeRefused(f"asked for the edge {self.edge!r}, but {challenge.edge!r} answered")
        edge_key = self.identities.public(self.edge)
        if edge_key is None:
            raise HandshakeRefused(f"the edge {self.edge!r} is not in this device's registry of the plan")
        digest = cert_digest(cert_der)
        if not verify_signature(edge_key, _transcript("edge", digest, self._hello, challenge.nonce), challenge.signature):
            raise HandshakeRefused(f"the edge's signature does not verify under the plan's key of {self.edge!r}: "
                                   "not that edge, or another TLS endpoint than the one it signed for")
        me = self.identities.own(self.identities.me)
        return Proof(me.sign(_transcript("device", digest, self._hello, challenge.nonce)))


class EdgeHandshake:
    """The edge's half of the handshake (no IO): :meth:`challenge` on the hello, :meth:`verify` on the proof.

    ``admit(device)`` may return a reason to refuse a device (not one of this round's split
    devices); it runs on the claimed id, before the proof, so it must not reserve anything.
    """

    def __init__(self, identities: PlannedIdentities, cert_der: bytes, run_id: str, server_round: int, *,
                 admit: Callable[[str], str | None] | None = None, rng: Callable[[int], bytes] = os.urandom):
        self.identities, self.run_id, self.server_round = identities, run_id, server_round
        self._digest, self._admit, self._rng = cert_digest(cert_der), admit, rng
        self._hello: Hello | None = None
        self._nonce = b""

    def challenge(self, hello: Hello) -> Challenge:
        """Refuse a hello for another edge, run or round, or from anyone but a device of the plan."""
        me = self.identities.me
        if hello.edge != me:
            raise HandshakeRefused(f"this is {me!r}, not {hello.edge!r}")
        if hello.run_id != self.run_id:
            raise HandshakeRefused(f"stream for run {hello.run_id!r}, but this edge serves run {self.run_id!r}")
        if hello.server_round != self.server_round:
            raise HandshakeRefused(f"stream for round {hello.server_round}, but this edge serves round {self.server_round} "
                                   "(a stream is opened for one round)")
        if not hello.device.startswith(DEVICE_PREFIX) or self.identities.public(hello.device) is None:
            raise HandshakeRefused(f"{hello.device!r} is not a device in the plan's registry")
        reason = self._admit(hello.device) if self._admit else None
        if reason:
            raise HandshakeRefused(reason)
        self._hello, self._nonce = hello, self._rng(NONCE_BYTES)
        signature = self.identities.own(me).sign(_transcript("edge", self._digest, hello, self._nonce))
        return Challenge(me, self._nonce, signature)

    def verify(self, proof: Proof) -> str:
        """The device id, once its signature of this connection's transcript verifies."""
        if self._hello is None:
            raise HandshakeRefused("a proof before the hello")
        device = self._hello.device
        key = self.identities.public(device)
        if key is None or not verify_signature(key, _transcript("device", self._digest, self._hello, self._nonce),
                                               proof.signature):
            raise HandshakeRefused(f"the signature does not verify under the plan's key of {device!r} "
                                   "(another device's key, or a proof from another connection or round)")
        return device



def tensor_bytes(payload: Payload) -> int:
    """Bytes of tensor data in a payload (what the network model counts per step)."""
    arrays = payload.values() if isinstance(payload, Mapping) else [payload]
    return int(sum(a.nbytes for a in arrays))
