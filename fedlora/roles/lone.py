"""A device left alone in its neighbourhood cell joins another cell's secure session for the round.

A secure session needs at least :data:`~fedlora.secure.rounds.MIN_SESSION_CLIENTS` clients: the
unmasker sees only a cell's sum, and the sum of one update is that update. When mobility (or
devices that are off this round) leaves a neighbourhood with one training device, the cloud would
refuse the cell before training (no battery wasted) and that device's data would not count.
:func:`host_lone_devices` instead moves the device into the session of another neighbourhood that
trains this round -- a sibling under the same sub-urban cell first, any other neighbourhood only
when it has none -- for this round only, before dispatch.

The host's session is an ordinary session over the merged group: the host's aggregator and
unmasker, a roster and a threshold t computed for the merged n, the host's start adapter (under
HierFAVG the host's cell model, which the merged sum updates). So no tier ever sees the lone
device's update on its own, dropout recovery covers it like any member, and it is in exactly one
session (its own cell sends no request). Its placement (``cell_of``) does not change: the network
model carries its traffic on its own cell's links and does not add the relay from its edge to the
host's through the sub-urban tier.

:func:`left_out` names the sampled devices that did not count for a reason other than their own
dropout (the round record's ``left_out``; aim: none).
"""

from __future__ import annotations

from collections.abc import Mapping

from fedlora.adapters import AdapterState
from fedlora.secure.rounds import CELL_ABORTED, CELL_REFUSED, DROPPED, MIN_SESSION_CLIENTS
from fedlora.world.topology import CellTree

# (neighbourhood cell, its training clients in id order, the adapter they start from): one cell request.
Group = tuple[str, list[int], AdapterState]
# Why a cell's clients are dropped though they did not drop out themselves: a cell the cloud refused, or
# one the protocol aborted (fewer than t survivors, a bad aggregator) after they had answered.
NOT_THEIR_DROPOUT = (CELL_REFUSED, CELL_ABORTED)


def host_lone_devices(groups: list[Group], tree: CellTree) -> tuple[list[Group], dict[int, tuple[str, str]]]:
    """-> (the groups with every cell of fewer than ``MIN_SESSION_CLIENTS`` clients merged into a host
    cell, {merged client: (its own cell, the host cell)}).

    Promises: every client of ``groups`` is in exactly one returned group; a host keeps its start
    adapter, which its guests then train from; groups stay in cell order; a cell stays alone only
    when no other cell trains this round. A host is a sibling (same parent) when one trains, the
    smallest that is not itself alone (ties by id), so sessions stay even and the relay short.
    """
    cells = {cell: (sorted(clients), start) for cell, clients, start in groups}
    if len(cells) != len(groups):
        raise ValueError("a cell appears in two groups; each cell is one session")
    hosted: dict[int, tuple[str, str]] = {}
    for cell in sorted(cells):
        if len(cells[cell][0]) >= MIN_SESSION_CLIENTS:
            continue  # big enough (or made so by a guest before)
        host = _host(cell, cells, tree)
        if host is None:
            continue
        guests, _ = cells.pop(cell)
        cells[host] = (sorted(cells[host][0] + guests), cells[host][1])
        hosted.update({c: (cell, host) for c in guests})
    return [(cell, clients, start) for cell, (clients, start) in sorted(cells.items())], hosted


def _host(cell: str, cells: Mapping[str, tuple[list[int], AdapterState]], tree: CellTree) -> str | None:
    """The cell whose session ``cell``'s clients join, or None when no other cell trains."""
    parent = tree.cells[cell].parent if cell in tree.cells else None
    others = [c for c in cells if c != cell]
    siblings = [c for c in others if c in tree.cells and tree.cells[c].parent == parent]
    pool = siblings or others
    if not pool:
        return None
    return min(pool, key=lambda c: (len(cells[c][0]) < MIN_SESSION_CLIENTS, len(cells[c][0]), c))


def left_out(statuses: Mapping[int, object]) -> list[dict]:
    """The clients of ``statuses`` (client -> a status with ``.status`` and ``.reason``) whose update is
    not in the round's sum though they did not drop out themselves, as [{client, reason}] in id order."""
    return [{"client": c, "reason": st.reason} for c, st in sorted(statuses.items())
            if st.status == DROPPED and str(st.reason or "").startswith(NOT_THEIR_DROPOUT)]
