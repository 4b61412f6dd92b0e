"""Weighted sums of adapter updates: what every aggregating tier accumulates and forwards.

:class:`WeightedSum` holds ``sum(n_u * delta_u)`` and ``sum(n_u)``. Sums compose: an edge
aggregator adds its children's and forwards one sum upward; the cloud's mean is the flat
weighted mean. Pure numpy (no torch), so the world model and the tiers import it freely.

Per-tensor weights: under split learning an update's tensors come from two places (a split
device's own blocks, its edge's blocks), and a cell may mix split and full devices, so each
tensor's mean is over whoever trained it. :meth:`WeightedSum.add_tensors` adds tensors of updates
already counted (the edge's part); ``tensor_weight`` then holds every tensor's own weight. It stays
empty (every tensor weighs ``weight``) while all updates carry the same tensors, as without split.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedlora.wire import Checked

AdapterState = dict[str, np.ndarray]


@dataclass
class WeightedSum(Checked):
    """Running ``sum(weight * delta)`` and ``sum(weight)`` over client updates."""

    total: AdapterState = field(default_factory=dict)
    weight: float = 0.0
    count: int = 0
    # Tensor -> its weight, for every tensor of ``total`` once the summed updates' tensors differ; empty:
    # every tensor weighs ``weight``.
    tensor_weight: dict[str, float] = field(default_factory=dict)

    def weight_of(self, key: str) -> float:
        """The summed weight behind tensor ``key`` (0 for a tensor nobody trained)."""
        if key not in self.total:
            return 0.0
        return self.tensor_weight.get(key, self.weight)

    def add(self, delta: AdapterState, weight: float) -> None:
        if weight <= 0:
            raise ValueError(f"weight must be positive, got {weight}")
        self._weigh(delta, weight)
        self._add_values(delta, weight)
        self.weight += weight
        self.count += 1

    def add_tensors(self, delta: AdapterState, weight: float) -> None:
        """More tensors of an update already counted (``add``): the edge's blocks of a split device's
        update. They weigh ``weight`` in their tensors' means; ``weight`` and ``count`` stay."""
        if weight <= 0:
            raise ValueError(f"weight must be positive, got {weight}")
        self._materialise()
        for key in delta:
            self.tensor_weight[key] = self.tensor_weight.get(key, 0.0) + weight
        self._add_values(delta, weight)

    def _materialise(self) -> None:
        """Give every tensor its own weight (before tensors of unequal weight are added)."""
        if not self.tensor_weight:
            self.tensor_weight = {k: self.weight for k in self.total}

    def _weigh(self, delta: AdapterState, weight: float) -> None:
        """Per-tensor weights for a counted update: only once the tensor sets differ."""
        if not self.tensor_weight and (not self.total or set(delta) == set(self.total)):
            return
        self._materialise()
        for key in delta:
            self.tensor_weight[key] = self.tensor_weight.get(key, 0.0) + weight

    def _add_values(self, delta: AdapterState, weight: float) -> None:
        for key, value in delta.items():
            scaled = value.astype(np.float64) * weight
            if key in self.total:
                self.total[key] += scaled
            else:
                self.total[key] = scaled

    def merge(self, other: WeightedSum) -> None:
        """Add another (child) sum into this one."""
        if other.tensor_weight or (self.total and other.total and set(self.total) != set(other.total)) or \
                (self.tensor_weight and other.total):
            weights = {k: self.weight_of(k) + other.weight_of(k) for k in set(self.total) | set(other.total)}
            self.tensor_weight = weights
        for key, value in other.total.items():
            self.total[key] = self.total[key] + value if key in self.total else value.copy()
        self.weight += other.weight
        self.count += other.count

    def mean(self) -> AdapterState:
        if self.count == 0:
            raise ValueError("no updates to average")
        if self.tensor_weight:
            return {k: (v / self.tensor_weight[k]).astype(np.float32) for k, v in self.total.items()}
        return {k: (v / self.weight).astype(np.float32) for k, v in self.total.items()}
