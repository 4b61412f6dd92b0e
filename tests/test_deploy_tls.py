"""Loopback check of a planned deployment: TLS + Flower SuperNode authentication, for real.

Plans a two-tier deployment (cloud > one edge > 2 END clients) on free loopback ports,
starts the cloud's and the edge's ``flower-superlink`` with the planned commands
(``start.sh superlink``: the plan's TLS certificate, ``--enable-supernode-auth``), registers
the planned SuperNode keys with each folder's ``register_supernodes.sh`` (Control API), and
checks through the SuperLinks' node lists that

- the edge's upward SuperNode joins the cloud, and an END client's SuperNode joins its edge,
  both started with the planned commands (registered key + the CA certificate);
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
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedlora.config import compose
from fedlora.deploy import commands, pki
from fedlora.deploy.plan import DeploySettings, write_plan
from server.deploy import ProcessGroup

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


@pytest.fixture
def deployment(tmp_path):
    cfg = compose(["model=tiny", "topology.suburban_cells=1", "topology.neighbourhoods_per_suburban=1",
                   "federation.num_clients=2", "federation.min_clients=1"])
    base = _free_run(2)
    runtime = _free_run(7)
    out = tmp_path / "plan"
    nodes = write_plan(cfg, out, DeploySettings(base_port=base, runtime_port_base=runtime))
    assert sorted(nodes) == ["cloud", "edge-neighbourhood-0-0", "end-0", "end-1"]
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONUNBUFFERED="1")
    with ProcessGroup(tmp_path / "logs") as procs:  # stops every process and its descendants
        yield out, base, runtime, procs, env


EDGE = "edge-neighbourhood-0-0"


def _nodes(folder: Path, env) -> list[dict]:
    res = subprocess.run(commands.list_argv(), cwd=folder, env=dict(env, FLWR_HOME=str(folder / "flwr")),
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(res.stdout)["nodes"]


def _online(folder, env) -> set[str]:
    return {n["node-id"] for n in _nodes(folder, env) if n["status"] == "online"}


def _wait(pred, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _start_superlink(procs: ProcessGroup, env, folder: Path, address: str) -> None:
    superlink = procs.start(f"{folder.name}-superlink", ["sh", "start.sh", "superlink"], env, folder)
    env = dict(env, FLWR_HOME=str(folder / "flwr"))

    def up():
        assert superlink.poll() is None, (folder / "logs" / "superlink.log").read_text()[-3000:]
        return subprocess.run(commands.list_argv(), cwd=folder, env=env, capture_output=True, timeout=30).returncode == 0
    (folder / "flwr").mkdir(exist_ok=True)
    (folder / "flwr" / "config.toml").write_text(commands.flwr_config_toml(address, str(folder / "ca.pem")))
    _wait(up, 60, f"the {folder.name} SuperLink's Control API (TLS) to answer")


def _register(folder: Path, env, names: list[str]) -> None:
    res = subprocess.run(["sh", "register_supernodes.sh"], cwd=folder, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert all(f"registered {n}" in res.stdout for n in names), res.stdout + res.stderr
    # Registering again is idempotent (the systemd unit runs it on every start).
    again = subprocess.run(["sh", "register_supernodes.sh"], cwd=folder, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and f"{names[0]} already registered" in again.stdout, again.stdout + again.stderr
    assert len(_nodes(folder, env)) == len(names) and not _online(folder, env)


def test_tls_and_supernode_auth_on_loopback(deployment, tmp_path):
    out, base, runtime, procs, env = deployment
    cloud, edge = out / "cloud", out / EDGE
    _start_superlink(procs, env, cloud, f"127.0.0.1:{base}")
    _start_superlink(procs, env, edge, f"127.0.0.1:{base + 1}")
    _register(cloud, env, [EDGE])
    _register(edge, env, ["end-0", "end-1"])

    # 1. The planned SuperNodes (registered key + CA certificate) join: edge -> cloud, end-0 -> edge.
    edge_up = procs.start("edge-supernode", ["sh", "start.sh", "supernode"], env, edge)
    end0 = procs.start("end0", ["sh", "start.sh", "supernode"], env, out / "end-0")
    _wait(lambda: _online(cloud, env), 60, "the edge's SuperNode to come online at the cloud")
    online = _wait(lambda: _online(edge, env), 60, "end-0 to come online at the edge")
    assert len(online) == 1 and end0.poll() is None and edge_up.poll() is None
    assert "Activated node_id=" in (edge / "logs" / "superlink.log").read_text()

    def refused(argv, name) -> str:
        proc = procs.start(name, argv + ["--max-retries", "2", "--max-wait-time", "15"], env, out / "end-1")
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name}: SuperNode still running after 60 s; it should have been refused")
        assert proc.returncode != 0, f"{name} exited 0"
        assert _online(edge, env) == online, f"{name} came online"
        return (procs.log_dir / f"{name}.log").read_text(errors="replace")

    address = f"127.0.0.1:{base + 1}"
    # 2. A SuperNode whose key is not registered is refused by the SuperLink.
    rogue = tmp_path / "rogue_key"
    pki.write_private(rogue, pki.ssh_private(pki.make_supernode_key()))
    log = refused(commands.supernode_argv(superlink=address, ca="ca.pem", auth_key=str(rogue), node_config={},
                                          runtime_port=runtime + 4), "rogue")
    assert "Failed to activate SuperNode" in log and "CERTIFICATE_VERIFY_FAILED" not in log, log[-3000:]

    # 3. A registered SuperNode without the CA certificate cannot connect (system trust store).
    log = refused(commands.supernode_argv(superlink=address, ca=None, auth_key="auth/supernode_key", node_config={},
                                          runtime_port=runtime + 5), "no_ca")
    assert "CERTIFICATE_VERIFY_FAILED" in log, log[-3000:]

    # 4. ... nor with another deployment's CA certificate.
    other = tmp_path / "other_ca.pem"
    pki.write_public(other, pki.cert_pem(pki.make_ca("another CA").cert))
    log = refused(commands.supernode_argv(superlink=address, ca=str(other), auth_key="auth/supernode_key", node_config={},
                                          runtime_port=runtime + 6), "other_ca")
    assert "CERTIFICATE_VERIFY_FAILED" in log, log[-3000:]

    # 5. The same registered key WITH the CA certificate joins (the refusals were not about the key).
    procs.start("end1", ["sh", "start.sh", "supernode"], env, out / "end-1")
    _wait(lambda: len(_online(edge, env)) == 2, 60, "end-1 to come online")
