"""The run directory: per-round records, checkpoints, plots and the final summary.

Layout (the contract in docs/ARCHITECTURE):
``config.yaml``, ``rounds.jsonl``, ``adapter/``, ``checkpoints/``, ``plots/*.png``,
``summary.json``.
"""

from __future__ import annotations

import errno
import json
import math
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

ROUNDS = "rounds.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"


class CheckpointError(RuntimeError):
    """A run directory's record or checkpoint could not be written (disk full, read-only, ...) or read back;
    the message says which file, why, and that the last good checkpoint is kept."""


def _atomic_write(path: Path, write) -> None:
    """``write(tmp)`` then rename tmp over ``path``: a crash at any point leaves ``path`` old or new, never
    torn. The file and its folder are synced, so a power cut after the rename keeps the new one; a
    failed write (e.g. disk full) removes tmp and raises with ``path`` untouched."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2) + "\n"))


def read_rounds(run_dir: Path) -> list[dict]:
    """The round records; a last line cut short by a crash while it was appended (no newline yet) is not one."""
    path = Path(run_dir) / ROUNDS
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            lines.pop()  # torn: the round it began is redone (its checkpoint was never written)
    return [json.loads(line) for line in lines if line.strip()]


def append_round(run_dir: Path, record: dict) -> None:
    """Append the round's record; on a failed write (e.g. disk full) the file is cut back to what it was."""
    path = Path(run_dir) / ROUNDS
    with open(path, "a") as f:
        size = f.tell()
        try:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        except OSError as exc:
            f.truncate(size)
            raise CheckpointError(f"cannot append round {record.get('round')} to {path}: {_reason(exc)}; "
                                  f"{_kept(run_dir)}") from None


def truncate_rounds(run_dir: Path, last_round: int) -> None:
    """Keep only records up to ``last_round`` (a resumed run redoes later rounds)."""
    kept = [r for r in read_rounds(run_dir) if r["round"] <= last_round]
    _atomic_write(Path(run_dir) / ROUNDS, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in kept)))


def save_checkpoint(run_dir: Path, server_round: int, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Atomically save everything needed to continue after ``server_round``.

    The round's arrays go to their own file first, then ``latest.json`` is switched to it (each an
    atomic replace), then all but the newest two round files are removed: a crash at any point leaves
    ``latest.json`` naming a complete file of this round or of the one before. :class:`CheckpointError`
    when the disk is full (or the write fails otherwise); the previous checkpoint then stays the latest.
    """
    ckpt_dir = Path(run_dir) / CHECKPOINTS
    path = ckpt_dir / f"round-{server_round:05d}.npz"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, lambda p: _savez(p, arrays))
        write_json(ckpt_dir / "latest.json", {"round": server_round, "file": path.name, **meta})
    except OSError as exc:
        raise CheckpointError(f"cannot write the checkpoint of round {server_round} in {ckpt_dir}: {_reason(exc)}; "
                              f"{_kept(run_dir)}") from None
    for old in sorted(ckpt_dir.glob("round-*.npz"))[:-2]:
        old.unlink(missing_ok=True)
    return path


def _savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _reason(exc: OSError) -> str:
    return "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))


def _kept(run_dir: Path) -> str:
    """What a failed write leaves: the last good checkpoint, and how to go on from it."""
    try:
        latest = json.loads((Path(run_dir) / CHECKPOINTS / "latest.json").read_text())
        kept = f"the last good checkpoint (round {int(latest['round'])}) is kept"
    except (OSError, ValueError, KeyError, TypeError):
        kept = "no earlier checkpoint exists"
    return f"{kept}; free space (or fix the folder) and run `fedlora resume {run_dir}`"


def load_checkpoint(run_dir: Path) -> tuple[int, dict[str, np.ndarray], dict] | None:
    """(round, arrays, meta) of the latest checkpoint, or None when there is none; CheckpointError when it
    cannot be read (never the case after a crash: every file of it is replaced atomically)."""
    latest = Path(run_dir) / CHECKPOINTS / "latest.json"
    if not latest.exists():
        return None
    try:
        meta = json.loads(latest.read_text())
        with np.load(Path(run_dir) / CHECKPOINTS / meta["file"]) as data:
            arrays = {k: data[k] for k in data.files}
        return int(meta["round"]), arrays, meta
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"the checkpoint in {latest.parent} cannot be read ({type(exc).__name__}: {exc}); "
                              "it was damaged outside fedlora (its writes are atomic)") from None


def perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    return float(math.exp(min(loss, 50.0)))


def summarise(run_dir: Path, base_eval_loss: float | None, wall_s: float, extra: dict | None = None) -> dict:
    """Write summary.json from rounds.jsonl and return it."""
    rounds = read_rounds(run_dir)
    final = next((r["eval_loss"] for r in reversed(rounds) if r.get("eval_loss") is not None), None)
    totals: dict[str, dict[str, int]] = {"up": {}, "down": {}}
    for r in rounds:
        for direction in ("up", "down"):
            for link, n in r["bytes"][direction].items():
                totals[direction][link] = totals[direction].get(link, 0) + n
    summary = {
        "rounds": len(rounds),
        "base_eval_loss": base_eval_loss,
        "final_eval_loss": final,
        "base_perplexity": perplexity(base_eval_loss),
        "final_perplexity": perplexity(final),
        "eval_loss_drop": None if final is None or base_eval_loss is None else base_eval_loss - final,
        "final_train_loss": next((r["train_loss"] for r in reversed(rounds) if r.get("train_loss") is not None), None),
        "total_bytes": {**totals, "all": sum(totals["up"].values()) + sum(totals["down"].values())},
        "dropped_total": sum(len(r["dropped"]) for r in rounds),
        # Sampled participations (in the sum or dropped), and those left out though they did not drop out
        # themselves (a round's ``left_out``: a refused or aborted secure cell; aim: 0).
        "sampled_total": sum(len(r["participants"]) + len(r["dropped"]) for r in rounds),
        "left_out_total": sum(len(r.get("left_out", ())) for r in rounds),
        "wall_s": wall_s,
        **(extra or {}),
    }
    write_json(Path(run_dir) / SUMMARY, summary)
    return summary


def plot(run_dir: Path, base_eval_loss: float | None, tree=None) -> list[Path]:
    """Loss per round, bytes per round per link and (given the cell tree) the tree with the
    run's bytes on each tier's links, as PNGs under plots/."""
    # matplotlib takes seconds to import: only when plotting; its backend is chosen before pyplot loads
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # only after the backend is chosen

    rounds = read_rounds(run_dir)
    out_dir = Path(run_dir) / "plots"
    out_dir.mkdir(exist_ok=True)
    if not rounds:
        return []
    xs = [r["round"] for r in rounds]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [r.get("train_loss") for r in rounds], "o-", label="train loss (clients)")
    eval_x = ([0] if base_eval_loss is not None else []) + xs
    eval_y = ([base_eval_loss] if base_eval_loss is not None else []) + [r.get("eval_loss") for r in rounds]
    ax.plot(eval_x, eval_y, "s-", label="held-out loss (global adapter)")
    ax.set_xlabel("round")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_title("Loss per round")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths = [out_dir / "loss.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    links = sorted({(d, link) for r in rounds for d in ("up", "down") for link in r["bytes"][d]})
    width = 0.8 / max(1, len(links))
    for i, (direction, link) in enumerate(links):
        ys = [r["bytes"][direction].get(link, 0) / 1e6 for r in rounds]
        ax.bar([x + (i - (len(links) - 1) / 2) * width for x in xs], ys, width, label=f"{link} ({direction})")
    ax.set_xlabel("round")
    ax.set_ylabel("MB")
    ax.set_title("Bytes per round per link")
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "bytes.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    if tree is not None:
        paths.append(_plot_tree(plt, tree, rounds, out_dir / "tree.png"))
    return paths


def _plot_tree(plt, tree, rounds: list[dict], path: Path) -> Path:
    """Cells by tier (cloud on top, END clients as counts per leaf cell at the bottom), with
    the run's total MB up/down on each tier's links."""
    levels = [t for t in ("cloud", "suburban", "neighbourhood", "femto") if tree.tier(t)]
    pos: dict[str, tuple[float, float]] = {}
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(tree.leaf_cells) + 2), 1.4 * (len(levels) + 1)))
    for depth, tier in enumerate(levels):
        cells = tree.tier(tier)
        for i, cell in enumerate(cells):
            pos[cell] = ((i + 0.5) / len(cells), len(levels) - depth)
    clients_in: dict[str, int] = {}
    for cell in tree.initial.values():
        clients_in[cell] = clients_in.get(cell, 0) + 1
    for cell, (x, y) in pos.items():
        parent = tree.cells[cell].parent
        if parent in pos:
            ax.plot([x, pos[parent][0]], [y, pos[parent][1]], "-", color="0.6", zorder=1)
        label = cell if len(pos) <= 24 else ""
        ax.scatter([x], [y], s=120, zorder=2, color="tab:blue")
        if label:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=7)
    for cell, n in clients_in.items():
        if cell in pos:
            x, y = pos[cell]
            ax.plot([x, x], [y, 0.35], ":", color="0.7", zorder=1)
            ax.annotate(f"{n}", (x, 0.25), ha="center", fontsize=7)
    totals = {d: {} for d in ("up", "down")}
    for r in rounds:
        for d in totals:
            for link, n in r["bytes"][d].items():
                totals[d][link] = totals[d].get(link, 0) + n
    lines = [f"{link}: up {totals['up'].get(link, 0) / 1e6:.1f} MB, down {totals['down'].get(link, 0) / 1e6:.1f} MB"
             for link in sorted(set(totals["up"]) | set(totals["down"])) if totals["up"].get(link) or totals["down"].get(link)]
    ax.text(0.01, 0.99, "\n".join(lines), transform=ax.transAxes, fontsize=8, va="top",
            bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "0.8"})
    ax.set_title(f"Cell tree: {len(tree.clients)} END clients (bottom: clients per cell at start)", fontsize=10)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(0, len(levels) + 1.0)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
