"""Where END devices are in a deployment: the cells whose edges report them connected.

In simulation the mobility model moves the devices between rounds (:mod:`fedlora.world.mobility`).
In a deployment they move themselves: a device of a plan knows several edges, its *candidate
cells* (:func:`candidate_cells`), and is attached to one of them at a time. Before each round
the cloud asks every edge which END devices are connected to its SuperLink (one
:class:`EdgeReport` per edge), and :func:`place_devices` turns the reports into the round's
placement -- so each device is asked, and its update counted, exactly once: in the cell it
uploads from. :func:`tracks_devices` says whether a run's cloud asks at all.

Pure Python: no Flower, no sockets.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from fedlora.world.mobility import trace_moves
from fedlora.world.topology import CellTree


@dataclass(frozen=True)
class EdgeReport:
    """The END devices connected to one edge's SuperLink when the cloud asked."""

    cell: str  # the neighbourhood cell the edge aggregates
    # client -> the device's attachment count: it counts up each time the device attaches to
    # an edge, so the newest attachment wins when two edges report it (0: the device did not say).
    devices: dict[int, int]


@dataclass
class Placement:
    """One round's placement from the edges' reports."""

    cell_of: dict[int, str]  # every client -> the leaf cell it uploads from this round
    moved: dict[int, tuple[str, str]] = field(default_factory=dict)  # client -> (leaf before, leaf now)
    # In no report: kept in its last cell (whose edge waits for it, or drops it as not connected).
    unreported: list[int] = field(default_factory=list)
    # Reported by more than one edge (its old edge has not yet seen it leave): client -> those cells.
    several: dict[int, list[str]] = field(default_factory=dict)


def tracks_devices(tree: CellTree) -> bool:
    """Whether a deployed cloud asks its edges where the devices are before every round: on a
    tree with a mobility model (``topology.mobility.model`` not ``none``). In a deployment the
    model does not move anyone; it says that devices may move (and, in the plan, where to)."""
    return tree.kind == "tree" and tree.mobility.model != "none"


def candidate_cells(tree: CellTree, client: int) -> list[str]:
    """The neighbourhood cells whose edges a device may attach to: its home cell (where
    ``build_tree`` puts it in round 1) first, then the cells the mobility model can move it to
    -- ``none``: no other; ``random_walk`` (with ``handover_prob`` > 0): the sibling
    neighbourhoods under its sub-urban cell, or every other neighbourhood when ``far_prob`` > 0
    or it has no sibling; ``trace``: the cells the trace moves it to."""
    if tree.kind != "tree":
        raise ValueError("candidate cells need a tree topology (topology.kind=tree)")
    home = tree.neighbourhood_of(tree.initial[client])
    m = tree.mobility
    others: list[str] = []
    if m.model == "random_walk" and m.handover_prob > 0:
        hoods = tree.tier("neighbourhood")
        siblings = [n for n in tree.cells[tree.cells[home].parent].children if n != home]  # type: ignore[index]
        others = [n for n in hoods if n != home] if m.far_prob > 0 or not siblings else siblings
    elif m.model == "trace":
        moves = trace_moves(tree)
        others = [tree.neighbourhood_of(cells[client]) for _, cells in sorted(moves.items()) if client in cells]
    return list(dict.fromkeys([home, *others]))


def place_devices(tree: CellTree, previous: Mapping[int, str], reports: Iterable[EdgeReport]) -> Placement:
    """Each client of ``previous`` (client -> last round's leaf cell) in exactly one leaf cell:

    - reported by one edge: that edge's cell (its last leaf if that is in the same neighbourhood,
      so a passenger keeps its vehicle; else the neighbourhood itself);
    - reported by several: the report with the highest attachment count; on a tie a cell other
      than its last one (it moved there; its old edge has not seen it leave yet), first by id;
    - reported by none: its last cell.

    Reports of clients not in ``previous`` are ignored; a report for a cell that is no
    neighbourhood of ``tree`` is a ValueError."""
    hoods = set(tree.tier("neighbourhood"))
    seen: dict[int, list[tuple[int, str]]] = {}
    for report in reports:
        if report.cell not in hoods:
            raise ValueError(f"a report for {report.cell!r}, which is no neighbourhood cell of this topology")
        for client, count in report.devices.items():
            if client in previous:
                seen.setdefault(int(client), []).append((int(count), report.cell))
    out = Placement(cell_of={})
    for client, leaf in sorted(previous.items()):
        where = seen.get(client)
        if not where:
            out.unreported.append(client)
            out.cell_of[client] = leaf
            continue
        here = tree.neighbourhood_of(leaf)
        if len(where) > 1:
            out.several[client] = sorted(cell for _, cell in where)
        newest = max(count for count, _ in where)
        cells = sorted({cell for count, cell in where if count == newest}, key=lambda cell: (cell == here, cell))
        cell = cells[0]
        out.cell_of[client] = leaf if cell == here else cell
        if cell != here:
            out.moved[client] = (leaf, cell)
    return out
