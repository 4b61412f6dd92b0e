"""bench/device_settings.py: the simulated devices, the comparison of a measured peak with the
picker's prediction, the first-load cache, and a smoke run with the tiny model (~10 s).

The smoke run checks that every measured/predicted field is there and says what it should
(the peak is the child's ru_maxrss after training, the prediction is pick_settings' own, the
flags follow from the numbers); the timings themselves are the benchmark's business.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedlora.config import compose
from fedlora.deploy.device import DeviceFacts, pick_settings

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
# A bench script that cannot be imported is a broken benchmark: an error here, never a skip.
import device_settings as ds  # noqa: E402 (importable only once bench/ is on sys.path)

RESULTS = BENCH / "results" / "device_settings.json"
SETTING_KEYS = ("dtype", "gradient_checkpointing", "batch_size", "grad_accum", "max_seq_len", "lora_r")


def test_simulated_devices_are_stated_assumptions():
    for name, spec in ds.DEVICES.items():
        f = ds.device_facts(name)
        assert f.mem_total_mib == spec["mem_total_mib"]
        assert f.mem_available_mib == spec["mem_total_mib"] - ds.OS_FOOTPRINT_MIB
        assert (f.arch, f.aes, f.cpu_count) == ("aarch64", False, 4)
    assert ds.device_facts("2gb", 700).mem_available_mib == ds.DEVICES["2gb"]["mem_total_mib"] - 700


def test_settings_are_the_pickers_for_the_default_config():
    for name in ds.DEVICES:
        assert ds.settings_for(name, "smollm2") == pick_settings(compose([]), ds.device_facts(name))
    small, big = ds.settings_for("2gb", "smollm2"), ds.settings_for("4gb", "smollm2")
    assert (small.dtype, small.gradient_checkpointing) == ("bfloat16", True)
    assert (big.dtype, big.gradient_checkpointing) == ("float32", False)


def _fake_child(peak: float, model_peak: float = 500.0) -> dict:
    steps = [{"s": 3.0, "wall_s": 3.1, "cpu_s": 3.0, "loss": 1.5, "tokens": 800, "maxrss_mib": peak},
             {"s": 2.0, "wall_s": 2.0, "cpu_s": 4.0, "loss": 1.4, "tokens": 800, "maxrss_mib": peak},
             {"s": 2.2, "wall_s": 2.2, "cpu_s": 4.2, "loss": 1.3, "tokens": 800, "maxrss_mib": peak}]
    return {"phases": {"model": {"maxrss_mib": model_peak}, "train": {"maxrss_mib": peak}}, "steps": steps,
            "torch_threads": 2}


def test_a_peak_above_the_prediction_or_the_device_is_reported():
    settings = {"predicted_peak_mib": 1000.0, "needed_mib": 1256.0}
    facts = {"mem_available_mib": 1600.0, "mem_total_mib": 1850.0}
    ok = ds.summarise_run("2gb", settings, facts, 2, "warm", _fake_child(900.0), 10.0)
    assert (ok["within_prediction"], ok["within_needed"], ok["within_available"]) == (True, True, True)
    assert ok["peak_minus_predicted_mib"] == -100.0 and ok["headroom_to_available_mib"] == 700.0
    assert (ok["first_step_s"], ok["step_s"], ok["cpu_s_per_step"]) == (3.0, 2.1, 4.1)
    assert ds.check_run(ok) == []
    over = ds.summarise_run("2gb", settings, facts, 2, "warm", _fake_child(1100.0), 10.0)
    [msg] = ds.check_run(over)
    assert "UNDER-PREDICTS" in msg and "inside the safety margin" in msg and "+100 MiB" in msg
    beyond = ds.summarise_run("2gb", settings, facts, 2, "warm", _fake_child(1700.0), 10.0)
    msgs = ds.check_run(beyond)
    assert len(msgs) == 2 and "BEYOND" in msgs[0] and "DOES NOT FIT" in msgs[1]


def test_first_load_cache_links_the_fp32_models_but_no_dtype_copy(tmp_path, monkeypatch):
    real = tmp_path / "cache"
    for name in ("smollm2-135m-instruct", "smollm2-135m-instruct-bfloat16", "smollm2-tokenizer"):
        (real / name).mkdir(parents=True)
    (real / ".smollm2-135m-instruct.lock").touch()
    monkeypatch.setenv("FEDLORA_CACHE", str(real))
    tmp, linked = ds._first_load_cache()
    try:
        assert sorted(linked) == ["smollm2-135m-instruct", "smollm2-tokenizer"]
        assert sorted(p.name for p in tmp.iterdir()) == sorted(linked)
        assert all(p.is_symlink() and p.resolve() == (real / p.name).resolve() for p in tmp.iterdir())
        assert os.environ["FEDLORA_CACHE"] == str(tmp)
    finally:
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "empty"))
    with pytest.raises(SystemExit, match="no fp32 model"):
        ds._first_load_cache()


def _check_record(record: dict) -> None:
    """Every run's fields are there and consistent with the picker and the child's raw report."""
    devices = {d["name"]: d for d in record["devices"]}
    assert record["runs"] and not any("error" in r for r in record["runs"])
    for r in record["runs"]:
        d = devices[r["device"]]
        s, f, raw = d["settings"], d["facts"], r["raw"]
        assert r["peak_mib"] == raw["phases"]["train"]["maxrss_mib"] > raw["phases"]["imports"]["maxrss_mib"] > 0
        assert r["predicted_peak_mib"] == s["predicted_peak_mib"] > 0 and r["needed_mib"] == s["needed_mib"]
        assert r["available_mib"] == f["mem_available_mib"] and r["mem_total_mib"] == f["mem_total_mib"]
        assert r["peak_minus_predicted_mib"] == pytest.approx(r["peak_mib"] - r["predicted_peak_mib"])
        assert r["within_prediction"] == (r["peak_mib"] <= r["predicted_peak_mib"])
        assert r["within_needed"] == (r["peak_mib"] <= r["needed_mib"])
        assert r["within_available"] == (r["peak_mib"] <= r["available_mib"])
        assert r["torch_threads"] == r["threads"] == raw["torch_threads"]
        assert r["first_step_s"] > 0 and r["step_s"] > 0 and r["cpu_s_per_step"] > 0
        assert len(raw["steps"]) == record["settings"]["steps"]
        # The child trained at the picked settings.
        assert raw["batch_shape"] == [s["batch_size"], s["max_seq_len"]]
        assert raw["base_dtype"] == s["dtype"] and raw["gradient_checkpointing"] == s["gradient_checkpointing"]
        assert raw["grad_accum"] == s["grad_accum"]
        assert (r["cache"] == "first-load") == bool(raw["first_load_built"])
    assert record["warnings"] == [w for r in record["runs"] for w in ds.check_run(r)]


def test_smoke_run_with_the_tiny_model(tmp_path):
    out = tmp_path / "ds.json"
    proc = subprocess.run([sys.executable, str(BENCH / "device_settings.py"), "--model", "tiny", "--no-lock",
                           "--steps", "2", "--threads", "1", "--devices", "2gb", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["benchmark"] == "device_settings" and record["settings"]["model"] == "tiny"
    [device] = record["devices"]
    expected = pick_settings(compose(["model=tiny"]), DeviceFacts(**device["facts"])).as_dict()
    assert device["settings"] == expected
    _check_record(record)
    assert "predicted MiB" in proc.stdout and "peak MiB" in proc.stdout


@pytest.mark.skipif(not RESULTS.is_file(), reason="no recorded results")
def test_recorded_results_match_todays_picker():
    """The committed SmolLM2 numbers were measured at the settings the picker chooses now;
    when the memory model changes the choice, re-run bench/device_settings.py."""
    record = json.loads(RESULTS.read_text())
    assert record["settings"]["model"] == "smollm2"
    for d in record["devices"]:
        now = pick_settings(compose([]), DeviceFacts(**d["facts"])).as_dict()
        assert {k: d["settings"][k] for k in SETTING_KEYS} == {k: now[k] for k in SETTING_KEYS}, (
            f"{d['name']}: the picker now chooses differently from what was measured; re-run bench/device_settings.py")
    _check_record(record)
