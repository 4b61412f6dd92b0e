"""Self-check of an END-device install (scripts/device-setup.sh runs it; run it again any time).

    python scripts/device_selfcheck.py [--train] [--work DIR]

Checks, one line each with its wall time, and exits 1 at the first that fails:

1. the modules ``fedlora client --config`` loads (the CLI, the device launcher, the ClientApp, the
   device role) import, and none of the simulation stack (Ray, Hydra) is loaded by them;
2. Flower's ``flower-supernode`` and ``flwr-clientapp`` (the launcher starts them by name) run;
3. ``fedlora deploy check --config FOLDER`` (the real command) reports the device and picks its
   settings, for a node folder with the tiny random model;
4. with ``--train``: one local training round on the deployed-device path -- the device's own data
   file and the settings the check picked (:func:`fedlora.roles.device.train_round` with
   :class:`~fedlora.roles.device.DeviceLocal`), then again that no Ray or Hydra was loaded.

Nothing is sent anywhere and nothing is left behind (``--work`` keeps the folder for a look).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
# What a device must never load: the simulation engine and the config composer (pyproject's `full` extra).
SIMULATION_STACK = ("ray", "hydra")
DEVICE_MODULES = ("fedlora.cli", "fedlora.deploy.launcher", "clients.app", "fedlora.roles.device")
# A node folder's config: the schema's defaults with the tiny random model and a short round.
NODE_CONFIG = {"model": {"source": "tiny"}, "train": {"local_steps": 2, "max_seq_len": 128}, "progress": False}
OWN_EXAMPLES = [
    {"messages": [{"role": "user", "content": f"Resting heart rate {60 + i} bpm today, slept {5 + i % 4} h. Any advice?"},
                  {"role": "assistant", "content": f"A resting rate of {60 + i} bpm is in the normal range; "
                                                   f"aim for {7 + i % 2} hours of sleep."}]}
    for i in range(10)
]


class CheckFailed(RuntimeError):
    pass


def loaded_simulation_stack() -> list[str]:
    return sorted(m for m in sys.modules if m.split(".")[0] in SIMULATION_STACK)


def step(name: str, fn) -> object:
    start = time.perf_counter()
    try:
        result = fn()
    except CheckFailed as exc:
        print(f"FAIL {name}: {exc}", flush=True)
        raise SystemExit(1) from None
    print(f"ok   {name} ({time.perf_counter() - start:.1f} s){': ' + result if isinstance(result, str) else ''}", flush=True)
    return result


def check_imports() -> str:
    import importlib
    import importlib.util

    for module in DEVICE_MODULES:
        importlib.import_module(module)
    loaded = loaded_simulation_stack()
    if loaded:
        raise CheckFailed(f"the device's modules loaded the simulation stack: {', '.join(loaded[:5])}")
    installed = [m for m in SIMULATION_STACK if importlib.util.find_spec(m) is not None]
    import flwr
    import torch
    return (f"Python {sys.version.split()[0]}, torch {torch.__version__}, flwr {flwr.__version__}; "
            f"no Ray/Hydra loaded ({'installed: ' + ', '.join(installed) if installed else 'neither installed'})")


def check_flower_commands() -> str:
    for command in ("flower-supernode", "flwr-clientapp"):
        exe = BIN / command
        if not exe.is_file():
            raise CheckFailed(f"{exe} is missing (pip install flwr into this venv)")
        done = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise CheckFailed(f"{command} --help exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return "flower-supernode, flwr-clientapp"


def write_node(folder: Path) -> Path:
    """A node folder as far as the device check reads one: its config.yaml, and its own data."""
    node = folder / "node"
    (node / "data").mkdir(parents=True)
    doc = json.loads(json.dumps(NODE_CONFIG))
    doc["model"]["cache_dir"] = str(folder / "cache")
    (node / "config.yaml").write_text(json.dumps(doc, indent=2) + "\n")  # JSON is YAML
    (node / "data" / "examples.jsonl").write_text("".join(json.dumps(e) + "\n" for e in OWN_EXAMPLES))
    return node


def check_device(node: Path) -> dict:
    done = subprocess.run([str(BIN / "fedlora"), "deploy", "check", "--config", str(node), "--json"],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise CheckFailed(f"fedlora deploy check exited {done.returncode}: {(done.stdout + done.stderr).strip()[-800:]}")
    return json.loads(done.stdout)


def check_training(node: Path, picked: dict) -> str:
    from fedlora.config import load_yaml
    from fedlora.roles.device import DeviceLocal, initial_adapter, train_round
    from fedlora.run_settings import resolve_run

    cfg = load_yaml(node / "config.yaml")
    settings = resolve_run(cfg).round_settings(1, {"freeze_a": False, "proximal_mu": 0.0})
    own = " ".join([*picked["settings"]["overrides"], f"simulation.threads_per_client={picked['device']['cpu_count']}"])
    local = DeviceLocal(own, str(node / "data" / "examples.jsonl"))
    delta, metrics = train_round(settings, initial_adapter(settings, freeze_a=False), 0, local=local)
    norm = math.sqrt(sum(float((v.astype("float64") ** 2).sum()) for v in delta.values()))
    if not (metrics["num_examples"] > 0 and math.isfinite(metrics["train_loss"]) and norm > 0):
        raise CheckFailed(f"training did not move the adapter: {metrics}, |delta|={norm}")
    loaded = loaded_simulation_stack()
    if loaded:
        raise CheckFailed(f"training loaded the simulation stack: {', '.join(loaded[:5])}")
    return (f"{metrics['train_steps']:.0f} steps on {metrics['num_examples']:.0f} own examples, loss "
            f"{metrics['train_loss']:.3f}, |delta| {norm:.3g}, {metrics['train_seconds']:.1f} s training")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--train", action="store_true", help="also run one local training round of the tiny model")
    p.add_argument("--work", type=Path, help="keep the node folder and model cache here (default: a temporary folder)")
    args = p.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="fedlora-selfcheck-")) if args.work is None else args.work
    if args.work is not None and args.work.exists():
        raise SystemExit(f"--work {args.work} exists; give a new folder")
    try:
        step("imports of `fedlora client` (launcher, ClientApp, device role)", check_imports)
        step("Flower's SuperNode commands", check_flower_commands)
        node = write_node(folder)
        picked = step("fedlora deploy check --config (tiny model)", lambda: check_device(node))
        d, s = picked["device"], picked["settings"]
        print(f"     device: {d['arch']}, {d['cpu_count']} CPUs, {d['mem_available_mib']:.0f} MiB available, mask PRG "
              f"{d['mask_prg']}; settings: {' '.join(s['overrides'])}", flush=True)
        if args.train:
            step("one local training round (own data file, picked settings)", lambda: check_training(node, picked))
    finally:
        if args.work is None:
            shutil.rmtree(folder, ignore_errors=True)
    print("device self-check passed", flush=True)


if __name__ == "__main__":
    main()
