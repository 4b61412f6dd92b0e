"""Edge aggregators as real processes: what a round costs on loopback vs in-process.

What it measures
----------------
The loopback deployment of ``tests/test_edge_processes.py`` (``fedlora.deploy.processes``: a cloud
SuperLink + ``mode="cloud"`` run, one edge per neighbourhood cell -- its own SuperLink, its
long-lived ``mode="edge"`` service run and a SuperNode upward -- and one END SuperNode per
client, all started through ``fedlora cloud|edge|end``), by default 1 sub-urban cell with 2
neighbourhoods, 4 END clients, tiny model, 3 rounds; and the same configuration through
``run_federation`` + ``InProcessTransport`` (no Flower, one process). Reported:

* ``tiers_ready_s``: from starting the edge and END processes until every edge service run
  beats (SuperLinks up, service runs submitted and started);
* ``before_round_1_s``: ``fedlora cloud`` start until round 1 starts (cloud SuperLink, run
  submission, ``flwr-serverapp`` start, model load, base evaluation, finding the edges);
* per round: ``wall_s`` (cloud's round time), ``sum train s`` (END clients' pure training),
  and from each edge's service log the time to find its children (identity queries to
  newly connected END nodes; only when a node is new) and to run the cell (train messages:
  Flower starts one ``flwr-clientapp`` process per message, which installs the FAB and
  imports torch + loads the model before training);
* the largest difference between the deployment's and the in-process adapter.

Run (takes the benchmark lock itself, and must run under the Flower lock):

    flock /tmp/fedlora-flower.lock .venv/bin/python bench/edge_processes.py
    flock /tmp/fedlora-flower.lock .venv/bin/python bench/edge_processes.py --rounds 2 --no-lock   # smoke
    # plain --insecure vs a planned deployment (TLS + node auth + the plan's keys), secure aggregation:
    flock /tmp/fedlora-flower.lock .venv/bin/python bench/edge_processes.py --privacy secagg --modes insecure,planned \\
        --rounds 2 --out bench/results/edge_processes_planned.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_LOCK, RESULTS, bench_lock, machine, provenance, table, write_json  # noqa: E402


def overrides(args: argparse.Namespace) -> list[str]:
    return [
        f"model={args.model}", "topology=small6g", "topology.suburban_cells=1",
        f"topology.neighbourhoods_per_suburban={args.edges}", "topology.mobility.model=none", f"privacy={args.privacy}",
        f"federation.num_clients={args.clients}", "federation.fraction=1.0", f"federation.rounds={args.rounds}",
        f"train.local_steps={args.local_steps}", "train.max_seq_len=128", "data.records_per_client=12",
        "data.max_eval_examples=8", "progress=false", *args.overrides,
    ]


def rounds_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]


def edge_timings(folders: dict[str, Path]) -> dict[int, dict[str, list[float]]]:
    """Round -> {"find_s": [per edge], "cell_s": [per edge]} from the edge services' logs
    (``folders``: cell -> the edge's work folder, holding ``spool/service.log``)."""
    out: dict[int, dict[str, list[float]]] = {}
    pattern = re.compile(r"round (\d+): children found in ([\d.]+)s, cell run in ([\d.]+)s")
    for folder in folders.values():
        for m in pattern.finditer((folder / "spool" / "service.log").read_text()):
            row = out.setdefault(int(m.group(1)), {"find_s": [], "cell_s": []})
            row["find_s"].append(float(m.group(2)))
            row["cell_s"].append(float(m.group(3)))
    return out


def deployment(cfg, used: list[str], work: Path, *, planned: bool = False) -> dict:
    """``planned``: from a ``fedlora deploy plan`` (TLS, SuperNode auth, the plan's secagg keys:
    ``fedlora edge|client|cloud --config``); else ``--insecure`` with keys from the seed."""
    from fedlora.deploy.plan import DeploySettings, write_plan
    from fedlora.deploy.processes import ProcessGroup, free_port_run, placement, start_loopback_tiers

    fedlora = [sys.executable, "-m", "fedlora.cli"]
    with ProcessGroup(work / "logs") as group:
        t0 = time.perf_counter()
        if planned:
            plan, cells = work / "plan", placement(cfg)
            write_plan(cfg, plan, DeploySettings(base_port=free_port_run(1 + len(cells)),
                                                 runtime_port_base=free_port_run(len(cells) + cfg.federation.num_clients)),
                       overrides=used)
            spools = {cell: plan / f"edge-{cell}" for cell in cells}
            for cell, clients in cells.items():
                group.start(f"edge-{cell}", [*fedlora, "edge", "--config", str(spools[cell])], dict(os.environ))
                for c in clients:
                    group.start(f"end-{c}", [*fedlora, "client", "--config", str(plan / f"end-{c}")], dict(os.environ))
            run_dir = plan / "cloud" / "run"
            cloud_argv = [*fedlora, "cloud", "--config", str(plan / "cloud")]
        else:
            tiers = start_loopback_tiers(group, cfg, work)
            spools = {cell: work / cell for cell in tiers["edges"]}
            run_dir = work / "run"
            cloud_argv = [*fedlora, "cloud", "--insecure", "--listen", tiers["cloud"], "--run-dir", str(run_dir),
                          "--work-dir", str(work / "cloud"), *used]
        beats = [folder / "spool" / "heartbeat" for folder in spools.values()]
        while not all(b.exists() for b in beats):
            group.check()
            time.sleep(0.2)
        ready = time.perf_counter() - t0
        t1 = time.perf_counter()
        cloud = group.start("cloud", cloud_argv, dict(os.environ))
        if cloud.wait(timeout=1800) != 0:
            raise SystemExit(f"the cloud run failed; logs in {work}")
        total = time.perf_counter() - t1
        processes = len(group.tree())
    rounds = rounds_of(run_dir)
    return {"tiers_ready_s": ready, "cloud_total_s": total, "before_round_1_s": total - sum(r["wall_s"] for r in rounds),
            "rounds": rounds, "edges": edge_timings(spools), "processes_at_end": processes, "run_dir": str(run_dir)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    p.add_argument("--model", default="tiny")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--edges", type=int, default=2, help="neighbourhood cells (one edge process each)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--privacy", default="none", choices=["none", "secagg"])
    p.add_argument("--modes", default="insecure",
                   help="comma-separated deployments to run side by side: insecure (--insecure, keys from the seed), "
                        "planned (a `fedlora deploy plan`: TLS, SuperNode auth, the plan's keys)")
    p.add_argument("--lock", default=DEFAULT_LOCK)
    p.add_argument("--no-lock", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "edge_processes.json"))
    args = p.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - {"insecure", "planned"}:
        p.error(f"--modes={args.modes!r}: use insecure and/or planned")

    import numpy as np
    from safetensors.numpy import load_file

    from fedlora.config import compose
    from fedlora.roles.cloud import run_federation
    from fedlora.roles.local import InProcessTransport
    from fedlora.runs.progress import quiet_libraries

    quiet_libraries()
    used = overrides(args)
    cfg = compose(used)
    base = Path(tempfile.mkdtemp(prefix="fedlora-edge-bench-"))
    info = machine()
    deps = {}
    with bench_lock(None if args.no_lock else args.lock, what="edge_processes"):
        info["loadavg_when_locked"] = [round(x, 2) for x in os.getloadavg()]
        t0 = time.perf_counter()
        run_federation(cfg, base / "inprocess", InProcessTransport(cfg.federation.num_clients))
        inprocess_total = time.perf_counter() - t0
        for mode in modes:
            deps[mode] = deployment(cfg, used, base / mode, planned=mode == "planned")
        info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    ref = rounds_of(base / "inprocess")
    want = load_file(str(base / "inprocess" / "adapter" / "adapter_model.safetensors"))
    print(f"\nEdge processes on loopback: {args.model}, {args.clients} END clients under {args.edges} edges, "
          f"{args.rounds} rounds, {args.local_steps} local steps, privacy={args.privacy}")
    results = {}
    for mode, dep in deps.items():
        got = load_file(str(Path(dep["run_dir"]) / "adapter" / "adapter_model.safetensors"))
        max_diff = max(float(np.abs(got[k] - want[k]).max()) for k in want)
        rows = []
        for r, q in zip(dep["rounds"], ref):
            e = dep["edges"].get(r["round"], {"find_s": [float("nan")], "cell_s": [float("nan")]})
            rows.append([r["round"], len(r["participants"]), q["wall_s"], r["wall_s"],
                         sum(v for v in r["client_train_s"].values() if v), max(e["find_s"]), max(e["cell_s"]),
                         r["wall_s"] - max(a + b for a, b in zip(e["find_s"], e["cell_s"]))])
        print(f"\n{mode}:")
        print(table(rows, ["round", "clients", "in-process s", "deployed s", "sum train s", "edge: find children s",
                           "edge: cell run s", "cloud<->edge s"], digits=1))
        print(f"tiers ready {dep['tiers_ready_s']:.1f}s; `fedlora cloud` before round 1 {dep['before_round_1_s']:.1f}s "
              f"(in-process total {inprocess_total:.1f}s); max |adapter difference| {max_diff:.2e}")
        results[mode] = {**{k: v for k, v in dep.items() if k != "rounds"},
                         "rounds": [{"round": r["round"], "wall_s": r["wall_s"], "client_train_s": r["client_train_s"],
                                     "eval_s": r["eval_s"], "participants": r["participants"]} for r in dep["rounds"]],
                         "max_abs_adapter_difference": max_diff, "table": rows}
    out = write_json(args.out, {
        **provenance("edge_processes", info), "overrides": used,
        "inprocess": {"total_s": inprocess_total, "rounds": [{"round": q["round"], "wall_s": q["wall_s"]} for q in ref]},
        "deployments": results,
    })
    print(f"written: {out}")


if __name__ == "__main__":
    main()
