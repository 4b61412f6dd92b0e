"""The sub-urban aggregator (and every tier above a leaf cell): add the children's sums, forward one.

A neighbourhood hands up one :class:`~fedlora.aggregate.sums.WeightedSum` per round; a
sub-urban cell adds those of its neighbourhoods and hands one sum to the cloud, which adds
its sub-urban cells'. :func:`merge_up` does that tier by tier, bottom up, so the backhaul
carries one sum per cell and each update is counted exactly once; :func:`aggregate_tree`
first places each client's update in its leaf cell. Under secure aggregation the same tiers
add *masked* sums instead (:func:`fedlora.secure.tiers.add_masked`), which only the
unmasker turns back into a plain sum.

Pure Python + numpy: no Flower, torch or sockets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fedlora.aggregate.sums import AdapterState, WeightedSum
from fedlora.world.topology import CLOUD, TIERS, CellTree


@dataclass
class TreeSums:
    """The weighted sums each cell forwards in one round.

    ``cells`` holds every cell with at least one counted update below it; ``cloud`` is the
    cloud's sum when the round went up to the cloud (always when flat), else None.
    """

    cells: dict[str, WeightedSum] = field(default_factory=dict)
    cloud: WeightedSum | None = None

    def tier(self, tree: CellTree, tier: str) -> dict[str, WeightedSum]:
        return {c: s for c, s in self.cells.items() if tree.cells[c].tier == tier}


def aggregate_tree(
    tree: CellTree,
    updates: Mapping[int, tuple[AdapterState, float]],
    cell_of: Mapping[int, str],
    *,
    to_cloud: bool = True,
) -> TreeSums:
    """Add each client's ``(delta, weight)`` into its leaf cell, then merge each cell's sum
    into its parent's, tier by tier, up to the neighbourhoods (``to_cloud=False``) or the cloud.

    Promises: each update is added exactly once, in the cell ``cell_of`` names (where the
    client uploads from this round); ``cloud.weight`` is the sum of the client weights and
    ``cloud.mean()`` equals the flat weighted mean (to float rounding). Raises KeyError for a
    client without a cell and ValueError for a cell no END client can upload to.
    """
    if tree.kind == "flat":  # the cloud is the only cell: every round goes up to it
        to_cloud = True
    leaves = set(tree.leaf_cells)
    sums: dict[str, WeightedSum] = {}
    for client in sorted(updates):
        if client not in cell_of:
            raise KeyError(f"client {client} has an update but no cell in cell_of")
        cell = cell_of[client]
        if cell not in leaves:
            raise ValueError(f"client {client} is placed in {cell!r}, which is not a leaf cell of the tree")
        delta, weight = updates[client]
        sums.setdefault(cell, WeightedSum()).add(delta, weight)
    return merge_up(tree, sums, to_cloud=to_cloud)


def merge_up(tree: CellTree, sums: dict[str, WeightedSum], *, to_cloud: bool = True) -> TreeSums:
    """Merge each cell's sum into its parent's, tier by tier from the bottom, up to the
    neighbourhoods (``to_cloud=False``) or the cloud: what the edge aggregators above the
    leaf cells do. ``sums`` (leaf or neighbourhood cell -> sum) is extended in place."""
    if tree.kind == "flat":
        to_cloud = True
    top = "cloud" if to_cloud else "neighbourhood"
    # Bottom-up, one tier at a time, so a parent forwards only once all its children merged.
    for tier in reversed(TIERS[TIERS.index(top) + 1 :]):
        for cell_id in tree.tier(tier):
            if cell_id in sums:
                sums.setdefault(tree.cells[cell_id].parent, WeightedSum()).merge(sums[cell_id])  # type: ignore[arg-type]
    cloud = sums.get(CLOUD, WeightedSum()) if to_cloud else None
    return TreeSums({c: s for c, s in sums.items() if c != CLOUD}, cloud)
