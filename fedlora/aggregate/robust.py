"""Robust aggregation of one cell's updates, for plain (non-secure) mode: median, trimmed mean, norm bounding.

A device that follows the protocol can still send a harmful update (scaled up, sign-flipped, an inflated
example count). These rules bound what one such device can do to a cell's sum:

- ``median``: the coordinate-wise median of the cell's updates (Flower's ``FedMedian``; Yin et al. 2018),
  unweighted, so an example count cannot buy influence;
- ``trimmed_mean``: the coordinate-wise mean after cutting ``int(trim_fraction * k)`` of the ``k``
  updates at each end of every coordinate (Flower's ``FedTrimmedAvg``, same cut), unweighted;
- norm bounding (``norm_bound > 0``, any rule): each update is first clipped to that L2 norm (the direction
  kept, :func:`fedlora.aggregate.dp.clip_update`) and weighted by at most ``n_max`` examples.

Robust statistics do not compose through sums, so they are applied where the individual updates are seen:
the neighbourhood cell (:func:`fedlora.roles.neighbourhood.run_cell`; with ``topology=flat`` the cloud is that
cell, so the median is the whole federation's). The cell forwards its robust estimate as a
:class:`~fedlora.aggregate.sums.WeightedSum` of weight ``W`` (its accepted, capped example count), so upper
tiers and the cloud average the cells' estimates by examples exactly as they average plain sums. A cell of one
or two updates cannot outvote anyone: its median is its mean.

Pure numpy: no torch, Flower or sockets.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedlora.aggregate.dp import clip_update
from fedlora.aggregate.sums import AdapterState, WeightedSum

# The rules a cell can sum its updates by (fedlora.config.ROBUST_RULES names the strategies that pick them).
RULES = ("mean", "median", "trimmed_mean")


def is_robust(rule: str, norm_bound: float) -> bool:
    """Whether a cell sums by anything other than the plain weighted mean."""
    return rule != "mean" or norm_bound > 0


def coordinate_median(updates: Sequence[AdapterState]) -> AdapterState:
    """The coordinate-wise median of ``updates`` (all with the same tensors and shapes), float64."""
    _check_same(updates)
    return {k: np.median(np.stack([np.asarray(u[k], dtype=np.float64) for u in updates]), axis=0) for k in updates[0]}


def trimmed_mean(updates: Sequence[AdapterState], trim_fraction: float) -> AdapterState:
    """The coordinate-wise mean after cutting ``int(trim_fraction * k)`` values at each end (float64)."""
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction={trim_fraction} must be in [0, 0.5)")
    _check_same(updates)
    k = len(updates)
    cut = int(trim_fraction * k)
    out = {}
    for key in updates[0]:
        stacked = np.sort(np.stack([np.asarray(u[key], dtype=np.float64) for u in updates]), axis=0)
        out[key] = stacked[cut:k - cut].mean(axis=0)
    return out


def cell_sum(updates: Sequence[tuple[AdapterState, float]], *, rule: str, trim_fraction: float = 0.2,
             norm_bound: float = 0.0, max_examples: int = 0) -> WeightedSum:
    """One cell's accepted ``(delta, examples)`` summed by ``rule`` as a :class:`WeightedSum` whose mean is the
    cell's estimate and whose weight is the cell's examples.

    ``norm_bound > 0``: each delta clipped to that L2 norm first. Whenever the rule is robust
    (:func:`is_robust`), each update weighs ``min(examples, max_examples)`` (``max_examples`` = n_max, 0: no
    cap), so an inflated count can move neither the cell's estimate nor its weight beyond n_max.
    Promises: ``rule="mean"`` without a bound equals :meth:`WeightedSum.add` of every update.
    """
    if rule not in RULES:
        raise ValueError(f"aggregation rule {rule!r} is not one of: {', '.join(RULES)}")
    if not updates:
        raise ValueError("no updates to aggregate")
    robust = is_robust(rule, norm_bound)
    deltas, weights = [], []
    for delta, examples in updates:
        deltas.append(clip_update(delta, norm_bound)[0] if norm_bound > 0 else delta)
        weights.append(min(float(examples), float(max_examples)) if robust and max_examples > 0 else float(examples))
    total = WeightedSum()
    if rule == "mean":
        for delta, weight in zip(deltas, weights):
            total.add(delta, weight)
        return total
    estimate = coordinate_median(deltas) if rule == "median" else trimmed_mean(deltas, trim_fraction)
    weight = float(sum(weights))
    if weight <= 0:
        raise ValueError(f"the cell's examples sum to {weight}; weights must be positive")
    return WeightedSum(total={k: v * weight for k, v in estimate.items()}, weight=weight, count=len(deltas))


def _check_same(updates: Sequence[AdapterState]) -> None:
    if not updates:
        raise ValueError("no updates to aggregate")
    first = {k: np.shape(v) for k, v in updates[0].items()}
    for u in updates[1:]:
        if {k: np.shape(v) for k, v in u.items()} != first:
            raise ValueError("updates to aggregate coordinate-wise must have the same tensors and shapes")
