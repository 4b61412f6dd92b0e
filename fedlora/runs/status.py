"""What a run directory says about its run: state, rounds done, who joined and who dropped.

Reads only the run-directory contract (``config.yaml``, ``rounds.jsonl``,
``checkpoints/latest.json``, ``summary.json``), so it works the same for ``fedlora run``,
``flwr run`` and ``fedlora cloud``, while the run is going (a half-written last line of
``rounds.jsonl`` is skipped) or long after. :func:`run_status` builds a JSON-ready dict;
:func:`render_text` turns it into a plain-text report (no colour, same on a terminal and in
a pipe). Backs ``fedlora status``.

The state is derived, not recorded: ``finished`` once ``summary.json`` exists; otherwise
``running`` while a file of the run changed recently (within :data:`STALE_FLOOR_S` or three
times the slowest round so far, whichever is longer), else ``interrupted`` (resumable when
a checkpoint exists). A run that crashed a moment ago therefore reads ``running`` until
that window has passed: the run directory holds no heartbeat of the process.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fedlora.config import ConfigError, load_yaml
from fedlora.run_settings import resolve_run
from fedlora.runs.report import CHECKPOINTS, ROUNDS, SUMMARY
from fedlora.world.mobility import assignment_at, next_assignment

CONFIG = "config.yaml"
FINISHED, RUNNING, INTERRUPTED = "finished", "running", "interrupted"
# No file of the run touched for this long (and for 3x the slowest round) -> interrupted.
STALE_FLOOR_S = 300.0
UNKNOWN_CELL = "?"


class StatusError(Exception):
    """The directory is not a readable run directory; the message says what is missing or broken."""


def read_records(run_dir: Path) -> tuple[list[dict], bool]:
    """(round records, whether a partial last line was skipped).

    The last line may be half-written while the run appends it; any other unreadable line
    means the file is damaged and raises :class:`StatusError` naming the line."""
    path = Path(run_dir) / ROUNDS
    if not path.exists():
        return [], False
    text = path.read_text()
    lines = text.split("\n")
    records, partial = [], False
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:  # no newline after it yet: still being written
                partial = True
                continue
            raise StatusError(f"{path} line {i + 1} is not JSON ({exc.msg}); the file is damaged") from None
        if not isinstance(record, dict) or not isinstance(record.get("round"), int):
            raise StatusError(f"{path} line {i + 1} is not a round record (no integer 'round')")
        records.append(record)
    return records, partial


def run_status(run_dir: str | Path, now: float | None = None) -> dict[str, Any]:
    """Everything ``fedlora status`` shows, as a JSON-ready dict (see the module docstring)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise StatusError(f"{run_dir} does not exist or is not a directory")
    if not (run_dir / CONFIG).is_file():
        raise StatusError(f"{run_dir} is not a run directory (no {CONFIG}); give the folder a run wrote, "
                          f"e.g. runs/<date>-<time>")
    try:
        run = resolve_run(load_yaml(run_dir / CONFIG))
    except ConfigError as exc:
        raise StatusError(f"{run_dir / CONFIG} cannot be read: {exc}") from None
    cfg = run.config
    records, partial = read_records(run_dir)
    summary = _read_json(run_dir / SUMMARY)
    latest = _read_json(run_dir / CHECKPOINTS / "latest.json")
    now = time.time() if now is None else now
    touched = [p.stat().st_mtime for p in (run_dir / CONFIG, run_dir / ROUNDS, run_dir / CHECKPOINTS / "latest.json")
               if p.exists()]
    idle_s = max(0.0, now - max(touched))
    slowest = max((float(r.get("wall_s") or 0.0) for r in records), default=0.0)
    total = cfg.federation.rounds
    done = max((r["round"] for r in records), default=0)
    checkpoint = int(latest["round"]) if latest and isinstance(latest.get("round"), int) else None
    rounds = _rounds(records, run.tree if run.tree.kind != "flat" else None, cfg.seed)
    state, detail = _state(summary, idle_s, slowest, done, total, checkpoint)
    return {
        "run_dir": str(run_dir),
        "state": state,
        "detail": detail,
        "rounds_done": done,
        "rounds_total": total,
        "checkpoint_round": checkpoint,
        "idle_s": idle_s,
        "partial_last_line": partial,
        "topology": cfg.topology.kind,
        "num_clients": cfg.federation.num_clients,
        "privacy": run.privacy,
        "base_eval_loss": latest.get("base_eval_loss") if latest else None,
        "rounds": rounds,
        "clients": _clients(rounds),
        "summary": summary,
    }


def _read_json(path: Path) -> dict | None:
    """The file's object, or None when it is missing or (mid-write) unreadable."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def _state(summary, idle_s: float, slowest: float, done: int, total: int, checkpoint: int | None) -> tuple[str, str]:
    if summary is not None:
        return FINISHED, "summary.json written"
    window = max(STALE_FLOOR_S, 3 * slowest)
    if idle_s <= window:
        doing = f"round {done + 1} in progress" if done < total else "writing the adapter, plots and summary"
        return RUNNING, f"{doing} (last write {_age(idle_s)} ago)"
    why = f"no write for {_age(idle_s)} (a round took at most {slowest:.0f}s)"
    if checkpoint is None:
        return INTERRUPTED, f"{why}; no checkpoint, start it again"
    return INTERRUPTED, (f"{why}; resumable from the round-{checkpoint} checkpoint "
                         f"(`fedlora resume RUN_DIR`, or `fedlora cloud --resume --run-dir RUN_DIR ...`)")


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _rounds(records: list[dict], tree, seed: int) -> list[dict]:
    """One entry per round record: who joined and dropped (by reason and, on a tree, by
    neighbourhood cell), the secure outcome per cell, losses, epsilon and wall time."""
    placements = _Placements(tree, seed) if tree is not None else None
    out = []
    for r in records:
        joined = sorted(int(c) for c in r.get("participants", []))
        dropped = sorted(({"client": int(d["client"]), "reason": str(d.get("reason", ""))} for d in r.get("dropped", [])),
                         key=lambda d: d["client"])
        by_reason: dict[str, list[int]] = {}
        for d in dropped:
            by_reason.setdefault(d["reason"], []).append(d["client"])
        secure = (r.get("secure") or {}).get("cells") or {}
        entry = {
            "round": r["round"],
            "joined": joined,
            "dropped": dropped,
            "dropped_by_reason": by_reason,
            "aggregated": r.get("aggregated"),
            "eval_loss": r.get("eval_loss"),
            "train_loss": r.get("train_loss"),
            "epsilon": (r.get("dp") or {}).get("epsilon"),
            "wall_s": r.get("wall_s"),
            "secure": {cell: {"ok": bool(s.get("ok")), "reason": s.get("reason")} for cell, s in sorted(secure.items())}
            if secure else None,
            "cells": None,
            "split": _split(r),
        }
        if placements is not None:
            entry["cells"] = _cells(r, joined, dropped, secure, tree, placements)
        out.append(entry)
    return out


class _Placements:
    """Each client's leaf cell per round, replayed from the config (the mobility model is
    seeded), for dropped clients the record does not place; computed only when asked."""

    def __init__(self, tree, seed: int):
        self.tree, self.seed, self._by_round, self._failed = tree, seed, {}, False

    def cell(self, client: int, server_round: int) -> str | None:
        if self._failed:
            return None
        if server_round not in self._by_round:
            try:
                prev = max((r for r in self._by_round if r < server_round), default=None)
                if prev is None:
                    placement = assignment_at(self.tree, server_round, self.seed)
                else:
                    placement = self._by_round[prev]
                    for r in range(prev + 1, server_round + 1):
                        placement = next_assignment(self.tree, placement, r, self.seed)
            except Exception:  # e.g. a mobility trace file no longer where the run read it
                self._failed = True
                return None
            self._by_round[server_round] = placement
        return self._by_round[server_round].get(client)


def _cells(r: dict, joined: list[int], dropped: list[dict], secure: dict, tree, placements: _Placements) -> dict:
    """{neighbourhood cell: {joined, dropped, secure}}: participants placed by the record's
    ``cell_of``, dropped clients by the secure session they were in, else by replaying the
    placement."""
    def hood(leaf: str) -> str:
        try:
            return tree.neighbourhood_of(leaf)
        except KeyError:
            return UNKNOWN_CELL

    cell_of = {int(c): hood(leaf) for c, leaf in (r.get("cell_of") or {}).items()}
    for cell, s in secure.items():
        for c in list(s.get("survivors") or []) + [c for cs in (s.get("dropped") or {}).values() for c in cs]:
            cell_of.setdefault(int(c), cell)
    cells: dict[str, dict] = {cell: {"joined": [], "dropped": []} for cell in secure}
    for c in joined:
        cells.setdefault(cell_of.get(c, UNKNOWN_CELL), {"joined": [], "dropped": []})["joined"].append(c)
    for d in dropped:
        c = d["client"]
        if c not in cell_of:
            leaf = placements.cell(c, r["round"])
            cell_of[c] = hood(leaf) if leaf is not None else UNKNOWN_CELL
        cells.setdefault(cell_of[c], {"joined": [], "dropped": []})["dropped"].append(c)
    for cell, entry in cells.items():
        s = secure.get(cell)
        entry["secure"] = None if s is None else {"ok": bool(s.get("ok")), "reason": s.get("reason")}
    return dict(sorted(cells.items()))


def _clients(rounds: list[dict]) -> dict[str, dict]:
    """{client id: {joined: [rounds], dropped: {round: reason}}} over every client asked in some round."""
    out: dict[int, dict] = {}
    for r in rounds:
        for c in r["joined"]:
            out.setdefault(c, {"joined": [], "dropped": {}})["joined"].append(r["round"])
        for d in r["dropped"]:
            out.setdefault(d["client"], {"joined": [], "dropped": {}})["dropped"][str(r["round"])] = d["reason"]
    return {str(c): out[c] for c in sorted(out)}


GRID_ROUNDS = 40  # rounds shown as columns of the client grid (the latest ones)
REASON_ROUNDS = 20  # rounds with drops listed by reason (the latest ones)


def _split(r: dict) -> dict | None:
    """Split learning in a round: {client: "k=.. m=.. edge ..."} for those that trained split, and the note."""
    sp = r.get("split")
    if not sp:
        return None
    clients = {int(c): f"k={e['k']} m={e['m']} with {e.get('edge', '?')}" for c, e in sp.get("clients", {}).items()
               if e.get("mode") == "split"}
    return {"clients": dict(sorted(clients.items())), "note": sp.get("note", ""),
            "activation_bytes_up": sum((sp.get("activation_bytes") or {}).get("up", {}).values())}


def render_text(status: dict, detail_round: int | None = None) -> str:
    """The status as plain text: header, a line per round, one round by cell (the latest by
    default), drop reasons per round, and a client x round grid."""
    s = status
    lines = [f"run {s['run_dir']}  ({s['topology']} topology, {s['num_clients']} clients, privacy {s['privacy']})",
             f"state: {s['state']} -- {s['rounds_done']}/{s['rounds_total']} rounds; {s['detail']}"]
    if s["partial_last_line"]:
        lines.append("  (the last line of rounds.jsonl is still being written; not shown)")
    if s["summary"]:
        sm = s["summary"]
        lines.append(f"  held-out loss {_num(sm.get('base_eval_loss'))} -> {_num(sm.get('final_eval_loss'))}, "
                     f"wall {_num(sm.get('wall_s'), '.0f')}s")
    rounds = s["rounds"]
    if not rounds:
        lines.append(f"no round finished yet (held-out loss of the base model {_num(s['base_eval_loss'])})"
                     if s["base_eval_loss"] is not None else "no round finished yet")
        return "\n".join(lines) + "\n"
    secure = any(r["secure"] for r in rounds)
    dp = any(r["epsilon"] is not None for r in rounds)
    header = ["round", "joined", "dropped"] + (["secure cells"] if secure else []) + ["held-out loss", "train loss"] \
        + (["epsilon"] if dp else []) + ["wall"]
    rows = []
    for r in rounds:
        asked = len(r["joined"]) + len(r["dropped"])
        row = [str(r["round"]), f"{len(r['joined'])}/{asked}", str(len(r["dropped"]))]
        if secure:
            ok = sum(1 for v in (r["secure"] or {}).values() if v["ok"])
            row.append(f"{ok}/{len(r['secure'])} ok" if r["secure"] else "-")
        row += [_num(r["eval_loss"]), _num(r["train_loss"])]
        if dp:
            row.append(_num(r["epsilon"], ".2f"))
        row.append(f"{_num(r['wall_s'], '.1f')}s")
        rows.append(row)
    lines += [""] + _table(header, rows)

    shown = next((r for r in rounds if r["round"] == detail_round), None) if detail_round is not None else rounds[-1]
    if shown is None:
        raise StatusError(f"round {detail_round} has no record yet (rounds 1..{rounds[-1]['round']} do)")
    if shown["cells"]:
        lines += ["", f"round {shown['round']} by neighbourhood cell:"]
        cell_rows = []
        for cell, c in shown["cells"].items():
            sec = "" if c["secure"] is None else ("secure ok" if c["secure"]["ok"]
                                                  else f"secure ABORTED: {c['secure']['reason']}")
            cell_rows.append([f"  {cell}", f"joined {_ids(c['joined'])}", f"dropped {_ids(c['dropped'])}", sec])
        lines += _table(None, cell_rows)
    if shown.get("split"):
        sp = shown["split"]
        lines += ["", f"round {shown['round']}: {len(sp['clients'])} device(s) trained split "
                      f"({sp['activation_bytes_up']} activation bytes up); {sp['note']}:"]
        lines += [f"  client {c}: {how}" for c, how in sp["clients"].items()]
    with_drops = [r for r in rounds if r["dropped"]]
    if with_drops:
        lines += ["", "dropped, by reason:"]
        if len(with_drops) > REASON_ROUNDS:
            lines.append(f"  ({len(with_drops) - REASON_ROUNDS} earlier round(s) with drops: see --json)")
        for r in with_drops[-REASON_ROUNDS:]:
            for i, (reason, clients) in enumerate(sorted(r["dropped_by_reason"].items())):
                lines.append(f"  {'round ' + str(r['round']) if i == 0 else '':<10}{_ids(clients)}: {reason}")
    lines += [""] + _grid(s["clients"], [r["round"] for r in rounds])
    return "\n".join(lines) + "\n"


def _grid(clients: dict[str, dict], round_ids: list[int]) -> list[str]:
    """A row per client: + joined, x dropped, . not asked, one column per round."""
    cols = round_ids[-GRID_ROUNDS:]
    first = f"clients by round ({cols[0]}..{cols[-1]}; + joined, x dropped, . not asked):"
    rows = []
    for cid, c in clients.items():
        joined, dropped = set(c["joined"]), {int(r) for r in c["dropped"]}
        marks = "".join("+" if r in joined else "x" if r in dropped else "." for r in cols)
        rows.append([cid, marks, str(len(joined)), str(len(dropped))])
    return [first] + _table(["client", "rounds", "joined", "dropped"], rows)


def _table(header: list[str] | None, rows: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell; numbers right-aligned, text left-aligned."""
    every = ([header] if header else []) + rows
    widths = [max(len(row[i]) for row in every) for i in range(len(every[0]))]
    right = [all(_numeric(row[i]) for row in rows) for i in range(len(widths))]

    def fmt(row):
        cells = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(row, widths, right)]
        return "  ".join(cells).rstrip()

    return [fmt(row) for row in every]


def _numeric(text: str) -> bool:
    return text[:1].isdigit() or text == "-"


def _ids(clients: list[int]) -> str:
    return " ".join(str(c) for c in clients) if clients else "-"


def _num(x, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)
