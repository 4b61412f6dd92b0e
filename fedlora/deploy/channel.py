"""The device's local channel: a Unix socket between Flower's per-message ClientApp and the resident process.

A planned END device (``fedlora client --config FOLDER``) runs one resident process
(:mod:`fedlora.deploy.resident`) that keeps the model loaded. Each Flower message's ClientApp
(``clients/app.py``, torch-free) connects to ``<folder>/state/device.sock``, sends one request
frame and reads one reply frame. Only the device's own user may talk on it:

- the socket is created with mode 0600 in a 0700 folder owned by that user; a client checks
  this (:func:`check_private`) before it connects and refuses a socket anyone else could open
  or could have put there;
- the server reads the peer's uid from the kernel (``SO_PEERCRED``) and drops a connection
  from any other user.

Frames are an 8-byte big-endian length and a :mod:`fedlora.wire` message (never pickle);
:func:`decode_request` / :func:`decode_reply` check every field's type, so a malformed frame is
an error, not a crash. A request that fails on the device comes back as ``{"ok": False,
"error": ...}`` and :func:`call` raises :class:`ChannelError` with it, as it does for a
missing, dead or silent resident process: the ClientApp's error reply makes the device a
dropout of that round, within the round's timeout.

Pure standard library + :mod:`fedlora.wire` (no Flower, no torch): the ClientApp imports it.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fedlora import wire

SOCKET = "state/device.sock"  # in the device's folder
MAX_FRAME = 1 << 30  # an adapter of a small LLM is a few MB; a larger frame is refused, not read
REQUEST, REPLY = "device-request", "device-reply"
log = logging.getLogger("fedlora")


class ChannelError(RuntimeError):
    """The resident device process could not answer (absent, unsafe socket, died, timed out, refused)."""


class UnsafeChannel(ChannelError):
    """The socket (or its folder) is not this user's own, or others could open or replace it."""


def socket_path(node_dir: str | Path) -> Path:
    path = Path(node_dir) / SOCKET
    if len(str(path).encode()) > 100:  # sun_path holds 108 bytes on Linux
        raise ChannelError(f"the device socket path {path} is too long for a Unix socket; move the device's folder "
                           "to a shorter path")
    return path


def check_private(path: Path) -> None:
    """Refuse (ChannelError) a socket that is not this user's own, or that another user could open."""
    uid = os.getuid()
    try:
        st, parent = os.lstat(path), os.lstat(path.parent)
    except FileNotFoundError:
        raise ChannelError(f"no resident device process: {path} does not exist (is `fedlora client --config` running?)") \
            from None
    if not stat.S_ISSOCK(st.st_mode):
        raise UnsafeChannel(f"{path} is not a socket; refusing to use it")
    for what, s in (("socket", st), ("folder", parent)):
        if s.st_uid != uid:
            raise UnsafeChannel(f"the device {what} {path if what == 'socket' else path.parent} belongs to uid {s.st_uid}, "
                               f"not to this user ({uid}); refusing it")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise UnsafeChannel(f"the device socket {path} has mode {stat.S_IMODE(st.st_mode):o}: others could open it; "
                           "it must be 600 (restart `fedlora client --config`)")
    if stat.S_IMODE(parent.st_mode) & 0o022:
        raise UnsafeChannel(f"the folder {path.parent} is writable by others (mode {stat.S_IMODE(parent.st_mode):o}): "
                           "anyone could replace the device socket; chmod 700 it")


def listen(path: Path) -> socket.socket:
    """A listening socket at ``path``, mode 0600 in a 0700 folder (a stale socket there is replaced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    if path.is_socket():
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket is created 0600: no moment where others could connect
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(4)
    check_private(path)
    return sock


def peer(conn: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a Unix socket connection (Linux SO_PEERCRED)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", creds)
    return pid, uid


def process_age_s(pid: int) -> float | None:
    """Seconds since process ``pid`` started (Linux /proc; None if unknown): how long a ClientApp
    process took from its start to its request (interpreter, imports, app package, message pull)."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return time.time() - (boot + ticks / os.sysconf("SC_CLK_TCK"))


def send_frame(sock: socket.socket, data: bytes) -> None:
    sock.sendall(struct.pack(">Q", len(data)) + data)


def recv_frame(sock: socket.socket) -> bytes:
    """One frame; ChannelError when the peer closes early or announces more than MAX_FRAME."""
    (size,) = struct.unpack(">Q", _recv_exact(sock, 8))
    if size > MAX_FRAME:
        raise ChannelError(f"a frame of {size} bytes is over the limit of {MAX_FRAME}")
    return _recv_exact(sock, size)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ChannelError("the resident device process closed the connection (it died or was stopped)")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


# --- the messages ---------------------------------------------------------------------------

# split: the edge's split order (JSON, fedlora/deploy/split_session.py) when the device trains split, else ""
_REQUEST_FIELDS = {"kind": str, "settings": str, "run": int, "stage": str, "round": int, "payload": bytes, "split": str}


def encode_request(kind: str, settings: str, arrays: dict[str, np.ndarray] | None, *, run: int = 0, stage: str = "",
                   round: int = 0, payload: bytes = b"", split: str = "") -> bytes:
    return wire.dumps({"kind": kind, "settings": settings, "arrays": arrays, "run": int(run), "stage": stage,
                       "round": int(round), "payload": bytes(payload), "split": str(split)}, REQUEST)


def decode_request(data: bytes) -> dict[str, Any]:
    """A request dict with every field of the expected type; wire.WireError (a ValueError) otherwise."""
    doc = wire.loads(data, REQUEST)
    if not isinstance(doc, dict) or set(doc) != {*_REQUEST_FIELDS, "arrays"}:
        raise wire.WireError(f"a {REQUEST} has the fields {sorted({*_REQUEST_FIELDS, 'arrays'})}")
    for key, kind in _REQUEST_FIELDS.items():
        if not isinstance(doc[key], kind):
            raise wire.WireError(f"{REQUEST} field {key!r} must be a {kind.__name__}")
    _check_arrays(doc["arrays"], REQUEST)
    return doc


def encode_reply(answer: dict[str, Any] | None = None, *, error: str | None = None) -> bytes:
    if error is not None:
        return wire.dumps({"ok": False, "error": error}, REPLY)
    return wire.dumps({"ok": True, "arrays": answer.get("arrays"), "reply": answer.get("reply"),
                       "metrics": answer["metrics"], "stats": answer["stats"]}, REPLY)


def decode_reply(data: bytes) -> dict[str, Any]:
    """A successful reply dict; ChannelError carrying the device's reason for an error reply."""
    doc = wire.loads(data, REPLY)
    if not isinstance(doc, dict) or not isinstance(doc.get("ok"), bool):
        raise wire.WireError(f"a {REPLY} needs a bool 'ok'")
    if not doc["ok"]:
        raise ChannelError(f"the device refused the request: {doc.get('error')}")
    if set(doc) != {"ok", "arrays", "reply", "metrics", "stats"}:
        raise wire.WireError(f"a {REPLY} has the fields arrays, metrics, ok, reply, stats")
    _check_arrays(doc["arrays"], REPLY)
    if doc["reply"] is not None and not isinstance(doc["reply"], bytes):
        raise wire.WireError(f"{REPLY} field 'reply' must be bytes")
    for key in ("metrics", "stats"):
        if not isinstance(doc[key], dict) or not all(isinstance(k, str) and isinstance(v, (int, float))
                                                     for k, v in doc[key].items()):
            raise wire.WireError(f"{REPLY} field {key!r} must map names to numbers")
    return doc


def _check_arrays(arrays: Any, what: str) -> None:
    if arrays is not None and not (isinstance(arrays, dict) and all(isinstance(k, str) and isinstance(v, np.ndarray)
                                                                    for k, v in arrays.items())):
        raise wire.WireError(f"{what} field 'arrays' must map names to arrays")


# --- both ends --------------------------------------------------------------------------------


def call(path: Path, request: bytes, *, timeout_s: float, connect_wait_s: float = 30.0) -> dict[str, Any]:
    """Send one request to the resident process at ``path``, return its decoded reply.

    Waits up to ``connect_wait_s`` for a process being (re)started to listen; the whole call
    never takes longer than ``timeout_s``. ChannelError for everything that is not an answer."""
    deadline = time.monotonic() + timeout_s
    connect_by = time.monotonic() + min(connect_wait_s, timeout_s)
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            check_private(path)
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            sock.connect(str(path))
            break
        except UnsafeChannel:
            sock.close()
            raise
        except (ChannelError, OSError) as exc:  # not there (yet): a resident process being restarted
            sock.close()
            if time.monotonic() >= connect_by:
                raise ChannelError(f"cannot reach the resident device process at {path}: {exc}") from None
            time.sleep(0.2)
    with sock:
        try:
            send_frame(sock, request)
            return decode_reply(recv_frame(sock))
        except TimeoutError:
            raise ChannelError(f"no answer from the resident device process within {timeout_s:.0f}s") from None
        except OSError as exc:
            raise ChannelError(f"the resident device process failed: {exc}") from None


def own_connections(listener: socket.socket, *, stopping: Callable[[], bool] = lambda: False,
                    idle_s: float = 1.0, label: str = "device channel") -> Iterator[tuple[socket.socket, int]]:
    """Accepted connections ``(conn, peer pid)`` from this process's own user, one at a time, until
    ``stopping()`` (checked every ``idle_s``); a connection from another user is closed unread.
    The caller uses the connection inside the loop body; it is closed when the body ends."""
    listener.settimeout(idle_s)
    me = os.getuid()
    while not stopping():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        with conn:
            pid, uid = peer(conn)
            if uid != me:
                log.warning("%s: dropped a connection from uid %d (only uid %d may use it)", label, uid, me)
                continue
            yield conn, pid


def serve(listener: socket.socket, handle: Callable[[dict[str, Any]], dict[str, Any]], *,
          stopping: Callable[[], bool] = lambda: False, received: Callable[[dict[str, Any]], None] | None = None,
          served: Callable[[dict[str, Any]], None] | None = None, idle_s: float = 1.0) -> None:
    """Answer requests one at a time until ``stopping()``: a request from another user is dropped
    unread, a malformed one or one ``handle`` raises on gets an error reply (the process goes on).
    ``received`` gets each request's kind, stage and round as it starts; ``served`` each answered
    request's timings: also ``clientapp_s`` (the ClientApp process's age when it asked) and
    ``handle_s`` (the work here)."""
    for conn, pid in own_connections(listener, stopping=stopping, idle_s=idle_s):
        conn.settimeout(None)  # training takes as long as it takes; the caller has the round's timeout
        try:
            data = recv_frame(conn)
        except ChannelError as exc:
            log.warning("device channel: %s", exc)
            continue
        t0, age, request = time.time(), process_age_s(pid), None
        try:
            request = decode_request(data)
            if received is not None:
                received({"kind": request["kind"], "stage": request["stage"], "round": request["round"], "received": t0})
            reply = encode_reply(handle(request))
        except Exception as exc:  # the device's reason goes back to the ClientApp: an error reply, a dropout
            log.warning("device request failed: %s: %s", type(exc).__name__, exc)
            reply = encode_reply(error=f"{type(exc).__name__}: {exc}")
        try:
            send_frame(conn, reply)
        except OSError as exc:  # the ClientApp gave up (its timeout); the next request is served anyway
            log.warning("device channel: could not send the reply: %s", exc)
        if served is not None and request is not None:
            served({"kind": request["kind"], "stage": request["stage"], "round": request["round"], "received": t0,
                    "clientapp_s": age, "handle_s": time.time() - t0})
