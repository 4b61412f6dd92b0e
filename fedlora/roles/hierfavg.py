"""HierFAVG: neighbourhood models between cloud syncs, kept for the cloud's round.

Under ``topology.cloud_sync_every = k > 1`` each neighbourhood aggregates every round into
its own cell model and the cloud syncs every k rounds (Liu et al., 2020); k = 1 is plain
FedAvg. Pure numpy.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedlora.aggregate.sums import AdapterState, WeightedSum
from fedlora.roles.suburban import TreeSums, merge_up
from fedlora.world.topology import CellTree


class CellModels:
    """Neighbourhood adapters between cloud syncs, HierFAVG style (Liu et al., 2020).

    Each round a neighbourhood averages the updates uploaded from it and moves its cell
    model by that mean; clients in it start the next round from the cell model. On a cloud
    sync every neighbourhood forwards its drift from the global adapter, weighted by the
    examples behind it, up the tree; the cloud's mean of those is the average delta the
    strategy applies, and every cell model is reset to the new global. With
    ``cloud_sync_every = 1`` this is exactly flat FedAvg.
    """

    def __init__(self, tree: CellTree):
        self.tree = tree
        self.models: dict[str, AdapterState] = {}  # neighbourhood -> cell model (absent = global)
        self.weights: dict[str, float] = {}  # neighbourhood -> example weight since the last sync
        self.counts: dict[str, int] = {}  # neighbourhood -> client updates since the last sync

    def start_from(self, cell: str, global_state: AdapterState) -> AdapterState:
        """The adapter an END client in leaf ``cell`` trains from this round."""
        return self.models.get(self.tree.neighbourhood_of(cell), global_state)

    def absorb(self, sums: TreeSums, global_state: AdapterState) -> None:
        """Apply this round's neighbourhood sums (``aggregate_tree(..., to_cloud=False)``)."""
        for cell, total in sums.tier(self.tree, "neighbourhood").items():
            if total.count == 0:
                continue
            base = self.start_from(cell, global_state)
            self.models[cell] = {k: (base[k] + d).astype(np.float32) for k, d in total.mean().items()}
            self.weights[cell] = self.weights.get(cell, 0.0) + total.weight
            self.counts[cell] = self.counts.get(cell, 0) + total.count

    def sync(self, global_state: AdapterState) -> WeightedSum:
        """The cloud's sum of every neighbourhood's weighted drift, merged up the tree; resets
        the cell models. ``count`` is the number of client updates behind it."""
        sums: dict[str, WeightedSum] = {}
        for cell, model in self.models.items():
            w = self.weights[cell]
            total = {k: (model[k].astype(np.float64) - global_state[k]) * w for k in model}
            sums[cell] = WeightedSum(total=total, weight=w, count=self.counts[cell])
        self.models, self.weights, self.counts = {}, {}, {}
        return merge_up(self.tree, sums).cloud  # type: ignore[return-value]

    def state(self) -> dict[str, np.ndarray]:
        """Cell models and weights to checkpoint (``<cell>/<tensor>``, ``<cell>#weight``, ``<cell>#count``)."""
        out: dict[str, np.ndarray] = {}
        for cell, model in self.models.items():
            out.update({f"{cell}/{k}": v for k, v in model.items()})
            out[f"{cell}#weight"] = np.array(self.weights[cell])
            out[f"{cell}#count"] = np.array(self.counts[cell])
        return out

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self.models, self.weights, self.counts = {}, {}, {}
        for key, value in state.items():
            if key.endswith("#weight"):
                self.weights[key[: -len("#weight")]] = float(value)
            elif key.endswith("#count"):
                self.counts[key[: -len("#count")]] = int(value)
            else:
                cell, tensor = key.split("/", 1)
                self.models.setdefault(cell, {})[tensor] = value
