"""Weighted sums of adapter updates: what every aggregating tier accumulates and forwards.

:class:`WeightedSum` holds ``sum(n_u * delta_u)`` and ``sum(n_u)``. Sums compose: an edge
aggregator adds its children's and forwards one sum upward; the cloud's mean is the flat
weighted mean. Pure numpy (no torch), so the world model and the tiers import it freely.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

AdapterState = dict[str, np.ndarray]


@dataclass
class WeightedSum:
    """Running ``sum(weight * delta)`` and ``sum(weight)`` over client updates."""

    total: AdapterState = field(default_factory=dict)
    weight: float = 0.0
    count: int = 0

    def add(self, delta: AdapterState, weight: float) -> None:
        if weight <= 0:
            raise ValueError(f"weight must be positive, got {weight}")
        for key, value in delta.items():
            scaled = value.astype(np.float64) * weight
            if key in self.total:
                self.total[key] += scaled
            else:
                self.total[key] = scaled
        self.weight += weight
        self.count += 1

    def merge(self, other: WeightedSum) -> None:
        """Add another (child) sum into this one."""
        for key, value in other.total.items():
            self.total[key] = self.total[key] + value if key in self.total else value.copy()
        self.weight += other.weight
        self.count += other.count

    def mean(self) -> AdapterState:
        if self.count == 0:
            raise ValueError("no updates to average")
        return {k: (v / self.weight).astype(np.float32) for k, v in self.total.items()}
