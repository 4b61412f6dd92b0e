"""The edge's local channel: cell requests and results as files in one *spool* directory.

An edge machine runs two Flower processes that meet here: the relay (the edge SuperNode's
ClientApp, ``clients/edge.py``) drops each cell request from the parent (or a request for
the devices connected to the edge, :data:`REPORT_JOB`) and waits for its result; the edge
service (a long-lived ServerApp run, ``server/edge.py``) claims each request, runs the cell
and leaves the result or an error. The service touches a heartbeat
file while it runs, so a relay does not wait for a service that is gone, and the deployment
(``fedlora.deploy.processes``) knows when to start it again. A ``stop`` file ends the service.

Pure file I/O (no Flower, no torch): every process on the edge may import it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

POLL_S = 0.05
HEARTBEAT_S = 2.0  # the edge service touches its heartbeat file this often
STALE_S = 30.0  # a relay gives up on an edge service whose heartbeat is older than this
# A request whose key starts so asks for the END devices connected to the edge, not a cell
# round; its result is JSON {client: attachment count} (fedlora.world.attachments).
REPORT_JOB = "report-"


class EdgeError(RuntimeError):
    """An edge could not run a cell request (service down, timeout, bad request)."""


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
                failure = self.failure()
                raise EdgeError(f"the edge service is not running (no heartbeat in {self.root} for {STALE_S:.0f}s)"
                                + (f"; it stopped on: {failure}" if failure else ""))
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

    def fail(self, reason: str) -> None:
        """The service stopped on an error: kept for the relays' errors and the deployment's log."""
        self._put(".", "failed", reason.encode())

    def failure(self) -> str | None:
        """Why the last service run stopped on an error (None: it did not, or a new run started)."""
        try:
            return (self.root / "failed").read_text(errors="replace")
        except FileNotFoundError:
            return None

    def started(self) -> None:
        """A new service run: the last one's failure no longer says anything."""
        (self.root / "failed").unlink(missing_ok=True)

    def stopping(self) -> bool:
        return (self.root / "stop").exists()
