"""The launcher's settings for a 2 GB and a 4 GB device, measured: peak memory and s/step.

What it measures
----------------
For simulated device facts (below), the DEFAULT federation config (``compose([])``:
SmolLM2-135M, LoRA r=8 on q,v, batch 4 x 256, fp32) goes through the launcher's
:func:`fedlora.deploy.device.pick_settings`, exactly as ``fedlora deploy check`` does on a
device. Then ONE END client's local training runs AT THOSE SETTINGS (fedlora's own
``load_base_model`` + ``wrap_lora`` + ``tokenize`` + ``train_local``, one optimiser step per
call, synthetic examples all exactly ``max_seq_len`` tokens long: the worst case the
picker plans for) in a FRESH subprocess, with the child machinery of
``bench/client_memory.py``. Per run it reports

* the measured peak RSS (``ru_maxrss`` of the child) against the picker's predicted peak,
  the predicted need (peak + safety margin, or the one-off bf16 conversion), the device's
  assumed MemAvailable and its MemTotal. **A measured peak above the prediction is a bug
  in the memory model** and is printed loudly (and listed under ``warnings`` in the JSON);
* seconds per local (optimiser) step, the first step apart, and CPU-seconds per step;
* the torch threads used: 1, and every count up to this machine's cores (2 here). A
  Raspberry Pi 4/5 has 4 cores; 4 threads cannot be measured on a 2-core machine.

Runs per device: a warm cache (the base already stored in the picked dtype) per thread
count, and, when the picked dtype is not float32, one ``first-load`` run in which this
process makes the bf16 copy of the base from the fp32 cache before training (what a
device does on its first round; the picker budgets for it).

The simulated devices (assumptions, stated in the JSON too)
-----------------------------------------------------------
MemTotal is what the kernel of 64-bit Raspberry Pi OS reports on a Raspberry Pi 4 of that
size (nominal RAM minus the firmware's GPU share and kernel reservations): 1,850 MiB of
2 GiB, 3,790 MiB of 4 GiB (typical values, the same as tests/test_deploy_device.py).
MemAvailable = MemTotal - the OS footprint of a headless Raspberry Pi OS Lite with SSH,
ASSUMED 250 MiB (a published ``top`` of 64-bit Bookworm Lite on a Pi Zero 2 W shows
417 - 292 = 125 MiB; a Pi 4 has more kernel structures and services, so twice that). A
desktop image uses several hundred MiB more: the ``sensitivity`` table shows what the
picker chooses for other footprints (pure, not measured). Architecture aarch64, 4 cores,
no AES instructions (Pi 4; the 4 GB row stands for a Pi 4 4 GB, a Pi 5 would have AES).

Run (takes the benchmark lock itself; ~10 min on 2 cores with SmolLM2):

    python bench/device_settings.py
    python bench/device_settings.py --model tiny --no-lock --steps 2 --threads 1 --out /tmp/ds.json   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_LOCK, REPO, RESULTS, bench_lock, maxrss_mib, provenance, table, write_json  # noqa: E402
from client_memory import MARK, phase_marker, report, spawn_child, synthetic_batches, timed_steps  # noqa: E402

OS_FOOTPRINT_MIB = 250.0  # assumed: headless 64-bit Raspberry Pi OS Lite + SSH on a Pi 4 (see the docstring)
DEVICES = {
    "2gb": {"label": "2 GB device (Raspberry Pi 4 2 GB, 64-bit Raspberry Pi OS Lite)", "mem_total_mib": 1850.0},
    "4gb": {"label": "4 GB device (Raspberry Pi 4 4 GB, 64-bit Raspberry Pi OS Lite)", "mem_total_mib": 3790.0},
}
PI_CORES = 4
SENSITIVITY_FOOTPRINTS = [125.0, 250.0, 400.0, 700.0]  # MiB; 700 ~ a desktop session (assumption)
DTYPE_COPY_SUFFIXES = ("-bfloat16", "-float16")


# ---------------------------------------------------------------------------- facts


def device_facts(name: str, os_footprint_mib: float = OS_FOOTPRINT_MIB):
    """The simulated facts of device ``name``: its MemTotal, MemAvailable = MemTotal - footprint,
    aarch64, 4 cores, no AES; Python and torch as here (the picker only checks they are usable)."""
    from fedlora.deploy.device import DeviceFacts

    total = DEVICES[name]["mem_total_mib"]
    try:
        torch_version: str | None = metadata.version("torch")  # not `import torch`: keeps this process small
    except metadata.PackageNotFoundError:
        torch_version = None
    return DeviceFacts(total, total - os_footprint_mib, "aarch64", platform.python_version(), torch_version, False, PI_CORES)


def default_config(model: str):
    from fedlora.config import compose

    return compose([] if model == "smollm2" else [f"model={model}"])


def settings_for(name: str, model: str, os_footprint_mib: float = OS_FOOTPRINT_MIB):
    from fedlora.deploy.device import pick_settings

    return pick_settings(default_config(model), device_facts(name, os_footprint_mib))


def sensitivity(model: str) -> list[dict]:
    """What the picker chooses for each device under other OS footprints (pure, nothing measured)."""
    from fedlora.deploy.device import DeviceError

    rows = []
    for name in DEVICES:
        for footprint in SENSITIVITY_FOOTPRINTS:
            row = {"device": name, "os_footprint_mib": footprint, "available_mib": DEVICES[name]["mem_total_mib"] - footprint}
            try:
                s = settings_for(name, model, footprint)
                row |= {"dtype": s.dtype, "gradient_checkpointing": s.gradient_checkpointing, "batch_size": s.batch_size,
                        "grad_accum": s.grad_accum, "max_seq_len": s.max_seq_len, "predicted_peak_mib": s.predicted_peak_mib,
                        "needed_mib": s.needed_mib}
            except DeviceError as exc:
                row["error"] = str(exc)
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------ child


def _first_load_cache() -> tuple[Path, list[str]]:
    """A temporary FEDLORA_CACHE holding links to the real cache's fp32 entries but none of
    its dtype copies, so this process makes the bf16 copy itself (a device's first round)."""
    real = Path(os.environ.get("FEDLORA_CACHE") or "~/.cache/fedlora").expanduser()
    entries = [p for p in real.iterdir() if p.is_dir() and not p.name.startswith(".")
               and not p.name.endswith(DTYPE_COPY_SUFFIXES)] if real.is_dir() else []
    if not entries:
        raise SystemExit(f"first-load run: no fp32 model in {real}; run a warm configuration first")
    tmp = Path(tempfile.mkdtemp(prefix="fedlora-first-load-"))
    for p in entries:
        (tmp / p.name).symlink_to(p)
    os.environ["FEDLORA_CACHE"] = str(tmp)
    return tmp, [p.name for p in entries]


def child(args: argparse.Namespace) -> None:
    phases, mark = phase_marker()
    mark("start")
    tmp_cache, linked = _first_load_cache() if args.first_load else (None, [])
    import torch

    torch.set_num_threads(args.threads)
    from fedlora.config import compose
    from fedlora.model import load_base_model, wrap_lora
    from fedlora.runs.progress import quiet_libraries
    from fedlora.train import train_local

    quiet_libraries()
    mark("imports")
    cfg = compose([*([] if args.model == "smollm2" else [f"model={args.model}"]), *json.loads(args.overrides),
                   "train.local_steps=1", "progress=false"])
    try:
        base, tokenizer = load_base_model(cfg.model)
        built = sorted(p.name for p in tmp_cache.iterdir() if not p.is_symlink()) if tmp_cache else []
    finally:
        if tmp_cache:
            shutil.rmtree(tmp_cache, ignore_errors=True)  # removes the links, not what they point to
    model = wrap_lora(base, cfg.lora, init_seed=cfg.seed)
    mark("model")
    t = cfg.train
    tokenized, shape, answer_tokens = synthetic_batches(tokenizer, t.batch_size * t.grad_accum * (args.steps + 1),
                                                        t.batch_size, t.max_seq_len)
    mark("data")

    def step(i: int) -> tuple[float, int, float]:
        res = train_local(model, tokenized, t, pad_id=tokenizer.pad_token_id, seed=i)
        return res.loss, res.tokens, res.seconds

    steps = timed_steps(args.steps, step)
    mark("train")
    report(phases, steps, shape, answer_tokens, model, first_load_built=built, first_load_linked=linked,
           base_dtype=str(next(base.parameters()).dtype).replace("torch.", ""),
           gradient_checkpointing=bool(t.gradient_checkpointing), grad_accum=t.grad_accum)


# ----------------------------------------------------------------------------- parent


def summarise_run(device: str, settings: dict, facts: dict, threads: int, cache: str, data: dict, wall: float | None) -> dict:
    """One run's figures against the picker's prediction and the device (median over steps 2+)."""
    steps = data["steps"]
    later = steps[1:] or steps
    peak = data["phases"]["train"]["maxrss_mib"]
    predicted, needed = settings["predicted_peak_mib"], settings["needed_mib"]
    return {
        "device": device, "threads": threads, "cache": cache,
        "peak_mib": peak,
        "maxrss_model_mib": data["phases"]["model"]["maxrss_mib"],
        "predicted_peak_mib": predicted,
        "needed_mib": needed,
        "available_mib": facts["mem_available_mib"],
        "mem_total_mib": facts["mem_total_mib"],
        "peak_minus_predicted_mib": peak - predicted,
        "headroom_to_available_mib": facts["mem_available_mib"] - peak,
        "within_prediction": peak <= predicted,
        "within_needed": peak <= needed,
        "within_available": peak <= facts["mem_available_mib"],
        "first_step_s": steps[0]["s"],
        "step_s": statistics.median(s["s"] for s in later),
        "cpu_s_per_step": statistics.median(s["cpu_s"] for s in later),
        "cpu_per_wall": statistics.median(s["cpu_s"] / max(1e-9, s["wall_s"]) for s in later),
        "torch_threads": data["torch_threads"],
        "first_loss": steps[0]["loss"],
        "subprocess_wall_s": wall,
        "raw": data,
    }


def check_run(r: dict) -> list[str]:
    """Loud findings for one run: the memory model under-predicted, or the device would not fit it."""
    where = f"{r['device']} threads={r['threads']} cache={r['cache']}"
    out = []
    if not r["within_prediction"]:
        out.append(f"MEMORY MODEL UNDER-PREDICTS: {where}: measured peak {r['peak_mib']:.0f} MiB > predicted "
                   f"{r['predicted_peak_mib']:.0f} MiB (+{r['peak_minus_predicted_mib']:.0f} MiB; "
                   f"{'inside' if r['within_needed'] else 'BEYOND'} the safety margin, needed {r['needed_mib']:.0f} MiB)")
    if not r["within_available"]:
        out.append(f"DOES NOT FIT: {where}: measured peak {r['peak_mib']:.0f} MiB > the device's available "
                   f"{r['available_mib']:.0f} MiB")
    return out


def child_command(args: argparse.Namespace, overrides: list[str], threads: int, first_load: bool) -> list[str]:
    return [sys.executable, __file__, "--child", "--model", args.model, "--overrides", json.dumps(overrides),
            "--threads", str(threads), "--steps", str(args.steps), *(["--first-load"] if first_load else [])]


# ---------------------------------------------------------------- CPU reference (--cpu-reference)

GEMM_SHAPE = (1024, 576, 1536)  # tokens of a 4 x 256 batch x SmolLM2's hidden x its MLP width


def child_gemm(threads: int, seconds: float = 2.0) -> None:
    """GFLOP/s (wall, and per CPU-second) of one (tokens x hidden) @ (hidden x mlp) matmul, fp32
    and bf16, on ``threads``."""
    import torch

    torch.set_num_threads(threads)
    m, k, n = GEMM_SHAPE
    out = {"threads": torch.get_num_threads(), "shape": [m, k, n]}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        for _ in range(3):
            a @ b  # warm-up
        count, t0, c0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < seconds:
            a @ b
            count += 1
        flop = 2 * m * k * n * count
        out[f"{name}_gflops"] = flop / (time.perf_counter() - t0) / 1e9
        # Per CPU-second of this process: robust to others time-slicing the CPU (not to SMT/cache sharing).
        out[f"{name}_gflop_per_cpu_s"] = flop / (time.process_time() - c0) / 1e9
    print(MARK + json.dumps(out), flush=True)


def child_convert() -> None:
    """Peak RSS of the first start on a device: the SmolLM2 GGUF -> fp32 safetensors conversion
    (into an empty temporary cache), then loading the result."""
    tmp = Path(tempfile.mkdtemp(prefix="fedlora-convert-"))
    os.environ["FEDLORA_CACHE"] = str(tmp)
    try:
        t0 = time.perf_counter()
        from fedlora.config import compose
        from fedlora.model import load_base_model

        load_base_model(compose([]).model)
        print(MARK + json.dumps({"maxrss_mib": maxrss_mib(), "seconds": time.perf_counter() - t0}), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cpu_reference(threads: list[int]) -> dict:
    """This machine's matmul throughput per thread count, and the GGUF conversion's peak."""
    out: dict = {"gemm": []}
    for n in threads:
        data, error, _ = spawn_child([sys.executable, __file__, "--child-gemm", "--threads", str(n)], n)
        out["gemm"].append(data if data is not None else {"threads": n, "error": error})
    data, error, wall = spawn_child([sys.executable, __file__, "--child-convert"], 1)
    out["gguf_conversion"] = data | {"subprocess_wall_s": wall} if data is not None else {"error": error}
    return out


def machine_info() -> dict:
    """``_common.machine()`` computed in a subprocess: it imports torch, and this process must
    stay small (its peak RSS is the floor of every child's ru_maxrss)."""
    code = "import json, sys; sys.path.insert(0, 'bench'); from _common import machine; print(json.dumps(machine()))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _picked(s: dict) -> str:
    """Short form of picked settings (a Settings dict or a sensitivity row), or the refusal."""
    if "error" in s:
        return "refused (the error is in the JSON)"
    return (f"{s['dtype']}{'+ckpt' if s['gradient_checkpointing'] else ''} b{s['batch_size']}x{s['grad_accum']} "
            f"L{s['max_seq_len']}")


def print_results(record: dict) -> None:
    headers = ["device", "settings", "threads", "cache", "load MiB", "peak MiB", "predicted MiB", "peak-pred", "needed MiB",
               "available MiB", "fits", "1st step s", "s/step", "CPU-s/step", "cpu/wall", "1st loss"]
    settings = {d["name"]: d["settings"] for d in record["devices"]}
    rows = []
    for r in record["runs"]:
        if "error" in r:
            continue
        rows.append([r["device"], _picked(settings[r["device"]]), r["torch_threads"], r["cache"], r["maxrss_model_mib"],
                     r["peak_mib"], r["predicted_peak_mib"], r["peak_minus_predicted_mib"], r["needed_mib"], r["available_mib"],
                     r["within_available"],
                     r["first_step_s"], r["step_s"], r["cpu_s_per_step"], r["cpu_per_wall"], f"{r['first_loss']:.4f}"])
    a = record["assumptions"]
    print(f"\nLauncher settings measured: {record['settings']['model']} (default config), "
          f"{record['settings']['steps']} optimiser steps per run, simulated aarch64 devices "
          f"(MemAvailable = MemTotal - {a['os_footprint_mib']:.0f} MiB assumed OS footprint); load, peak = child ru_maxrss "
          "after the model load (incl. making the bf16 copy on first-load runs) and after training; "
          "s/step, CPU-s/step, cpu/wall = median over steps 2+ (cpu/wall well below the thread count: "
          "others used the CPU during the run)")
    print(table(rows, headers, digits=1))
    for r in record["runs"]:
        if "error" in r:
            print(f"FAILED {r['device']} threads={r['threads']} cache={r['cache']}")
    print("\nPicker under other OS footprints (pure, not measured):")
    print(table([[x["device"], x["os_footprint_mib"], x["available_mib"], _picked(x), x.get("predicted_peak_mib"),
                  x.get("needed_mib")] for x in record["sensitivity"]],
                ["device", "OS footprint MiB", "available MiB", "picked", "predicted MiB", "needed MiB"], digits=0))
    for w in record["warnings"]:
        print(f"!!! {w}")
    if record["warnings"]:
        print(f"[device_settings] {len(record['warnings'])} warning(s): see '!!!' above", file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="fedlora model config group (smollm2; tiny for a smoke test)")
    p.add_argument("--devices", nargs="+", default=list(DEVICES), choices=list(DEVICES))
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help=f"torch thread counts (default 1 and this machine's {os.cpu_count()} cores)")
    p.add_argument("--steps", type=int, default=5, help="optimiser steps per run (the first reported apart)")
    p.add_argument("--repeats", type=int, default=1, help="runs per configuration (the peak varies run to run)")
    p.add_argument("--no-first-load", action="store_true", help="skip the runs that make the bf16 copy first")
    p.add_argument("--lock", default=DEFAULT_LOCK, help="benchmark lock file (default %(default)s)")
    p.add_argument("--no-lock", action="store_true", help="do not take the lock (smoke tests only)")
    p.add_argument("--out", default=str(RESULTS / "device_settings.json"))
    p.add_argument("--reprint", action="store_true", help="print the tables of --out again, measure nothing")
    p.add_argument("--cpu-reference", action="store_true",
                   help="measure only this machine's matmul GFLOP/s (fp32, bf16) per thread count and the peak of "
                        "the one-off GGUF -> fp32 conversion; writes --out (default device_settings_cpu.json)")
    # child-only
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--overrides", default="[]", help=argparse.SUPPRESS)
    p.add_argument("--first-load", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-gemm", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-convert", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.threads = args.threads[0] if args.threads else 1
        child(args)
        return
    if args.child_gemm:
        child_gemm(args.threads[0] if args.threads else 1)
        return
    if args.child_convert:
        child_convert()
        return
    if args.reprint:
        print_results(json.loads(Path(args.out).read_text()))
        return

    threads = args.threads or sorted({1, os.cpu_count() or 1})
    if args.cpu_reference:
        out = args.out if args.out != str(RESULTS / "device_settings.json") else str(RESULTS / "device_settings_cpu.json")
        info = machine_info()
        with bench_lock(None if args.no_lock else args.lock, what="device_settings"):
            info["loadavg_when_locked"] = [round(x, 2) for x in os.getloadavg()]
            ref = cpu_reference(threads)
            info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        write_json(out, {**provenance("device_settings --cpu-reference", info), **ref})
        print(json.dumps(ref, indent=2))
        print(f"\nwrote {out}")
        return
    devices = []
    for name in args.devices:
        facts = device_facts(name)
        s = settings_for(name, args.model)
        devices.append({"name": name, "label": DEVICES[name]["label"], "facts": asdict(facts), "settings": s.as_dict(),
                        "threads_on_device": PI_CORES})
    info = machine_info()
    runs = []
    with bench_lock(None if args.no_lock else args.lock, what="device_settings"):
        info["loadavg_when_locked"] = [round(x, 2) for x in os.getloadavg()]
        plan = [(d, n, "warm") for d in devices for n in threads]
        plan += [(d, max(threads), "first-load") for d in devices
                 if d["settings"]["dtype"] != "float32" and not args.no_first_load]
        for d, n, cache in plan:
            for rep in range(args.repeats):
                print(f"[device_settings] {args.model} {d['name']} threads={n} cache={cache} run {rep + 1}/{args.repeats}: "
                      + " ".join(d["settings"]["overrides"]), file=sys.stderr, flush=True)
                parent_peak = maxrss_mib()
                data, error, wall = spawn_child(child_command(args, d["settings"]["overrides"], n, cache == "first-load"), n)
                if data is None:
                    print(f"[device_settings]   FAILED:\n{error}", file=sys.stderr)
                    runs.append({"device": d["name"], "threads": n, "cache": cache, "error": error})
                    continue
                r = summarise_run(d["name"], d["settings"], d["facts"], n, cache, data, wall)
                r["repeat"], r["parent_maxrss_mib"] = rep, parent_peak
                r["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
                runs.append(r)
        info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]

    record = {
        **provenance("device_settings", info),
        "settings": {"model": args.model, "config": "fedlora.config.compose([])" + ("" if args.model == "smollm2" else
                                                                                   f" with model={args.model}"),
                     "steps": args.steps, "threads": threads, "repeats": args.repeats},
        "assumptions": {
            "os_footprint_mib": OS_FOOTPRINT_MIB,
            "mem_available": "MemTotal - os_footprint_mib (ASSUMED footprint of headless 64-bit Raspberry Pi OS Lite "
                             "with SSH on a Pi 4: twice the 125 MiB of a published Pi Zero 2 W Bookworm Lite `top`)",
            "mem_total": "typical MemTotal of 64-bit Raspberry Pi OS on a Pi 4 2 GB / 4 GB (nominal minus the GPU "
                         "share and kernel reservations); not read from a real Pi",
            "cores": f"{PI_CORES} on the simulated device; this machine has {os.cpu_count()}: "
                     f"threads measured here {threads}",
            "this_machine": "x86_64 CPU; memory is close to what an aarch64 device would use (same weights and "
                            "activations; the allocator and BLAS buffers differ); times are this machine's, not a Pi's",
        },
        "devices": devices,
        "runs": runs,
        "sensitivity": sensitivity(args.model),
    }
    record["warnings"] = [w for r in runs if "error" not in r for w in check_run(r)]
    out = write_json(args.out, record)  # before printing: a printing bug must not lose a long run
    print_results(record)
    print(f"\nwrote {out}")
    if any("error" in r for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
