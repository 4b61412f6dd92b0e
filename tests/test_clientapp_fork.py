"""The warm fork server for Flower's per-message ClientApp processes (fedlora.deploy.clientapp_fork).

It relies on Flower internals, so these tests fail when they move: the SuperExec starts
ClientApps by the command name ``flwr-clientapp`` through ``subprocess.Popen`` (found on PATH),
and the command's entry point is ``flwr.supernode.cli.flwr_clientapp``. Then, without Flower:
the shim hands its arguments to a running fork server, which runs them in a forked child; with
no server the shim runs the real command.
"""

from __future__ import annotations

import importlib
import inspect
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedlora.deploy import clientapp_fork, supernode_poll


def test_flower_starts_clientapps_by_name_from_path():
    supernode_poll.check_pinned()
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType
    from flwr.supercore.superexec.executor import subprocess_executor

    assert TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] == clientapp_fork.COMMAND
    source = inspect.getsource(subprocess_executor.SubprocessExecutor.launch)
    assert "TASK_TYPE_TO_COMMAND[spec.task_type]" in source and "subprocess.Popen(" in source
    module, name = clientapp_fork.ENTRY
    assert callable(getattr(importlib.import_module(module), name))
    real = Path(sys.executable).parent / clientapp_fork.COMMAND
    assert f"from {module} import {name}" in real.read_text()


SERVER = """
import json, os, sys
from pathlib import Path
from fedlora.deploy.clientapp_fork import serve
out = Path(sys.argv[2])
def run_child(argv):
    (out / f"{os.getpid()}.json").write_text(json.dumps({"argv": argv, "parent": os.getppid()}))
serve(Path(sys.argv[1]), run_child, stopping=lambda: (out / "stop").exists())
"""


@pytest.fixture
def short_dir():
    base = Path(tempfile.mkdtemp(prefix="fl-fork-", dir="/tmp"))
    yield base
    subprocess.run(["rm", "-rf", str(base)], check=False)


def test_shim_hands_over_to_the_fork_server_or_runs_the_real_command(short_dir):
    sock, out = short_dir / "fork" / "s.sock", short_dir / "out"
    out.mkdir()
    shim = clientapp_fork.write_shim(short_dir / "bin", sys.executable, "/bin/echo")
    env = {"PATH": "/usr/bin:/bin", clientapp_fork.ENV: str(sock)}
    # no server: Flower's own command (here: echo) runs with the arguments
    res = subprocess.run([str(shim), "--token", "abc"], env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and res.stdout.strip() == "--token abc"
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(sock), str(out)])
    try:
        deadline = time.time() + 60
        while not sock.exists() and time.time() < deadline:
            time.sleep(0.1)
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
        for token in ("t1", "t2"):
            res = subprocess.run([str(shim), "--token", token], env=env, capture_output=True, text=True, timeout=30)
            assert res.returncode == 0 and res.stdout == "", res  # handed over: echo did not run
        deadline = time.time() + 30
        while len(list(out.glob("*.json"))) < 2 and time.time() < deadline:
            time.sleep(0.1)
        runs = [json.loads(p.read_text()) for p in out.glob("*.json")]
        assert sorted(r["argv"] for r in runs) == [["--token", "t1"], ["--token", "t2"]]
        assert {r["parent"] for r in runs} == {server.pid}  # forked by the warm server
    finally:
        (out / "stop").touch()
        server.wait(30)
    assert not sock.exists()


def test_the_fork_server_is_off_unless_switched_on():
    assert not clientapp_fork.enabled({})
    assert clientapp_fork.enabled({clientapp_fork.SWITCH: "1"})
    assert not clientapp_fork.enabled({clientapp_fork.SWITCH: "0"})
    assert not clientapp_fork.enabled({clientapp_fork.SWITCH: ""})  # set but empty: the default
    with pytest.raises(ValueError, match="FEDLORA_CLIENTAPP_FORK='yes please'"):
        clientapp_fork.enabled({clientapp_fork.SWITCH: "yes please"})


def test_a_tier_starts_its_fork_server_again_and_leaves_out_one_that_keeps_dying(tmp_path):
    from fedlora.deploy.processes import QUICK_EXITS, ProcessGroup, _keep_fork_servers

    with ProcessGroup(tmp_path) as group:
        group.start("supernode-fork", [sys.executable, "-c", "raise SystemExit(3)"], {})
        group.start("supernode", [sys.executable, "-c", "import time; time.sleep(60)"], {})
        quick: dict[str, int] = {}
        pids = set()
        for _ in range(QUICK_EXITS):
            proc = group.procs["supernode-fork"]
            pids.add(proc.pid)
            proc.wait(30)
            _keep_fork_servers(group, quick)
        assert len(pids) == QUICK_EXITS  # started again after each exit but the last
        assert "supernode-fork" not in group.procs and quick["supernode-fork"] == QUICK_EXITS
        group.check()  # the tier itself goes on (its ClientApps start cold)
        assert group.procs["supernode"].poll() is None


def test_quick_exits_are_counted_in_a_row_per_process_and_a_long_run_resets_them():
    import time
    from types import SimpleNamespace

    from fedlora.deploy.processes import QUICK_EXITS, QUICK_S, _exited_at_once

    now = time.time()
    group = SimpleNamespace(specs={"a": ([], {}, None, now), "b": ([], {}, None, now)})
    exits: dict[str, int] = {}
    for n in range(1, QUICK_EXITS):
        assert _exited_at_once(group, "a", exits)[0] is False and exits["a"] == n
    assert _exited_at_once(group, "b", exits)[0] is False and exits == {"a": QUICK_EXITS - 1, "b": 1}
    group.specs["a"] = ([], {}, None, now - QUICK_S - 1)  # this run lived long: the count starts over
    given_up, lived = _exited_at_once(group, "a", exits)
    assert not given_up and exits["a"] == 0 and lived > QUICK_S
    group.specs["a"] = ([], {}, None, time.time())
    for _ in range(QUICK_EXITS - 1):
        assert not _exited_at_once(group, "a", exits)[0]
    assert _exited_at_once(group, "a", exits)[0] is True  # QUICK_EXITS in a row: give up
