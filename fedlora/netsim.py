"""The network model: bytes on every link and simulated time of one round.

Messages (store and forward; one message per child per link):

- down: the adapter a client starts from travels from its holder -- the cloud in a round
  after a cloud sync (and round 1), else the client's neighbourhood, which keeps a cell
  model between syncs -- down the tree, one copy per cell with a reached client below it,
  then one copy per END client over its first hop.
- up: each END client uploads its update to its leaf cell; each cell with a surviving
  update below it forwards ONE aggregate upward, to the neighbourhood in a round without
  a cloud sync, else up to the cloud. So ``suburban->cloud`` carries one sum per sub-urban
  cell however many clients there are.

Time of a hop: ``latency + bytes * 8 / bandwidth``; on a client's first hop the device's
own uplink/downlink rate caps the link's and its latency floors the link's. Link
bandwidth is a per-message rate: contention between clients of a cell is not modelled.
A client's path time is download + compute (measured training seconds on the reference
machine / the profile's ``compute_speed``) + upload + every forwarding hop to the top.
Aggregators wait for their surviving children and forwarding hops are equal within a
tier, so the round ends at the slowest surviving path.

Stragglers: clients unavailable this round (a draw fixed by seed, round and client
against the profile's ``availability``: they receive nothing) and clients whose path
time exceeds ``topology.deadline_s`` (they received the adapter; their late update is
neither aggregated nor counted on the uplink).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fedlora.topology import CLOUD, CellTree, Link, uniform


@dataclass
class RoundNetwork:
    """What the network model says about one round (``rounds.jsonl`` fields and more)."""

    # Link name -> bytes that crossed it, every link of the tree present (0 if unused).
    bytes_up: dict[str, int]
    bytes_down: dict[str, int]
    # When the round ends: the slowest surviving path (the deadline when none survived
    # and some were late; 0 when nobody tried).
    sim_network_s: float
    # Client -> why its update does not count this round (unavailable, past the deadline).
    stragglers: dict[int, str]
    # Client -> simulated seconds from the adapter leaving its holder to the update
    # reaching the top of the round, for every client timed (stragglers past the deadline
    # included).
    path_s: dict[int, float]
    # Clients whose update is aggregated, in id order.
    survivors: list[int]
    # Whether the round's sums went up to the cloud.
    cloud_sync: bool

    def record(self) -> dict:
        """The fields a round record needs: ``bytes`` and ``sim_network_s``."""
        return {"bytes": {"up": dict(self.bytes_up), "down": dict(self.bytes_down)}, "sim_network_s": self.sim_network_s}


def is_available(tree: CellTree, client: int, server_round: int, seed: int) -> bool:
    """Whether the client's device is reachable this round; fixed by (seed, round, client)."""
    return uniform(seed, "available", server_round, client) < tree.profile(client).availability


def unavailable(tree: CellTree, clients: Iterable[int], server_round: int, seed: int) -> dict[int, str]:
    """Clients of ``clients`` whose device is off this round -> reason. Ask before training:
    these never receive the adapter."""
    return {
        c: f"unavailable this round ({tree.profile_of[c]} availability {tree.profile(c).availability:g})"
        for c in sorted(clients)
        if not is_available(tree, c, server_round, seed)
    }


def compute_seconds(tree: CellTree, client: int, reference_s: float) -> float:
    """Training seconds on the client's device for ``reference_s`` on the reference machine."""
    return reference_s / tree.profile(client).compute_speed


def hop_seconds(link: Link, nbytes: int, *, cap_mbps: float | None = None, floor_ms: float = 0.0) -> float:
    """Seconds for one message over one link: latency plus serialisation at the link's rate
    (capped by ``cap_mbps``, the sending/receiving device's own rate on a first hop)."""
    mbps = link.bandwidth_mbps if cap_mbps is None else min(link.bandwidth_mbps, cap_mbps)
    return max(link.latency_ms, floor_ms) / 1e3 + nbytes * 8 / (mbps * 1e6)


def simulate_round(
    tree: CellTree,
    cell_of: Mapping[int, str],
    server_round: int,
    *,
    selected: Iterable[int],
    train_s: Mapping[int, float],
    adapter_bytes: int,
    up_bytes: Mapping[int, int] | None = None,
    aggregate_bytes: int | None = None,
    seed: int,
    cloud_sync: bool | None = None,
) -> RoundNetwork:
    """Bytes per link, path times, stragglers and simulated time of one round.

    ``selected``: clients sent the adapter this round (unavailable ones are dropped here).
    ``train_s``: measured training seconds on the reference machine of every client whose
    update came back usable; a selected client missing from it downloaded but contributes
    nothing (an error or rejected reply). ``adapter_bytes``: size of the adapter sent
    down. ``up_bytes``: bytes each client uploaded (default ``adapter_bytes``).
    ``aggregate_bytes``: size of one forwarded sum (default ``adapter_bytes``).
    ``cloud_sync``: whether sums go up to the cloud (default ``tree.syncs_with_cloud``;
    pass True to force a sync, e.g. in the last round).

    Promises: a deterministic function of its arguments; every reached client is placed
    in ``cell_of``; ``survivors`` is a subset of ``train_s`` and disjoint from ``stragglers``.
    """
    sync = tree.syncs_with_cloud(server_round) if cloud_sync is None else cloud_sync
    if tree.kind == "flat":
        sync = True  # the cloud is every client's only aggregator
    global_down = tree.global_download(server_round) or tree.kind == "flat"
    agg_bytes = adapter_bytes if aggregate_bytes is None else aggregate_bytes
    selected = sorted(set(selected))
    stragglers = unavailable(tree, selected, server_round, seed)
    reached = [c for c in selected if c not in stragglers]
    unknown = [c for c in train_s if c not in selected]
    if unknown:
        raise ValueError(f"clients {unknown} have training times but were not selected this round")

    down = {name: 0 for name in tree.links}
    up = {name: 0 for name in tree.links}
    down_cells: set[str] = set()
    path_s: dict[int, float] = {}
    for c in reached:
        leaf = cell_of[c]
        profile = tree.profile(c)
        first = tree.links[tree.first_hop(leaf)]
        chain = tree.chain(leaf)
        holder = CLOUD if global_down else tree.neighbourhood_of(leaf)
        top = CLOUD if sync else tree.neighbourhood_of(leaf)
        # Downlink: the cells between the holder and the leaf each receive one copy.
        below_holder = chain[: chain.index(holder)]
        down_cells.update(below_holder)
        down[first.name] += adapter_bytes
        if c not in train_s:
            continue
        t = sum(hop_seconds(tree.links[tree.cells[cell].uplink], adapter_bytes) for cell in below_holder)  # type: ignore[index]
        t += hop_seconds(first, adapter_bytes, cap_mbps=profile.downlink_mbps, floor_ms=profile.latency_ms)
        t += compute_seconds(tree, c, float(train_s[c]))
        nbytes = adapter_bytes if up_bytes is None else int(up_bytes[c])
        t += hop_seconds(first, nbytes, cap_mbps=profile.uplink_mbps, floor_ms=profile.latency_ms)
        t += sum(hop_seconds(tree.links[tree.cells[cell].uplink], agg_bytes) for cell in chain[: chain.index(top)])  # type: ignore[index]
        path_s[c] = t
        if tree.deadline_s > 0 and t > tree.deadline_s:
            stragglers[c] = f"past the deadline: path {t:.3f} s > topology.deadline_s={tree.deadline_s:g}"
    for cell in down_cells:
        down[tree.cells[cell].uplink] += adapter_bytes  # type: ignore[index]

    survivors = [c for c in sorted(path_s) if c not in stragglers]
    up_cells: set[str] = set()
    for c in survivors:
        leaf = cell_of[c]
        up[tree.first_hop(leaf)] += adapter_bytes if up_bytes is None else int(up_bytes[c])
        chain = tree.chain(leaf)
        top = CLOUD if sync else tree.neighbourhood_of(leaf)
        up_cells.update(chain[: chain.index(top)])
    for cell in up_cells:
        up[tree.cells[cell].uplink] += agg_bytes  # type: ignore[index]

    late = any(c in path_s for c in stragglers)
    if survivors:
        sim_s = max(path_s[c] for c in survivors)
    else:
        sim_s = tree.deadline_s if late else 0.0
    return RoundNetwork(
        bytes_up=up,
        bytes_down=down,
        sim_network_s=sim_s,
        stragglers=dict(sorted(stragglers.items())),
        path_s=path_s,
        survivors=survivors,
        cloud_sync=sync,
    )
