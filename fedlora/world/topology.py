"""The 6G cell tree: tiers, cells, links, device profiles, and sums flowing up the tree.

:func:`build_tree` turns ``cfg.topology`` into a :class:`CellTree`:

- ``flat``: only the cloud; every END client's path is ``["end->cloud"]``.
- ``tree``: ``cloud`` > ``suburban-<s>`` > ``neighbourhood-<s>-<n>`` (> ``femto-<s>-<n>-<j>``,
  a vehicle aggregating its passengers) > END clients.

A *placement* (``cell_of``) maps each END client to the *leaf* cell it uploads to: a
neighbourhood, a femto cell, or ``cloud`` when flat. ``tree.initial`` is the placement of
round 1; :mod:`fedlora.world.mobility` moves clients between rounds and :mod:`fedlora.world.netsim`
turns a placement into bytes per link and simulated time.

What the tiers do with the updates on this tree lives with the roles: the sums flowing up
it in :mod:`fedlora.roles.suburban`, HierFAVG cell models in :mod:`fedlora.roles.hierfavg`.

Everything here is pure Python + numpy: no Flower, torch or sockets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedlora.config import DeviceProfileConfig, LinkConfig, MobilityConfig, TopologyConfig
from fedlora.seeds import world_draw, world_seed

CLOUD = "cloud"
TIERS = ("cloud", "suburban", "neighbourhood", "femto")  # top to bottom
REFERENCE_PROFILE = "reference"


@dataclass(frozen=True)
class Link:
    """A kind of link between two tiers, named after its uplink direction (``end->cloud``)."""

    name: str
    bandwidth_mbps: float
    latency_ms: float
    # One medium per cell whose capacity concurrent transfers share (fedlora.world.netsim), or
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
    profile_of = _deal(clients, dict(topo.profile_mix) or {REFERENCE_PROFILE: 1.0}, world_seed(seed, "profiles"))

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
        home = _deal(clients, {n.id: w for n, w in zip(neighbourhoods, weights)}, world_seed(seed, "cells"))
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


def board(cells: Mapping[str, Cell], neighbourhood: str, client: int, server_round: int, seed: int,
          passenger_fraction: float) -> str:
    """The leaf cell of a client arriving in ``neighbourhood``: one of its femto cells (a
    vehicle) with chance ``passenger_fraction``, else the neighbourhood itself."""
    vehicles = [c for c in cells[neighbourhood].children if cells[c].tier == "femto"]
    if not vehicles or world_draw(seed, "board", server_round, client) >= passenger_fraction:
        return neighbourhood
    return vehicles[int(world_draw(seed, "vehicle", server_round, client) * len(vehicles))]


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
