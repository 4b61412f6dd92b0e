"""Split learning in a real loopback deployment from a plan: one neighbourhood edge, two split devices
and one that trains the whole model, two secure rounds.

Every machine runs its folder's own command (`fedlora edge|client|cloud --config`): TLS with the plan's
CA and SuperNode authentication on every hop, the plan's keys for secure aggregation. The cloud's network
model splits the two phones (too small to train the model whole under ``train.mode=auto``); for each of
them the edge opens the round's split stream (TLS, the plan's keys in its handshake) and sends its
training message with the split order; the device's resident process trains its blocks with the edge's
in between, over the stream, and replies with its masked input. Checked: both rounds complete with all
three devices in the cell's secure sum, the rounds' split record names the two split devices with their
exchanges and bytes, the edge's log shows each device's stream, and every process stops at the end.

Run it under the Flower lock: ``flock /tmp/fedlora-flower.lock python -m pytest -q tests/test_deploy_split.py``.
"""

from __future__ import annotations

import pytest
from test_deployment import FEDLORA, _logs, _online, _rounds, _wait
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
    "federation.rounds=2",
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
        assert cloud.wait(timeout=900) == 0, _logs(cloud_dir / "logs", edge / "spool", group.log_dir)
        rounds = _rounds(cloud_dir / "run")
    assert group.leftovers() == [], "processes left running"
    logs = _logs(edge / "spool", group.log_dir)
    assert [r["round"] for r in rounds] == [1, 2], logs
    for r in rounds:
        assert r["participants"] == [0, 1, 2] and r["dropped"] == [], (r, logs)
        assert r["secure"]["clients_in_sum"] == 3 and all(c["ok"] for c in r["secure"]["cells"].values()), r["secure"]
        assert r["split"]["split_clients"] == SPLIT, r["split"]
        for c in SPLIT:
            entry = r["split"]["clients"][str(c)]
            assert entry["mode"] == "split" and entry["exchanges"] == 2 and entry["bytes_up"] > 0, entry
            assert entry["edge"] == cell, entry
        assert r["split"]["clients"]["0"]["mode"] == "full"
    service = (edge / "spool" / "service.log").read_text()
    for c in SPLIT:
        assert service.count(f"split device {c}: ") == 2, service[-3000:]
    assert (cloud_dir / "run" / "adapter" / "adapter_model.safetensors").is_file()
