"""Which edge a planned END device attaches to, and its moves to another edge between rounds.

A device of a plan may know several edges: its ``node.yaml`` ``candidate_cells`` (cell -> that
cell's edge and its SuperLink's address; every such edge trusts the plan's CA, ``ca.pem``,
and admits this device's SuperNode key). It is attached to one of them at a time:

- ``fedlora client --config FOLDER --cell X`` attaches to the edge of X (and writes X to
  ``state/cell``); without ``--cell``, to the cell named in ``state/cell``, else its home cell;
- while it runs, writing another candidate cell's name into ``state/cell`` moves it: its
  SuperNode leaves the edge and starts again towards the new edge's SuperLink. Do it between
  rounds: a device that moves in the middle of a round is a dropout of that round.

Each attachment counts up in ``state/attachment.json``; a device with several candidate cells
tells its edges the count (node config ``attachment``), so that the cloud takes the newest
should two edges report it at once (:func:`fedlora.world.attachments.place_devices`).
"""

from __future__ import annotations

import json
import logging

from fedlora.deploy.plan import NodeFolder, PlanError

log = logging.getLogger("fedlora")
CELL_FILE = "state/cell"
ATTACHMENT_FILE = "state/attachment.json"


def candidates(node: NodeFolder) -> dict[str, str]:
    """Cell -> SuperLink address of the edges this device may attach to, its home cell first
    (a folder without ``candidate_cells``, or of a flat topology: its one upstream)."""
    listed = node.doc.get("candidate_cells")
    if listed:
        return {str(cell): str(edge["superlink"]) for cell, edge in listed.items()}
    up = node.doc["supernode"]
    upstream = str(up["upstream"])
    return {upstream[len("edge-"):] if upstream.startswith("edge-") else upstream: str(up["superlink"])}


class Attachment:
    """The edge this device is attached to now, and where ``state/cell`` asks it to move."""

    def __init__(self, node: NodeFolder, cell: str | None = None):
        self.node = node
        self.cells = candidates(node)
        self.roams = len(self.cells) > 1  # only then does it tell its edges the attachment count
        if cell:
            self._check(cell, "--cell")
            self._cell_file().parent.mkdir(exist_ok=True)
            self._cell_file().write_text(cell + "\n")
        self.ignored = ""  # a state/cell naming no candidate cell, warned about once
        wanted = self._wanted()
        if wanted not in self.cells:
            if wanted:
                self.ignored = wanted
                log.warning("device %s: %s names %r, which is none of its candidate cells (%s); attaching to its home "
                            "cell", node.name, CELL_FILE, wanted, ", ".join(self.cells))
            wanted = next(iter(self.cells))
        self.cell = wanted
        self.count = self._count_up()

    @property
    def superlink(self) -> str:
        return self.cells[self.cell]

    def node_config(self) -> dict:
        """What the device's SuperNode tells its edge about this attachment."""
        return {"attachment": self.count} if self.roams else {}

    def poll(self) -> tuple[str, dict] | None:
        """When ``state/cell`` names another candidate cell: attach there and return (its
        edge's SuperLink, the node settings that change); else None."""
        wanted = self._wanted()
        if not wanted or wanted == self.cell:
            return None
        if wanted not in self.cells:
            if wanted != self.ignored:
                self.ignored = wanted
                log.warning("device %s: %s names %r, which is none of its candidate cells (%s); staying in %s",
                            self.node.name, CELL_FILE, wanted, ", ".join(self.cells), self.cell)
            return None
        log.info("device %s: moving from %s to %s (%s)", self.node.name, self.cell, wanted, CELL_FILE)
        self.cell = wanted
        self.count = self._count_up()
        return self.superlink, self.node_config()

    def _check(self, cell: str, what: str) -> None:
        if cell not in self.cells:
            raise PlanError(f"{what} {cell!r} is none of this device's candidate cells: {', '.join(self.cells)} "
                            f"(node.yaml candidate_cells of {self.node.folder})")

    def _cell_file(self):
        return self.node.path(CELL_FILE)

    def _wanted(self) -> str | None:
        try:
            return self._cell_file().read_text().strip() or None
        except OSError:
            return None

    def _count_up(self) -> int:
        """One more attachment, remembered in ``state/attachment.json``."""
        path = self.node.path(ATTACHMENT_FILE)
        try:
            count = int(json.loads(path.read_text())["attachment"]) + 1
        except (OSError, ValueError, KeyError, TypeError):
            count = 1
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"cell": self.cell, "attachment": count}) + "\n")
        return count
