"""``flower-supernode`` with a shorter idle wait: the one Flower internal fedlora changes, pinned exactly.

A SuperNode of flwr 1.41.0 asks its SuperLink for a message, and when there is none sleeps
3 s before asking again (``flwr/supernode/start_client_internal.py``, a literal
``time.sleep(3)``; no flag or environment variable sets it). It then waits for the ClientApp's
reply in steps of 0.5 s. Every message to a device or edge pays half of that on average
(~1.75 s), and a secure round sends four messages per device in a row, each stage waiting for
its slowest device: the single largest cost of a deployed round once the model stays warm.

``python -m fedlora.deploy.supernode_poll --poll-s 0.2 <flower-supernode arguments>`` runs the
same ``flower-supernode`` with those two waits capped at ``--poll-s``, by giving that one
module a ``time`` whose ``sleep`` caps them (nothing else in Flower changes; one HTTP request
to the SuperLink every 0.2 s while idle). It does so only for the exact Flower version and
source it was written against (:data:`PINNED`, the module's SHA-256); for any other it logs a
warning and runs Flower unchanged. ``tests/test_supernode_poll.py`` fails when the pin or
the source moves, so an upgrade of flwr cannot silently lose (or break) it.

It also mends one Flower exit that hangs (:func:`run`): when the SuperLink refuses the node
(``401``, e.g. an edge that was restarted), the heartbeat thread and the message loop each send
the process SIGINT; Flower's handler resets SIGINT to Python's default before its graceful exit,
so the second signal raises KeyboardInterrupt inside that exit, before its force-exit timer
starts, and the process waits forever on its non-daemon threads: its launcher never sees it
exit, so never starts it again, and the device is "not connected" for the rest of the run.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import os
import signal
import sys
import threading
import time
import types
from importlib import metadata
from pathlib import Path

PINNED = ("1.41.0", "d6342f743fdf768f63305b88414ae2654e9a21bda153739da19c608e8d375067")
IDLE_WAITS = (3, 0.5)  # the literal waits of start_client_internal.py that are capped
POLL_S = 0.2
FORCE_EXIT_S = 5.0  # as Flower's own force-exit timer
log = logging.getLogger("fedlora")


class UnpinnedFlower(RuntimeError):
    """The installed Flower is not the version/source this patch was written for."""


def _module_file() -> Path:
    spec = importlib.util.find_spec("flwr.supernode.start_client_internal")
    if spec is None or spec.origin is None:
        raise UnpinnedFlower("flwr.supernode.start_client_internal is not installed")
    return Path(spec.origin)


def check_pinned() -> None:
    """Raise UnpinnedFlower unless flwr is :data:`PINNED` (version and the module's exact source)."""
    version = metadata.version("flwr")
    digest = hashlib.sha256(_module_file().read_bytes()).hexdigest()
    if (version, digest) != PINNED:
        raise UnpinnedFlower(f"flwr {version} (start_client_internal.py sha256 {digest[:12]}...) is not the pinned "
                             f"flwr {PINNED[0]} ({PINNED[1][:12]}...)")


def capped_time(poll_s: float) -> types.ModuleType:
    """A stand-in for the ``time`` module whose ``sleep`` waits at most ``poll_s`` for the :data:`IDLE_WAITS`."""
    clock = types.ModuleType("time")
    clock.__dict__.update({k: getattr(time, k) for k in dir(time) if not k.startswith("__")})

    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, poll_s) if seconds in IDLE_WAITS else seconds)

    clock.sleep = sleep
    return clock


def install(poll_s: float) -> None:
    """Cap the SuperNode's idle waits at ``poll_s`` in this process (UnpinnedFlower if it cannot)."""
    if not 0.01 <= poll_s <= 3:
        raise ValueError(f"--poll-s={poll_s}: between 0.01 and 3 seconds")
    check_pinned()
    # this very module (pinned above) is the one patched; importing it pulls in Flower
    import flwr.supernode.start_client_internal as internal

    internal.time = capped_time(poll_s)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedlora.deploy.supernode_poll", add_help=False)
    parser.add_argument("--poll-s", type=float, default=POLL_S)
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        install(args.poll_s)
    except UnpinnedFlower as exc:
        logging.basicConfig()
        log.warning("SuperNode idle wait left at Flower's 3 s: %s", exc)
    # Flower's own entry point, as the `flower-supernode` script calls it
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    run(flower_supernode)


def run(entry) -> None:
    """``sys.exit(entry())``, except that a KeyboardInterrupt which interrupted Flower's graceful exit
    (a second stop signal while it ran: see the module's doc) ends the process: Flower's exit handlers
    run once more, bounded by a force-exit timer, then ``os._exit(0)`` (Flower's code for a stop by signal)."""
    try:
        code = entry()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a third 401's signal must not interrupt this exit too
        logging.basicConfig()
        log.warning("a second stop signal interrupted Flower's graceful exit (the SuperLink refused this node "
                    "twice at once?); exiting now")
        threading.Thread(target=lambda: (time.sleep(FORCE_EXIT_S), os._exit(0)), daemon=True).start()
        try:
            from flwr.supercore.exit.exit_handler import trigger_exit_handlers  # Flower is imported by main, not here

            trigger_exit_handlers(run_before_force_exit=True)
            trigger_exit_handlers(run_before_force_exit=False)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    sys.exit(code)


if __name__ == "__main__":
    main()
