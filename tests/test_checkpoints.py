"""Checkpoints that never corrupt (issue 15): a crash at any point of a checkpoint, round record or adapter
write leaves the previous checkpoint usable and resume working; a full disk is one clear error.

Three ways of crashing: a writer process SIGKILLed after seeded random delays (dozens of kill points
spread over whole checkpoint writes), a failure injected after each os-level call of one write (so
every step is a kill point for sure), and ENOSPC from the write itself.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedlora.runs import report

KILLS = int(os.environ.get("FEDLORA_CHECKPOINT_KILLS", "30"))


def arrays_of(server_round: int) -> dict[str, np.ndarray]:
    """What round ``server_round``'s checkpoint holds (a few MB: a write takes long enough to be cut)."""
    rng = np.random.default_rng(server_round)
    return {"adapter/a": rng.standard_normal((512, 512)).astype(np.float32),
            "adapter/b": np.full((256, 1024), server_round, np.float32), "strategy/step": np.array([server_round])}


def check_run_dir(run_dir: Path) -> int:
    """The round the run directory resumes after; fails unless its checkpoint is exactly that round's."""
    ckpt = report.load_checkpoint(run_dir)
    assert ckpt is not None
    done, arrays, meta = ckpt
    expected = arrays_of(done)
    assert sorted(arrays) == sorted(expected) and all(np.array_equal(arrays[k], expected[k]) for k in expected)
    assert meta["wall_s"] == float(done)
    rounds = [r["round"] for r in report.read_rounds(run_dir)]
    assert rounds == list(range(1, len(rounds) + 1)) and len(rounds) in (done, done + 1)
    return done


WRITER = """
import sys
from pathlib import Path
from fedlora.runs import report
sys.path.insert(0, {tests!r})
from test_checkpoints import arrays_of

run_dir = Path(sys.argv[1])
run_dir.mkdir(exist_ok=True)
ckpt = report.load_checkpoint(run_dir)
done = 0 if ckpt is None else ckpt[0]
report.truncate_rounds(run_dir, done)  # as the cloud's resume does
if ckpt is None:
    report.save_checkpoint(run_dir, 0, arrays_of(0), {{"wall_s": 0.0}})
print("ready", flush=True)
for server_round in range(done + 1, 10**6):
    report.append_round(run_dir, {{"round": server_round, "bytes": {{"up": {{}}, "down": {{}}}}, "dropped": []}})
    report.save_checkpoint(run_dir, server_round, arrays_of(server_round), {{"wall_s": float(server_round)}})
"""


def test_sigkill_at_random_points_of_checkpoint_writes_keeps_a_usable_checkpoint(tmp_path):
    """A process checkpoints rounds in a loop and is SIGKILLed after a random delay, then restarted from its
    checkpoint, KILLS times: every time the run directory holds a complete checkpoint of the last round
    or the one before, its rounds.jsonl reads, and the next process resumes from it."""
    run_dir = tmp_path / "run"
    code = WRITER.format(tests=str(Path(__file__).parent))
    rng = random.Random(15)
    resumed_after, progressed = [], 0
    for _ in range(KILLS):
        proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        done = check_run_dir(run_dir)
        progressed += bool(resumed_after) and done > resumed_after[-1]
        resumed_after.append(done)
    assert progressed >= KILLS // 3, f"the writer hardly got anywhere: {resumed_after}"
    assert len(list((run_dir / report.CHECKPOINTS).glob("round-*.npz"))) <= 3


def _counting(monkeypatch, fail_at: int | None):
    """Count os-level write steps (file opens for writing, writes, fsyncs, replaces, unlinks); raise a
    simulated crash at step ``fail_at``. -> the list of step names seen."""
    import builtins
    import io

    steps: list[str] = []

    class Crash(BaseException):  # not an Exception: nothing in the writer may catch and go on
        pass

    def step(name):
        steps.append(name)
        if fail_at is not None and len(steps) == fail_at:
            raise Crash(name)

    real_open, real_replace, real_fsync, real_unlink = builtins.open, os.replace, os.fsync, Path.unlink

    class Writer(io.FileIO):
        def write(self, data):
            step("write")
            return super().write(data)

    def fake_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wa"):
            step(f"open {Path(file).name}")
            if "b" in mode:
                return io.BufferedWriter(Writer(file, mode.replace("b", "")), buffer_size=1 << 16)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "replace", lambda a, b: (step(f"replace {Path(b).name}"), real_replace(a, b))[1])
    monkeypatch.setattr(os, "fsync", lambda fd: (step("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: (step(f"unlink {self.name}"),
                                                                         real_unlink(self, missing_ok=missing_ok))[1])
    return steps, Crash


def test_a_crash_after_any_os_level_step_of_a_round_leaves_the_previous_or_the_new_checkpoint(tmp_path, monkeypatch):
    base = tmp_path / "base"
    for r in range(3):  # rounds 0..2 checkpointed, rounds 1..2 recorded
        if r:
            report.append_round(base, {"round": r})
        report.save_checkpoint(base, r, arrays_of(r), {"wall_s": float(r)})

    def one_round(run_dir):
        report.append_round(run_dir, {"round": 3})
        report.save_checkpoint(run_dir, 3, arrays_of(3), {"wall_s": 3.0})

    import shutil

    with monkeypatch.context() as m:
        steps, _ = _counting(m, None)
        shutil.copytree(base, tmp_path / "count")
        steps.clear()
        one_round(tmp_path / "count")
    total = len(steps)
    assert total > 10, steps
    seen = set()
    for k in range(1, total + 1):
        run_dir = tmp_path / f"k{k}"
        shutil.copytree(base, run_dir)
        with monkeypatch.context() as m:
            steps, crash = _counting(m, k)
            with pytest.raises(crash):
                one_round(run_dir)
        seen.add(check_run_dir(run_dir))
    assert seen == {2, 3}, f"{total} kill points gave the checkpoints of rounds {seen}"


def test_a_full_disk_is_one_clear_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    report.append_round(run_dir, {"round": 1})
    report.save_checkpoint(run_dir, 1, arrays_of(1), {"wall_s": 1.0})
    before = (run_dir / report.ROUNDS).read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(np, "savez", full)
        with pytest.raises(report.CheckpointError) as err:
            report.save_checkpoint(run_dir, 2, arrays_of(2), {"wall_s": 2.0})
    message = str(err.value)
    assert "\n" not in message and "disk is full" in message and "round 1" in message and "fedlora resume" in message
    assert check_run_dir(run_dir) == 1 and not list((run_dir / report.CHECKPOINTS).glob("*.tmp"))

    class Full:  # the round's record: a half-written line is cut back off
        def __init__(self, f):
            self.f = f

        def write(self, text):
            self.f.write(text[:7])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    import builtins

    real_open = builtins.open
    with monkeypatch.context() as m:
        m.setattr(builtins, "open", lambda f, mode="r", *a, **k: Full(real_open(f, mode, *a, **k)) if "a" in mode
                  else real_open(f, mode, *a, **k))
        with pytest.raises(report.CheckpointError, match="disk is full"):
            report.append_round(run_dir, {"round": 2})
    assert (run_dir / report.ROUNDS).read_bytes() == before


def test_a_torn_last_round_record_does_not_stop_resume_or_status(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    report.append_round(run_dir, {"round": 1})
    with open(run_dir / report.ROUNDS, "a") as f:
        f.write('{"round": 2, "byt')  # killed mid-append
    assert report.read_rounds(run_dir) == [{"round": 1}]
    report.truncate_rounds(run_dir, 1)
    assert (run_dir / report.ROUNDS).read_text() == json.dumps({"round": 1}) + "\n"


def test_a_crash_while_the_adapter_is_exported_keeps_the_previous_adapter(tmp_path, tiny_config, monkeypatch):
    """The PEFT adapter is written into a sibling folder and renamed: a crash mid-save leaves the old one."""
    from fedlora import adapters
    from fedlora.roles.device import lora_model

    cfg = tiny_config()
    model, _ = lora_model(cfg, freeze_a=False)
    state = adapters.get_state(model, trainable_only=True)
    out = tmp_path / "adapter"
    adapters.export_peft(model, state, out, "base")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = type(model).save_pretrained

    def crash(self, path, **kwargs):
        real(self, path, **kwargs)
        (Path(path) / "adapter_model.safetensors").write_bytes(b"torn")
        raise KeyboardInterrupt  # as a kill would stop it mid-write

    with monkeypatch.context() as m:
        m.setattr(type(model), "save_pretrained", crash)
        with pytest.raises(KeyboardInterrupt):
            adapters.export_peft(model, {k: v + 1 for k, v in state.items()}, out, "base")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    adapters.export_peft(model, {k: v + 1 for k, v in state.items()}, out, "base")  # and the next export replaces it
    assert {p.name: p.read_bytes() for p in out.iterdir()} != before


@pytest.mark.slow
def test_a_run_killed_mid_checkpoint_with_a_torn_record_resumes_to_the_uninterrupted_adapter(tmp_path, short_run,
                                                                                             monkeypatch):
    """A real (tiny) federation whose cloud dies while writing round 2's checkpoint -- after the round's npz,
    before latest.json, with half of round 2's record in rounds.jsonl: resume redoes round 2 and ends with
    the adapter of the run that never crashed."""
    from safetensors.numpy import load_file

    from fedlora.roles.cloud import run_federation
    from fedlora.roles.local import InProcessTransport

    cfg = short_run("federation.num_clients=4", "federation.rounds=2", "topology=flat", "privacy=none")
    run_federation(cfg, tmp_path / "full", InProcessTransport(4))
    real_write_json = report.write_json

    def die_before_round_2_is_committed(path, obj):
        if path.name == "latest.json" and obj["round"] == 2:
            with open(path.parents[1] / report.ROUNDS, "r+") as f:  # the record's last bytes never reached the disk
                f.truncate(len(f.read()) - 20)
            raise KeyboardInterrupt
        real_write_json(path, obj)

    with monkeypatch.context() as m:
        m.setattr(report, "write_json", die_before_round_2_is_committed)
        with pytest.raises(KeyboardInterrupt):
            run_federation(cfg, tmp_path / "broken", InProcessTransport(4))
    assert report.load_checkpoint(tmp_path / "broken")[0] == 1
    run_federation(cfg, tmp_path / "broken", InProcessTransport(4), resume=True)
    a, b = (load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors")) for d in ("full", "broken"))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert [r["round"] for r in report.read_rounds(tmp_path / "broken")] == [1, 2]
