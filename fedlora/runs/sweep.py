"""``fedlora run --multirun``: every job's config checked before the first starts, and a summary
after the last (one row per run, as CSV and a printed table)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from rich.table import Table

from fedlora.config import ConfigError, to_typed
from fedlora.run_settings import resolve_run

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"

COLUMNS = ["run", "swept", "base_eval_loss", "final_eval_loss", "eval_loss_drop", "final_perplexity", "total_bytes", "wall_s",
           "status"]


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


def sweep_jobs(config: DictConfig, config_loader) -> list[list[str]] | None:
    """Every job's overrides, in Hydra's job order, as its basic sweeper expands them; None
    under another sweeper (those pick values as the sweep goes)."""
    # Hydra's own expansion (a private module; hydra-core is pinned <1.4), so the jobs are the ones it launches.
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = config.hydra.sweeper
    if sweeper.get("_target_") != BASIC_SWEEPER:
        return None
    arguments = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    arguments += OmegaConf.to_container(config.hydra.overrides.task, resolve=False)  # type: ignore[operator]
    parsed = OverridesParser.create(config_loader=config_loader).parse_overrides(arguments)
    return [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def bad_jobs(config: DictConfig, config_loader, jobs: list[list[str]]) -> list[tuple[int, list[str], str]]:
    """(job number, its overrides, the error) of each job whose config does not compose or
    validate, composed the way Hydra's launcher composes it for the job."""
    bad = []
    for num, overrides in enumerate(jobs):
        try:
            job_config = config_loader.load_sweep_config(config, overrides)
            # resolve_run: the checks of the settings as a whole too (secure sums that could overflow)
            resolve_run(to_typed(OmegaConf.masked_copy(job_config, [k for k in job_config if k != "hydra"])))
        except (ConfigError, HydraException, OmegaConfBaseException) as exc:
            bad.append((num, overrides, _one_line(exc)))
    return bad


def _one_line(exc: BaseException) -> str:
    """A Hydra or OmegaConf error on one line: its text without the config search path, and its cause."""
    lines = [line.strip() for line in str(exc).split("Config search path:")[0].splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    if len(lines) > 1:  # e.g. "Available options in 'strategy':" and one option a line
        text = f"{text.rstrip('.')}; {lines[1]} {', '.join(lines[2:])}".rstrip()
    cause = str(exc.__cause__).strip().splitlines()[0] if exc.__cause__ is not None and str(exc.__cause__).strip() else ""
    return f"{text} ({cause})" if cause and cause not in text else text


def refusal(bad: list[tuple[int, list[str], str]], total: int) -> str:
    """The message for a sweep none of whose jobs starts: every bad job, its overrides and its error."""
    lines = [f"fedlora: error: {len(bad)} of the sweep's {total} jobs cannot run; none was started:"]
    lines += [f"  #{num} {' '.join(overrides)}: {error}" for num, overrides, error in bad]
    return "\n".join(lines)


class SweepSummary(Callback):
    """Hydra callback: before a multirun, check every job's config; after it, tabulate every job's summary.json."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Refuse the sweep (exit code 2) before any job starts when a job's config is bad, so no
        job trains only for a sibling to stop the sweep."""
        config_loader = GlobalHydra.instance().config_loader()
        jobs = sweep_jobs(config, config_loader)
        bad = bad_jobs(config, config_loader, jobs) if jobs else []
        if bad:
            print(refusal(bad, len(jobs or [])), file=sys.stderr)
            raise SystemExit(2)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = collect(sweep_dir)
        print_table(rows, write(sweep_dir, rows))
