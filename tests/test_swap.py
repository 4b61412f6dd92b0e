"""Adapter swapping: several adapters over one frozen base (PEFT multi-adapter), switched without
reloading it; `fedlora generate` / the chat / `fedlora eval` take the adapters to use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import fedlora.swap
from fedlora.config import compose
from fedlora.roles.cloud import run_federation
from fedlora.roles.local import InProcessTransport
from fedlora.swap import AdapterSet
from fedlora.usage import UserError

REPO = Path(__file__).resolve().parent.parent
FEDLORA = str(Path(sys.executable).parent / "fedlora")
IDS = torch.tensor([[1, 5, 9, 14, 2, 7]])


@pytest.fixture(scope="module")
def dpa_run(tmp_path_factory, model_cache):
    """A finished FedDPA run: the global adapter and each client's personal adapter, exported."""
    run_dir = tmp_path_factory.mktemp("dpa")
    cfg = compose(["model=tiny", f"model.cache_dir={model_cache}", "topology=flat", "federation.num_clients=3",
                   "federation.fraction=1.0", "federation.min_clients=1", "federation.rounds=2", "train.local_steps=3",
                   "train.lr=0.01", "data.records_per_client=12", "data.max_eval_examples=8", "progress=false",
                   "strategy=feddpa"])
    summary = run_federation(cfg, run_dir, InProcessTransport(3))
    return run_dir, summary, dict(os.environ, FEDLORA_CACHE=str(model_cache))


def alone(path: Path, *more: Path) -> torch.Tensor:
    """Logits of a fresh base with the adapter(s) at ``path`` (all active), loaded the plain PEFT way."""
    base_dir = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(path), adapter_name="a0")
    for i, extra in enumerate(more, 1):
        model.load_adapter(str(extra), adapter_name=f"a{i}")
    model.base_model.set_adapter([f"a{i}" for i in range(len(more) + 1)] if more else "a0")
    with torch.no_grad():
        return model(IDS).logits


def test_swapping_gives_each_adapters_own_output_without_reloading_the_base(dpa_run, tmp_path, monkeypatch):
    run_dir, _, _ = dpa_run
    calls = []
    real = fedlora.swap.load_base_model
    monkeypatch.setattr(fedlora.swap, "load_base_model", lambda cfg: calls.append(cfg) or real(cfg))
    named = {"global": run_dir / "adapter", "personal": run_dir / "personal" / "client-0",
             "other": run_dir / "personal" / "client-1"}
    # A cache of its own: this process's tiny base already carries the run's LoRA layers.
    adapters = AdapterSet(compose(["model=tiny", f"model.cache_dir={tmp_path}"]).model, named)
    outputs = {}
    for spec in ("global", "personal", "other", "global+personal", "global"):
        adapters.use(spec)
        with torch.no_grad():
            outputs.setdefault(spec, []).append(adapters.model(IDS).logits)
    assert len(calls) == 1  # one base for every adapter and every switch
    for name in named:
        torch.testing.assert_close(outputs[name][0], alone(named[name]))
    torch.testing.assert_close(outputs["global"][0], outputs["global"][1])  # back and forth: nothing leaks
    torch.testing.assert_close(outputs["global+personal"][0], alone(named["global"], named["personal"]))
    assert not torch.allclose(outputs["global+personal"][0], outputs["global"][0])
    with pytest.raises(UserError, match="no adapter 'nope'; loaded: global, personal, other"):
        adapters.use("global+nope")


def fedlora_cli(*args, env, stdin=None):
    return subprocess.run([FEDLORA, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, input=stdin)


def test_generate_and_the_chat_switch_adapters(dpa_run):
    run_dir, _, env = dpa_run
    personal = f"personal={run_dir / 'personal' / 'client-0'}"
    out = fedlora_cli("generate", str(run_dir), "--adapter", personal, "--prompt", "Resting HR 80 bpm?",
                      "--max-new-tokens", "3", env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[global] " in out.stdout and "[personal] " in out.stdout
    chat = "/adapters\nhello\n/adapter global+personal\nhello\n/adapter nope\n\n"
    out = fedlora_cli("generate", str(run_dir), "--adapter", personal, "--max-new-tokens", "3", env=env, stdin=chat)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[global] " in out.stdout and "using global+personal" in out.stdout and "[global+personal] " in out.stdout
    assert "no adapter 'nope'" in out.stdout
    bad = fedlora_cli("generate", str(run_dir), "--adapter", "x", "--prompt", "p", env=env)
    assert bad.returncode == 2 and "NAME=PATH" in bad.stderr


def test_eval_scores_each_adapter_on_a_clients_own_data(dpa_run):
    run_dir, summary, env = dpa_run
    out = fedlora_cli("eval", str(run_dir), "--adapter", f"personal={run_dir / 'personal' / 'client-0'}",
                      "--use", "global", "--use", "global+personal", "--client", "0", env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    row = summary["personal"]["clients"]["0"]
    assert set(result["adapters"]) == {"global", "global+personal"} and result["client"] == 0
    assert result["adapters"]["global"]["eval_loss"] == pytest.approx(row["global"], rel=1e-4)
    assert result["adapters"]["global+personal"]["eval_loss"] == pytest.approx(row["personal"], rel=1e-4)
