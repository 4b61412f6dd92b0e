"""The edge aggregator's SuperNode side: relay the parent's cell request to the edge service.

A SuperNode whose node config says ``role="edge"`` (``fedlora edge`` starts one, connected
upward to its parent's SuperLink) is no END device: ``clients/app.py`` hands its messages
here. :func:`identity` tells the parent which neighbourhood cell it aggregates;
:func:`relay` drops the parent's cell request bytes in the edge's *spool* directory and
answers with the result bytes the edge service (``server/edge.py``, a long-lived run on the
edge's own SuperLink) leaves there. A failure raises, so the parent gets an error reply and
drops that cell's clients with the reason.

Light on purpose: Flower starts a new ClientApp process for every message, and the relay
needs neither torch nor the model (importing them would cost seconds per round).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict

from fedlora import protocol

POLL_S = 0.05
HEARTBEAT_S = 2.0  # the edge service touches its heartbeat file this often
STALE_S = 30.0  # a relay gives up on an edge service whose heartbeat is older than this


class EdgeError(RuntimeError):
    """An edge could not run a cell request (service down, timeout, bad request)."""


# --- the spool: relay (ClientApp process) <-> service (ServerApp process) on one edge -----


class Spool:
    """Request/result files in one directory; every file appears atomically (write + rename)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        for sub in ("requests", "claimed", "results", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def _put(self, sub: str, name: str, data: bytes) -> None:
        tmp = self.root / "tmp" / f"{name}.{os.getpid()}"
        tmp.write_bytes(data)
        os.replace(tmp, self.root / sub / name)

    # relay side
    def submit(self, key: str, data: bytes) -> None:
        self._put("requests", f"{key}.req", data)

    def wait(self, key: str, timeout_s: float) -> bytes:
        """The result bytes for ``key``; EdgeError on an error result, timeout or dead service."""
        deadline = time.time() + timeout_s
        res, err = self.root / "results" / f"{key}.res", self.root / "results" / f"{key}.err"
        while time.time() < deadline:
            for path in (res, err):
                if path.exists():
                    data = path.read_bytes()
                    path.unlink()
                    if path is err:
                        raise EdgeError(data.decode(errors="replace"))
                    return data
            if not self.alive():
                self.cancel(key)
                raise EdgeError(f"the edge service is not running (no heartbeat in {self.root} for {STALE_S:.0f}s)")
            time.sleep(POLL_S)
        self.cancel(key)
        raise EdgeError(f"no cell result within {timeout_s:.0f}s")

    def cancel(self, key: str) -> None:
        (self.root / "requests" / f"{key}.req").unlink(missing_ok=True)

    def alive(self) -> bool:
        beat = self.root / "heartbeat"
        return beat.exists() and time.time() - beat.stat().st_mtime < STALE_S

    # service side
    def beat(self) -> None:
        self._put(".", "heartbeat", str(os.getpid()).encode())

    def claim(self) -> tuple[str, bytes] | None:
        """The oldest waiting request (key, bytes), moved out of ``requests/``; None if none."""
        waiting = sorted((self.root / "requests").glob("*.req"), key=lambda p: p.stat().st_mtime)
        for path in waiting:
            claimed = self.root / "claimed" / path.name
            try:
                os.replace(path, claimed)
            except FileNotFoundError:  # cancelled meanwhile
                continue
            data = claimed.read_bytes()
            claimed.unlink()
            return path.name[: -len(".req")], data
        return None

    def answer(self, key: str, result: bytes | None = None, error: str | None = None) -> None:
        if error is not None:
            self._put("results", f"{key}.err", error.encode())
        else:
            self._put("results", f"{key}.res", result)

    def stopping(self) -> bool:
        return (self.root / "stop").exists()


# --- edge ClientApp side (role="edge" in the SuperNode's node config) -----------------------


def is_edge(node_config) -> bool:
    return str(node_config.get(protocol.ROLE_KEY, "")) == protocol.EDGE_ROLE


def _edge_setting(node_config, key: str) -> str:
    value = str(node_config.get(key, "") or "")
    if not value:
        raise ValueError(f"this edge SuperNode has no {key!r} in its node config (--node-config '{key}=...')")
    return value


def identity(msg: Message, node_config) -> Message:
    """An edge tells its parent which cell it aggregates."""
    record = ConfigRecord({protocol.ROLE_KEY: protocol.EDGE_ROLE, protocol.CELL_KEY: _edge_setting(node_config, "cell")})
    return Message(RecordDict({protocol.IDENTITY: record}), reply_to=msg)


def relay(msg: Message, node_config) -> Message:
    """Hand the parent's cell request to this edge's service; answer with the cell's result."""
    spool = Spool(_edge_setting(node_config, "spool"))
    record = msg.content[protocol.CELL]
    data = bytes(record[protocol.CELL_REQUEST_KEY])
    timeout_s = float(record[protocol.CELL_TIMEOUT_KEY])
    key = f"{msg.metadata.run_id}-{msg.metadata.message_id[:16]}"
    spool.submit(key, data)
    result = spool.wait(key, timeout_s)
    return Message(RecordDict({protocol.CELL: ConfigRecord({protocol.CELL_RESULT_KEY: result})}), reply_to=msg)
