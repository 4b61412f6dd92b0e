"""Loopback check of a planned deployment: TLS + Flower SuperNode authentication, for real.

Plans a flat deployment (cloud + 2 END clients) on free loopback ports, starts the cloud's
``flower-superlink`` with the planned command (``start.sh superlink``: TLS certificate of the
plan, ``--enable-supernode-auth``), registers the planned SuperNode keys with the planned
``register_supernodes.sh`` (Control API), and checks through the SuperLink's node list that

- a SuperNode started with the planned command (its registered key + the CA certificate)
  comes online;
- a SuperNode with an unregistered key is refused (exits, never online);
- a registered SuperNode without the CA certificate, or with another CA's certificate,
  cannot connect (TLS verification fails; never online).

Run it under the Flower lock: ``flock /tmp/fedlora-flower.lock python -m pytest -q
tests/test_deploy_tls.py -m flower``. Every process it starts is in its own process group
and is killed at the end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedlora.config import compose
from fedlora.deploy import commands, pki
from fedlora.deploy.plan import DeploySettings, write_plan

pytestmark = pytest.mark.flower

BIN = Path(sys.executable).parent


def _free_run(n: int) -> int:
    """A port p such that p..p+n-1 are all free on 127.0.0.1 right now."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


class Procs:
    def __init__(self, env):
        self.env = env
        self.procs: list[subprocess.Popen] = []

    def start(self, argv, cwd, log: Path) -> subprocess.Popen:
        proc = subprocess.Popen(argv, cwd=cwd, env=self.env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop_all(self):
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.time() + 10
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for proc in self.procs:  # children (SuperExec) left in a group
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def deployment(tmp_path):
    cfg = compose(["model=tiny", "topology=flat", "federation.num_clients=2", "federation.min_clients=1"])
    base = _free_run(1)
    runtime = _free_run(6)
    out = tmp_path / "plan"
    write_plan(cfg, out, DeploySettings(base_port=base, runtime_port_base=runtime))
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               FLWR_HOME=str(out / "cloud" / "flwr"), PYTHONUNBUFFERED="1")
    procs = Procs(env)
    try:
        yield out, base, runtime, procs
    finally:
        procs.stop_all()


def _nodes(out: Path, env) -> list[dict]:
    res = subprocess.run(commands.list_argv(), cwd=out / "cloud", env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(res.stdout)["nodes"]


def _online(out, env) -> set[str]:
    return {n["node-id"] for n in _nodes(out, env) if n["status"] == "online"}


def _wait(pred, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_tls_and_supernode_auth_on_loopback(deployment, tmp_path):
    out, base, runtime, procs = deployment
    env = procs.env
    cloud = out / "cloud"
    superlink = procs.start(["sh", "start.sh", "superlink"], cloud, tmp_path / "superlink.out")

    def up():
        assert superlink.poll() is None, (cloud / "logs" / "superlink.log").read_text()[-3000:]
        res = subprocess.run(commands.list_argv(), cwd=cloud, env=env, capture_output=True, text=True, timeout=30)
        return res.returncode == 0
    (cloud / "flwr").mkdir(exist_ok=True)
    (cloud / "flwr" / "config.toml").write_text(commands.flwr_config_toml(f"127.0.0.1:{base}", str(cloud / "ca.pem")))
    _wait(up, 60, "the SuperLink's Control API (TLS) to answer")
    res = subprocess.run(["sh", "register_supernodes.sh"], cwd=cloud, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "registered end-0" in res.stdout and "registered end-1" in res.stdout, res.stdout + res.stderr
    assert len(_nodes(out, env)) == 2 and not _online(out, env)
    # Registering again is idempotent (the systemd unit runs it on every start).
    again = subprocess.run(["sh", "register_supernodes.sh"], cwd=cloud, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "end-0 already registered" in again.stdout, again.stdout + again.stderr

    # 1. The planned END client (registered key + CA certificate) joins.
    end0 = procs.start(["sh", "start.sh", "supernode"], out / "end-0", tmp_path / "end0.out")
    online = _wait(lambda: _online(out, env), 60, "end-0 to come online")
    assert len(online) == 1 and end0.poll() is None
    assert "Activated node_id=" in (cloud / "logs" / "superlink.log").read_text()

    def refused(argv, cwd, name) -> str:
        proc = procs.start(argv + ["--max-retries", "2", "--max-wait-time", "15"], cwd, tmp_path / f"{name}.out")
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name}: SuperNode still running after 60 s; it should have been refused")
        assert proc.returncode != 0, f"{name} exited 0"
        assert _online(out, env) == online, f"{name} came online"
        return (tmp_path / f"{name}.out").read_text(errors="replace")

    address = f"127.0.0.1:{base}"
    # 2. A SuperNode whose key is not registered is refused by the SuperLink.
    rogue = tmp_path / "rogue_key"
    pki.write_private(rogue, pki.ssh_private(pki.make_supernode_key()))
    log = refused(commands.supernode_argv(superlink=address, ca="ca.pem", auth_key=str(rogue), node_config={},
                                          runtime_port=runtime + 3), out / "end-1", "rogue")
    assert "activat" in log.lower() or "public key" in log.lower(), log[-3000:]

    # 3. A registered SuperNode without the CA certificate cannot connect (system trust store).
    log = refused(commands.supernode_argv(superlink=address, ca=None, auth_key="auth/supernode_key", node_config={},
                                          runtime_port=runtime + 4), out / "end-1", "no_ca")
    assert "certificate" in log.lower() or "ssl" in log.lower(), log[-3000:]

    # 4. ... nor with another deployment's CA certificate.
    other = tmp_path / "other_ca.pem"
    pki.write_public(other, pki.cert_pem(pki.make_ca("another CA").cert))
    log = refused(commands.supernode_argv(superlink=address, ca=str(other), auth_key="auth/supernode_key", node_config={},
                                          runtime_port=runtime + 5), out / "end-1", "other_ca")
    assert "certificate" in log.lower() or "ssl" in log.lower(), log[-3000:]

    # 5. The same registered key WITH the CA certificate joins (the refusals were not about the key).
    procs.start(["sh", "start.sh", "supernode"], out / "end-1", tmp_path / "end1.out")
    _wait(lambda: len(_online(out, env)) == 2, 60, "end-1 to come online")
