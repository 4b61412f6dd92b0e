"""Split learning in a real loopback deployment from a plan: one neighbourhood edge, two split devices
and one that trains the whole model, two secure rounds.

Every machine runs its folder's own command (`fedlora edge|client|cloud --config`): TLS with the plan's
CA and SuperNode authentication on every hop, the plan's keys for secure aggregation. The cloud's network
model splits the two phones (too small to train the model whole under ``train.mode=auto``); for each of
them the edge opens the round's split stream (TLS, the plan's keys in its handshake) and sends its
training message with the split order; the device's resident process trains its blocks with the edge's
in between, over the stream, and replies with its masked input. Checked: two rounds complete with all
three devices in the cell's secure sum, the rounds' split record names the two split devices with their
exchanges and bytes, the edge's log shows each device's stream; then the edge is killed (SIGKILL, its whole
process tree) in the middle of round 3, right after its first split device's stream: that round drops the
cell's devices and the run goes on -- the edge, started again, and all three devices take part in round 4.
Every process stops at the end.

Run it under the Flower lock: ``flock /tmp/fedlora-flower.lock python -m pytest -q tests/test_deploy_split.py``.
"""

from __future__ import annotations

import pytest
from test_deployment import FEDLORA, _kill_tree, _logs, _online, _rounds, _wait
from test_deployment import OVERRIDES as DEPLOYMENT

from fedlora.config import compose
from fedlora.deploy.plan import DeploySettings, write_plan
from fedlora.deploy.processes import ProcessGroup, free_port_run, placement

pytestmark = [pytest.mark.flower, pytest.mark.slow]

# test_deployment's settings, with one edge of three devices (a laptop and two small phones), two rounds
CHANGED = [
    "model.tiny.num_hidden_layers=4",
    "topology.neighbourhoods_per_suburban=1",
    "topology.profile_mix={rpi4: 0, phone: 0.67, car: 0, laptop: 0.33}",
    "topology.profiles.laptop.availability=1.0",
    "topology.profiles.phone.memory_gb=0.216",
    "train.split.runtime_mb=0",
    "train.mode=auto",
    "federation.num_clients=3",
    "federation.rounds=4",
    "federation.round_pause_s=0",
]
OVERRIDES = [o for o in DEPLOYMENT if o.split("=")[0] not in {c.split("=")[0] for c in CHANGED}] + CHANGED
SPLIT = [1, 2]  # the phones (cf. tests/test_split_deploy.py)


def test_two_split_devices_and_a_full_one_complete_two_secure_rounds_with_their_edge(tmp_path, env):
    cfg = compose(OVERRIDES)
    ((cell, ends),) = placement(cfg).items()
    assert sorted(ends) == [0, 1, 2]
    out = tmp_path / "plan"
    write_plan(cfg, out, DeploySettings(base_port=free_port_run(2, also=10000), runtime_port_base=free_port_run(6)),
               overrides=OVERRIDES)
    env = dict(env, PYTHONUNBUFFERED="1")
    edge, cloud_dir = out / f"edge-{cell}", out / "cloud"
    with ProcessGroup(tmp_path / "logs") as group:
        group.start(edge.name, [*FEDLORA, "edge", "--config", str(edge)], env)
        for c in ends:
            group.start(f"end-{c}", [*FEDLORA, "client", "--config", str(out / f"end-{c}")], env)
        _wait(lambda: _online(edge, env) == len(ends), 240, "the END devices to join the edge over TLS", group)
        cloud = group.start("cloud", [*FEDLORA, "cloud", "--config", str(cloud_dir)], env)
        service = edge / "spool" / "service.log"
        # Round 3: kill the edge once its first split device's stream has ended (the cell's round is under way).
        _wait(lambda: len(_rounds(cloud_dir / "run")) >= 2 and _streams(service, 1) >= 3, 600, "round 3's first stream",
              group, every=0.1)
        streams_before = _streams(service, 2)
        _kill_tree(group.procs[edge.name].pid)
        _wait(lambda: len(_rounds(cloud_dir / "run")) >= 3, 600, "round 3 without the edge")
        group.restart(edge.name)
        assert cloud.wait(timeout=900) == 0, _logs(cloud_dir / "logs", edge / "spool", group.log_dir)
        rounds = _rounds(cloud_dir / "run")
    assert group.leftovers() == [], "processes left running"
    logs = _logs(edge / "spool", group.log_dir)
    assert [r["round"] for r in rounds] == [1, 2, 3, 4], logs
    assert streams_before == 2  # device 2 had not finished its round-3 stream when the edge died
    assert rounds[2]["participants"] == [] and sorted(d["client"] for d in rounds[2]["dropped"]) == [0, 1, 2], rounds[2]
    for r in rounds[:2] + rounds[3:]:
        assert r["participants"] == [0, 1, 2] and r["dropped"] == [], (r, logs)
        assert r["secure"]["clients_in_sum"] == 3 and all(c["ok"] for c in r["secure"]["cells"].values()), r["secure"]
        assert r["split"]["split_clients"] == SPLIT, r["split"]
        for c in SPLIT:
            entry = r["split"]["clients"][str(c)]
            assert entry["mode"] == "split" and entry["exchanges"] == 2 and entry["bytes_up"] > 0, entry
            assert entry["edge"] == cell, entry
        assert r["split"]["clients"]["0"]["mode"] == "full"
    for c in SPLIT:
        assert _streams(service, c) == 4 - (c == 2), service.read_text()[-3000:]
    assert (cloud_dir / "run" / "adapter" / "adapter_model.safetensors").is_file()


def _streams(service, client: int) -> int:
    """How many of ``client``'s split streams the edge's log says ended (each round: one)."""
    return service.read_text().count(f"split device {client}: ") if service.is_file() else 0
