"""Fixtures shared by the tests that start Flower processes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Environment for Flower subprocesses: a private model cache, no telemetry, no runtime
    dependency installation, and the venv's bin on PATH (`flwr run` and fedlora's tier
    commands launch `flower-superlink` / `flower-supernode` by name)."""
    e = dict(os.environ)
    e["FEDLORA_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    e["FLWR_TELEMETRY_ENABLED"] = "0"
    e["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    return e
