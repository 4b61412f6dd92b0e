"""Sweep summary for ``fedlora run --multirun``: one row per run, as CSV and a printed table."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

COLUMNS = ["run", "swept", "base_eval_loss", "final_eval_loss", "eval_loss_drop", "final_perplexity", "total_bytes", "wall_s", "status"]


HEADERS = {"base_eval_loss": "base loss", "final_eval_loss": "final loss", "eval_loss_drop": "drop",
           "final_perplexity": "final ppl", "total_bytes": "bytes"}


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory under ``sweep_dir`` (numbered by Hydra)."""
    rows = []
    job_dirs = sorted((d for d in sweep_dir.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name))
    for job in job_dirs:
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = " ".join(OmegaConf.load(overrides_file)) if overrides_file.exists() else ""
        summary_file = job / "summary.json"
        row: dict[str, Any] = {"run": job.name, "overrides": overrides, "status": "missing summary (failed?)"}
        if summary_file.exists():
            s = json.loads(summary_file.read_text())
            row.update(
                base_eval_loss=s.get("base_eval_loss"),
                final_eval_loss=s.get("final_eval_loss"),
                eval_loss_drop=s.get("eval_loss_drop"),
                final_perplexity=s.get("final_perplexity"),
                total_bytes=s.get("total_bytes", {}).get("all"),
                wall_s=s.get("wall_s"),
                status="ok",
            )
        rows.append(row)
    _mark_swept(rows)
    return rows


def _mark_swept(rows: list[dict[str, Any]]) -> None:
    """``swept``: the overrides that differ between jobs (those shared by all are noise)."""
    shared = set.intersection(*(set(r["overrides"].split()) for r in rows)) if rows else set()
    for row in rows:
        row["swept"] = " ".join(o for o in row["overrides"].split() if o not in shared) or "(none)"


def write(sweep_dir: Path, rows: list[dict[str, Any]]) -> Path:
    path = sweep_dir / "sweep_summary.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*COLUMNS, "overrides"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def print_table(rows: list[dict[str, Any]], path: Path) -> None:
    table = Table(title=f"sweep summary ({path})")
    for col in COLUMNS:
        table.add_column(HEADERS.get(col, col), justify="left" if col in ("run", "swept", "status") else "right", overflow="fold")
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in COLUMNS))
    Console().print(table)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


class SweepSummary(Callback):
    """Hydra callback: after a multirun, tabulate every job's summary.json."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = collect(sweep_dir)
        print_table(rows, write(sweep_dir, rows))
