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


HELP = [[], ["run"], ["resume"], ["status"], ["eval"], ["generate"], ["deploy"], ["deploy", "plan"], ["deploy", "check"],
        ["cloud"], ["edge"], ["end"], ["client"]]


@pytest.mark.parametrize("command", HELP, ids=lambda c: " ".join(c) or "fedlora")
def test_every_command_prints_its_help(command):
    out = fedlora(*command, "--help", env=os.environ)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() and "error" not in out.stderr.lower()
    if command == ["deploy"]:
        assert "fedlora deploy plan" in out.stdout and "fedlora deploy check" in out.stdout


def test_the_deploy_subcommands_do_not_import_the_fedlora_command():
    code = "import sys, fedlora.deploy.cli; assert 'fedlora.cli' not in sys.modules, 'import cycle'"
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def _files(run_dir: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.stat().st_size) for p in run_dir.rglob("*") if p.is_file()}


def test_resume_of_a_finished_run_says_so_and_touches_nothing(finished_run, tmp_path, monkeypatch, capsys):
    import shutil

    import server.simulation
    from fedlora import cli
    from fedlora.config import load_yaml, save_yaml

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run[0], run_dir)
    before = _files(run_dir)
    resumed = []
    monkeypatch.setattr(server.simulation, "simulate", lambda cfg, run_dir, resume=False: resumed.append((cfg, resume)))
    cli.main(["resume", str(run_dir)])
    out = capsys.readouterr().out
    assert not resumed and f"{run_dir} is finished: 2 of its 2 rounds done" in out and "nothing to resume" in out
    assert _files(run_dir) == before
    # A config asking for more rounds than are done still resumes.
    cfg = load_yaml(run_dir / "config.yaml")
    cfg.federation.rounds = 3
    save_yaml(cfg, run_dir / "config.yaml")
    cli.main(["resume", str(run_dir)])
    assert [(c.federation.rounds, resume) for c, resume in resumed] == [(3, True)]


@pytest.mark.parametrize(
    "args,needles",
    [
        (["eval", "{run}", "lora.r=4"], ["cannot apply lora.r=4", "the adapter fixes its LoRA settings (r=8"]),
        (["eval", "{run}", "data.max_eval_examples=2", "federation.rounds=9", "model=smollm2"],
         ["federation.rounds=9: fedlora eval does not read federation.rounds", "model=smollm2: the run fixes the model"]),
        (["eval", "{run}/adapter", "lora=all_linear_r16"], ["lora=all_linear_r16: the adapter fixes"]),
        (["generate", "{run}", "--prompt", "hi", "data.max_eval_examples=2"],
         ["fedlora generate cannot apply data.max_eval_examples=2"]),
    ],
)
def test_eval_and_generate_refuse_an_override_that_cannot_apply(args, needles, finished_run, capsys):
    from fedlora import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main([a.format(run=finished_run[0]) for a in args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and all(n in err for n in needles), err


# `fedlora run` with the simulation replaced by one that records the job's config and writes its summary.
FAKE_RUN = """
import json, sys
from pathlib import Path
import server.simulation

def simulate(cfg, run_dir, resume=False):
    print("trained lora.r=%d" % cfg.lora.r, flush=True)
    summary = {"final_eval_loss": 1.0, "wall_s": 0.0, "total_bytes": {"all": 0}}
    (Path(run_dir) / "summary.json").write_text(json.dumps(summary))
    return summary

server.simulation.simulate = simulate
from fedlora.cli import main
main(sys.argv[1:])
"""


def test_a_sweep_with_bad_jobs_starts_none_and_names_every_bad_one(tmp_path):
    def sweep(*values):
        return subprocess.run([sys.executable, "-c", FAKE_RUN, "run", "--multirun", "model=tiny", *values,
                               f"hydra.sweep.dir={tmp_path / 'sweep'}"], check=False, cwd=REPO, capture_output=True,
                              text=True, timeout=300)

    out = sweep("lora.r=4,-1,0", "strategy=fedavg,fedbogus")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "trained" not in out.stdout and not (tmp_path / "sweep").exists()
    assert "5 of the sweep's 6 jobs cannot run; none was started" in out.stderr
    assert "#2 model=tiny lora.r=-1 strategy=fedavg: lora.r=-1 must be > 0" in out.stderr
    assert "#4 model=tiny lora.r=0 strategy=fedavg: lora.r=0 must be > 0" in out.stderr
    assert "#1 model=tiny lora.r=4 strategy=fedbogus: In 'config': Could not find 'strategy/fedbogus'" in out.stderr
    # A job whose settings are fine one by one but whose secure sums could overflow is caught too.
    out = sweep("privacy=secagg", "privacy.bits=24", "federation.num_clients=8,300")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "1 of the sweep's 2 jobs cannot run; none was started" in out.stderr
    assert "federation.num_clients=300: privacy.bits=24 with privacy.max_examples=64" in out.stderr
    # A sweep of good jobs runs them all.
    out = sweep("lora.r=4,8")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "trained lora.r=4" in out.stdout and "trained lora.r=8" in out.stdout
    assert (tmp_path / "sweep" / "sweep_summary.csv").read_text().count("\n") == 3


def _eval_json(capsys, *args) -> dict:
    from fedlora import cli

    cli.main(["eval", *map(str, args)])
    return json.loads(capsys.readouterr().out)


def test_eval_scores_a_file_it_is_given_whole_and_says_what_it_scored(finished_run, tmp_path, capsys):
    run_dir, summary, _ = finished_run
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"instruction": f"What is {i} + {i}?", "output": f"It is {2 * i}."}) + "\n"
                             for i in range(7)))
    for given in (["data=file", f"data.path={other}"], [f"data.path={other}"], [f"data.path={other}", "data=file"]):
        result = _eval_json(capsys, run_dir, *given)
        assert result["examples"] == 7 and result["scored"].startswith(f"all 7 usable rows of {other}"), (given, result)
    result = _eval_json(capsys, run_dir, f"data.path={other}", "data.max_eval_examples=3")
    assert result["examples"] == 3 and result["scored"].startswith("the first 3 of the 7 usable rows")
    # Without a file: the run's held-out examples, as the run scored them.
    result = _eval_json(capsys, run_dir)
    assert result["scored"].startswith("the run's held-out examples")
    assert result["eval_loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-4)


@pytest.mark.parametrize(
    "given,needle",
    [
        (["data=nosuch"], "data=nosuch: there is no data config 'nosuch' (conf/data/ has: file, medical, wearable)"),
        (["data.pth=x.jsonl"], "data.pth"),
        (["data=file", "data.path=/no/such/file.jsonl"], "/no/such/file.jsonl"),
        (["data=file"], "data.path must name a dataset file"),
        (["--task", "choice"], "--task choice needs --file"),
    ],
)
def test_eval_a_bad_override_is_one_clear_line(given, needle, finished_run, capsys):
    from fedlora import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["eval", str(finished_run[0]), *given])
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("fedlora: error:"))
    assert exit_.value.code == 2 and needle in line and "Traceback" not in err, err


def test_eval_task_accuracy_base_and_adapter(finished_run, tmp_path, capsys):
    run_dir, summary, _ = finished_run
    labelled = tmp_path / "labelled.jsonl"
    rows = [{"question": f"Is {i} even?", "context": "Numbers.", "label": "yes" if i % 2 == 0 else "no"} for i in range(5)]
    rows.append({"question": "Which is a city?", "options": ["Paris", "Blue"], "answer": "Paris"})
    labelled.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = _eval_json(capsys, run_dir, "--task", "choice", "--file", labelled)
    assert result["task"] == "choice" and result["examples"] == 6 and "log-likelihood" in result["method"]
    for scores in (result["base"], result["tuned"]):
        assert {"acc", "acc_norm", "macro_f1"} <= scores.keys() and 0 <= scores["acc"] <= 1
        assert scores["acc"] * 6 == pytest.approx(round(scores["acc"] * 6))
    result = _eval_json(capsys, run_dir, "--task", "advice", "--limit", "2")
    assert result["examples"] == 2 and {"exact_match", "field_accuracy", "all_fields"} <= result["tuned"].keys()
    # The run itself reported the advice accuracy of its base and adapter on its held-out questions.
    accuracy = summary["advice_accuracy"]
    assert accuracy["base"]["examples"] == accuracy["adapter"]["examples"] > 0
    assert 0 <= accuracy["adapter"]["field_accuracy"] <= 1 and accuracy["seconds"] > 0
