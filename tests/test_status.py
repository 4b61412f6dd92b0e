"""`fedlora status`: a run directory read back as who joined, who dropped and why, and the run's state."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from fedlora import cli
from fedlora.roles.cloud import run_federation
from fedlora.roles.local import InProcessTransport
from fedlora.roles.neighbourhood import ClientReply
from fedlora.runs.status import FINISHED, INTERRUPTED, RUNNING, STALE_FLOOR_S, StatusError, read_records, render_text, run_status

OOM = "client error: out of memory"


# Six always-available laptops, all of them in each of two one-step rounds on short examples.
SIX_LAPTOPS = ("federation.num_clients=6", "federation.rounds=2", "federation.fraction=1.0", "federation.min_clients=1",
               "train.local_steps=1", "train.max_seq_len=64", "data.records_per_client=6", "data.max_eval_examples=4",
               "progress=false", "topology.profile_mix={rpi4: 0, phone: 0, car: 0, laptop: 1.0}",
               "topology.profiles.laptop.availability=1.0")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_config):
    """A flat run where clients 1 (error) and 3 (no reply) drop in round 2, and a secure run on
    the small6g tree where two clients miss the masked-input stage of round 2."""
    base = tmp_path_factory.mktemp("runs")

    def fault(server_round, reply):
        if server_round == 2 and reply.client == 1:
            return ClientReply(1, error=OOM)
        return None if server_round == 2 and reply.client == 3 else reply

    run_federation(tiny_config(*SIX_LAPTOPS, "topology=flat", "privacy=none"), base / "flat",
                   InProcessTransport(6, fault=fault))

    def stage_fault(server_round, stage, reply):
        return None if server_round == 2 and stage == "masked-input" and reply.client in (0, 1) else reply

    run_federation(tiny_config(*SIX_LAPTOPS, "topology=small6g", "federation.num_clients=8", "privacy=secagg_dp"),
                   base / "secure", InProcessTransport(8, stage_fault=stage_fault))
    return base


def copy_run(runs, name, tmp_path):
    return shutil.copytree(runs / name, tmp_path / name)


def test_flat_run_shows_who_joined_and_who_dropped_why(runs):
    s = run_status(runs / "flat")
    assert (s["state"], s["rounds_done"], s["rounds_total"]) == (FINISHED, 2, 2)
    r1, r2 = s["rounds"]
    assert r1["joined"] == list(range(6)) and r1["dropped"] == []
    assert r2["joined"] == [0, 2, 4, 5]
    assert r2["dropped_by_reason"][OOM] == [1]
    (silent,) = [reason for reason, clients in r2["dropped_by_reason"].items() if clients == [3]]
    assert "no reply" in silent
    assert r2["cells"] is None and r2["secure"] is None and r2["epsilon"] is None  # flat, no secagg, no DP
    assert r2["eval_loss"] is not None and r2["wall_s"] > 0
    assert s["clients"]["1"] == {"joined": [1], "dropped": {"2": OOM}}
    assert s["clients"]["0"] == {"joined": [1, 2], "dropped": {}}

    text = render_text(s)
    assert "state: finished -- 2/2 rounds" in text
    assert f"1: {OOM}" in text  # grouped reasons: clients, then why
    grid = {line.split()[0]: line.split()[1] for line in text.splitlines() if line[:6].strip().isdigit() and
            len(line.split()) == 4}
    assert grid["1"] == "+x" and grid["3"] == "+x" and grid["0"] == "++"
    assert "\x1b" not in text  # plain text, fine in a pipe


def test_secure_tree_run_shows_cells_their_session_outcome_and_epsilon(runs):
    s = run_status(runs / "secure")
    assert s["privacy"] == "secagg_dp" and s["topology"] == "tree"
    r1, r2 = s["rounds"]
    assert all(v["ok"] for v in r1["secure"].values()) and r1["dropped"] == []
    assert 0 < r1["epsilon"] < r2["epsilon"]  # the privacy spent grows with rounds
    record = read_records(runs / "secure")[0][1]
    for c, leaf in record["cell_of"].items():  # participants sit in the cell the record says
        assert int(c) in r2["cells"][leaf]["joined"]
    aborted = {cell: v["reason"] for cell, v in r2["secure"].items() if not v["ok"]}
    assert aborted, "with two clients missing masked-input, a two-client cell cannot finish its session"
    for cell, reason in aborted.items():
        assert r2["cells"][cell]["secure"] == {"ok": False, "reason": reason}
        assert r2["cells"][cell]["joined"] == []
    for d in r2["dropped"]:
        # every dropped client is placed, and one dropped with its aborted cell sits in that cell
        cell = next(cell for cell, v in r2["cells"].items() if d["client"] in v["dropped"])
        if d["reason"].startswith("cell aborted"):
            assert f"'{cell}'" in d["reason"]
    assert sorted(c for v in r2["cells"].values() for c in v["joined"] + v["dropped"]) == list(range(8))

    text = render_text(s)
    assert "round 2 by neighbourhood cell:" in text
    assert any(line.strip().startswith(cell) and "secure ABORTED" in line for cell in aborted for line in text.splitlines())
    assert "epsilon" in text and f"{r2['epsilon']:.2f}" in text
    assert "round 1 by neighbourhood cell:" in render_text(s, detail_round=1)
    with pytest.raises(StatusError, match="round 7 has no record"):
        render_text(s, detail_round=7)


def test_state_running_then_interrupted_and_resumable(runs, tmp_path):
    run = copy_run(runs, "flat", tmp_path)
    (run / "summary.json").unlink()
    lines = (run / "rounds.jsonl").read_text().splitlines(keepends=True)
    (run / "rounds.jsonl").write_text(lines[0])
    last_write = max((run / p).stat().st_mtime for p in ("rounds.jsonl", "config.yaml", "checkpoints/latest.json"))

    s = run_status(run, now=last_write + 5)
    assert (s["state"], s["rounds_done"], s["rounds_total"]) == (RUNNING, 1, 2)
    assert "round 2 in progress" in s["detail"]
    assert [r["round"] for r in s["rounds"]] == [1]

    s = run_status(run, now=last_write + STALE_FLOOR_S + 60)
    assert s["state"] == INTERRUPTED and s["checkpoint_round"] == 2  # the copy kept the round-2 checkpoint
    assert "resumable from the round-2 checkpoint" in s["detail"]
    shutil.rmtree(run / "checkpoints")
    s = run_status(run, now=last_write + STALE_FLOOR_S + 60)
    assert s["state"] == INTERRUPTED and "no checkpoint" in s["detail"]


def test_a_half_written_last_line_is_skipped_but_a_damaged_middle_line_is_an_error(runs, tmp_path):
    run = copy_run(runs, "flat", tmp_path)
    full = (run / "rounds.jsonl").read_text()
    first, second = full.splitlines(keepends=True)
    (run / "rounds.jsonl").write_text(first + second[: len(second) // 2])
    s = run_status(run)
    assert s["partial_last_line"] and [r["round"] for r in s["rounds"]] == [1]
    assert "still being written" in render_text(s)

    (run / "rounds.jsonl").write_text(second[: len(second) // 2] + "\n" + first)
    with pytest.raises(StatusError, match="line 1 is not JSON"):
        run_status(run)


def test_cli_json_and_clear_errors(runs, tmp_path, capsys):
    cli.main(["status", str(runs / "secure"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["state"] == FINISHED and [r["round"] for r in out["rounds"]] == [1, 2]
    assert out["rounds"][1]["dropped"] == run_status(runs / "secure")["rounds"][1]["dropped"]

    for target, message in ((tmp_path, "is not a run directory (no config.yaml)"),
                            (tmp_path / "missing", "does not exist")):
        with pytest.raises(SystemExit) as exc:
            cli.main(["status", str(target)])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


def test_follow_redraws_on_change_and_stops_when_the_run_finishes(runs, tmp_path):
    run = copy_run(runs, "flat", tmp_path)
    summary = (run / "summary.json").read_text()
    (run / "summary.json").unlink()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "fedlora.cli", "status", str(run), "--follow", "--interval", "0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    watchdog = threading.Timer(60, proc.kill)  # a follow that never stops fails the test, not the suite
    watchdog.start()
    try:
        seen = [proc.stdout.readline() for _ in range(2)]  # "run ...", "state: ..."
        time.sleep(0.5)  # several looks without a change: a pipe gets no second copy
        (run / "summary.json").write_text(summary)
        seen.append(proc.stdout.read())
        proc.wait(timeout=30)
    finally:
        watchdog.cancel()
        proc.kill()
    assert proc.returncode == 0, "".join(seen)
    states = [line for line in "".join(seen).splitlines() if line.startswith("state: ")]
    assert [line.split()[1] for line in states] == [RUNNING, FINISHED]
