"""Warm devices: a deployed secure round against the in-process simulation, before and after.

What it measures
----------------
One configuration (default: 1 sub-urban cell, 2 edges, 6 END devices, tiny model, secure
aggregation, 2 local steps), run three ways side by side in ONE invocation:

* ``simulation``: ``run_federation`` + ``InProcessTransport`` (one process, no Flower);
* ``cold`` (before): a loopback deployment from a plan (TLS + SuperNode auth + the plan's
  keys; ``fedlora edge|client|cloud --config``) as it was before warm devices: ``fedlora
  client --cold`` (every Flower message's ClientApp process imports torch and loads the
  model), Flower's own waits (``FEDLORA_SUPERNODE_POLL_S=off``, SuperExec task poll 1 s);
* ``warm``: the same plan with each device's resident process (``fedlora.deploy.resident``)
  and the shorter waits (SuperExec poll 0.1 s, SuperNode idle wait 0.2 s), each Flower message's
  ``flwr-clientapp`` started as Flower starts it (``FEDLORA_CLIENTAPP_FORK=0``);
* ``fork`` (opt-in): ``warm`` plus Flower's per-message
  ``flwr-clientapp`` processes forked from a warm parent (``fedlora.deploy.clientapp_fork``).

Reported per round: wall time of each; the END devices' training (max over devices); for
``warm``/``fork``, from the resident processes' own timings (``state/resident.json``), per stage the
slowest device's ClientApp process start (interpreter, ``import flwr``, app package, message
pull) and work beyond training (crypto, codec), and the rest (polling, TLS, transfer, the
edge and cloud). Per device per secure round: Flower messages and ClientApp processes (from
the SuperNodes' logs), model loads. The resident processes' memory after every round (peak
and current RSS): no growth round over round.

Run (takes the benchmark lock itself; run it under the Flower lock):

    flock /tmp/fedlora-flower.lock .venv/bin/python bench/deploy_speed.py --rounds 3
    flock /tmp/fedlora-flower.lock .venv/bin/python bench/deploy_speed.py --modes cold,warm,fork --rounds 2
    flock /tmp/fedlora-flower.lock .venv/bin/python bench/deploy_speed.py --modes warm --rounds 10   # memory
    flock /tmp/fedlora-flower.lock .venv/bin/python bench/deploy_speed.py --model smollm2 --local-steps 1 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_LOCK, RESULTS, bench_lock, machine, provenance, table, write_json  # noqa: E402
from edge_processes import rounds_of  # noqa: E402

STAGES = ("advertise", "share-keys", "masked-input", "unmask")
# Flower's waits as they were before (cold) -- the environment of every process of that deployment.
# ``fork``: warm, and Flower's per-message ClientApp processes forked from a warm parent (opt-in).
MODE_ENV = {"cold": {"FEDLORA_SUPERNODE_POLL_S": "off", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "1.0",
                     "FEDLORA_CLIENTAPP_FORK": "0"}, "warm": {"FEDLORA_CLIENTAPP_FORK": "0"},
            "fork": {"FEDLORA_CLIENTAPP_FORK": "1"}}


def overrides(args: argparse.Namespace) -> list[str]:
    return [
        f"model={args.model}", "topology=small6g", "topology.suburban_cells=1",
        f"topology.neighbourhoods_per_suburban={args.edges}", "topology.mobility.model=none",
        "topology.profiles.phone.availability=1.0", "privacy=secagg", f"federation.num_clients={args.clients}",
        "federation.fraction=1.0", f"federation.rounds={args.rounds}", "federation.round_timeout_s=600",
        f"train.local_steps={args.local_steps}", "train.max_seq_len=128", "data.records_per_client=12",
        "data.max_eval_examples=8", "progress=false", *args.overrides,
    ]


def device_cores(ends: list[int], pin: bool) -> dict[int, list[str]]:
    """END client -> the command prefix that pins its processes to one core (client i: core i mod the
    cores this bench may use), so each device trains with one torch thread on a core it shares in turn,
    as a device on its own machine trains on its own cores; ``pin`` off: every device on every core."""
    cores = sorted(os.sched_getaffinity(0))
    return {c: (["taskset", "-c", str(cores[i % len(cores)])] if pin else []) for i, c in enumerate(ends)}


def deployment(cfg, used: list[str], work: Path, *, mode: str, timeout_s: float = 3600, pin: bool = False) -> dict:
    from fedlora.deploy.plan import DeploySettings, write_plan
    from fedlora.deploy.processes import ProcessGroup, free_port_run, placement

    fedlora = [sys.executable, "-m", "fedlora.cli"]
    warm = mode != "cold"
    env = dict(os.environ, **MODE_ENV[mode])
    cells = placement(cfg)
    plan = work / "plan"
    write_plan(cfg, plan, DeploySettings(base_port=free_port_run(1 + len(cells)),
                                         runtime_port_base=free_port_run(len(cells) + cfg.federation.num_clients)),
               overrides=used)
    ends = sorted(c for clients in cells.values() for c in clients)
    pinned = device_cores(ends, pin)
    with ProcessGroup(work / "logs") as group:
        t0 = time.perf_counter()
        for cell, clients in cells.items():
            group.start(f"edge-{cell}", [*fedlora, "edge", "--config", str(plan / f"edge-{cell}")], env)
            for c in clients:
                group.start(f"end-{c}", [*pinned[c], *fedlora, "client", "--config", str(plan / f"end-{c}"),
                                         *([] if warm else ["--cold"])], env)
        beats = [plan / f"edge-{cell}" / "spool" / "heartbeat" for cell in cells]
        while not all(b.exists() for b in beats):
            group.check()
            time.sleep(0.2)
        ready = time.perf_counter() - t0
        t1 = time.perf_counter()
        cloud = group.start("cloud", [*fedlora, "cloud", "--config", str(plan / "cloud")], env)
        if cloud.wait(timeout=timeout_s) != 0:  # subprocess.TimeoutExpired past it: this mode failed
            raise SystemExit(f"the cloud run failed; logs in {work}")
        total = time.perf_counter() - t1
    rounds = rounds_of(plan / "cloud" / "run")
    return {"tiers_ready_s": ready, "cloud_total_s": total, "rounds": rounds, "plan": str(plan), "ends": ends,
            "messages": messages_per_device(plan, ends), "residents": residents(plan, ends) if warm else None,
            "leftovers": group.leftovers()}


HEADER = re.compile(r"\[RUN \d+(?:, ROUND (\d+)/([\w-]+))?\]")  # Flower's log header of each message's lines
RECEIVED = re.compile(r"Receiving: (\S+) message")
STARTED = "Start `flwr-clientapp` process"  # the SuperExec, once per message (cold, warm and fork alike)
FORKED = "forked ClientApp process"  # fedlora.deploy.clientapp_fork, once per ClientApp it forks


def flower_log(folder: Path, name: str) -> str:
    return "\n".join(re.sub(r"\x1b\[[0-9;]*m", "", p.read_text(errors="replace"))
                     for p in sorted((folder / "logs").glob(name)))


def messages_per_device(plan: Path, ends: list[int]) -> dict[int, dict]:
    """Client -> what its SuperNode's log says: messages received by type, per round (``run`` for
    the run's identify query) the messages and ``flwr-clientapp`` starts, the long-running Flower
    processes started (SuperNode, SuperExec: retries while the edge comes up included) and how many
    ClientApps the fork server forked (``fork`` mode)."""
    out = {}
    for c in ends:
        folder = plan / f"end-{c}"
        text = flower_log(folder, "supernode.log")
        types: dict[str, int] = {}
        rounds: dict[str, dict[str, int]] = {}
        where, stage, trains = "run", None, 0
        for line in text.splitlines():
            if h := HEADER.search(line):
                where, stage = h.group(1) or "run", h.group(2)
            elif m := RECEIVED.search(line):
                types[m.group(1)] = types.get(m.group(1), 0) + 1
                trains += m.group(1) == "train" or stage == STAGES[0]  # the message that trains (secure: its first stage)
                rounds.setdefault(where, {"messages": 0, "clientapp_starts": 0})["messages"] += 1
            elif STARTED in line:
                rounds.setdefault(where, {"messages": 0, "clientapp_starts": 0})["clientapp_starts"] += 1
        out[c] = {"types": types, "rounds": rounds, "trains": trains, "supernode_starts": text.count("Starting Flower SuperNode"),
                  "superexec_starts": text.count("Starting Flower SuperExec"),
                  "forks": flower_log(folder, "supernode-fork.log").count(FORKED)}
    return out


def per_device_round(dep: dict, rounds: int) -> dict:
    """Means over devices and the secure rounds (``run``: the run's own messages, once per device)."""
    msgs = list(dep["messages"].values())
    n = len(msgs)

    def mean(key: str, where: str = "rounds") -> float:
        if where == "run":
            return sum(m["rounds"].get("run", {}).get(key, 0) for m in msgs) / n
        return sum(v[key] for m in msgs for r, v in m["rounds"].items() if r != "run") / n / rounds

    starts = mean("clientapp_starts")
    forks = sum(m["forks"] for m in msgs) / n
    if forks and not starts:  # Flower's start line is the ClientApp's own output: a forked one writes to the fork log
        starts = (forks - mean("messages", "run")) / rounds
    if dep["residents"]:
        loads = sum(s["model_builds"] for s in dep["residents"].values()) / n / rounds
    else:  # cold: the ClientApp of each message that trains loads the model
        loads = sum(m["trains"] for m in msgs) / n / rounds
    return {"messages_per_device_round": mean("messages"), "clientapp_starts_per_device_round": starts,
            "run_messages_per_device": mean("messages", "run"),
            "run_clientapp_starts_per_device": mean("clientapp_starts", "run"),
            "forked_clientapps_per_device_run": forks,
            "interpreter_clientapp_starts_per_device_round": max(0.0, starts - forks / rounds) if forks else starts,
            "supernode_starts_per_device_run": sum(m["supernode_starts"] for m in msgs) / n,
            "superexec_starts_per_device_run": sum(m["superexec_starts"] for m in msgs) / n,
            "resident_processes_per_device_run": 1 if dep["residents"] else 0,
            "model_loads_per_device_round": loads}


def residents(plan: Path, ends: list[int]) -> dict[int, dict]:
    return {c: json.loads((plan / f"end-{c}" / "state" / "resident.json").read_text()) for c in ends}


def breakdown(dep: dict) -> dict[int, dict[str, float]]:
    """Round -> the slowest device's ClientApp start and work beyond training, summed over the stages (warm)."""
    per: dict[int, dict[str, dict[str, float]]] = {}
    for status in dep["residents"].values():
        for t in status["timings"]:
            stage = per.setdefault(t["round"], {}).setdefault(t["stage"], {"clientapp_s": 0.0, "handle_s": 0.0})
            stage["clientapp_s"] = max(stage["clientapp_s"], t["clientapp_s"] or 0.0)
            stage["handle_s"] = max(stage["handle_s"], t["handle_s"])
    return {r: {k: sum(s[k] for s in stages.values()) for k in ("clientapp_s", "handle_s")} for r, stages in per.items()}


def interrupted(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    p.add_argument("--model", default="tiny")
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--edges", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--modes", default="cold,warm",
                   help="deployments side by side: cold (before), warm (after), fork (warm + forked ClientApps)")
    p.add_argument("--mode-timeout-s", type=float, default=3600, help="a deployment's cloud run longer than this fails")
    p.add_argument("--pin-devices", action="store_true",
                   help="each END device's processes on one core (i mod cores): one torch thread per device, "
                        "not every device's threads on every core (on one machine they oversubscribe it)")
    p.add_argument("--lock", default=DEFAULT_LOCK)
    p.add_argument("--no-lock", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "deploy_speed.json"))
    args = p.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - set(MODE_ENV):
        p.error(f"--modes={args.modes!r}: use cold, warm and/or fork")

    from fedlora.config import compose
    from fedlora.roles.cloud import run_federation
    from fedlora.roles.local import InProcessTransport
    from fedlora.runs.progress import quiet_libraries

    quiet_libraries()
    # `timeout` (SIGTERM): unwind, so the deployment's process group stops its processes (new sessions, not signalled)
    signal.signal(signal.SIGTERM, interrupted)
    used = overrides(args)
    cfg = compose(used)
    base = Path(tempfile.mkdtemp(prefix="fedlora-deploy-speed-"))
    info, deps, failed = machine(), {}, {}
    with bench_lock(None if args.no_lock else args.lock, what="deploy_speed"):
        info["loadavg_when_locked"] = [round(x, 2) for x in os.getloadavg()]
        t0 = time.perf_counter()
        run_federation(cfg, base / "simulation", InProcessTransport(cfg.federation.num_clients))
        sim_total = time.perf_counter() - t0
        for mode in modes:
            try:
                deps[mode] = deployment(cfg, used, base / mode, mode=mode, timeout_s=args.mode_timeout_s,
                                        pin=args.pin_devices)
            except (SystemExit, Exception) as exc:  # one mode failing must not lose the others' figures
                failed[mode] = f"{type(exc).__name__}: {exc}"
                print(f"{mode}: FAILED ({failed[mode]}); logs in {base / mode}")
            except KeyboardInterrupt as exc:  # `timeout`: keep the modes done so far, run no more
                failed[mode] = f"interrupted ({exc})"
                print(f"{mode}: INTERRUPTED; logs in {base / mode}")
                break
        modes = [m for m in modes if m in deps]
        info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    sim = rounds_of(base / "simulation")
    print(f"\nDeployed secure rounds on loopback (plan: TLS + SuperNode auth + plan keys): {args.model}, {args.clients} END "
          f"devices under {args.edges} edges, {args.rounds} rounds, {args.local_steps} local steps; simulation total "
          f"{sim_total:.1f}s")
    rows = []
    for i, q in enumerate(sim):
        row = [q["round"], q["wall_s"], max(q["client_train_s"].values())]
        for mode in modes:
            r = deps[mode]["rounds"][i]
            train = max(v for v in r["client_train_s"].values() if v)
            row += [r["wall_s"], train, r["wall_s"] - train]
            if mode != "cold":
                b = breakdown(deps[mode]).get(q["round"], {"clientapp_s": float("nan"), "handle_s": float("nan")})
                row += [b["clientapp_s"], b["handle_s"] - train, r["wall_s"] - b["clientapp_s"] - b["handle_s"]]
        rows.append(row)
    head = ["round", "simulation s", "sim train s"]
    for mode in modes:
        head += [f"{mode} s", f"{mode} train s", f"{mode} beyond training s"]
        if mode != "cold":
            head += [f"{mode}: ClientApp starts s", f"{mode}: crypto+codec s", f"{mode}: polling+TLS+transfer+edge s"]
    print(table(rows, head, digits=1))
    counts = {}
    for mode, dep in deps.items():
        counts[mode] = per_device_round(dep, args.rounds)
        print(f"{mode}: tiers ready {dep['tiers_ready_s']:.1f}s, cloud total {dep['cloud_total_s']:.1f}s; "
              f"leftovers {dep['leftovers']}")
    keys = list(next(iter(counts.values()))) if counts else []
    print("Per END device (means over devices; 'round' = one secure round):")
    print(table([[key, *[counts[m][key] for m in deps]] for key in keys], ["", *deps], digits=2))
    memory = None
    warm = next((m for m in ("warm", "fork") if m in deps), None)
    if warm is not None:
        memory = {}
        for c, status in deps[warm]["residents"].items():
            ends = [t for t in status["timings"] if t["stage"] == STAGES[-1]]
            memory[c] = [{"round": t["round"], "rss_mib": t.get("rss_mib"), "peak_mib": t.get("peak_mib")} for t in ends]
        # A device that missed a round (a dropout) has no figure for it: "-" there.
        served = sorted({m["round"] for ms in memory.values() for m in ms})
        cols = [f"r{r}" for r in served]

        def row(c, ms, key):
            by_round = {m["round"]: m[key] for m in ms}
            return [c, *[by_round.get(r, "-") for r in served]]

        print(f"{warm} resident processes, peak RSS MiB after each round (per device):")
        print(table([row(c, ms, "peak_mib") for c, ms in memory.items()], ["device", *cols], digits=0))
        print(table([row(c, ms, "rss_mib") for c, ms in memory.items()], ["device (RSS now)", *cols], digits=0))
        growth = {c: {"peak_mib": ms[-1]["peak_mib"] - ms[min(1, len(ms) - 1)]["peak_mib"],
                      "rss_mib": ms[-1]["rss_mib"] - ms[min(1, len(ms) - 1)]["rss_mib"]} for c, ms in memory.items() if ms}
        memory = {"per_round": memory, "growth_round2_to_last": growth}
        worst = {k: max(g[k] for g in growth.values()) for k in ("peak_mib", "rss_mib")}
        print(f"{warm}: growth from round 2 to the last round, max over devices: peak {worst['peak_mib']:+.1f} MiB, "
              f"RSS now {worst['rss_mib']:+.1f} MiB")
    out = write_json(args.out, {
        **provenance("deploy_speed", info), "overrides": used, "failed": failed,
        "simulation": {"total_s": sim_total, "rounds": sim},
        "deployments": {m: {k: v for k, v in d.items() if k != "residents"} for m, d in deps.items()},
        "residents": {m: d["residents"] for m, d in deps.items() if d["residents"]}, "counts": counts, "memory": memory,
        "table": {"head": head, "rows": rows},
    })
    print(f"written: {out}")


if __name__ == "__main__":
    main()
