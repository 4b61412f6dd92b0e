"""The repository passes `ruff check` as configured in pyproject.toml [tool.ruff]."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_ruff_check_finds_nothing():
    if importlib.util.find_spec("ruff") is None:
        # ruff is in the `test` extra that scripts/setup.sh installs: a skip would hide a broken install.
        pytest.fail("ruff is not installed: run scripts/setup.sh, or `.venv/bin/python -m pip install -e '.[test]'`",
                    pytrace=False)
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", str(REPO)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"ruff check found problems:\n{out.stdout}{out.stderr}"
