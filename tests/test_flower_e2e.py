"""End to end through Flower's simulation engine (Ray): both ways in give the same adapter.

`fedlora run` (Hydra CLI, in-process engine) and `flwr run .` (Flower's CLI, local
SuperLink) must leave the run-directory contract and the same adapter as the in-process
loop on the same config and seeds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedlora.config import compose
from fedlora.roles.cloud import run_federation
from fedlora.roles.local import InProcessTransport

pytestmark = pytest.mark.flower
REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
OVERRIDES = [
    "model=tiny",
    "topology=flat",
    "federation.num_clients=3",
    "federation.rounds=2",
    "federation.fraction=0.67",
    "train.local_steps=2",
    "train.max_seq_len=128",
    "data.records_per_client=12",
    "data.max_eval_examples=8",
    "progress=false",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    """The same federation run in-process, without Flower."""
    os.environ["FEDLORA_CACHE"] = env["FEDLORA_CACHE"]
    run_dir = tmp_path_factory.mktemp("inprocess")
    run_federation(compose(OVERRIDES), run_dir, InProcessTransport(3))
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def check_contract(run_dir: Path, uplink: str = "end->cloud") -> None:
    for name in ("config.yaml", "rounds.jsonl", "summary.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (run_dir / name).is_file(), name
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["bytes"]["up"][uplink] > 0 for r in rounds)
    assert {p.name for p in (run_dir / "plots").glob("*.png")} == {"loss.png", "bytes.png", "tree.png"}
    assert any((run_dir / "checkpoints").iterdir())


def same_adapter(run_dir: Path, reference: dict) -> None:
    got = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == reference.keys()
    for key in got:
        np.testing.assert_allclose(got[key], reference[key], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_fedlora_run_through_flower_simulation(tmp_path, env, reference):
    out = subprocess.run(
        [str(BIN / "fedlora"), "run", *OVERRIDES, f"output_dir={tmp_path}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run_dir,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    check_contract(run_dir)
    same_adapter(run_dir, reference)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_ref = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_ref), str(run_dir / "adapter"))


@pytest.mark.slow
def test_flwr_run_dot_gives_the_same_result(tmp_path, env, reference):
    """Flower users' way in: `flwr run .` with a local SuperLink, stopped afterwards."""
    env = dict(env, FLWR_HOME=str(tmp_path / "flwr-home"))
    run_dir = tmp_path / "run"
    overrides = " ".join(OVERRIDES)
    try:
        out = subprocess.run(
            [str(BIN / "flwr"), "run", ".", "--stream",
             "--federation-config", "num-supernodes=3 client-resources-num-cpus=1",
             "--run-config", f'overrides="{overrides}" run-dir="{run_dir}"'],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        )
    finally:
        _stop_superlink(tmp_path / "flwr-home")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (run_dir / "summary.json").is_file(), out.stdout[-3000:] + out.stderr[-3000:]
    check_contract(run_dir)
    same_adapter(run_dir, reference)


# privacy=secagg on the 6G tree: 4 neighbourhood cells of 2 clients, every client available.
SECURE_OVERRIDES = [o for o in OVERRIDES if not o.startswith(("topology", "federation.num_clients", "federation.fraction"))] + [
    "topology=small6g",
    "federation.num_clients=8",
    "federation.fraction=1.0",
    "privacy=secagg",
    "topology.profile_mix={rpi4: 0, phone: 0, car: 0, laptop: 1.0}",
    "topology.profiles.laptop.availability=1.0",
]


@pytest.mark.slow
def test_fedlora_run_secagg_through_flower_equals_the_in_process_secure_run(tmp_path, env):
    """Every secure stage as real Flower messages (Ray workers, state in context.state)."""
    os.environ["FEDLORA_CACHE"] = env["FEDLORA_CACHE"]
    run_federation(compose(SECURE_OVERRIDES), tmp_path / "inprocess", InProcessTransport(8))
    out = subprocess.run(
        [str(BIN / "fedlora"), "run", *SECURE_OVERRIDES, f"output_dir={tmp_path / 'runs'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run_dir,) = [d for d in (tmp_path / "runs").iterdir() if d.is_dir()]
    check_contract(run_dir, uplink="end->neighbourhood")
    same_adapter(run_dir, load_file(str(tmp_path / "inprocess" / "adapter" / "adapter_model.safetensors")))
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (tmp_path / "inprocess" / "rounds.jsonl").read_text().splitlines()]
    for r, ref in zip(rounds, expected, strict=True):
        cells = r["secure"]["cells"]
        assert cells == ref["secure"]["cells"] and all(c["ok"] for c in cells.values()), cells
        assert sorted(c for cell in cells.values() for c in cell["survivors"]) == list(range(8))
        assert r["aggregated"] and r["secure"]["clients_in_sum"] == 8 and r["participants"] == list(range(8))


def _stop_superlink(flwr_home: Path) -> list[int]:
    """Stop the SuperLink `flwr run` started for this FLWR_HOME (it outlives the command).

    None is found when `flwr run` reused a local SuperLink that was already listening on
    Flower's fixed local ports (someone else's); that one is left alone.
    """
    stopped = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").replace("\0", " ")
        except OSError:
            continue
        if "flower-superlink" in args and str(flwr_home) in args:
            pid = int(cmdline.parent.name)
            os.kill(pid, signal.SIGTERM)
            stopped.append(pid)
    return stopped


@pytest.mark.parametrize(
    "args,needle",
    [
        (["lora.rr=4"], "rr"),
        (["strategy.name=fedsgd"], "strategy.name"),
        (["data=file", "data.path=/no/such/file.jsonl"], "data.path"),
        (["model=local", "model.path=/no/such/model"], "model.path"),
    ],
)
def test_cli_errors_are_one_clear_line(tmp_path, env, args, needle):
    out = subprocess.run([str(BIN / "fedlora"), "run", *args, f"output_dir={tmp_path}"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert needle in out.stderr + out.stdout
    assert "Traceback" not in out.stderr + out.stdout


@pytest.mark.slow
def test_ctrl_c_then_fedlora_resume_matches_uninterrupted(tmp_path, env):
    """SIGINT mid-run through the CLI, `fedlora resume`, same adapter as one clean run."""
    import time

    overrides = [o for o in OVERRIDES if not o.startswith(("federation.rounds", "train.local_steps"))]
    overrides += ["federation.rounds=4", "train.local_steps=6"]
    os.environ["FEDLORA_CACHE"] = env["FEDLORA_CACHE"]
    clean = tmp_path / "clean"
    run_federation(compose(overrides), clean, InProcessTransport(3))

    proc = subprocess.Popen([str(BIN / "fedlora"), "run", *overrides, f"output_dir={tmp_path / 'runs'}"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    latest = None
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / "runs").glob("*/checkpoints/latest.json"))
        if found and json.loads(found[0].read_text())["round"] >= 1:
            latest = found[0]
            break
        time.sleep(0.2)
    assert latest is not None, "the run never checkpointed a round"
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the interrupt landed")
    assert proc.returncode == 130, output[-3000:]
    assert "fedlora resume" in output
    run_dir = latest.parent.parent
    assert not (run_dir / "adapter").exists()

    out = subprocess.run([str(BIN / "fedlora"), "resume", str(run_dir)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rounds = [json.loads(line)["round"] for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3, 4]
    same_adapter(run_dir, load_file(str(clean / "adapter" / "adapter_model.safetensors")))


@pytest.mark.slow
def test_multirun_sweep_writes_one_run_per_setting_and_a_summary(tmp_path, env):
    out = subprocess.run(
        [str(BIN / "fedlora"), "run", "--multirun", "lora.r=2,4",
         *[o for o in OVERRIDES if not o.startswith("federation.rounds")], "federation.rounds=1", f"output_dir={tmp_path}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (sweep_dir,) = list(tmp_path.glob("multirun-*"))
    import csv

    rows = list(csv.DictReader(open(sweep_dir / "sweep_summary.csv")))
    assert [r["swept"] for r in rows] == ["lora.r=2", "lora.r=4"]
    assert all(r["status"] == "ok" for r in rows)
    bytes_r2, bytes_r4 = (int(r["total_bytes"]) for r in rows)
    assert bytes_r4 == 2 * bytes_r2  # LoRA tensors scale with the rank
    for job in ("0", "1"):
        assert (sweep_dir / job / "adapter" / "adapter_model.safetensors").is_file()
    assert "sweep summary" in out.stdout
