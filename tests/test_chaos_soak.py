"""The short chaos soak (bench/chaos_soak.py --short) in CI: a planned deployment (TLS, node auth,
secure aggregation with the plan's keys, tiny model, 2 edges, 6 END devices), each machine in its
own network namespace, 3 rounds while a seeded schedule kills the cloud (it resumes) and an END
device (started again) and degrades and cuts links with ``tc netem``. The run must complete with
every round recorded once, every asked device joined or dropped with a reason, no update counted
twice, a finite adapter that plain peft loads, and nothing left running (processes, namespaces).

Without network namespaces (not root) it runs the same on loopback with the process faults only
and says so in a warning. The full soak (10 rounds, every kind of fault) is
``python bench/chaos_soak.py``; its figures are in bench/results/chaos_soak.json.

Run it under the Flower lock: ``flock /tmp/fedlora-flower.lock python -m pytest -q tests/test_chaos_soak.py``.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
# A bench script that cannot be imported is a broken soak: an error here, never a skip.
import chaos_soak  # noqa: E402 (importable only once bench/ is on sys.path)

from fedlora.deploy import chaos  # noqa: E402

pytestmark = [pytest.mark.flower, pytest.mark.slow]


def test_short_chaos_soak_survives_its_faults(tmp_path, env):
    why_not = chaos_soak.netns_usable()
    if why_not is not None:
        warnings.warn(f"chaos soak on loopback, no link faults: {why_not}", stacklevel=1)
    # Every device reachable in every round (no simulated availability): each dropout is a fault's.
    always = [f"topology.profiles.{p}.availability=1.0" for p in ("rpi4", "car", "laptop")]
    result = chaos_soak.soak(tmp_path, chaos_soak.SHORT, netns=why_not is None, timeout_s=1500, env=env,
                             extra_overrides=always)
    report = result.report()
    print(json.dumps({k: report[k] for k in ("network", "faults", "per_round", "wall_s")}, indent=1))
    assert result.completed, report["problems"]
    assert result.problems == [], result.problems
    assert result.leftovers == [] and result.namespaces_left == []
    faults = report["faults"]
    kinds = {f["kind"] for f in result.faults if f["fired_round"] is not None}
    assert {chaos.KILL} <= kinds and (why_not is not None or {chaos.NETEM, chaos.PARTITION} <= kinds), result.faults
    assert any(f["target"] == "cloud" and f["fired_round"] is not None for f in result.faults), result.faults
    assert faults["injected"] == faults["survived"] == faults["scheduled"], faults
    assert faults["recovered"] + faults["unobservable"] == faults["injected"], faults  # each hit machine came back
    assert [r["round"] for r in result.rounds] == [1, 2, 3]
    assert result.adapter["peft_lora_tensors"] >= result.adapter["tensors"] > 0
