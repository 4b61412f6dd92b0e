"""A LoRA rank per device (HetLoRA-style zero padding): slices of the global adapter and padded updates.

The cloud keeps the global adapter at the federation's rank ``R = lora.r``, the largest. A device
whose profile gives it rank ``r < R`` (``topology.profiles.<p>.lora_r``) trains the first ``r``
components of it -- the first ``r`` rows of every ``lora_A`` and the first ``r`` columns of every
``lora_B`` (:func:`slice_state`) -- and returns its update zero-padded back to ``R``
(:func:`pad_state`). Every update then has the global adapter's shapes, so the cells, the
sub-urban sums, the checks of a reply and secure aggregation (fixed shapes per cell) are as for
one rank, and the aggregate is the plain weighted sum of the padded deltas: linear, so exact
under secure aggregation too. A component ``k`` is moved by the devices whose rank is above ``k``
only, and diluted by the weight of the others (HetLoRA's behaviour; the higher components learn
more slowly when few devices train them).

Scaling. PEFT scales a rank-``r`` adapter by ``alpha / r``. The global adapter's output is
``(alpha / R) * B A``; its first ``r`` components contribute ``(alpha / R) * B[:, :r] A[:r]``. A
device at rank ``r`` with the usual ``alpha / r`` would compute ``R / r`` times that, so its slice
would not be the global adapter restricted to those components, and its gradients and update
would be in another scale than the ones they are added to. A device therefore scales by
``alpha / R`` (:func:`device_alpha`: it uses ``alpha * r / R`` over its ``r``): its model is
exactly the global one with the components above ``r`` removed (tested), its update is a change
of the global adapter's own parameters, and the padded sum means what the one-rank sum means.
"""

from __future__ import annotations

import numpy as np

AdapterState = dict[str, np.ndarray]


def is_lora_a(key: str) -> bool:
    return ".lora_A." in key or ".lora_embedding_A." in key


def is_lora_b(key: str) -> bool:
    return ".lora_B." in key or ".lora_embedding_B." in key


def slice_state(state: AdapterState, r: int) -> AdapterState:
    """The first ``r`` components of an adapter: rows ``:r`` of every A (r x in), columns ``:r`` of
    every B (out x r). ValueError for a tensor that is neither, or an adapter of rank below ``r``."""
    out = {}
    for key, value in state.items():
        rank = _rank_of(key, value)
        if r > rank:
            raise ValueError(f"adapter tensor {key!r} has rank {rank}; cannot take its first {r} components")
        out[key] = np.ascontiguousarray(value[:r] if is_lora_a(key) else value[:, :r])
    return out


def pad_state(state: AdapterState, shapes: dict[str, tuple[int, ...]]) -> AdapterState:
    """A rank-``r`` adapter (update) zero-padded to ``shapes`` (the global adapter's, rank ``R >= r``):
    A gains zero rows, B zero columns. Inverse of :func:`slice_state` on the first ``r`` components."""
    out = {}
    for key, value in state.items():
        full = np.zeros(shapes[key], dtype=value.dtype)
        if is_lora_a(key):
            full[: value.shape[0]] = value
        else:
            _rank_of(key, value)
            full[:, : value.shape[1]] = value
        out[key] = full
    return out


def device_alpha(alpha: float, r: int, global_r: int) -> float:
    """The ``lora_alpha`` a rank-``r`` device uses so that its scaling ``alpha / r`` equals the global
    adapter's ``alpha / global_r`` (module docstring: why)."""
    return alpha * r / global_r


def _rank_of(key: str, value: np.ndarray) -> int:
    if is_lora_a(key):
        return int(value.shape[0])
    if is_lora_b(key):
        return int(value.shape[1])
    raise ValueError(f"adapter tensor {key!r} is neither a LoRA A nor a LoRA B matrix")
