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

    Per-tensor weights (split learning; :class:`~fedlora.aggregate.sums.WeightedSum`): a cell model's
    tensors move by the round's per-tensor means (each over whoever trained the tensor), and the drift
    forwarded on a sync weighs each tensor by its own weight summed since the last sync. A cell keeps
    them only once its sums carried them; until then every tensor weighs the cell's weight.
    """

    def __init__(self, tree: CellTree):
        self.tree = tree
        self.models: dict[str, AdapterState] = {}  # neighbourhood -> cell model (absent = global)
        self.weights: dict[str, float] = {}  # neighbourhood -> example weight since the last sync
        self.counts: dict[str, int] = {}  # neighbourhood -> client updates since the last sync
        # neighbourhood -> tensor -> its weight since the last sync (absent: every tensor weighs ``weights``)
        self.tensor_weights: dict[str, dict[str, float]] = {}

    def start_from(self, cell: str, global_state: AdapterState) -> AdapterState:
        """The adapter an END client in leaf ``cell`` trains from this round."""
        return self.models.get(self.tree.neighbourhood_of(cell), global_state)

    def absorb(self, sums: TreeSums, global_state: AdapterState) -> None:
        """Apply this round's neighbourhood sums (``aggregate_tree(..., to_cloud=False)``)."""
        for cell, total in sums.tier(self.tree, "neighbourhood").items():
            if total.count == 0:
                continue
            prior = self.models.get(cell, {})
            base = self.start_from(cell, global_state)
            moved = {k: (base[k] + d).astype(np.float32) for k, d in total.mean().items()}
            weight = self.weights.get(cell, 0.0)
            if total.tensor_weight or cell in self.tensor_weights or (prior and set(moved) != set(prior)):
                before = self.tensor_weights.get(cell) or dict.fromkeys(prior, weight)
                self.tensor_weights[cell] = {k: before.get(k, 0.0) + total.weight_of(k)
                                             for k in sorted(set(before) | set(moved))}
            self.models[cell] = {**prior, **moved}
            self.weights[cell] = weight + total.weight
            self.counts[cell] = self.counts.get(cell, 0) + total.count

    def sync(self, global_state: AdapterState) -> WeightedSum:
        """The cloud's sum of every neighbourhood's weighted drift, merged up the tree; resets
        the cell models. ``count`` is the number of client updates behind it."""
        sums: dict[str, WeightedSum] = {}
        for cell, model in self.models.items():
            w, per_tensor = self.weights[cell], self.tensor_weights.get(cell, {})
            total = {k: (model[k].astype(np.float64) - global_state[k]) * per_tensor.get(k, w) for k in model}
            sums[cell] = WeightedSum(total=total, weight=w, count=self.counts[cell], tensor_weight=dict(per_tensor))
        self.models, self.weights, self.counts, self.tensor_weights = {}, {}, {}, {}
        return merge_up(self.tree, sums).cloud  # type: ignore[return-value]

    def state(self) -> dict[str, np.ndarray]:
        """Cell models and weights to checkpoint (``<cell>/<tensor>``, ``<cell>#weight``, ``<cell>#count``,
        and per-tensor weights ``<cell>#tensor_weight/<tensor>`` where a cell keeps them)."""
        out: dict[str, np.ndarray] = {}
        for cell, model in self.models.items():
            out.update({f"{cell}/{k}": v for k, v in model.items()})
            out[f"{cell}#weight"] = np.array(self.weights[cell])
            out[f"{cell}#count"] = np.array(self.counts[cell])
            out.update({f"{cell}{TENSOR_WEIGHT}{k}": np.array(w) for k, w in self.tensor_weights.get(cell, {}).items()})
        return out

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore :meth:`state` (a checkpoint written before per-tensor weights loads with none)."""
        self.models, self.weights, self.counts, self.tensor_weights = {}, {}, {}, {}
        for key, value in state.items():
            if TENSOR_WEIGHT in key:
                cell, tensor = key.split(TENSOR_WEIGHT, 1)
                self.tensor_weights.setdefault(cell, {})[tensor] = float(value)
            elif key.endswith("#weight"):
                self.weights[key[: -len("#weight")]] = float(value)
            elif key.endswith("#count"):
                self.counts[key[: -len("#count")]] = int(value)
            else:
                cell, tensor = key.split("/", 1)
                self.models.setdefault(cell, {})[tensor] = value


TENSOR_WEIGHT = "#tensor_weight/"  # checkpoint keys <cell>#tensor_weight/<tensor>
