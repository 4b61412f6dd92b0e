"""Flower ServerApp for the urban/cloud tier: thin over fedlora.roles.cloud.run_federation.

Run config keys (pyproject ``[tool.flwr.app.config]``, or ``--run-config``):
- ``config-file``: a resolved fedlora config.yaml (``fedlora run`` sets it); when empty,
  ``overrides`` (Hydra overrides, space-separated) are composed onto ``conf/``;
- ``run-dir``: where the run directory goes (default ``<output_dir>/flwr-<time>``);
- ``resume``: continue the run directory from its last checkpoint;
- ``mode``: ``""`` (the END clients are this SuperLink's SuperNodes: simulation, or a
  deployment without edges), ``"cloud"`` (this SuperLink's SuperNodes are edge aggregators,
  one per neighbourhood cell: ``server/edge.py``), or ``"edge"`` (the long-lived service of
  one edge on its own SuperLink; also needs ``cell`` and ``spool``). ``fedlora cloud|edge``
  set these (``fedlora/deploy/processes.py``);
- ``node-dir``: the cloud's or edge's folder of a deployment plan (``fedlora cloud|edge
  --config``): secure aggregation then uses the plan's registry and this machine's own key.
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora.config import FedLoraConfig, compose, load_yaml
from fedlora.deploy.plan import read_node
from fedlora.roles.cloud import run_federation
from fedlora.run_settings import resolve_run
from fedlora.runs.progress import make_progress
from fedlora.world.attachments import tracks_devices
from server.edge import EdgeCellRunner, serve
from server.transport import FlowerTransport

app = ServerApp()


def settings_from_run_config(run_config: dict) -> tuple[FedLoraConfig, Path, bool]:
    config_file = str(run_config.get("config-file", "") or "")
    cfg = load_yaml(config_file) if config_file else compose(shlex.split(str(run_config.get("overrides", "") or "")))
    run_dir = str(run_config.get("run-dir", "") or "")
    path = Path(run_dir) if run_dir else Path(cfg.output_dir) / time.strftime("flwr-%Y%m%d-%H%M%S")
    return cfg, path, bool(run_config.get("resume", False))


def _ensure_console_log() -> None:
    """Under `flwr run` nothing configures logging; give fedlora's log a console handler."""
    log = logging.getLogger("fedlora")
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s fedlora: %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


MODES = ("", "cloud", "edge")


@app.main()
def main(grid: Grid, context: Context) -> None:
    _ensure_console_log()
    run_config = dict(context.run_config)
    mode = str(run_config.get("mode", "") or "")
    node_dir = str(run_config.get("node-dir", "") or "")
    if mode not in MODES:
        raise ValueError(f"run config mode={mode!r} is not one of: {', '.join(repr(m) for m in MODES)}")
    if mode == "edge":
        serve(grid, str(run_config.get("cell", "")), str(run_config.get("spool", "")), node_dir=node_dir)
        return
    cfg, run_dir, resume = settings_from_run_config(run_config)
    run = resolve_run(cfg)  # once per run: privacy=auto, n_max, the cell tree
    runner = locator = None
    if mode == "cloud":
        runner = transport = EdgeCellRunner(grid, run.tree, timeout_s=cfg.federation.round_timeout_s,
                                            track_devices=tracks_devices(run.tree))
        locator = runner if runner.track_devices else None  # devices move between edges: ask where they are
    else:
        transport = FlowerTransport(grid, expected_clients=cfg.federation.num_clients, timeout_s=cfg.federation.round_timeout_s)
    progress = make_progress(cfg.progress)
    try:
        identities = None
        if node_dir:  # a planned deployment: the plan's registry and the cloud's own key
            identities = read_node(node_dir).identities()
        run_federation(run, run_dir, transport, resume=resume, progress=progress, runner=runner, identities=identities,
                       locator=locator)
    finally:
        progress.close()
