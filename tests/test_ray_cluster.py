"""`fedlora run simulation.ray_address=...` joins a Ray cluster started separately.

The test starts a Ray head on loopback with its own temp dir and ports (`ray start --head`,
as on machine A of a real cluster), runs a tiny federation joined to it, and checks that
the run finished AND that its driver is in the head's job table (a run that ignored the
address would start its own local Ray and never show up there). Only the processes whose
command line names this test's temp dir are stopped afterwards -- never `ray stop`, which
would stop every Ray on the machine. What this cannot test here: a second machine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedlora.config import ConfigError, compose, validate
from server.simulation import backend_config

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
OVERRIDES = [
    "model=tiny",
    "topology=small6g",
    "federation.num_clients=4",
    "federation.rounds=1",
    "federation.fraction=1.0",
    "train.local_steps=1",
    "train.max_seq_len=64",
    "data.records_per_client=8",
    "data.max_eval_examples=4",
    "progress=false",
]


def test_backend_config_joins_a_cluster_without_local_resources():
    local = backend_config(compose([]))
    assert local["init_args"]["num_cpus"] >= 1 and "address" not in local["init_args"]
    joined = backend_config(compose(["simulation.ray_address=10.0.0.1:6379"]))
    # ray.init refuses num_cpus when it connects to an existing cluster.
    assert joined["init_args"]["address"] == "10.0.0.1:6379" and "num_cpus" not in joined["init_args"]
    assert joined["client_resources"] == local["client_resources"]


@pytest.mark.parametrize("address", ["ray://10.0.0.1:10001", "10.0.0.1", "head:port", "head:0", ":6379"])
def test_bad_ray_address_names_the_setting(address):
    cfg = compose([])
    cfg.simulation.ray_address = address
    with pytest.raises(ConfigError, match="simulation.ray_address"):
        validate(cfg)


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _pids_naming(needle: str) -> list[int]:
    """Processes whose command line contains ``needle`` (read from /proc: ps truncates)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle.encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def _stop(pids_of: str) -> None:
    """SIGTERM, then SIGKILL, the processes of this test's Ray head (and only those)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _pids_naming(pids_of)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        while time.time() < deadline and _pids_naming(pids_of):
            time.sleep(0.2)
        if not _pids_naming(pids_of):
            return


@pytest.fixture
def ray_head():
    """A Ray head on 127.0.0.1 with 2 CPUs, its own temp dir and free ports; stopped after."""
    # Short path: Ray's unix sockets live under the temp dir (107-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="fedlora-ray-", dir="/tmp")
    port, client_port, agent_port, agent_grpc, metrics, runtime_env, node_mgr, obj_mgr, dashboard = _free_ports(9)
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    cmd = [
        str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
        "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp_dir}", "--include-dashboard=false",
        f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={agent_port}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}", f"--node-manager-port={node_mgr}",
        f"--object-manager-port={obj_mgr}", f"--dashboard-port={dashboard}", "--disable-usage-stats",
    ]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert _pids_naming(temp_dir), "ray start returned but no process of its temp dir is running"
        yield {"address": f"127.0.0.1:{port}", "temp_dir": temp_dir, "env": env}
    finally:
        _stop(temp_dir)
        leftover = _pids_naming(temp_dir)
        subprocess.run(["rm", "-rf", temp_dir], check=False)
        assert not leftover, f"Ray head processes still running: {leftover}"


JOBS = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
from ray._private.state import jobs
print("JOBS=" + json.dumps([{k: j[k] for k in ("DriverPid", "IsDead", "Entrypoint")} for j in jobs()]))
ray.shutdown()
"""


@pytest.mark.flower
@pytest.mark.slow
def test_fedlora_run_joins_a_separately_started_ray_head(tmp_path, ray_head, model_cache):
    env = dict(ray_head["env"], FLWR_TELEMETRY_ENABLED="0", FEDLORA_CACHE=str(model_cache))
    run = subprocess.Popen(
        [str(BIN / "fedlora"), "run", *OVERRIDES, f"output_dir={tmp_path / 'runs'}", f"model.cache_dir={model_cache}",
         f"simulation.ray_address={ray_head['address']}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        log, _ = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, log[-4000:]
    assert f"Ray cluster at {ray_head['address']}" in log
    (run_dir,) = [d for d in (tmp_path / "runs").iterdir() if d.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert len(rounds) == 1 and rounds[0]["aggregated"] and len(rounds[0]["participants"]) >= 2
    assert summary["final_eval_loss"] > 0

    # The head knows the run: its driver (the `fedlora run` process) is a finished job there.
    out = subprocess.run([sys.executable, "-c", JOBS, ray_head["address"]], env=ray_head["env"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    jobs = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("JOBS="))[len("JOBS="):])
    ours = [j for j in jobs if j["DriverPid"] == run.pid]
    assert len(ours) == 1 and ours[0]["IsDead"], jobs
    assert "fedlora" in ours[0]["Entrypoint"] and "simulation.ray_address" in ours[0]["Entrypoint"]
    # And its virtual clients ran in worker processes of this head (their logs are in its session).
    session = Path(ray_head["temp_dir"]) / "session_latest" / "logs"
    assert any("ClientAppActor" in p.read_text(errors="ignore") for p in session.glob("worker-*.out")), sorted(
        p.name for p in session.iterdir()
    )
