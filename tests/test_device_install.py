"""The END-device install (issue 11): `pip install -e .` is what a device needs, without the simulation stack.

A device (scripts/device-setup.sh, docs/devices.md) installs fedlora's base dependencies only; Ray (flwr's
`simulation` extra) and Hydra are in the `full` extra that every other machine installs. These tests read
pyproject.toml and the installed packages' metadata (no network), and import the device's entry points in a
fresh interpreter to see that neither Ray nor Hydra is loaded. The installs themselves, on Debian 13 amd64
and arm64, are checked by scripts/check_device_install.sh (root, network, tens of minutes: not run here).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Distributions an END device must not get, and the modules they would load.
SIMULATION_DISTS = {"ray", "hydra-core"}
SIMULATION_MODULES = ("ray", "hydra")
DEVICE_ENTRY_POINTS = ("fedlora.cli", "fedlora.deploy.launcher", "clients.app", "fedlora.roles.device")


def base_requirements() -> list[Requirement]:
    return [Requirement(r) for r in PROJECT["dependencies"]]


def closure(requirements: list[Requirement], environment: dict) -> dict[str, list[str]]:
    """Every distribution (with the extras asked of it) that ``requirements`` pull in on ``environment``,
    walked through the installed packages' metadata, markers evaluated: ``name[extras]`` -> the chain."""
    seen: dict[str, list[str]] = {}
    todo = [(r, ["fedlora"]) for r in requirements]
    while todo:
        req, chain = todo.pop()
        name = canonicalize_name(req.name)
        key = f"{name}[{','.join(sorted(req.extras))}]"
        if key in seen:
            continue
        seen[key] = chain + [str(req)]
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{name} (pulled in by {' -> '.join(seen[key])}) is not installed: this venv does not "
                        "satisfy pyproject.toml; run scripts/setup.sh", pytrace=False)
        for text in dist.requires or []:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({**environment, "extra": e}) for e in ("", *req.extras)):
                sub.marker = None
                todo.append((sub, seen[key]))
    return seen


def test_device_dependencies_leave_out_the_simulation_stack():
    """No Ray (not even through flwr's extra) and no Hydra in the base set, directly or through any
    installed dependency; both are in the `full` extra, which scripts/setup.sh installs."""
    direct = {canonicalize_name(r.name): r for r in base_requirements()}
    assert not SIMULATION_DISTS & set(direct), f"pyproject's dependencies name {SIMULATION_DISTS & set(direct)}"
    assert not direct["flwr"].extras, f"the device set must take flwr without extras, got {direct['flwr']}"
    pulled = closure(base_requirements(), default_environment())
    bad = {k: v for k, v in pulled.items() if k.split("[")[0] in SIMULATION_DISTS or k.startswith("flwr[simulation")}
    assert not bad, "the device set pulls in the simulation stack:\n" + "\n".join(" -> ".join(v) for v in bad.values())
    full = {canonicalize_name(Requirement(r).name): Requirement(r) for r in PROJECT["optional-dependencies"]["full"]}
    assert "simulation" in full["flwr"].extras and "hydra-core" in full
    assert full["flwr"].specifier == direct["flwr"].specifier  # one flwr version for devices and the rest
    assert '".[full,test]"' in (ROOT / "scripts" / "setup.sh").read_text()


def test_requires_python_covers_raspberry_pi_os():
    """3.11 (Bookworm), 3.12, and 3.13 (Raspberry Pi OS on Debian 13 trixie) are allowed; 3.10 is not."""
    spec = SpecifierSet(PROJECT["requires-python"])
    assert [v for v in ("3.10", "3.11", "3.12", "3.13") if v in spec] == ["3.11", "3.12", "3.13"]


def test_device_setup_pins_torch_as_the_project_does():
    (torch,) = [r for r in base_requirements() if r.name == "torch"]
    script = (ROOT / "scripts" / "device-setup.sh").read_text()
    assert f'TORCH_PIN="torch{torch.specifier}"' in script
    assert re.search(r"3\.11\|3\.12\|3\.13\)", script), "device-setup.sh accepts the Pythons requires-python allows"


def test_device_entry_points_load_no_ray_or_hydra():
    """What `fedlora client --config` loads (the CLI, the launcher, the ClientApp Flower runs per message,
    the device role), in a fresh interpreter: no module of Ray or Hydra (both installed in this venv)."""
    code = (f"import importlib, json, sys\nfor m in {DEVICE_ENTRY_POINTS!r}: importlib.import_module(m)\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {SIMULATION_MODULES!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    # the test can fail: the same probe sees Ray where it is loaded
    probe = subprocess.run([sys.executable, "-c", "import ray\n" + code],
                           capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert "ray" in json.loads(probe.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_device_selfcheck_passes(tmp_path):
    """scripts/device_selfcheck.py --train, as device-setup.sh runs it, passes in this venv: imports, Flower's
    commands, `fedlora deploy check --config`, one tiny training round on the own-data path."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "device_selfcheck.py"), "--train",
                           "--work", str(tmp_path / "w")], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert "device self-check passed" in done.stdout
    assert re.search(r"ok   one local training round .*own examples, loss \d", done.stdout)


def test_composing_without_hydra_says_what_to_do(monkeypatch):
    """On a device (no Hydra) a command that composes conf/ (e.g. `fedlora deploy check` without --config)
    fails with what to do, not with a bare ModuleNotFoundError."""
    from fedlora.config import ConfigError, compose

    monkeypatch.setitem(sys.modules, "hydra", None)  # `import hydra` now fails as on a device
    with pytest.raises(ConfigError, match=r"--config FOLDER.*pip install -e '\.\[full\]'"):
        compose(["model=tiny"])


def test_device_install_scripts_parse():
    """The scripts no test runs whole (root, network): bash parses them, and the arm64 check defaults to Debian 13's
    qemu (Debian 12's qemu 7.2 crashes in `import torch`, docs/devices.md) and restores binfmt_misc on exit."""
    for name in ("device-setup.sh", "check_device_install.sh"):
        done = subprocess.run(["bash", "-n", str(ROOT / "scripts" / name)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{name}: {done.stderr}"
    check = (ROOT / "scripts" / "check_device_install.sh").read_text()
    assert '"${ARM64_QEMU:-trixie}"' in check and "trap 'unmount_all; restore_binfmt' EXIT" in check
