"""END clients handing over between neighbourhood cells, between rounds.

A placement ``cell_of`` maps every END client to the leaf cell it uploads from (see
:mod:`fedlora.world.topology`). Mobility only ever *replaces* a client's cell, so after any
number of moves every client is still in exactly one cell. Models
(``topology.mobility.model``):

- ``none``: clients stay where :func:`~fedlora.world.topology.build_tree` put them.
- ``random_walk``: from round 2 on, each client hands over with chance ``handover_prob``,
  to a sibling neighbourhood under the same sub-urban cell, or with chance ``far_prob``
  (or when it has no sibling) to any other neighbourhood; arriving, it may board one of
  that neighbourhood's vehicles (femto cells) like at the start. Draws are fixed by
  (seed, round, client), so a run and its resume move the same clients.
- ``trace``: a file of ``round,client,cell`` rows (CSV with that header, or a JSON list of
  ``{"round", "client", "cell"}`` objects); a row puts the client in that leaf cell from
  that round on (round 1 rows override the initial placement).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

from fedlora.config import ConfigError
from fedlora.seeds import world_draw
from fedlora.world.topology import CellTree, board

TRACE_SETTING = "topology.mobility.trace_path"


def next_assignment(tree: CellTree, cell_of: Mapping[int, str], server_round: int, seed: int) -> dict[int, str]:
    """The placement for ``server_round`` given the previous round's (a new dict; the
    argument is not changed). Every client of ``cell_of`` keeps exactly one leaf cell."""
    model = tree.mobility.model
    if model == "none" or tree.kind == "flat":
        return dict(cell_of)
    if model == "random_walk":
        return _random_walk(tree, cell_of, server_round, seed)
    if model == "trace":
        moves = trace_moves(tree).get(server_round, {})
        out = dict(cell_of)
        for client, cell in moves.items():
            if client in out:
                out[client] = cell
        return out
    raise ConfigError(f"topology.mobility.model={model!r} is not one of: none, random_walk, trace")


def assignment_at(tree: CellTree, server_round: int, seed: int) -> dict[int, str]:
    """The placement in ``server_round``, replayed from ``tree.initial`` (what a resumed run
    needs). Validates a whole trace up front, so a bad row fails the run at its start."""
    cell_of = dict(tree.initial)
    for r in range(1, server_round + 1):
        cell_of = next_assignment(tree, cell_of, r, seed)
    return cell_of


def _random_walk(tree: CellTree, cell_of: Mapping[int, str], server_round: int, seed: int) -> dict[int, str]:
    m = tree.mobility
    out = dict(cell_of)
    if server_round < 2:  # round 1 is the initial placement; moves happen between rounds
        return out
    neighbourhoods = tree.tier("neighbourhood")
    for client in sorted(cell_of):
        if world_draw(seed, "handover", server_round, client) >= m.handover_prob:
            continue
        here = tree.neighbourhood_of(cell_of[client])
        others = [n for n in neighbourhoods if n != here]
        if not others:
            continue
        siblings = [n for n in tree.cells[tree.cells[here].parent].children if n != here]  # type: ignore[index]
        far = world_draw(seed, "far", server_round, client) < m.far_prob
        candidates = others if far or not siblings else siblings
        dest = candidates[int(world_draw(seed, "dest", server_round, client) * len(candidates))]
        out[client] = board(tree.cells, dest, client, server_round, seed, tree.passenger_fraction)
    return out


def trace_moves(tree: CellTree) -> dict[int, dict[int, str]]:
    """The tree's trace as ``round -> {client: leaf cell}``, every row checked against the
    tree. Raises ConfigError naming ``topology.mobility.trace_path`` and the bad row."""
    path = Path(tree.mobility.trace_path).expanduser()
    if not tree.mobility.trace_path or not path.is_file():
        raise ConfigError(f"{TRACE_SETTING}={tree.mobility.trace_path!r} does not exist or is not a file")
    return _checked_moves(str(path.resolve()), path.stat().st_mtime_ns, tuple(tree.leaf_cells), len(tree.initial))


@lru_cache(maxsize=8)
def _checked_moves(path: str, mtime_ns: int, leaves: tuple[str, ...], num_clients: int) -> dict[int, dict[int, str]]:
    del mtime_ns  # part of the cache key only: an edited file is read again
    known = set(leaves)
    moves: dict[int, dict[int, str]] = {}
    for where, r, client, cell in read_trace(path):
        if cell not in known:
            raise ConfigError(
                f"{TRACE_SETTING}: {where}: unknown cell {cell!r}; leaf cells are e.g. {', '.join(leaves[:4])}"
            )
        if not 0 <= client < num_clients:
            raise ConfigError(f"{TRACE_SETTING}: {where}: client {client} is not in 0..{num_clients - 1}")
        previous = moves.setdefault(r, {}).get(client)
        if previous is not None and previous != cell:
            raise ConfigError(f"{TRACE_SETTING}: {where}: client {client} is already in {previous!r} in round {r}")
        moves[r][client] = cell
    return moves


def read_trace(path: str | Path) -> list[tuple[str, int, int, str]]:
    """Rows of a trace file as ``(where, round, client, cell)``, ``where`` naming file and row.

    CSV needs a header with ``round``, ``client`` and ``cell``; JSON is a list of objects
    with those keys. Raises ConfigError for a missing file, a bad header or a bad value.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{TRACE_SETTING}={str(path)!r} does not exist or is not a file")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{TRACE_SETTING}: {path}: not valid JSON ({exc})") from None
        if not isinstance(data, list):
            raise ConfigError(f"{TRACE_SETTING}: {path}: expected a JSON list of {{round, client, cell}} objects")
        rows = [(f"{path} item {i}", item) for i, item in enumerate(data)]
    else:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            missing = {"round", "client", "cell"} - set(reader.fieldnames or [])
            if missing:
                raise ConfigError(f"{TRACE_SETTING}: {path}: header lacks {', '.join(sorted(missing))} (need round,client,cell)")
            rows = [(f"{path} line {reader.line_num}", row) for row in reader]
    out = []
    for where, row in rows:
        if not isinstance(row, dict) or not {"round", "client", "cell"} <= set(row):
            raise ConfigError(f"{TRACE_SETTING}: {where}: needs round, client and cell")
        try:
            r, client = int(row["round"]), int(row["client"])
        except (TypeError, ValueError):
            raise ConfigError(f"{TRACE_SETTING}: {where}: round and client must be integers, got {row!r}") from None
        if r < 1:
            raise ConfigError(f"{TRACE_SETTING}: {where}: round {r} must be >= 1")
        out.append((where, r, client, str(row["cell"]).strip()))
    return out
