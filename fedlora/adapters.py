"""LoRA adapter tensors as plain named numpy arrays: what travels between tiers.

An *adapter state* is ``{name: float32 ndarray}`` keyed by PEFT's state-dict names
without the adapter name (``...q_proj.lora_A.weight``), the same keys
``peft.get_peft_model_state_dict`` uses, so a state can be exported as a standard PEFT
adapter. Only LoRA tensors ever leave a device; the frozen base never does.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch

AdapterState = dict[str, np.ndarray]


def _state_key(param_name: str, adapter_name: str = "default") -> str:
    return param_name.replace(f".{adapter_name}.", ".")


def lora_parameters(model: torch.nn.Module, *, trainable_only: bool, adapter_name: str = "default"
                    ) -> dict[str, torch.nn.Parameter]:
    """LoRA parameters of one of a PEFT model's adapters (``adapter_name``; the federation's is
    ``default``) by state key, in the model's (stable) order."""
    out = {}
    for name, param in model.named_parameters():
        if "lora_" not in name or not (f".{adapter_name}." in name or name.endswith(f".{adapter_name}")):
            continue
        if trainable_only and not param.requires_grad:
            continue
        out[_state_key(name, adapter_name)] = param
    return out


def get_state(model: torch.nn.Module, *, trainable_only: bool = True, adapter_name: str = "default") -> AdapterState:
    """Copy the model's LoRA tensors (of adapter ``adapter_name``) out as float32 numpy arrays."""
    return {
        k: p.detach().to(torch.float32).cpu().numpy().copy()
        for k, p in lora_parameters(model, trainable_only=trainable_only, adapter_name=adapter_name).items()
    }


def set_state(model: torch.nn.Module, state: AdapterState, *, adapter_name: str = "default") -> None:
    """Load LoRA tensors into the model's adapter ``adapter_name`` in place. Every key must exist with the right shape."""
    params = lora_parameters(model, trainable_only=False, adapter_name=adapter_name)
    with torch.no_grad():
        for key, value in state.items():
            if key not in params:
                raise KeyError(f"adapter tensor {key!r} does not exist in the model")
            param = params[key]
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"adapter tensor {key!r} has shape {value.shape}, model expects {tuple(param.shape)}")
            param.copy_(torch.from_numpy(np.ascontiguousarray(value)).to(param.dtype))


def is_lora_b(key: str) -> bool:
    """Whether a state key names a LoRA B (up-projection) tensor."""
    return ".lora_B." in key or ".lora_embedding_B." in key


def shapes(state: AdapterState) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def nbytes(state: AdapterState) -> int:
    """Payload bytes of a state as sent (raw tensor bytes)."""
    return int(sum(v.nbytes for v in state.values()))


def num_parameters(state: AdapterState) -> int:
    return int(sum(v.size for v in state.values()))


def add(state: AdapterState, delta: AdapterState) -> AdapterState:
    """state + delta for the keys of delta; keys only in state are kept unchanged."""
    out = dict(state)
    for k, d in delta.items():
        out[k] = (state[k] + d).astype(np.float32)
    return out


def filled(update: AdapterState, shapes: dict[str, tuple[int, ...]]) -> AdapterState:
    """``update`` with a float32 zero tensor for every tensor of ``shapes`` it lacks (a split device's
    update without its edge's blocks, the edge's part without the device's)."""
    return {**update, **{k: np.zeros(shape, np.float32) for k, shape in shapes.items() if k not in update}}


def subtract(a: AdapterState, b: AdapterState) -> AdapterState:
    """a - b over the keys of a."""
    return {k: (a[k] - b[k]).astype(np.float32) for k in a}


def check_update(update: object, expected: dict[str, tuple[int, ...]]) -> str | None:
    """Why a client's update cannot be aggregated, or None when it can.

    An update must have exactly the expected tensor names, float32 tensors of the
    expected shapes, and only finite values.
    """
    if not isinstance(update, dict):
        return f"update is a {type(update).__name__}, not a mapping of tensors"
    missing = sorted(set(expected) - set(update))
    extra = sorted(set(update) - set(expected))
    if missing:
        return f"{len(missing)} tensor(s) missing, e.g. {missing[0]!r}"
    if extra:
        return f"{len(extra)} unexpected tensor(s), e.g. {extra[0]!r}"
    for key, shape in expected.items():
        value = update[key]
        if not isinstance(value, np.ndarray):
            return f"tensor {key!r} is a {type(value).__name__}, not an array"
        if value.dtype != np.float32:
            return f"tensor {key!r} has dtype {value.dtype}, expected float32"
        if tuple(value.shape) != tuple(shape):
            return f"tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)}"
        if not np.isfinite(value).all():
            return f"tensor {key!r} contains NaN or inf"
    return None


def check_count(value: object) -> str | None:
    """Why a reported example count is unusable, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"num_examples is {value!r}, not a number"
    if not math.isfinite(value) or value <= 0 or value != int(value):
        return f"num_examples is {value!r}, not a positive whole number"
    return None


def export_peft(model: torch.nn.Module, state: AdapterState, out_dir: str | Path, base_model_ref: str) -> Path:
    """Write ``state`` as a standard PEFT adapter (adapter_config.json + safetensors).

    ``base_model_ref`` becomes ``base_model_name_or_path`` so plain
    ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ref), out_dir)`` works.
    Written into a fresh sibling folder that then replaces ``out_dir``: a crash mid-write never
    leaves a torn adapter there (at worst, for an instant between two renames, none at all).
    """
    out_dir = Path(out_dir)
    tmp, old = out_dir.with_name(f".{out_dir.name}.tmp"), out_dir.with_name(f".{out_dir.name}.old")
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    set_state(model, state)
    peft_config = model.peft_config["default"]
    previous = peft_config.base_model_name_or_path
    peft_config.base_model_name_or_path = base_model_ref
    try:
        # Only the federation's adapter: a device's personal one (FedDPA) is exported on its own.
        model.save_pretrained(str(tmp), safe_serialization=True, selected_adapters=["default"])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        peft_config.base_model_name_or_path = previous
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir
