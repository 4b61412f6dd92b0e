"""The device check: facts parsing, the memory model's calibration, and the settings picked
for fake 4 GB / 2 GB / 1 GB devices (pure: no torch needed)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedlora.config import compose
from fedlora.deploy import device
from fedlora.deploy.device import (
    CALIBRATION_ROWS,
    MEASURED_PEAK_MIB,
    QUANT_CALIBRATION,
    QUANT_CALIBRATION_FILES,
    SAFETY_MIB,
    SMOLLM2_135M,
    DeviceError,
    DeviceFacts,
    conversion_peak_mib,
    cpu_has_aes,
    device_rank,
    lora_params,
    mask_prg,
    parse_meminfo,
    pick_settings,
    predict_peak_mib,
)

BENCH = Path(__file__).resolve().parent.parent / "bench" / "results" / "client_memory.json"

PI4_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU part\t: 0xd08
"""
PI5_CPUINFO = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid\n"
X86_CPUINFO = "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr pae sse sse2 ssse3 sse4_1 sse4_2 aes avx avx2\n"


def facts(available_mib: float, total_mib: float | None = None, arch="aarch64", aes=False, torch="2.13.0",
          python="3.11.2") -> DeviceFacts:
    return DeviceFacts(total_mib or available_mib + 250, available_mib, arch, python, torch, aes, 4)


def x86(available_mib: float, bnb=True) -> DeviceFacts:
    """A device that can run a quantised base (x86-64 with AVX2; bitsandbytes installed unless ``bnb=False``)."""
    return DeviceFacts(available_mib + 250, available_mib, "x86_64", "3.11.2", "2.13.0", True, 4, True, bnb)


@pytest.fixture(scope="module")
def smollm2():
    return compose([])  # the default model: SmolLM2-135M, LoRA r=8 on q,v, batch 4 x 256, fp32


def test_parse_facts():
    total, available = parse_meminfo("MemTotal:        1896744 kB\nMemFree:          911232 kB\nMemAvailable:    1634500 kB\n")
    assert total == pytest.approx(1896744 / 1024) and available == pytest.approx(1634500 / 1024)
    assert parse_meminfo("MemTotal: 1024 kB\nMemFree: 100 kB\nCached: 28 kB\n") == (1.0, 0.125)
    with pytest.raises(DeviceError, match="MemTotal"):
        parse_meminfo("nothing useful")
    assert not cpu_has_aes(PI4_CPUINFO)  # Cortex-A72: no ARMv8 crypto extensions
    assert cpu_has_aes(PI5_CPUINFO) and cpu_has_aes(X86_CPUINFO)
    assert cpu_has_aes("flags: fpu aes\n") and not cpu_has_aes("flags: fpu aesni_like vaes_x\n")


def test_mask_prg_follows_aes():
    assert mask_prg(facts(2000, aes=False)) == "chacha20"
    assert mask_prg(facts(2000, arch="x86_64", aes=True)) == "aes128-ctr"


def test_memory_model_is_calibrated_on_the_benchmark():
    """The model's constants are the benchmark's measured peaks, and it reproduces them."""
    rows = json.loads(BENCH.read_text())["results"]
    by_key = {(r["dtype"], r["threads"], r["variant"]): r for r in rows}
    for key, row in CALIBRATION_ROWS.items():
        assert MEASURED_PEAK_MIB[key] == by_key[row]["peak_mib"], row
        assert by_key[row]["raw"]["batch_shape"] == [4, 256]
        assert by_key[row]["raw"]["trainable_params"] == lora_params(SMOLLM2_135M, 8, ["q_proj", "v_proj"])
        assert by_key[row]["raw"]["params"] == SMOLLM2_135M.params
        predicted = predict_peak_mib(SMOLLM2_135M, dtype=key[0], checkpointing=key[1], batch=4, seq=256, r=8,
                                     targets=["q_proj", "v_proj"])
        assert predicted == pytest.approx(by_key[row]["peak_mib"], rel=1e-9)
    # Less work needs less memory; more needs more.
    kw = dict(dtype="bfloat16", checkpointing=True, r=8, targets=["q_proj", "v_proj"])
    assert predict_peak_mib(SMOLLM2_135M, batch=2, seq=256, **kw) < predict_peak_mib(SMOLLM2_135M, batch=4, seq=256, **kw)
    assert (predict_peak_mib(SMOLLM2_135M, batch=4, seq=512, **kw)
            > 2 * predict_peak_mib(SMOLLM2_135M, batch=4, seq=256, **kw) - 1000)


def test_4gb_device_trains_as_configured(smollm2):
    s = pick_settings(smollm2, facts(3480, 3790))  # Raspberry Pi 4 4 GB: ~3.4 GiB available
    assert (s.dtype, s.gradient_checkpointing, s.batch_size, s.max_seq_len, s.lora_r) == ("float32", False, 4, 256, 8)
    assert s.changed == [] and s.mask_prg == "chacha20"


def test_2gb_device_gets_bf16_and_checkpointing(smollm2):
    s = pick_settings(smollm2, facts(1640, 1850))  # Raspberry Pi 4 2 GB, 64-bit OS Lite
    assert (s.dtype, s.gradient_checkpointing, s.batch_size, s.max_seq_len) == ("bfloat16", True, 4, 256)
    assert s.needed_mib <= 1640 and s.lora_r == 8
    assert "model.dtype=bfloat16" in s.overrides() and "train.gradient_checkpointing=true" in s.overrides()


def test_tighter_device_lowers_batch_then_sequence_keeping_effective_batch(smollm2):
    s = pick_settings(smollm2, facts(1400))
    assert (s.dtype, s.gradient_checkpointing, s.batch_size, s.grad_accum, s.max_seq_len) == ("bfloat16", True, 2, 2, 256)
    # Below the one-off bf16 conversion peak (1.45 GB measured) only an fp32 base remains, with
    # checkpointing, batch 1 and shorter sequences.
    t = pick_settings(smollm2, facts(1300))
    assert (t.dtype, t.gradient_checkpointing, t.batch_size, t.grad_accum) == ("float32", True, 1, 4) and t.max_seq_len < 256
    for available in range(3500, 1100, -50):
        try:
            u = pick_settings(smollm2, facts(available))
        except DeviceError:
            assert available < 1300
            continue
        assert u.needed_mib <= available and u.batch_size * u.grad_accum == 4 and u.max_seq_len >= 64


def test_a_cached_bf16_copy_is_judged_by_its_training_peak_alone(smollm2):
    """Without the bf16 copy a 1,300 MiB device is below the one-off conversion peak (fp32 only);
    with it cached, bf16 + checkpointing at the full length fits."""
    assert pick_settings(smollm2, facts(1300)).dtype == "float32"
    s = pick_settings(smollm2, facts(1300), bf16_cached=True)
    assert (s.dtype, s.gradient_checkpointing, s.max_seq_len) == ("bfloat16", True, 256) and s.bf16_cached
    assert s.needed_mib <= 1300 < conversion_peak_mib(SMOLLM2_135M)
    roomy = pick_settings(smollm2, facts(3480), bf16_cached=True)
    assert dataclasses.replace(roomy, bf16_cached=False) == pick_settings(smollm2, facts(3480))  # fp32 there: unchanged


def test_the_quantised_bases_are_calibrated_on_the_benchmark():
    """QUANT_CALIBRATION is the benchmark's measured peaks (one harness, the bf16 copy cached), and the model
    reproduces each quantised base's measured excess over the bf16 base at the measured sizes."""
    kw = dict(r=8, targets=["q_proj", "v_proj"])
    results = BENCH.parent
    for (ckpt, tokens), row in QUANT_CALIBRATION.items():
        memory = json.loads((results / QUANT_CALIBRATION_FILES[(ckpt, tokens)]).read_text())["memory"]
        measured = {r["config"]: r for r in memory if "peak_mib" in r}
        suffix = ":ckpt" if ckpt else ""
        for how, peak in row.items():
            got = measured[("bf16" if how == "none" else how) + suffix]
            assert got["peak_mib"] == peak and got["raw"]["batch_shape"][0] * 256 == tokens, (ckpt, tokens, how)
            assert got["raw"]["batch_shape"][1] == 256 and got["maxrss_model_mib"] < peak
        bf16 = predict_peak_mib(SMOLLM2_135M, dtype="bfloat16", checkpointing=ckpt, batch=tokens // 256, seq=256, **kw)
        for how in ("int8", "nf4"):
            q = predict_peak_mib(SMOLLM2_135M, dtype="bfloat16", checkpointing=ckpt, batch=tokens // 256, seq=256,
                                 quantize=how, **kw)
            assert q - bf16 == pytest.approx(row[how] - row["none"], abs=1e-6)
            assert q > bf16  # SmolLM2-135M on CPU: a quantised base never peaks lower (bitsandbytes' buffers)
    # Between and beyond the measured sizes: interpolated, then held; more tokens never need less.
    for how in ("int8", "nf4"):
        peaks = [predict_peak_mib(SMOLLM2_135M, dtype="bfloat16", checkpointing=True, batch=b, seq=s, quantize=how, **kw)
                 for b, s in [(1, 64), (1, 128), (1, 256), (3, 256), (4, 256), (4, 512)]]
        assert peaks == sorted(peaks)


def _larger_model(tmp_path: Path) -> list[str]:
    """Overrides for a local model of SmolLM2-1.7B's shape (only its config.json: the launcher sizes it)."""
    folder = tmp_path / "smollm2-1.7b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "_name_or_path": "SmolLM2-1.7B-shape", "hidden_size": 2048, "num_hidden_layers": 24,
        "num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 8192, "vocab_size": 49152}))
    return ["model.source=local", f"model.path={folder}"]


def test_a_quantised_base_is_never_picked_for_smollm2_but_is_for_a_larger_model(smollm2, tmp_path):
    """SmolLM2-135M: the measured quantised bases never peak below bf16 with checkpointing, so where bf16 does
    not fit even at batch 1 the launcher cuts max_seq_len, never quantises. A model of SmolLM2-1.7B's shape:
    the smaller weights win, and where bf16 does not fit at batch 1 a quantised base is picked at that length
    before examples are truncated -- with the bf16 copy cached and bitsandbytes installed, else never."""
    for available in range(1700, 600, -10):
        try:
            assert pick_settings(smollm2, x86(available), bf16_cached=True).quantize == "none", available
        except DeviceError:
            pass
    larger = compose(_larger_model(tmp_path))
    shape = device.model_shape(larger.model)
    kw = dict(checkpointing=True, r=8, targets=["q_proj", "v_proj"])
    picked = {}
    for available in range(6000, 1000, -50):
        try:
            s = pick_settings(larger, x86(available), bf16_cached=True)
        except DeviceError:
            continue
        if s.quantize == "none":
            continue
        picked[available] = s
        bf16 = predict_peak_mib(shape, dtype="bfloat16", batch=1, seq=s.max_seq_len, **kw)
        assert s.needed_mib <= available < bf16 + SAFETY_MIB  # bf16 at this length does not fit, the quantised base does
        assert (s.dtype, s.gradient_checkpointing) == ("bfloat16", True)
        assert f"model.quantize={s.quantize}" in s.overrides() and f"model.quantize: none -> {s.quantize}" in s.changed
    assert picked, "a quantised base is never picked for the larger model"
    assert {s.quantize for s in picked.values()} == {"int8", "nf4"}  # int8 first, nf4 where int8 does not fit
    assert any(s.max_seq_len == 256 for s in picked.values())  # before max_seq_len is cut
    for available in picked:
        for kwargs in (dict(facts=x86(available)), dict(facts=x86(available, bnb=False), bf16_cached=True)):
            try:
                assert pick_settings(larger, **kwargs).quantize == "none"
            except DeviceError:
                pass


def test_the_device_trains_its_profiles_rank(tmp_path, capsys):
    cfg = compose(["model=tiny", "topology=flat", "federation.num_clients=1", "federation.min_clients=1",
                   "topology.profiles.phone.lora_r=2", "topology.profile_mix.phone=1", "topology.profile_mix.laptop=0",
                   "topology.profile_mix.rpi4=0", "topology.profile_mix.car=0"])
    assert (device_rank(cfg, "phone"), device_rank(cfg, "laptop"), device_rank(cfg, None)) == (2, cfg.lora.r, cfg.lora.r)
    from fedlora.cli import main
    from fedlora.deploy.plan import write_plan

    write_plan(cfg, tmp_path / "p")
    main(["deploy", "check", "--config", str(tmp_path / "p" / "end-0")])
    out = capsys.readouterr().out
    assert "LoRA r=2 (device profile phone's" in out and "bf16 copy cached" in out
    main(["deploy", "check", "--config", str(tmp_path / "p" / "end-0"), "--json"])
    assert json.loads(capsys.readouterr().out)["settings"]["lora_r"] == 2


def test_1gb_device_is_refused_with_a_clear_message(smollm2):
    with pytest.raises(DeviceError) as err:
        pick_settings(smollm2, facts(800, 1000))
    msg = str(err.value)
    assert "cannot train SmolLM2-135M" in msg and "800 MiB available" in msg and "batch 1" in msg


def test_platform_refusals(smollm2):
    with pytest.raises(DeviceError, match="64-bit Raspberry Pi OS"):
        pick_settings(smollm2, facts(3000, arch="armv7l"))
    with pytest.raises(DeviceError, match="torch is not installed"):
        pick_settings(smollm2, facts(3000, torch=None))
    with pytest.raises(DeviceError, match="Python 3.9"):
        pick_settings(smollm2, facts(3000, python="3.9.2"))


def test_rank_is_the_federations_and_counts(smollm2):
    big = compose(["lora=all_linear_r16"])
    a, b = pick_settings(smollm2, facts(3000)), pick_settings(big, facts(3000))
    assert (a.lora_r, b.lora_r) == (8, 16)
    assert lora_params(SMOLLM2_135M, 16, list(big.lora.target_modules)) > 10 * lora_params(SMOLLM2_135M, 8, ["q_proj", "v_proj"])


def test_a_configured_bf16_base_is_kept(smollm2):
    cfg = compose(["model.dtype=bfloat16", "train.gradient_checkpointing=true"])
    s = pick_settings(cfg, facts(8000))
    assert (s.dtype, s.gradient_checkpointing) == ("bfloat16", True) and s.changed == []


def test_local_model_without_config_json_is_a_clear_error(tmp_path):
    cfg = compose(["model=local", f"model.path={tmp_path}"])
    with pytest.raises(DeviceError, match="no config.json"):
        pick_settings(cfg, facts(8000))


def test_read_facts_on_this_machine():
    f = device.read_facts()
    assert f.mem_total_mib > 0 and 0 < f.mem_available_mib <= f.mem_total_mib and f.arch
    assert f.cpu_count == len(os.sched_getaffinity(0))


def test_a_device_counts_only_the_cores_it_may_run_on():
    """A cpuset or ``taskset`` limits the device's torch threads (one core: one thread, not one per core
    of the machine oversubscribing it)."""
    code = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); " \
           "from fedlora.deploy.device import usable_cpus; print(usable_cpus())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "1"


def test_cli_check_on_a_node_folder(tmp_path, capsys):
    from fedlora.cli import main
    from fedlora.deploy.plan import write_plan

    write_plan(compose(["model=tiny", "topology=flat", "federation.num_clients=1", "federation.min_clients=1"]), tmp_path / "p")
    main(["deploy", "check", "--config", str(tmp_path / "p" / "end-0"), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert doc["settings"]["model"] == "tiny" and doc["device"]["mask_prg"] in ("aes128-ctr", "chacha20")
    with pytest.raises(SystemExit) as exit_:
        main(["deploy", "check", "--config", str(tmp_path)])
    assert exit_.value.code == 2 and "not a node folder" in capsys.readouterr().err


def test_device_local_settings_change_how_a_device_trains_never_what(tmp_path):
    """What the launcher passes a device's ClientApp: only LOCAL_KEYS, applied to the
    round's settings; its own data file replaces the demo partition."""
    from fedlora.config import compose
    from fedlora.roles.device import DeviceLocal
    from fedlora.run_settings import resolve_run

    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "q", "input": "", "output": "a"}\n')
    local = DeviceLocal("model.dtype=bfloat16 train.gradient_checkpointing=true train.batch_size=2 "
                        "simulation.threads_per_client=4", str(data))
    federation = resolve_run(compose(["model=tiny"])).round_settings(1, {"proximal_mu": 0.0, "freeze_a": False})
    settings = local.apply(federation)
    assert (settings.model.dtype, settings.train.gradient_checkpointing, settings.train.batch_size) == ("bfloat16", True, 2)
    assert settings.threads == 4 and (settings.data.source, settings.data.path) == ("file", str(data))
    assert settings.lora == federation.lora and federation.model.dtype != "bfloat16"  # input untouched
    for bad in ["lora.r=4", "train.lr=1", "train.batch_size=0", "train.gradient_checkpointing=maybe", "model.dtype"]:
        with pytest.raises(ValueError, match="device setting"):
            DeviceLocal(bad).apply(federation)


def test_a_device_reads_the_federations_config_without_looking_for_its_files(tmp_path):
    from fedlora.config import ConfigError, compose
    from fedlora.deploy.plan import read_node, write_plan

    data = tmp_path / "federation.jsonl"
    data.write_text('{"instruction": "q", "input": "", "output": "a"}\n')
    write_plan(compose(["model=tiny", "topology=flat", "federation.num_clients=1", "federation.min_clients=1", "data=file",
                        f"data.path={data}"]), tmp_path / "p")
    data.unlink()  # the cloud's file: a device has its own data
    assert read_node(tmp_path / "p" / "end-0", "end").config().data.path == str(data)
    with pytest.raises(ConfigError, match="data.path"):
        read_node(tmp_path / "p" / "cloud", "cloud").config()
