"""The network model: bytes on every link and simulated time of one round.

Messages (store and forward; one message per child per link):

- down: the adapter a client starts from travels from its holder -- the cloud in a round
  after a cloud sync (and round 1), else the client's neighbourhood, which keeps a cell
  model between syncs -- down the tree, one copy per cell with a reached client below it,
  then one copy per END client over its first hop (unicast: no broadcast channel is
  modelled, so ``bytes.down`` counts one adapter per reached client).
- up: each END client uploads its update to its leaf cell; each cell with a surviving
  update below it forwards ONE aggregate upward, to the neighbourhood in a round without
  a cloud sync, else up to the cloud. So ``suburban->cloud`` carries one sum per sub-urban
  cell however many clients there are.

Link instances and sharing (processor sharing, max-min fair):

- The *access link* of a leaf cell (``end->neighbourhood`` of one neighbourhood,
  ``end->femto`` of one vehicle, ``end->cloud`` of the cloud when flat) is ONE medium per
  cell and direction: its ``bandwidth_mbps`` is the cell's capacity, shared by all
  transfers on it at the same moment. The upload and download directions each have the
  full capacity (FDD-like; they do not compete with each other).
- Every *upper link* instance belongs to the child cell: the uplink of ``neighbourhood-0-1``
  to its sub-urban cell is that neighbourhood's own fibre, shared by whatever crosses it.
  With store and forward that is one copy down and one sum up per round, so sharing never
  binds there; the same code times it.
- Sharing is processor sharing with per-transfer caps: at every moment the link's
  capacity is split max-min fairly among the transfers in progress (water-filling), a
  transfer never going faster than its cap -- the device's own ``uplink_mbps`` /
  ``downlink_mbps`` on the first hop. When a transfer ends or another starts, rates are
  recomputed. N equal uploads that start together on a link of capacity C (below their
  caps) all end after ``N * bytes * 8 / C``: round time grows linearly with the clients
  per cell once the cell is saturated.
- A link with ``shared: false`` (``topology.links.<kind>.shared``) gives every transfer
  the full ``bandwidth_mbps`` (capped by the device): the per-message model, used for a
  flat topology's ``end->cloud``, where every device has its own internet path.
- A transfer on a hop takes the time its bits need at the shared rate plus the hop's
  latency (the larger of the link's and, on the first hop, the device's), added once
  after the last bit. With one transfer on a link this is exactly the per-message
  ``latency + bytes * 8 / min(bandwidth, device cap)`` (:func:`hop_seconds`).

Times: the copy for a cell leaves its parent when the parent has it (time 0 at the
holder). Every reached client downloads on its cell's access link from the moment the
copy is in the cell, so clients whose reply later fails still take their share. A client
computes for measured training seconds on the reference machine / the profile's
``compute_speed`` after its download ends, then uploads on the shared access link. Its
*path time* is the moment its upload reaches its leaf cell plus every forwarding hop of
one sum to the top (``path_s``). Aggregators wait for their surviving children and
forwarding hops are equal within a tier, so the round ends at the slowest surviving path.

Split learning (``split``): a split device's training also waits for its edge and for every
micro-batch's four activation-sized messages (activations and the padding mask up, activations
down, gradients up, gradients down) between it and its neighbourhood edge, on each hop up to the
neighbourhood (capacity shared by the leaf cell's split devices, capped by the device's rates,
each message with the hop's latency); the edge's compute (measured seconds on the reference
machine) runs at ``edge_speed`` shared by the neighbourhood's split devices. These bytes are
counted on those links (in ``bytes``, and apart in ``activation_up``/``activation_down``).

Stragglers: clients unavailable this round (a draw fixed by seed, round and client
against the profile's ``availability``: they receive nothing and take no capacity) and
clients whose path time exceeds ``topology.deadline_s`` (they received the adapter; their
late update is neither aggregated nor counted on the uplink). A late upload still shares
the access link until it ends: the device does not know it is late, and nothing cuts it
off at the deadline.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from fedlora.seeds import world_draw
from fedlora.world.topology import CLOUD, CellTree, Link


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
    # Split learning: activation and gradient bytes per link (also in bytes_up/down), and each split
    # client's seconds spent on its edge and the per-step messages.
    activation_up: dict[str, int] = field(default_factory=dict)
    activation_down: dict[str, int] = field(default_factory=dict)
    split_s: dict[int, float] = field(default_factory=dict)

    def record(self) -> dict:
        """The fields a round record needs: ``bytes`` and ``sim_network_s``."""
        return {"bytes": {"up": dict(self.bytes_up), "down": dict(self.bytes_down)}, "sim_network_s": self.sim_network_s}


def is_available(tree: CellTree, client: int, server_round: int, seed: int) -> bool:
    """Whether the client's device is reachable this round; fixed by (seed, round, client)."""
    return world_draw(seed, "available", server_round, client) < tree.profile(client).availability


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
    """Seconds for one message alone on one link: latency plus serialisation at the link's
    rate (capped by ``cap_mbps``, the sending/receiving device's own rate on a first hop)."""
    mbps = link.bandwidth_mbps if cap_mbps is None else min(link.bandwidth_mbps, cap_mbps)
    return max(link.latency_ms, floor_ms) / 1e3 + nbytes * 8 / (mbps * 1e6)


@dataclass(frozen=True)
class SplitTraffic:
    """One split device's exchanges with its neighbourhood edge in a round."""

    exchanges: int  # forward/backward pairs (micro-batches)
    bytes_up: int  # device -> edge, all exchanges
    bytes_down: int  # edge -> device
    edge_s: float  # the edge's compute, measured seconds on the reference machine
    edge_speed: float  # the edge's compute speed (train.split.edge_speed)


@dataclass(frozen=True)
class Transfer:
    """One message on one link instance: who sends it, when it may start, how big it is."""

    key: Hashable
    start_s: float
    nbytes: int
    # The sender's/receiver's own rate limit (a device on its first hop); None = the link's.
    cap_mbps: float | None = None
    # A latency floor above the link's own (the device's access latency on a first hop).
    floor_ms: float = 0.0


def fair_rates(caps: Sequence[float], capacity: float) -> list[float]:
    """Max-min fair split of ``capacity`` among transfers with rate caps (water-filling):
    a transfer capped below the equal share gets its cap, the rest split what is left."""
    rates = [0.0] * len(caps)
    left, n = float(capacity), len(caps)
    for i in sorted(range(len(caps)), key=lambda i: caps[i]):
        rates[i] = min(caps[i], left / n)
        left -= rates[i]
        n -= 1
    return rates


def share_link(link: Link, transfers: Iterable[Transfer]) -> dict[Hashable, float]:
    """When each transfer on one link instance ends (delivered, latency included).

    Shared link (``link.shared``): processor sharing, the capacity split max-min fairly
    (:func:`fair_rates`) among the transfers in progress, recomputed at every start and
    end. Dedicated link: each transfer alone (:func:`hop_seconds`). Keys must be unique.
    """
    transfers = sorted(transfers, key=lambda t: (t.start_s, repr(t.key)))
    if len({t.key for t in transfers}) != len(transfers):
        raise ValueError(f"duplicate transfer keys on link {link.name}")
    if not link.shared:
        return {t.key: t.start_s + hop_seconds(link, t.nbytes, cap_mbps=t.cap_mbps, floor_ms=t.floor_ms) for t in transfers}
    capacity = link.bandwidth_mbps * 1e6
    done: dict[Hashable, float] = {}
    active: dict[int, float] = {}  # index into transfers -> bits left
    now, nxt = 0.0, 0
    while nxt < len(transfers) or active:
        if not active:
            now = max(now, transfers[nxt].start_s)
        while nxt < len(transfers) and transfers[nxt].start_s <= now:
            active[nxt] = transfers[nxt].nbytes * 8.0
            nxt += 1
        idx = list(active)
        caps = [capacity if transfers[i].cap_mbps is None else min(capacity, transfers[i].cap_mbps * 1e6) for i in idx]
        rates = fair_rates(caps, capacity)
        left = [active[i] / r for i, r in zip(idx, rates)]  # seconds to finish at these rates
        to_end = min(left)
        to_start = transfers[nxt].start_s - now if nxt < len(transfers) else math.inf
        step = min(to_end, to_start)
        now += step
        for i, r in zip(idx, rates):
            active[i] -= r * step
        # Transfers whose last bit left now: the first to finish, and any finishing with it
        # (a relative tolerance absorbs float rounding).
        ending = [i for i, s in zip(idx, left) if step == to_end and s - to_end <= 1e-12 * max(to_end, 1e-9)]
        for i in ending:
            del active[i]
            t = transfers[i]
            done[t.key] = now + max(link.latency_ms, t.floor_ms) / 1e3
    return done


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
    split: Mapping[int, SplitTraffic] | None = None,
) -> RoundNetwork:
    """Bytes per link, path times, stragglers and simulated time of one round.

    ``selected``: clients sent the adapter this round (unavailable ones are dropped here).
    ``train_s``: measured training seconds on the reference machine of every client whose
    update came back usable; a selected client missing from it downloaded (and shared its
    cell's downlink) but contributes nothing (an error or rejected reply).
    ``adapter_bytes``: size of the adapter sent down. ``up_bytes``: bytes each client
    uploaded (default ``adapter_bytes``). ``aggregate_bytes``: size of one forwarded sum
    (default ``adapter_bytes``). ``cloud_sync``: whether sums go up to the cloud (default
    ``tree.syncs_with_cloud``; pass True to force a sync, e.g. in the last round).
    ``split``: the split devices' exchanges with their edges (see the module docstring).

    Promises: a deterministic function of its arguments; every reached client is placed
    in ``cell_of``; ``survivors`` is a subset of ``train_s`` and disjoint from ``stragglers``.
    """
    routes = _Routes.of(tree, server_round, cloud_sync)
    agg_bytes = adapter_bytes if aggregate_bytes is None else aggregate_bytes
    selected = sorted(set(selected))
    stragglers = unavailable(tree, selected, server_round, seed)
    reached = [c for c in selected if c not in stragglers]
    unknown = [c for c in train_s if c not in selected]
    if unknown:
        raise ValueError(f"clients {unknown} have training times but were not selected this round")
    down_cells, downloaded = _downlink(routes, cell_of, reached, adapter_bytes)
    trained = [c for c in reached if c in train_s]
    ready = _compute(tree, trained, downloaded, train_s)
    split_s = _split_seconds(tree, cell_of, {c: split[c] for c in trained if c in split}) if split else {}
    for c, extra in split_s.items():
        ready[c] += extra
    sizes = {c: adapter_bytes if up_bytes is None else int(up_bytes[c]) for c in trained}
    path_s = _uplink(routes, cell_of, trained, ready, sizes, agg_bytes)
    stragglers.update(_past_deadline(tree, path_s))
    survivors = [c for c in sorted(path_s) if c not in stragglers]
    up, down = _link_bytes(routes, cell_of, reached, down_cells, survivors, sizes, adapter_bytes, agg_bytes)
    act_up, act_down = _activation_bytes(tree, cell_of, {c: split[c] for c in split_s}) if split else ({}, {})
    for name, n in act_up.items():
        up[name] += n
    for name, n in act_down.items():
        down[name] += n
    return RoundNetwork(
        bytes_up=up,
        bytes_down=down,
        sim_network_s=_round_end(tree, path_s, survivors, stragglers),
        stragglers=dict(sorted(stragglers.items())),
        path_s=dict(sorted(path_s.items())),
        survivors=survivors,
        cloud_sync=routes.sync,
        activation_up=act_up,
        activation_down=act_down,
        split_s=dict(sorted(split_s.items())),
    )


def _edge_hops(tree: CellTree, leaf: str) -> list[tuple[str, str]]:
    """(link name, cell whose instance it is) from an END client in ``leaf`` up to its neighbourhood edge."""
    hops = [(tree.first_hop(leaf), leaf)]
    cell = leaf
    while tree.cells[cell].tier != "neighbourhood" and tree.cells[cell].parent is not None:
        hops.append((tree.cells[cell].uplink, cell))  # type: ignore[arg-type]
        cell = tree.cells[cell].parent  # type: ignore[assignment]
    return hops


def _split_seconds(tree: CellTree, cell_of: Mapping[int, str], split: Mapping[int, SplitTraffic]) -> dict[int, float]:
    """Split client -> seconds its round spends on its edge's compute and on the per-step messages."""
    per_leaf: dict[str, int] = {}
    per_edge: dict[str, int] = {}
    for c in split:
        per_leaf[cell_of[c]] = per_leaf.get(cell_of[c], 0) + 1
        edge = tree.neighbourhood_of(cell_of[c])
        per_edge[edge] = per_edge.get(edge, 0) + 1
    out = {}
    for c, t in split.items():
        p, leaf = tree.profile(c), cell_of[c]
        seconds = t.edge_s * per_edge[tree.neighbourhood_of(leaf)] / t.edge_speed
        for i, (name, _) in enumerate(_edge_hops(tree, leaf)):
            link = tree.links[name]
            share = link.bandwidth_mbps / per_leaf[leaf] if link.shared else link.bandwidth_mbps
            up, down = (min(share, p.uplink_mbps), min(share, p.downlink_mbps)) if i == 0 else (share, share)
            latency = max(link.latency_ms, p.latency_ms if i == 0 else 0.0) / 1e3
            seconds += 4 * t.exchanges * latency + t.bytes_up * 8 / (up * 1e6) + t.bytes_down * 8 / (down * 1e6)
        out[c] = seconds
    return out


def _activation_bytes(tree: CellTree, cell_of: Mapping[int, str],
                      split: Mapping[int, SplitTraffic]) -> tuple[dict[str, int], dict[str, int]]:
    """Activation/gradient bytes per link kind between the split clients and their edges (up, down)."""
    up: dict[str, int] = {}
    down: dict[str, int] = {}
    for c, t in sorted(split.items()):
        for name, _ in _edge_hops(tree, cell_of[c]):
            up[name] = up.get(name, 0) + t.bytes_up
            down[name] = down.get(name, 0) + t.bytes_down
    return up, down


@dataclass(frozen=True)
class _Routes:
    """Where a round's adapter comes down from and where its sums go up to, for any leaf cell."""

    tree: CellTree
    sync: bool  # the round's sums go up to the cloud (else they stop at the neighbourhood)
    global_down: bool  # clients start from the cloud's adapter (else from their neighbourhood's cell model)

    @classmethod
    def of(cls, tree: CellTree, server_round: int, cloud_sync: bool | None) -> _Routes:
        sync = tree.syncs_with_cloud(server_round) if cloud_sync is None else cloud_sync
        if tree.kind == "flat":
            sync = True  # the cloud is every client's only aggregator
        return cls(tree, sync, tree.global_download(server_round) or tree.kind == "flat")

    def holder(self, leaf: str) -> str:
        return CLOUD if self.global_down else self.tree.neighbourhood_of(leaf)

    def top(self, leaf: str) -> str:
        return CLOUD if self.sync else self.tree.neighbourhood_of(leaf)

    def below(self, leaf: str, upper: str) -> list[str]:
        """Cells from ``leaf`` up to (not including) ``upper``: the uplinks in between."""
        chain = self.tree.chain(leaf)
        return chain[: chain.index(upper)]

    def uplink(self, cell: str) -> Link:
        return self.tree.links[self.tree.cells[cell].uplink]  # type: ignore[index]


def _downlink(routes: _Routes, cell_of: Mapping[int, str], reached: list[int],
              adapter_bytes: int) -> tuple[set[str], dict[int, float]]:
    """Down the tree: one copy per cell between the holder and a reached client, each on its
    own uplink instance, leaving the parent when the parent has it; then every reached client
    of a leaf downloads on the leaf's shared access link. -> (cells a copy crossed into,
    client -> when its download ends)."""
    tree = routes.tree
    down_cells = {cell for c in reached for cell in routes.below(cell_of[c], routes.holder(cell_of[c]))}
    has_copy: dict[str, float] = {}

    def copy_at(cell: str) -> float:
        if cell not in down_cells:
            return 0.0  # the holder, or a cell that got nothing this round
        if cell not in has_copy:
            start = copy_at(tree.cells[cell].parent)  # type: ignore[arg-type]
            has_copy[cell] = share_link(routes.uplink(cell), [Transfer(cell, start, adapter_bytes)])[cell]
        return has_copy[cell]

    downloaded: dict[int, float] = {}
    for leaf, group in _by_leaf(reached, cell_of).items():
        link = tree.links[tree.first_hop(leaf)]
        start = copy_at(leaf)
        downloaded.update(share_link(link, [
            Transfer(c, start, adapter_bytes, tree.profile(c).downlink_mbps, tree.profile(c).latency_ms) for c in group
        ]))
    return down_cells, downloaded


def _compute(tree: CellTree, trained: list[int], downloaded: Mapping[int, float],
             train_s: Mapping[int, float]) -> dict[int, float]:
    """Client -> when its update is ready to upload: its download's end plus its training on its own device."""
    return {c: downloaded[c] + compute_seconds(tree, c, float(train_s[c])) for c in trained}


def _uplink(routes: _Routes, cell_of: Mapping[int, str], trained: list[int], ready: Mapping[int, float],
            sizes: Mapping[int, int], agg_bytes: int) -> dict[int, float]:
    """Up: every trained client uploads on its leaf's shared access link once ready, then one sum
    per cell goes on up to the round's top. -> client -> its path time."""
    tree = routes.tree
    path_s: dict[int, float] = {}
    forward: dict[str, float] = {}  # cell -> seconds one sum takes on its uplink
    for leaf, group in _by_leaf(trained, cell_of).items():
        link = tree.links[tree.first_hop(leaf)]
        arrived = share_link(link, [
            Transfer(c, ready[c], sizes[c], tree.profile(c).uplink_mbps, tree.profile(c).latency_ms) for c in group
        ])
        hops = routes.below(leaf, routes.top(leaf))
        for cell in hops:
            if cell not in forward:
                forward[cell] = share_link(routes.uplink(cell), [Transfer(cell, 0.0, agg_bytes)])[cell]
        for c in group:
            path_s[c] = arrived[c] + sum(forward[cell] for cell in hops)
    return path_s


def _past_deadline(tree: CellTree, path_s: Mapping[int, float]) -> dict[int, str]:
    """Clients whose path time exceeds ``topology.deadline_s`` (0: no deadline) -> why they are late."""
    if tree.deadline_s <= 0:
        return {}
    return {c: f"past the deadline: path {s:.3f} s > topology.deadline_s={tree.deadline_s:g}"
            for c, s in path_s.items() if s > tree.deadline_s}


def _link_bytes(routes: _Routes, cell_of: Mapping[int, str], reached: list[int], down_cells: set[str],
                survivors: list[int], sizes: Mapping[int, int], adapter_bytes: int,
                agg_bytes: int) -> tuple[dict[str, int], dict[str, int]]:
    """-> (bytes up, bytes down) per link kind, every kind of the tree present (0 if unused):
    one adapter per reached client and per cell a copy crossed into; one update per survivor
    and one sum per cell between a survivor and the round's top."""
    tree = routes.tree
    down = {name: 0 for name in tree.links}
    up = {name: 0 for name in tree.links}
    for c in reached:
        down[tree.first_hop(cell_of[c])] += adapter_bytes
    for cell in down_cells:
        down[tree.cells[cell].uplink] += adapter_bytes  # type: ignore[index]
    up_cells: set[str] = set()
    for c in survivors:
        up[tree.first_hop(cell_of[c])] += sizes[c]
        up_cells.update(routes.below(cell_of[c], routes.top(cell_of[c])))
    for cell in up_cells:
        up[tree.cells[cell].uplink] += agg_bytes  # type: ignore[index]
    return up, down


def _round_end(tree: CellTree, path_s: Mapping[int, float], survivors: list[int], stragglers: Mapping[int, str]) -> float:
    """When the round ends: the slowest surviving path; the deadline when none survived and some
    were late; 0 when nobody tried."""
    if survivors:
        return max(path_s[c] for c in survivors)
    return tree.deadline_s if any(c in path_s for c in stragglers) else 0.0


def _by_leaf(clients: Iterable[int], cell_of: Mapping[int, str]) -> dict[str, list[int]]:
    """Clients grouped by the leaf cell they are in (one access-link instance each)."""
    out: dict[str, list[int]] = {}
    for c in sorted(clients):
        out.setdefault(cell_of[c], []).append(c)
    return out
