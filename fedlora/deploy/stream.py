"""The direct stream between a split device and its edge, for one round of a deployment.

Split learning exchanges activations and gradients at every local step; a Flower message per
step would start a ClientApp process per step, so in a deployment the device process and its
edge process talk over one TLS connection of their own, opened for the round and closed after
it (``docs/split_stream.md``: the design and what it protects).

- **TLS 1.3** (Python :mod:`ssl`): the edge presents its plan server certificate
  (``tls/server.pem``, the one its SuperLink uses); the device checks it against the plan's CA
  (``ca.pem``) and the edge's host name. The wire is confidential and tamper-evident.
- **Who is who**: the signed handshake of :mod:`fedlora.deploy.stream_protocol` with both ends'
  plan identity keys, bound to this round, this run and the edge certificate the device saw.
- **Failure is a dropout**: everything raised to a caller is a :class:`StreamError` whose text is
  the reason; the device drops for the round and the run goes on. Every wait has a deadline
  (:class:`StreamLimits`).

The seam for the split maths:

- device: ``with StreamLink.connect(credentials, edge_address, edge=..., run_id=..., server_round=...) as link``
  then ``link.forward(activations)`` / ``link.backward(grads)`` (or ``link.call(kind, payload)``);
- edge: ``with SplitStreamServer(credentials, listen, run_id=..., server_round=...,
  handler_for=lambda device: handler) as server`` for the round; each admitted device's session
  runs :func:`serve_split_session` with ``handler(kind, payload) -> payload``;
  ``server.close()`` returns every device's :class:`StreamOutcome` (completed or dropped, why,
  steps, bytes).

A payload is one numpy array or a dict of named arrays (e.g. hidden states with an attention mask).
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fedlora.deploy import pki
from fedlora.deploy.plan import CA_CERT, SERVER_CERT, SERVER_KEY, NodeFolder
from fedlora.deploy.stream_protocol import (
    HANDSHAKE_FRAME_BYTES,
    HEADER_BYTES,
    Admitted,
    Bye,
    Challenge,
    DeviceHandshake,
    EdgeHandshake,
    Failed,
    FrameError,
    Handler,
    HandshakeRefused,
    Hello,
    Payload,
    PeerFailed,
    PeerGone,
    Proof,
    Refused,
    Reply,
    Step,
    StreamError,
    StreamLimits,
    check_payload,
    decode_frame,
    expect,
    frame_length,
    frame_parts,
    parse_address,
    stream_port,
    tensor_bytes,
)
from fedlora.secure.identities import PlannedIdentities

# What callers of the stream need, from one place.
__all__ = ["FrameError", "HandshakeRefused", "PeerFailed", "PeerGone", "StreamError", "StreamLimits",
           "StreamCredentials", "StreamLink", "SplitStreamServer", "serve_split_session", "EdgeSession",
           "StreamOutcome", "RoundStreams", "echo_handler", "stream_port", "tensor_bytes", "Payload", "Handler"]

# ------------------------------------------------------------------------ credentials

@dataclass(frozen=True)
class StreamCredentials:
    """What one end needs: its plan identity (own key + registry) and its TLS context.

    The edge also keeps its certificate (DER), which the signatures bind."""

    identities: PlannedIdentities
    tls: ssl.SSLContext
    cert_der: bytes = b""

    @classmethod
    def for_edge(cls, identities: PlannedIdentities, cert: Path, key: Path) -> StreamCredentials:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(str(cert), str(key))
        der = pki.load_cert(cert).public_bytes(pki.serialization.Encoding.DER)
        return cls(identities, context, der)

    @classmethod
    def for_device(cls, identities: PlannedIdentities, ca_cert: Path) -> StreamCredentials:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_verify_locations(cafile=str(ca_cert))
        return cls(identities, context)

    @classmethod
    def from_node(cls, node: NodeFolder) -> StreamCredentials:
        """An edge's or END device's credentials from its plan folder."""
        if node.role == "edge":
            return cls.for_edge(node.identities(), node.path(SERVER_CERT), node.path(SERVER_KEY))
        if node.role == "end":
            return cls.for_device(node.identities(), node.path(CA_CERT))
        raise ValueError(f"{node.name} is a {node.role}; split streams run between an edge and its END devices")


# -------------------------------------------------------------------------- channel

class _Channel:
    """One TLS socket carrying frames; every wait has a deadline; counts frame bytes."""

    def __init__(self, sock: ssl.SSLSocket, peer: str):
        self.sock, self.peer, self.address = sock, peer, ""
        self.bytes_sent = self.bytes_received = 0
        self.abort_reason = ""
        self.closed = False

    def send(self, message: object, limit: int, timeout: float) -> None:
        header, body = frame_parts(message, limit)
        try:
            self.sock.settimeout(timeout)
            if len(body) < 65536:
                self.sock.sendall(header + body)  # one TLS record for a small frame
            else:
                self.sock.sendall(header)
                self.sock.sendall(body)
        except (socket.timeout, TimeoutError):
            raise PeerGone(self.abort_reason or f"{self.peer} took no data for {timeout:g}s (timed out)") from None
        except (OSError, ValueError) as exc:  # ValueError: a socket closed under us
            raise PeerGone(self.abort_reason or f"{self.peer} disconnected ({exc})") from None
        self.bytes_sent += len(header) + len(body)

    def recv(self, limit: int, timeout: float) -> object:
        deadline = time.monotonic() + timeout
        length = frame_length(bytes(self._read(HEADER_BYTES, deadline, timeout, first=True)), limit)
        message = decode_frame(bytes(self._read(length, deadline, timeout, first=False)))
        self.bytes_received += HEADER_BYTES + length
        return message

    def _read(self, n: int, deadline: float, timeout: float, *, first: bool) -> bytearray:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                self.sock.settimeout(left)
                k = self.sock.recv_into(view[got:])
            except (socket.timeout, TimeoutError):
                raise PeerGone(self.abort_reason or f"{self.peer} sent nothing for {timeout:g}s (timed out)") from None
            except (OSError, ValueError) as exc:
                raise PeerGone(self.abort_reason or f"{self.peer} disconnected ({exc})") from None
            if k == 0:
                where = "" if first and got == 0 else " in the middle of a frame"
                raise PeerGone(self.abort_reason or f"{self.peer} disconnected{where}")
            got += k
        return buf

    def abort(self, reason: str) -> None:
        """End the connection now, from any thread (wakes a blocked read)."""
        self.abort_reason = self.abort_reason or reason
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)  # the raw socket: leaves the TLS object to its thread
        except OSError:
            pass

    def close(self, linger_s: float = 0.5) -> None:
        """Close so that what was sent last arrives: send FIN, read (and drop) what the peer still
        sends until it closes too (at most ``linger_s``), then close. Closing with unread data
        would reset the connection, and the peer could lose the Failed or Refused frame that says why."""
        if self.closed:
            return
        self.closed = True
        deadline = time.monotonic() + linger_s
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_WR)
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                if not self.sock.recv(65536):
                    break
        except (OSError, ValueError):  # already reset, closed or timed out: nothing more to wait for
            pass
        finally:
            self.sock.close()


def _try_send(channel: _Channel, message: object) -> None:
    """Best effort: tell the peer why before closing (it may be gone already)."""
    try:
        channel.send(message, HANDSHAKE_FRAME_BYTES, 1.0)
    except StreamError:
        pass


def _short(reason: str) -> str:
    return reason if len(reason) <= 1000 else reason[:997] + "..."


# --------------------------------------------------------------------------- device

def _dial(host: str, port: int, timeout: float, edge: str) -> socket.socket:
    """A TCP connection to the edge, retried while it is refused until ``timeout``: the edge opens
    its round's stream when the round starts, and a device may be a moment ahead of it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection((host, port), timeout=max(deadline - time.monotonic(), 0.01))
        except ConnectionRefusedError as exc:
            if time.monotonic() + 0.1 >= deadline:
                raise PeerGone(f"cannot reach the edge {edge} at {host}:{port} within {timeout:g}s: {exc}") from None
            time.sleep(0.1)
        except OSError as exc:
            raise PeerGone(f"cannot reach the edge {edge} at {host}:{port}: {exc}") from None


class StreamLink:
    """The device's end of one round's stream to its edge: split steps as calls.

    Make it with :meth:`connect`; use it as a context manager (or :meth:`close` it) so the edge
    sees the round end cleanly. Any :class:`StreamError` closes it: the device is a dropout for
    the round."""

    def __init__(self, channel: _Channel, *, device: str, edge: str, limits: StreamLimits):
        self._channel, self.device, self.edge, self.limits = channel, device, edge, limits
        self.steps = 0
        self.closed = False

    @classmethod
    def connect(cls, credentials: StreamCredentials, address: str | tuple[str, int], *, edge: str, run_id: str,
                server_round: int, limits: StreamLimits | None = None) -> StreamLink:
        """Open the stream of ``server_round`` to the edge ``edge`` (its protocol id, ``aggregator/<cell>``)
        at ``address``: TLS against the plan's CA and the host name, then the signed handshake."""
        limits = limits or StreamLimits()
        host, port = parse_address(address)
        raw = _dial(host, port, limits.connect_timeout_s, edge)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = credentials.tls.wrap_socket(raw, server_hostname=host)
        except ssl.SSLCertVerificationError as exc:
            raw.close()
            raise HandshakeRefused(f"TLS: the edge at {host}:{port} has no certificate of the plan's CA for {host} "
                                   f"({exc.verify_message})") from None
        except (ssl.SSLError, OSError) as exc:
            raw.close()
            raise PeerGone(f"TLS with the edge at {host}:{port} failed: {exc}") from None
        channel = _Channel(sock, f"the edge {edge}")
        try:
            handshake = DeviceHandshake(credentials.identities, edge, run_id, server_round)
            channel.send(handshake.hello(), HANDSHAKE_FRAME_BYTES, limits.handshake_timeout_s)
            challenge = expect(channel.recv(HANDSHAKE_FRAME_BYTES, limits.handshake_timeout_s), Challenge, channel.peer)
            try:
                proof = handshake.prove(challenge, sock.getpeercert(binary_form=True))
            except HandshakeRefused as exc:
                _try_send(channel, Failed(str(exc)))
                raise
            channel.send(proof, HANDSHAKE_FRAME_BYTES, limits.handshake_timeout_s)
            expect(channel.recv(HANDSHAKE_FRAME_BYTES, limits.handshake_timeout_s), Admitted, channel.peer)
        except BaseException:
            channel.close()
            raise
        return cls(channel, device=credentials.identities.me, edge=edge, limits=limits)

    def call(self, kind: str, payload: Payload) -> Payload:
        """Send step ``kind`` with ``payload`` and return the edge's answer."""
        if self.closed:
            raise StreamError(f"the stream to {self.edge} is closed")
        try:
            self._channel.send(Step(self.steps, kind, payload), self.limits.max_frame_bytes, self.limits.step_timeout_s)
            reply = expect(self._channel.recv(self.limits.max_frame_bytes, self.limits.step_timeout_s), Reply,
                           self._channel.peer)
            if reply.seq != self.steps:
                raise FrameError(f"{self._channel.peer} answered step {reply.seq}, expected {self.steps}")
        except StreamError as exc:
            if isinstance(exc, FrameError):
                _try_send(self._channel, Failed(f"{self.device}: {_short(str(exc))}"))
            self._end()
            raise
        except ValueError as exc:  # a payload that is not tensors: the caller's bug, said before anything is sent
            raise ValueError(f"step {kind!r}: {exc}") from None
        self.steps += 1
        return reply.payload

    def forward(self, activations: Payload) -> Payload:
        """The edge's middle blocks applied to the device's activations."""
        return self.call("forward", activations)

    def backward(self, grads: Payload) -> Payload:
        """The gradient at the device's cut, from the gradient at the edge's output."""
        return self.call("backward", grads)

    @property
    def bytes_sent(self) -> int:
        return self._channel.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self._channel.bytes_received

    def close(self) -> None:
        """End the round's stream: tell the edge (best effort), then close."""
        if not self.closed:
            _try_send(self._channel, Bye(self.steps))
            self._end()

    def _end(self) -> None:
        self.closed = True
        self._channel.close()

    def __enter__(self) -> StreamLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- edge

@dataclass
class StreamOutcome:
    """How one device's stream ended on the edge."""

    device: str
    completed: bool  # the device said goodbye; otherwise it is a dropout for the round
    steps: int
    bytes_received: int
    bytes_sent: int
    reason: str = ""  # why it did not complete


@dataclass
class EdgeSession:
    """One admitted device's stream on the edge."""

    device: str
    channel: _Channel
    limits: StreamLimits


def serve_split_session(session: EdgeSession, handler: Handler) -> StreamOutcome:
    """Answer the device's steps with ``handler(kind, payload) -> payload`` until it says goodbye.

    Never raises for the device's faults or the handler's: a disconnect, a timeout, a bad frame
    or a handler exception ends the session with ``completed=False`` and the reason (the device
    then drops for the round). Closes the connection."""
    channel, limits, steps = session.channel, session.limits, 0

    def outcome(completed: bool, reason: str = "") -> StreamOutcome:
        return StreamOutcome(session.device, completed, steps, channel.bytes_received, channel.bytes_sent, reason)

    try:
        while True:
            message = channel.recv(limits.max_frame_bytes, limits.step_timeout_s)
            if isinstance(message, Bye):
                if message.steps != steps:
                    raise FrameError(f"{channel.peer} said goodbye after {message.steps} steps, but {steps} were answered")
                return outcome(True)
            step = expect(message, Step, channel.peer)
            if step.seq != steps:
                raise FrameError(f"{channel.peer} sent step {step.seq}, expected {steps}")
            try:
                answer = handler(step.kind, step.payload)
                check_payload(answer, "split handler's answer")
            except Exception as exc:  # the edge's maths must not take the edge down: this device drops
                reason = f"the edge's split handler failed at step {steps} ({step.kind}): {type(exc).__name__}: {exc}"
                _try_send(channel, Failed(_short(reason)))
                return outcome(False, reason)
            channel.send(Reply(steps, answer), limits.max_frame_bytes, limits.step_timeout_s)
            steps += 1
    except StreamError as exc:
        if isinstance(exc, FrameError):
            _try_send(channel, Failed(_short(str(exc))))
        return outcome(False, str(exc))
    finally:
        channel.close()


@dataclass
class RoundStreams:
    """What the edge's streams of one round came to: each admitted device's outcome, and every
    connection refused before admission (``peer: reason``)."""

    outcomes: dict[str, StreamOutcome] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)

    def dropped(self) -> dict[str, str]:
        """Device -> reason, for every admitted device whose stream did not complete."""
        return {d: o.reason for d, o in sorted(self.outcomes.items()) if not o.completed}


class SplitStreamServer:
    """The edge's listening end of one round's split streams.

    TLS with the edge's plan certificate; each connection is admitted by the signed handshake for
    ``run_id`` and ``server_round`` (only ``devices`` when given; one stream per device per round),
    then served in its own thread by :func:`serve_split_session` with ``handler_for(device)``.
    Open it for the round (:meth:`start`, or ``with``), :meth:`close` it after: that refuses new
    connections, ends every session still running (its device drops) and joins every thread.
    Handler calls of all sessions run one at a time unless ``one_handler_at_a_time=False``.
    """

    def __init__(self, credentials: StreamCredentials, listen: str | tuple[str, int], *, run_id: str, server_round: int,
                 handler_for: Callable[[str], Handler], devices: Iterable[str] | None = None,
                 limits: StreamLimits | None = None, max_connections: int = 64, one_handler_at_a_time: bool = True):
        if not credentials.cert_der:
            raise ValueError("the edge's stream credentials need its server certificate (StreamCredentials.for_edge)")
        self.credentials, self.run_id, self.server_round = credentials, run_id, server_round
        self.limits = limits or StreamLimits()
        self._listen = parse_address(listen)
        self._handler_for = handler_for
        self._devices = frozenset(devices) if devices is not None else None
        self._max_connections = max_connections
        # Handlers of different devices usually share the edge's one model: by default their calls
        # take turns (each device's own state -- LoRA tensors, optimiser, pending graph -- is the
        # handler's to keep apart).
        self._handler_turn = threading.Lock() if one_handler_at_a_time else None
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._claimed: set[str] = set()
        self._channels: set[_Channel] = set()
        self._threads: list[threading.Thread] = []
        self._result = RoundStreams()
        self._listener: socket.socket | None = None
        self.address: tuple[str, int] | None = None

    def start(self) -> SplitStreamServer:
        """Bind and listen; ``address`` is then the (host, port) bound (port 0 picks a free one)."""
        listener = socket.create_server(self._listen, reuse_port=False)
        listener.settimeout(0.1)  # the accept loop checks for close() this often
        self._listener, self.address = listener, listener.getsockname()[:2]
        self._spawn(self._accept_loop, "split-stream-accept")
        return self

    def __enter__(self) -> SplitStreamServer:
        return self.start() if self._listener is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def outcomes(self) -> dict[str, StreamOutcome]:
        """The sessions that have ended so far."""
        with self._lock:
            return dict(self._result.outcomes)

    def wait(self, devices: Iterable[str], timeout: float) -> bool:
        """Wait until every one of ``devices`` has a finished session; False at the timeout."""
        wanted, deadline = set(devices), time.monotonic() + timeout
        while not wanted <= set(self.outcomes()):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self) -> RoundStreams:
        """End the round's streams: every session still open ends as a dropout ("the edge closed the
        round"); returns what the round's streams came to."""
        self._closing.set()  # the accept loop sees it within 0.1 s and closes the listener itself
        with self._lock:
            channels = list(self._channels)
        for channel in channels:
            channel.abort(f"the edge closed round {self.server_round}'s streams")
        for thread in list(self._threads):
            if thread is not threading.current_thread():
                thread.join(self.limits.close_timeout_s)
        with self._lock:
            alive = [t.name for t in self._threads if t.is_alive()]
            return RoundStreams(dict(self._result.outcomes), list(self._result.refused) +
                                [f"{name}: still running after close" for name in alive])

    # -- threads ------------------------------------------------------------------------

    def _spawn(self, target: Callable, name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _accept_loop(self) -> None:
        try:
            self._accept_until_closed()
        finally:
            self._listener.close()  # here, not in close(): never under a thread blocked on it

    def _accept_until_closed(self) -> None:
        while not self._closing.is_set():
            try:
                conn, addr = self._listener.accept()
            except (socket.timeout, TimeoutError):
                continue
            except OSError as exc:
                self._refuse("listener", f"accept failed, no more connections this round ({exc})")
                return
            peer = f"{addr[0]}:{addr[1]}"
            with self._lock:
                busy = sum(t.is_alive() for t in self._threads) > self._max_connections
            if busy or self._closing.is_set():
                conn.close()
                self._refuse(peer, "too many connections" if busy else "closing")
                continue
            self._spawn(self._serve_connection, f"split-stream {peer}", conn, peer)

    def _refuse(self, peer: str, reason: str) -> None:
        with self._lock:
            self._result.refused.append(f"{peer}: {reason}")

    def _serve_connection(self, conn: socket.socket, peer: str) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(self.limits.handshake_timeout_s)
            sock = self.credentials.tls.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            conn.close()
            self._refuse(peer, f"TLS handshake failed ({exc})")
            return
        channel = _Channel(sock, f"the device at {peer}")
        channel.address = peer
        with self._lock:
            self._channels.add(channel)
        try:
            self._serve_channel(channel, peer)
        finally:  # whatever happened, this connection is over
            channel.close()
            with self._lock:
                self._channels.discard(channel)

    def _serve_channel(self, channel: _Channel, peer: str) -> None:
        try:
            device = self._admit(channel)
        except StreamError as exc:
            self._refuse(peer, str(exc))
            return
        channel.peer = f"the device {device}"
        try:
            handler = self._handler_for(device)
        except Exception as exc:  # the edge cannot serve this device: it drops, the others go on
            handler = _failing_handler(f"no split handler for {device}: {type(exc).__name__}: {exc}")
        if self._handler_turn is not None:
            handler = _taking_turns(handler, self._handler_turn)
        outcome = serve_split_session(EdgeSession(device, channel, self.limits), handler)
        with self._lock:
            self._result.outcomes[device] = outcome

    def _admit(self, channel: _Channel) -> str:
        """Run the edge's half of the handshake on ``channel``: the admitted device's id."""
        limits = self.limits
        handshake = EdgeHandshake(self.credentials.identities, self.credentials.cert_der, self.run_id,
                                  self.server_round, admit=self._admissible)
        try:
            hello = expect(channel.recv(HANDSHAKE_FRAME_BYTES, limits.handshake_timeout_s), Hello, channel.peer)
            channel.peer = f"the device at {channel.address} (claims {hello.device})"
            channel.send(handshake.challenge(hello), HANDSHAKE_FRAME_BYTES, limits.handshake_timeout_s)
            proof = expect(channel.recv(HANDSHAKE_FRAME_BYTES, limits.handshake_timeout_s), Proof, channel.peer)
            device = handshake.verify(proof)
            with self._lock:
                # Claimed only now, after its proof: a stranger cannot take a device's place in the round.
                reason = self._admissible(device) or ("closing" if self._closing.is_set() else None)
                if not reason:
                    self._claimed.add(device)
            if reason:
                raise HandshakeRefused(reason)
            channel.send(Admitted(), HANDSHAKE_FRAME_BYTES, limits.handshake_timeout_s)
        except (HandshakeRefused, FrameError) as exc:
            _try_send(channel, Refused(_short(str(exc))))
            raise
        return device

    def _admissible(self, device: str) -> str | None:
        if self._devices is not None and device not in self._devices:
            return f"{device} is not a split device of this edge in round {self.server_round}"
        if device in self._claimed:
            return f"{device} already has a stream in round {self.server_round} (one per device per round)"
        return None


def _taking_turns(handler: Handler, turn: threading.Lock) -> Handler:
    def in_turn(kind: str, payload: Payload) -> Payload:
        with turn:
            return handler(kind, payload)
    return in_turn


def _failing_handler(reason: str) -> Handler:
    def handler(kind: str, payload: Payload) -> Payload:
        raise RuntimeError(reason)
    return handler


def echo_handler(kind: str, payload: Payload) -> Payload:
    """A handler that answers every step with its own payload (tests and the benchmark)."""
    return payload


