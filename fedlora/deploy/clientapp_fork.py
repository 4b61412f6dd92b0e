"""Flower's per-message ``flwr-clientapp`` process, forked from a warm parent instead of started cold.

A SuperNode's SuperExec starts ``flwr-clientapp --token ...`` (by name, from ``PATH``) for every
message: a new interpreter that imports Flower, numpy and the app's libraries before it even asks
for its message -- seconds per message on a small CPU, four times per device per secure round.
With ``FEDLORA_CLIENTAPP_FORK`` on, a SuperNode started by :mod:`fedlora.deploy.processes` gets
``PATH`` with a folder first whose ``flwr-clientapp`` is :data:`SHIM`: a stdlib-only script
(``python -S``) that hands its arguments over a 0600 Unix socket to this module's fork server
and exits. The fork server has imported Flower and the app's third-party libraries once; for each
request it forks a child that runs Flower's own ``flwr_clientapp()`` entry point with those
arguments -- still one fresh process per message, as Flower means it (its own token, its own
FAB install and app import; fedlora's modules come from the app package, not from the parent),
only without the interpreter start and library imports. When the fork server is not there, the
shim runs the real ``flwr-clientapp`` (Flower's behaviour).

This relies on Flower internals (the SuperExec's command name, the entry point's module): pinned
with :mod:`fedlora.deploy.supernode_poll`'s exact flwr version, and ``tests/test_clientapp_fork.py``
fails when they move. Off unless ``FEDLORA_CLIENTAPP_FORK=1``: with it on, CI's loopback deployment saw a
device's SuperNode refused (401) by its restarted edge hang instead of exiting, so it never rejoined
(with Flower's own ClientApp starts it exits and its launcher starts it again); on by default once that is fixed.
If the fork server dies, the tier starts it again (:mod:`fedlora.deploy.processes`); meanwhile the shim
runs the real command, so a message is never lost to it.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import socket
import sys
import traceback
from pathlib import Path

from fedlora.deploy import channel

SWITCH = "FEDLORA_CLIENTAPP_FORK"  # "1": SuperNodes started by fedlora.deploy.processes use the fork server
ENV = "FEDLORA_CLIENTAPP_FORK_SOCKET"  # the fork server's socket, as the shim reads it
COMMAND = "flwr-clientapp"  # what the SuperExec starts for every ClientApp task (flwr 1.41)
ENTRY = ("flwr.supernode.cli", "flwr_clientapp")  # the real command's entry point
# Imported once in the parent; the app's own modules are not (they come from each message's app package).
PRELOAD = ("flwr.supernode.cli", "flwr.supernode.runtime.run_clientapp", "flwr.app", "flwr.clientapp", "numpy",
           "omegaconf", "rich.progress")
SHIM = """#!{python} -S
# fedlora: hand this ClientApp start to the warm fork server (fedlora.deploy.clientapp_fork), else run Flower's own.
import json, os, socket, sys
ok = False
try:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(os.environ[{env!r}])
        s.sendall(json.dumps(sys.argv[1:]).encode())
        s.shutdown(socket.SHUT_WR)
        ok = s.recv(2) == b"ok"
except (OSError, KeyError):
    pass
if not ok:
    os.execv({real!r}, [{real!r}, *sys.argv[1:]])
"""
log = logging.getLogger("fedlora")


def enabled(environ=os.environ) -> bool:
    """Whether SuperNodes fork their ClientApps from the warm server (``FEDLORA_CLIENTAPP_FORK=1``; off by default)."""
    value = environ.get(SWITCH, "0").strip().lower()
    if value not in ("0", "1", "off", "on", "false", "true", ""):
        raise ValueError(f"{SWITCH}={value!r}: use 1 (fork ClientApps from a warm server) "
                         "or 0 (Flower's cold start, the default)")
    return value in ("1", "on", "true")  # unset or empty: the default, off


def write_shim(folder: Path, python: str, real: str) -> Path:
    """``folder/flwr-clientapp`` (executable): put ``folder`` first on the SuperNode's PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / COMMAND
    path.write_text(SHIM.format(python=python, env=ENV, real=real))
    path.chmod(0o700)
    return path


def read_argv(conn: socket.socket) -> list[str]:
    """The shim's arguments (a JSON list of strings, at most 64 KiB)."""
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
        if len(data) > 65536:
            raise ValueError("a ClientApp start request over 64 KiB")
    argv = json.loads(data)
    if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
        raise ValueError("a ClientApp start request is a list of strings")
    return argv


def serve(path: Path, run_child=None, *, stopping=lambda: False) -> None:
    """Fork one child per request until ``stopping()``; ``run_child(argv)`` (default Flower's
    ``flwr_clientapp``) runs in the child, whose exit code is its result."""
    for name in PRELOAD:  # the point of this server: paid once, inherited by every child
        importlib.import_module(name)
    if run_child is None:
        run_child = _flower_clientapp
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    listener = channel.listen(path)
    try:
        for conn, _pid in channel.own_connections(listener, stopping=stopping, label="clientapp fork server"):
            try:
                argv = read_argv(conn)
            except ValueError as exc:
                log.warning("clientapp fork server: %s", exc)
                continue
            child = os.fork()
            if child == 0:
                listener.close()
                conn.close()
                _child(run_child, argv)
            conn.sendall(b"ok")
            log.info("clientapp fork server: forked ClientApp process %d", child)  # counted by bench/deploy_speed.py
    finally:
        listener.close()
        path.unlink(missing_ok=True)


def _child(run_child, argv: list[str]) -> None:
    """In the forked child: Flower's defaults for signals, run, exit without the parent's cleanup."""
    code = 1
    try:
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        sys.argv = [COMMAND, *argv]
        run_child(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # the child's failure is Flower's to report; here only its trace in the log
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _flower_clientapp(argv: list[str]) -> None:
    module, name = ENTRY
    getattr(importlib.import_module(module), name)()


def main(argv: list[str] | None = None) -> None:
    """``python -m fedlora.deploy.clientapp_fork SOCKET``: the fork server, until SIGTERM."""
    args = sys.argv[1:] if argv is None else argv
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))
    logging.basicConfig(level=logging.INFO)
    serve(Path(args[0]), stopping=lambda: stop["now"])


if __name__ == "__main__":
    main()
