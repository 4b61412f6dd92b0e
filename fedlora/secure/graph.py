"""Who masks with whom and who holds whose shares: the neighbour graph of one cell.

- Small cells (up to ``complete_up_to`` clients, ~100 by default) use the complete graph:
  every client masks with every other (SecAgg, Bonawitz et al. 2017).
- Bigger cells use a k-regular Harary graph (SecAgg+, Bell et al. 2020): clients sit on a
  ring in an order fixed by the round's graph seed, and each masks with its k/2 nearest on
  either side. Cost per client grows with k ~ log n instead of n.

A client's secrets are Shamir-shared among its *holders*: itself and its neighbours
(Bonawitz shares to every client including oneself). The graph depends only on the roster
and the seed, so every party computes the same one.

Threshold t (shares needed to rebuild a secret) must be a strict majority of a client's
holders: then a server cannot collect ``t`` shares of a client's self-mask seed *and* ``t``
of its mask key from disjoint groups of honest clients, each group told a different story
about whether the client dropped (every honest client reveals only one of the two).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

COMPLETE = "complete"
HARARY = "harary"
DEFAULT_COMPLETE_UP_TO = 100


@dataclass(frozen=True)
class NeighbourGraph:
    """An undirected graph over a cell's roster; ``members`` in canonical (sorted) order."""

    members: tuple[str, ...]
    kind: str
    degree: int
    adjacency: dict[str, frozenset[str]] = field(repr=False, compare=False)
    positions: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "positions", {m: i for i, m in enumerate(self.members)})

    def neighbours(self, client: str) -> frozenset[str]:
        """The clients ``client`` shares a pairwise mask with (never itself)."""
        try:
            return self.adjacency[client]
        except KeyError:
            raise KeyError(f"{client!r} is not in this cell's roster") from None

    def holders(self, client: str) -> tuple[str, ...]:
        """Who gets a share of ``client``'s secrets: itself and its neighbours, roster order."""
        near = self.neighbours(client) | {client}
        return tuple(m for m in self.members if m in near)

    def share_x(self, holder: str) -> int:
        """The Shamir x-coordinate of ``holder``: 1 + its position in the roster."""
        try:
            return self.positions[holder] + 1
        except KeyError:
            raise KeyError(f"{holder!r} is not in this cell's roster") from None

    def check_threshold(self, threshold: int) -> None:
        """Raise ValueError unless ``threshold`` is a safe t for every client's holders:
        at least 2 (a sum over one client is that client's update), at most the number of
        holders (or nothing can be rebuilt), and a strict majority of them (see module doc)."""
        holders = self.degree + 1
        if threshold < 2:
            raise ValueError(f"threshold t={threshold} must be >= 2: a sum over one client reveals that client")
        if threshold > holders:
            raise ValueError(f"threshold t={threshold} exceeds the {holders} holders of each client's shares "
                             f"({self.kind} graph of degree {self.degree} over {len(self.members)} clients)")
        if 2 * threshold <= holders:
            raise ValueError(f"threshold t={threshold} must be more than half of the {holders} holders of each "
                             f"client's shares (t >= {holders // 2 + 1}), or a server could learn both secrets of a client")


def complete_graph(members: tuple[str, ...] | list[str]) -> NeighbourGraph:
    """Every client is a neighbour of every other."""
    ordered = _canonical(members)
    everyone = frozenset(ordered)
    adjacency = {m: everyone - {m} for m in ordered}
    return NeighbourGraph(ordered, COMPLETE, len(ordered) - 1, adjacency)


def harary_graph(members: tuple[str, ...] | list[str], degree: int, seed: bytes) -> NeighbourGraph:
    """The k-regular Harary graph H_{k,n} with clients placed on the ring by ``seed``.

    Ring position: clients sorted by SHA-256(seed, id), so the placement is uniform and the
    same on every device. Even k: each client is joined to the k/2 nearest on either side.
    Odd k (n must be even): additionally to the opposite client on the ring.
    """
    ordered = _canonical(members)
    n = len(ordered)
    if degree >= n - 1:
        return complete_graph(ordered)
    if degree < 2:
        raise ValueError(f"graph degree must be >= 2, got {degree}")
    if degree % 2 and n % 2:
        raise ValueError(f"no {degree}-regular graph on {n} clients (odd degree needs an even number of clients)")
    ring = sorted(ordered, key=lambda m: hashlib.sha256(seed + b"\x00" + m.encode()).digest())
    adjacency: dict[str, set[str]] = {m: set() for m in ordered}
    for i, m in enumerate(ring):
        for step in range(1, degree // 2 + 1):
            for other in (ring[(i + step) % n], ring[(i - step) % n]):
                adjacency[m].add(other)
        if degree % 2:
            adjacency[m].add(ring[(i + n // 2) % n])
    return NeighbourGraph(ordered, HARARY, degree, {m: frozenset(a) for m, a in adjacency.items()})


def cell_graph(members: tuple[str, ...] | list[str], seed: bytes, *, complete_up_to: int = DEFAULT_COMPLETE_UP_TO,
               degree: int | None = None) -> NeighbourGraph:
    """The graph a cell uses: complete up to ``complete_up_to`` clients, else Harary with
    ``degree`` (default :func:`secagg_plus_parameters`)."""
    n = len(members)
    if n <= complete_up_to:
        return complete_graph(members)
    k = degree if degree is not None else secagg_plus_parameters(n, complete_up_to)[0]
    return harary_graph(members, k, seed)


def secagg_plus_parameters(n: int, complete_up_to: int = DEFAULT_COMPLETE_UP_TO) -> tuple[int, int]:
    """A (degree k, threshold t) for a cell of ``n`` clients.

    Complete graph: k = n - 1 and the smallest safe t (a strict majority of n), which
    tolerates the most dropouts. Harary graph: k = 2 * ceil(2.6 * log2 n) and
    t = floor(0.7 k) + 1, a log-n scaling pinned to the design point n = 1000 -> (52, 37)
    (SecAgg+ against 5% corrupt and 5% dropped clients). It is a heuristic scaling, not a
    re-derivation of Bell et al.'s bounds: set k and t explicitly for other risk levels.
    """
    if n < 2:
        raise ValueError(f"a cell needs at least 2 clients, got {n}")
    if n <= complete_up_to:
        return n - 1, n // 2 + 1
    k = min(n - 1, 2 * math.ceil(2.6 * math.log2(n)))
    return k, math.floor(0.7 * k) + 1


def _canonical(members: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    ordered = tuple(sorted(members))
    if len(set(ordered)) != len(ordered):
        raise ValueError("a roster lists a client twice")
    if len(ordered) < 2:
        raise ValueError(f"a cell graph needs at least 2 clients, got {len(ordered)}")
    return ordered
