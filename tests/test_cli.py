"""`fedlora eval` and `fedlora generate` on a finished run, and CLI usage errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedlora.config import compose
from fedlora.roles.cloud import run_federation
from fedlora.roles.local import InProcessTransport

REPO = Path(__file__).resolve().parent.parent
FEDLORA = str(Path(sys.executable).parent / "fedlora")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, model_cache):
    cache = str(model_cache)
    os.environ["FEDLORA_CACHE"] = cache
    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose(["model=tiny", "topology=flat", "federation.num_clients=3", "federation.rounds=2", "train.local_steps=3",
                   "data.records_per_client=12", "data.max_eval_examples=8", "progress=false", "train.lr=0.01"])
    summary = run_federation(cfg, run_dir, InProcessTransport(3))
    return run_dir, summary, dict(os.environ, FEDLORA_CACHE=cache)


def fedlora(*args, env):
    return subprocess.run([FEDLORA, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_eval_reports_the_runs_held_out_loss(finished_run):
    run_dir, summary, env = finished_run
    out = fedlora("eval", str(run_dir), env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["eval_loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-4)
    assert result["base_eval_loss"] == pytest.approx(summary["base_eval_loss"], rel=1e-4)
    assert result["perplexity"] < result["base_perplexity"]
    # An adapter directory works too, and overrides change the evaluation data.
    out = fedlora("eval", str(run_dir / "adapter"), "model=tiny", "data.max_eval_examples=2", env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["examples"] == 2


def test_generate_answers_a_prompt(finished_run):
    run_dir, _, env = finished_run
    out = fedlora("generate", str(run_dir), "--prompt", "My watch: resting HR 80 bpm. Advice?", "--max-new-tokens", "5",
                  "--compare-base", env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[adapter]" in out.stdout and "[base]" in out.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (["eval", "/no/such/run"], "neither a run directory nor a PEFT adapter"),
        (["resume", "/no/such/run"], "not a run directory"),
        (["bogus"], "unknown command"),
    ],
)
def test_usage_errors(args, needle, finished_run):
    out = fedlora(*args, env=finished_run[2])
    assert out.returncode == 2
    assert needle in out.stderr and "Traceback" not in out.stderr
