"""Launch a fedlora run on Flower's simulation engine (Ray) from Python.

``fedlora run`` and ``fedlora resume`` come here. The ServerApp (``server.app:app``) runs
in a thread of this process, so its live progress shows in this terminal; virtual END
clients (``clients.app:app``) run in Ray worker processes, each loading the base model
once. This is the engine ``flwr run`` uses for local simulation, called the way Flower's
own ``flwr-simulation`` process calls it (``_run_simulation``), with flwr pinned.

By default Ray starts on this machine; with ``simulation.ray_address`` the run joins a
running Ray cluster instead and Flower's actor pool spreads over all its nodes.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from fedlora.config import FedLoraConfig, save_yaml
from fedlora.run_settings import resolve_run
from fedlora.runs.progress import quiet_libraries
from fedlora.runs.report import SUMMARY

APP_DIR = Path(__file__).resolve().parent.parent
log = logging.getLogger("fedlora")


def backend_config(cfg: FedLoraConfig) -> dict:
    """Flower's Ray backend config. Flower passes ``init_args`` to ``ray.init`` as keyword
    arguments when Ray is not initialised yet (flwr 1.41:
    ``flwr/server/superlink/fleet/vce/backend/raybackend.py``, ``RayBackend.init_ray``;
    it adds ``runtime_env`` with the driver's PYTHONPATH itself).

    Local (``simulation.ray_address`` empty): start Ray here with every core of this machine.
    Cluster: ``address`` joins the running cluster; Ray forbids ``num_cpus`` there (the
    nodes' ``ray start --num-cpus`` set the resources), and Flower sizes its actor pool from
    the cluster's resources, so virtual clients run on every node.
    """
    init_args: dict = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": True}
    if cfg.simulation.ray_address:
        init_args["address"] = cfg.simulation.ray_address
    else:
        init_args["num_cpus"] = os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": cfg.simulation.cpus_per_client, "num_gpus": 0.0},
        "init_args": init_args,
    }


def simulate(cfg: FedLoraConfig, run_dir: Path, *, resume: bool = False) -> dict:
    """Run (or resume) ``cfg`` in ``run_dir`` with Flower's simulation engine; return the summary."""
    resolve_run(cfg)  # ConfigError now, before Ray starts, for a run that cannot be summed securely
    quiet_libraries()  # before Ray starts, so its workers inherit the settings
    # Flower (and with it Ray) loads only when a simulation starts, not for `fedlora run`'s config checks
    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    quiet_libraries()  # again: importing flwr resets its logger to DEBUG

    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        save_yaml(cfg, run_dir / "config.yaml")
    run_config = {"config-file": str(run_dir / "config.yaml"), "run-dir": str(run_dir), "resume": resume, "overrides": ""}
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    where = f"Ray cluster at {cfg.simulation.ray_address}" if cfg.simulation.ray_address else "local Ray"
    log.info("run directory: %s (%d virtual clients, Flower simulation engine, %s)", run_dir, cfg.federation.num_clients, where)
    try:
        _run_simulation(
            num_supernodes=cfg.federation.num_clients,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            server_app_attr="server.app:app",
            client_app_attr="clients.app:app",
            backend_name="ray",
            backend_config=backend_config(cfg),
            server_app_context=context,
            app_dir=str(APP_DIR),
        )
    except KeyboardInterrupt:
        _hard_exit(run_dir)
    summary_path = run_dir / SUMMARY
    if not summary_path.exists():
        raise RuntimeError(f"the simulation ended without writing {summary_path}; see the log above")
    return json.loads(summary_path.read_text())


def _hard_exit(run_dir: Path) -> None:
    """Ctrl-C: Flower's ServerApp thread and Ray's worker threads would keep the process
    alive, so stop Ray and leave at once. Every finished round is checkpointed."""
    import ray  # loaded by the running simulation; at the top it would load Ray wherever this module is imported

    print(f"\nfedlora: interrupted; continue with: fedlora resume {run_dir}", file=sys.stderr, flush=True)
    ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    os._exit(130)
