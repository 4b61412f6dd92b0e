"""The one Flower internal fedlora changes (fedlora.deploy.supernode_poll), held to its exact pin.

These tests fail when flwr is upgraded or its SuperNode loop changes: then re-read
``flwr/supernode/start_client_internal.py``, check the idle waits are still the literal
``time.sleep(3)`` / ``time.sleep(0.5)`` of a module-level ``import time``, and update PINNED.
"""

from __future__ import annotations

import time
from importlib import metadata

import pytest

from fedlora.deploy import supernode_poll
from fedlora.deploy.processes import DeployError, supernode_poll_s


def test_flower_is_the_pinned_version_and_source():
    supernode_poll.check_pinned()  # version and the module's sha256
    assert metadata.version("flwr") == supernode_poll.PINNED[0]
    source = supernode_poll._module_file().read_text()
    assert "\nimport time\n" in source
    assert source.count("time.sleep(3)") == 1 and source.count("time.sleep(0.5)") == 2
    assert source.count("time.sleep(") == 3  # no other wait that the cap would touch or miss


def test_install_caps_only_the_idle_waits(monkeypatch):
    import flwr.supernode.start_client_internal as internal

    monkeypatch.setattr(internal, "time", internal.time)  # restored after the test
    supernode_poll.install(0.05)
    assert internal.time is not time and internal.time.time is time.time
    t0 = time.perf_counter()
    internal.time.sleep(3)
    internal.time.sleep(0.5)
    assert time.perf_counter() - t0 < 0.5
    t0 = time.perf_counter()
    internal.time.sleep(0.3)  # any other wait is Flower's own
    assert time.perf_counter() - t0 >= 0.29
    with pytest.raises(ValueError, match="between"):
        supernode_poll.install(10)


def test_another_flower_is_refused(monkeypatch):
    monkeypatch.setattr(supernode_poll, "PINNED", ("1.41.0", "0" * 64))
    with pytest.raises(supernode_poll.UnpinnedFlower, match="not the pinned"):
        supernode_poll.install(0.2)


def test_poll_setting(monkeypatch):
    monkeypatch.delenv("FEDLORA_SUPERNODE_POLL_S", raising=False)
    assert supernode_poll_s() == supernode_poll.POLL_S
    monkeypatch.setenv("FEDLORA_SUPERNODE_POLL_S", "off")
    assert supernode_poll_s() is None
    monkeypatch.setenv("FEDLORA_SUPERNODE_POLL_S", "0.5")
    assert supernode_poll_s() == 0.5
    monkeypatch.setenv("FEDLORA_SUPERNODE_POLL_S", "fast")
    with pytest.raises(DeployError, match="seconds"):
        supernode_poll_s()


# Flower's own signal handling, with the second SIGINT sent from inside its graceful exit (as when the
# heartbeat thread's 401 lands while the message loop's 401 is being handled) and a non-daemon thread
# that never ends (the SuperNode has them): without supernode_poll.run this process never exits.
TWO_SIGNALS = """
import os, signal, threading
from flwr.supercore.exit import add_exit_handler, register_signal_handlers
from flwr.supercore.telemetry import EventType
from fedlora.deploy import supernode_poll

def entry():
    register_signal_handlers(event_type=EventType.RUN_SUPERNODE_LEAVE, exit_message="SuperNode terminated gracefully.")
    threading.Thread(target=threading.Event().wait).start()
    add_exit_handler(lambda: os.kill(os.getpid(), signal.SIGINT), run_before_force_exit=True)
    add_exit_handler(lambda: print("exit handlers ran", flush=True))
    os.kill(os.getpid(), signal.SIGINT)
    threading.Event().wait()

supernode_poll.run(entry)
"""


def test_a_second_stop_signal_during_flowers_graceful_exit_still_ends_the_supernode(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0")
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", TWO_SIGNALS], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "interrupted Flower's graceful exit" in done.stderr and "exit handlers ran" in done.stdout, done
    assert time.monotonic() - t0 < 60
