"""The 6G cell tree: tiers, cells, links, device profiles, and sums flowing up the tree.

:func:`build_tree` turns ``cfg.topology`` into a :class:`CellTree`:

- ``flat``: only the cloud; every END client's path is ``["end->cloud"]``.
- ``tree``: ``cloud`` > ``suburban-<s>`` > ``neighbourhood-<s>-<n>`` (> ``femto-<s>-<n>-<j>``,
  a vehicle aggregating its passengers) > END clients.

A *placement* (``cell_of``) maps each END client to the *leaf* cell it uploads to: a
neighbourhood, a femto cell, or ``cloud`` when flat. ``tree.initial`` is the placement of
round 1; :mod:`fedlora.mobility` moves clients between rounds and :mod:`fedlora.netsim`
turns a placement into bytes per link and simulated time.

:func:`aggregate_tree` adds client updates into their leaf cell's
:class:`~fedlora.aggregation.WeightedSum` and merges every cell's sum into its parent's --
what the edge aggregators do -- so the backhaul carries one sum per cell and each update
is counted exactly once. :class:`CellModels` adds HierFAVG-style periods: neighbourhoods
aggregate every round and sync with the cloud every ``topology.cloud_sync_every`` rounds.

Everything here is pure Python + numpy: no Flower, torch or sockets at import time
(``WeightedSum`` is imported where a sum is built).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from fedlora.config import DeviceProfileConfig, LinkConfig, MobilityConfig, TopologyConfig

if TYPE_CHECKING:  # aggregation imports torch (via adapters); keep it out of import time
    from fedlora.aggregation import WeightedSum

AdapterState = dict[str, np.ndarray]

CLOUD = "cloud"
TIERS = ("cloud", "suburban", "neighbourhood", "femto")  # top to bottom
REFERENCE_PROFILE = "reference"


def stable_seed(*parts: object) -> int:
    """A 31-bit seed from its parts, the same in every process (unlike ``hash()``)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def uniform(*parts: object) -> float:
    """A uniform draw in [0, 1) fixed by its parts (e.g. seed, purpose, round, client).

    Hash-based rather than a shared generator, so one client's draw does not depend on
    which other clients exist or in which order they are asked.
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


@dataclass(frozen=True)
class Link:
    """A kind of link between two tiers, named after its uplink direction (``end->cloud``)."""

    name: str
    bandwidth_mbps: float
    latency_ms: float
    # One medium per cell whose capacity concurrent transfers share (fedlora.netsim), or
    # the full rate for every message.
    shared: bool = True


@dataclass(frozen=True)
class Cell:
    """One node of the tree above the END clients."""

    id: str
    tier: str
    # The cell this one forwards its sum to (None for the cloud).
    parent: str | None
    children: tuple[str, ...]
    # Name of the link to the parent, e.g. ``neighbourhood->suburban`` (None for the cloud).
    uplink: str | None


@dataclass(frozen=True)
class CellTree:
    """The cells, links and END clients of one topology; immutable once built."""

    kind: str
    cells: dict[str, Cell]
    links: dict[str, Link]
    profiles: dict[str, DeviceProfileConfig]
    # END client -> name of its device profile.
    profile_of: dict[int, str]
    # END client -> leaf cell it uploads to in round 1 (before any mobility).
    initial: dict[int, str]
    cloud_sync_every: int
    deadline_s: float
    mobility: MobilityConfig
    # Femto cells per neighbourhood and the chance a client rides in one (0 = no femto tier).
    femto_per_neighbourhood: int = 0
    passenger_fraction: float = 0.0

    @property
    def clients(self) -> list[int]:
        return sorted(self.initial)

    def tier(self, tier: str) -> list[str]:
        """Ids of the cells of one tier, in id order."""
        return [c.id for c in self.cells.values() if c.tier == tier]

    @property
    def leaf_cells(self) -> list[str]:
        """Cells END clients can upload to: neighbourhoods and femtos, or the cloud when flat."""
        if self.kind == "flat":
            return [CLOUD]
        return self.tier("neighbourhood") + self.tier("femto")

    def neighbourhood_of(self, cell: str) -> str:
        """The neighbourhood a leaf cell belongs to (itself for a neighbourhood, the cloud when flat)."""
        c = self._cell(cell)
        return c.parent if c.tier == "femto" else c.id  # type: ignore[return-value]

    def chain(self, cell: str) -> list[str]:
        """Cell ids from ``cell`` up to the cloud, both included."""
        out = [self._cell(cell).id]
        while (parent := self.cells[out[-1]].parent) is not None:
            out.append(parent)
        return out

    def first_hop(self, cell: str) -> str:
        """Name of the link an END client in leaf ``cell`` uses: ``end->neighbourhood`` etc."""
        return f"end->{self._cell(cell).tier}"

    def path(self, cell: str) -> list[str]:
        """Link names an update from an END client in leaf ``cell`` travels, bottom to top.

        Flat: ``["end->cloud"]``; tree: ``["end->neighbourhood", "neighbourhood->suburban",
        "suburban->cloud"]``; a femto passenger starts with ``end->femto``, ``femto->neighbourhood``.
        """
        return [self.first_hop(cell)] + [self.cells[c].uplink for c in self.chain(cell)[:-1]]  # type: ignore[misc]

    def profile(self, client: int) -> DeviceProfileConfig:
        return self.profiles[self.profile_of[client]]

    def syncs_with_cloud(self, server_round: int) -> bool:
        """Whether round ``server_round`` (1-based) ends with a cloud aggregation (every k-th)."""
        return server_round % self.cloud_sync_every == 0

    def global_download(self, server_round: int) -> bool:
        """Whether clients start ``server_round`` from the cloud's global adapter (sent down the
        whole tree) rather than their neighbourhood's cell model (sent over the access link)."""
        return server_round == 1 or self.syncs_with_cloud(server_round - 1)

    def _cell(self, cell: str) -> Cell:
        try:
            return self.cells[cell]
        except KeyError:
            raise KeyError(f"unknown cell {cell!r}; cells look like {', '.join(self.leaf_cells[:3])}") from None


def build_tree(topo: TopologyConfig, num_clients: int, seed: int) -> CellTree:
    """Build the tree for END clients ``0..num_clients-1``.

    Deterministic in (``topo``, ``num_clients``, ``seed``): clients are shuffled by the seed
    and dealt to neighbourhoods in the proportions of ``topo.neighbourhood_weights`` (even
    when empty), cell sizes differing by at most one from their exact share; each client in
    a neighbourhood with femto cells rides in one with chance ``femto.passenger_fraction``;
    profiles are dealt the same way by ``topo.profile_mix`` (everyone ``reference`` if empty).
    """
    if num_clients < 1:
        raise ValueError(f"num_clients={num_clients} must be >= 1")
    clients = list(range(num_clients))
    links_cfg = topo.links
    profiles = dict(topo.profiles)
    profiles.setdefault(REFERENCE_PROFILE, DeviceProfileConfig())
    profile_of = _deal(clients, dict(topo.profile_mix) or {REFERENCE_PROFILE: 1.0}, stable_seed(seed, "profiles"))

    if topo.kind == "flat":
        cells = {CLOUD: Cell(CLOUD, "cloud", None, (), None)}
        links = {"end->cloud": _link("end->cloud", links_cfg.end_cloud)}
        initial = {c: CLOUD for c in clients}
        femto = 0
    else:
        femto = topo.femto.per_neighbourhood
        cells, links = _tree_cells(topo, femto)
        neighbourhoods = [c for c in cells.values() if c.tier == "neighbourhood"]
        weights = list(topo.neighbourhood_weights) or [1.0] * len(neighbourhoods)
        if len(weights) != len(neighbourhoods):
            raise ValueError(f"topology.neighbourhood_weights needs {len(neighbourhoods)} entries, got {len(weights)}")
        home = _deal(clients, {n.id: w for n, w in zip(neighbourhoods, weights)}, stable_seed(seed, "cells"))
        initial = {c: board(cells, home[c], c, 0, seed, topo.femto.passenger_fraction) for c in clients}
    return CellTree(
        kind=topo.kind,
        cells=cells,
        links=links,
        profiles=profiles,
        profile_of=profile_of,
        initial=initial,
        cloud_sync_every=topo.cloud_sync_every,
        deadline_s=topo.deadline_s,
        mobility=topo.mobility,
        femto_per_neighbourhood=femto,
        passenger_fraction=topo.femto.passenger_fraction if femto else 0.0,
    )


def board(cells: Mapping[str, Cell], neighbourhood: str, client: int, server_round: int, seed: int, passenger_fraction: float) -> str:
    """The leaf cell of a client arriving in ``neighbourhood``: one of its femto cells (a
    vehicle) with chance ``passenger_fraction``, else the neighbourhood itself."""
    vehicles = [c for c in cells[neighbourhood].children if cells[c].tier == "femto"]
    if not vehicles or uniform(seed, "board", server_round, client) >= passenger_fraction:
        return neighbourhood
    return vehicles[int(uniform(seed, "vehicle", server_round, client) * len(vehicles))]


def _link(name: str, spec: LinkConfig) -> Link:
    return Link(name, float(spec.bandwidth_mbps), float(spec.latency_ms), bool(spec.shared))


def _tree_cells(topo: TopologyConfig, femto: int) -> tuple[dict[str, Cell], dict[str, Link]]:
    """Cells and links of a tree topology, ids in a stable order."""
    cfg = topo.links
    links = {
        "end->neighbourhood": _link("end->neighbourhood", cfg.end_neighbourhood),
        "neighbourhood->suburban": _link("neighbourhood->suburban", cfg.neighbourhood_suburban),
        "suburban->cloud": _link("suburban->cloud", cfg.suburban_cloud),
    }
    if femto:
        links["end->femto"] = _link("end->femto", cfg.end_femto)
        links["femto->neighbourhood"] = _link("femto->neighbourhood", cfg.femto_neighbourhood)
    cells: dict[str, Cell] = {}
    suburbs = []
    for s in range(topo.suburban_cells):
        sid = f"suburban-{s}"
        hoods = []
        for n in range(topo.neighbourhoods_per_suburban):
            nid = f"neighbourhood-{s}-{n}"
            vehicles = tuple(f"femto-{s}-{n}-{j}" for j in range(femto))
            for vid in vehicles:
                cells[vid] = Cell(vid, "femto", nid, (), "femto->neighbourhood")
            cells[nid] = Cell(nid, "neighbourhood", sid, vehicles, "neighbourhood->suburban")
            hoods.append(nid)
        cells[sid] = Cell(sid, "suburban", CLOUD, tuple(hoods), "suburban->cloud")
        suburbs.append(sid)
    cells[CLOUD] = Cell(CLOUD, "cloud", None, tuple(suburbs), None)
    order = {t: i for i, t in enumerate(TIERS)}
    return dict(sorted(cells.items(), key=lambda kv: (order[kv[1].tier], _natural(kv[0])))), links


def _natural(cell_id: str) -> tuple[int, ...]:
    return tuple(int(p) for p in cell_id.split("-")[1:])


def _deal(clients: list[int], shares: Mapping[str, float], seed: int) -> dict[int, str]:
    """Give each client one of ``shares``' keys: exact counts by largest remainder, clients
    shuffled by ``seed`` so who gets what is random but reproducible."""
    names = list(shares)
    weights = np.array([float(shares[n]) for n in names])
    quota = len(clients) * weights / weights.sum()
    counts = np.floor(quota).astype(int)
    # Hand the leftover clients to the largest remainders (ties: first name wins).
    for i in sorted(range(len(names)), key=lambda i: (-(quota[i] - counts[i]), i))[: len(clients) - counts.sum()]:
        counts[i] += 1
    order = np.random.default_rng(seed).permutation(len(clients))
    out, start = {}, 0
    for name, count in zip(names, counts):
        for idx in order[start : start + count]:
            out[clients[idx]] = name
        start += count
    return out


# --------------------------------------------------------------------------- sums up the tree


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
    from fedlora.aggregation import WeightedSum

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
    from fedlora.aggregation import WeightedSum

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
        from fedlora.aggregation import WeightedSum

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
