"""Live progress of a run: a rich display on a terminal, one log line per event otherwise."""

from __future__ import annotations

import logging
import os
import sys

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as Bars

log = logging.getLogger("fedlora")


class Progress:
    """Plain log lines: what non-interactive runs (CI, log files) get."""

    def start(self, total_rounds: int, first_round: int) -> None:
        log.info("training rounds %d..%d", first_round, total_rounds)

    def start_round(self, server_round: int, clients: list[int]) -> None:
        log.info("round %d: %d client(s) training: %s", server_round, len(clients), clients)

    def client_done(self, client: int, ok: bool, detail: str) -> None:
        (log.info if ok else log.warning)("  client %d %s", client, detail)

    def end_round(self, record: dict) -> None:
        eval_loss = record.get("eval_loss")
        log.info(
            "round %d done in %.1fs: train_loss=%s eval_loss=%s participants=%d dropped=%d",
            record["round"],
            record["wall_s"],
            _fmt(record.get("train_loss")),
            _fmt(eval_loss),
            len(record["participants"]),
            len(record["dropped"]),
        )

    def note(self, message: str) -> None:
        log.info(message)

    def close(self) -> None:
        pass


class RichProgress(Progress):
    """A rounds bar and a clients-in-this-round bar, with log lines printed above them."""

    def __init__(self) -> None:
        self._bars = Bars(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            transient=False,
        )
        self._bars.start()
        self._rounds = None
        self._clients = None

    def start(self, total_rounds: int, first_round: int) -> None:
        self._rounds = self._bars.add_task("rounds", total=total_rounds, completed=first_round - 1, info="")

    def start_round(self, server_round: int, clients: list[int]) -> None:
        if self._clients is not None:
            self._bars.remove_task(self._clients)
        self._clients = self._bars.add_task(f"round {server_round} clients", total=len(clients), info="")

    def client_done(self, client: int, ok: bool, detail: str) -> None:
        self._bars.advance(self._clients)
        self._bars.update(self._clients, info=f"client {client}: {detail}")
        if not ok:
            self._bars.console.print(f"[yellow]client {client} dropped: {detail}")

    def end_round(self, record: dict) -> None:
        self._bars.advance(self._rounds)
        info = f"eval_loss {_fmt(record.get('eval_loss'))}"
        self._bars.update(self._rounds, info=info)
        self._bars.console.print(
            f"round {record['round']}: train_loss {_fmt(record.get('train_loss'))}  {info}  "
            f"participants {len(record['participants'])}  dropped {len(record['dropped'])}  {record['wall_s']:.1f}s"
        )

    def note(self, message: str) -> None:
        self._bars.console.print(message)

    def close(self) -> None:
        self._bars.stop()


def quiet_libraries() -> None:
    """Keep the console to fedlora's own progress: libraries speak only on warnings."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    for noisy in ("transformers", "datasets", "httpx", "urllib3", "filelock", "alembic", "flwr", "ray"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bitsandbytes (imported by peft when installed) warns at import that an optional kernels package is missing
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # flwr has its own console handler; do not print its records twice through the root's.
    logging.getLogger("flwr").propagate = False
    if "transformers" not in sys.modules:
        # The variables above quiet it when it loads; importing it here would cost seconds in every
        # process that never trains (Flower's per-message ClientApp of a warm device, an edge's relay).
        return
    from transformers.utils import logging as hf_logging  # already imported: quiet it now

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def make_progress(enabled: bool) -> Progress:
    if enabled and sys.stderr.isatty():
        return RichProgress()
    return Progress()


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"
