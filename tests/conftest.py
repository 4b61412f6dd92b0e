"""Fixtures shared by the tests: one tiny-model cache for the session, the tiny config with
overrides, and the environment for tests that start Flower processes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from fedlora.config import compose

BIN = Path(sys.executable).parent

# A federated run that takes seconds with the tiny model: two local steps on 128-token
# examples, twelve records per client, eight held-out examples, no progress bar.
SHORT_RUN = ("train.local_steps=2", "train.max_seq_len=128", "data.records_per_client=12", "data.max_eval_examples=8",
             "data.accuracy_examples=2",
             "progress=false")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """The converted-model cache of this test session (never ~/.cache): the tiny model and the
    extracted tokenizer are built once and shared by every test that loads them. The loaded
    base is then shared in-process too (fedlora.model caches it per cache root), which the
    round loop allows: it re-wraps the base and sets every LoRA tensor itself. test_model.py
    keeps a cache of its own, as it checks the cache and the plain base object directly."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def tiny_config(model_cache):
    """``tiny_config(*overrides)``: ``conf/`` composed with the tiny model from the session's
    cache and ``overrides`` (later ones win)."""

    def compose_tiny(*overrides: str):
        return compose(["model=tiny", f"model.cache_dir={model_cache}", *overrides])

    return compose_tiny


@pytest.fixture(scope="session")
def short_run(tiny_config):
    """``short_run(*overrides)``: :func:`tiny_config` for a short federated run (``SHORT_RUN``),
    then ``overrides``."""

    def compose_short(*overrides: str):
        return tiny_config(*SHORT_RUN, *overrides)

    return compose_short


@pytest.fixture(scope="module")
def env(model_cache):
    """Environment for Flower subprocesses: the session's model cache, no telemetry, no runtime
    dependency installation, and the venv's bin on PATH (`flwr run` and fedlora's tier
    commands launch `flower-superlink` / `flower-supernode` by name)."""
    e = dict(os.environ)
    e["FEDLORA_CACHE"] = str(model_cache)
    e["FLWR_TELEMETRY_ENABLED"] = "0"
    e["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    return e
