"""A chaos soak: a planned deployment run for many rounds under a seeded schedule of faults.

A plan (TLS on every hop, SuperNode authentication, secure aggregation with each machine's
own keys, the tiny model, one sub-urban cell of two edges, six END devices) is run with each
machine in its own network namespace (``ip netns``; veth pairs to a bridge in a hub
namespace), every machine started with its folder's command (``fedlora cloud|edge|client
--config``), while the faults of :func:`fedlora.deploy.chaos.fault_schedule` are injected:

- END devices, edges and the cloud killed (SIGKILL of the machine's process tree, or SIGTERM)
  at a random moment of a round and started again after a few seconds with the same command;
- an END device's resident process killed while it serves a given secure stage (mid-stage);
- a machine's link degraded with ``tc netem`` (delay, jitter, loss) for a while, and cut (100%
  loss both ways: a partition) for a few seconds.

Afterwards it checks (:func:`fedlora.deploy.chaos.check_rounds`): the run completed; every round
is recorded once (no round lost or repeated by the cloud's restarts: it resumes); every device
asked in a round joined it or is in its dropped list with a reason; no update was counted twice
(the secure cells' survivors are disjoint and are the participants; the round's example count is
theirs); the final adapter is finite and loads with plain ``peft``. It writes the faults injected
vs survived. Every process it starts is stopped, every namespace (and so every veth) deleted,
on success, failure and Ctrl-C.

    sudo .venv/bin/python bench/chaos_soak.py --rounds 10 --seed 1       # the full soak (~20-40 min on 2 cores)
    sudo .venv/bin/python bench/chaos_soak.py --short                    # what CI runs (tests/test_chaos_soak.py)

Run it under the Flower lock on a shared machine (``flock /tmp/fedlora-flower.lock ...``). Without
network namespaces (not root, no ``ip``) it says so and runs on loopback with the process
faults only (``--no-netns`` forces that).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fedlora.config import compose  # noqa: E402 (after the path set-up, for `python bench/chaos_soak.py`)
from fedlora.deploy import chaos  # noqa: E402
from fedlora.deploy.plan import DeploySettings, edge_name, end_name, write_plan  # noqa: E402
from fedlora.deploy.processes import ProcessGroup, placement  # noqa: E402
from fedlora.deploy.resident import read_status  # noqa: E402

FIRST_ROUND_S = 60.0  # a round's duration before one is recorded (faults fall at a fraction of it)
RESULTS = Path(__file__).resolve().parent / "results"
FEDLORA = [sys.executable, "-m", "fedlora.cli"]
BASE_OVERRIDES = [
    "model=tiny",
    "topology=small6g",
    "topology.suburban_cells=1",
    "topology.neighbourhoods_per_suburban=2",
    "topology.mobility.model=none",
    "topology.profiles.phone.availability=1.0",
    "privacy=secagg",
    "federation.num_clients=6",
    "federation.fraction=1.0",
    "federation.round_pause_s=2",
    "federation.round_timeout_s=120",
    "train.local_steps=2",
    "train.max_seq_len=128",
    "data.records_per_client=12",
    "data.max_eval_examples=8",
    "progress=false",
]
# The short soak CI runs: 3 rounds, one fault of each kind but the edge kill and the stage kill.
SHORT = chaos.ChaosSettings(rounds=3, device_kills=1, resident_kills=0, edge_kills=0, cloud_kills=1, netems=1,
                            partitions=1, spread=0.8, down_s=(2.0, 6.0), netem_s=(10.0, 20.0), partition_s=(3.0, 6.0))


@dataclass
class SoakResult:
    """What a soak did and found (``report()`` is what it writes)."""

    settings: dict
    network: str  # "netns" or "loopback (...why)"
    faults: list[dict]
    rounds: list[dict]
    completed: bool
    problems: list[str]
    adapter: dict = field(default_factory=dict)
    wall_s: float = 0.0
    leftovers: list[int] = field(default_factory=list)
    namespaces_left: list[str] = field(default_factory=list)
    machines: chaos.Machines | None = None

    def report(self) -> dict:
        survived = chaos.survival(self.faults, self.rounds, self.completed and not self.problems, self.machines)
        return {"settings": self.settings, "network": self.network, "completed": self.completed,
                "rounds": len(self.rounds), "problems": self.problems, "faults": survived, "fault_log": self.faults,
                "adapter": self.adapter, "wall_s": round(self.wall_s, 1), "processes_left": self.leftovers,
                "namespaces_left": self.namespaces_left,
                "per_round": [{"round": r["round"], "participants": r["participants"],
                               "dropped": r["dropped"], "wall_s": round(r.get("wall_s", 0.0), 1),
                               "cells_ok": sorted(c for c, s in (r.get("secure") or {}).get("cells", {}).items()
                                                  if s.get("ok"))} for r in self.rounds]}


# --- network namespaces ---------------------------------------------------------------------------------------------


def netns_usable() -> str | None:
    """None when network namespaces can be made here, else why not."""
    if shutil.which("ip") is None or shutil.which("tc") is None or shutil.which("nft") is None:
        return "no `ip`/`tc` (iproute2) or `nft` (nftables) command"
    probe = f"flc-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()[-200:]} (needs root or CAP_SYS_ADMIN)"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class NetLab:
    """One namespace per machine, joined by veth pairs to a bridge in a hub namespace; deleted on close."""

    def __init__(self, machines: list[str]):
        self.machines = machines
        self.tag = f"{os.getpid() % 100000}"
        self.subnet = 100 + os.getpid() % 100  # 10.<subnet>.0.0/16, apart from other soaks on this machine
        self.index = {m: i for i, m in enumerate(machines)}
        self.made = False
        self.netem = False  # whether this kernel has sch_netem (else links get a rate cap and nftables loss)

    def __enter__(self) -> NetLab:
        self.made = True
        try:
            for argv in chaos.netns_argvs(self.tag, self.subnet, len(self.machines)):
                subprocess.run(argv, check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as exc:
            self.close()
            raise RuntimeError(f"{' '.join(exc.cmd)}: {exc.stderr.strip()}") from None
        probe = ["ip", "netns", "exec", chaos.hub_name(self.tag), "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay",
                 "1ms"]
        self.netem = subprocess.run(probe, capture_output=True).returncode == 0
        subprocess.run(probe[:6] + ["del", "dev", "lo", "root"], capture_output=True)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def address(self, machine: str) -> str:
        return chaos.node_address(self.subnet, self.index[machine])

    def prefix(self, machine: str) -> list[str]:
        return ["ip", "netns", "exec", chaos.netns_name(self.tag, self.index[machine])]

    def degrade(self, machine: str, link: chaos.Degrade | None) -> None:
        """Degrade ``machine``'s link (netem, or a rate cap and random loss), cut it (``link`` None)."""
        i = self.index[machine]
        argvs = (chaos.partition_argvs(self.tag, i) if link is None
                 else chaos.degrade_argvs(self.tag, i, link, netem=self.netem))
        for argv in argvs:
            subprocess.run(argv, check=True, capture_output=True, text=True)

    def restore(self, machine: str) -> None:
        for argv in chaos.restore_argvs(self.tag, self.index[machine]):
            subprocess.run(argv, capture_output=True)  # what was not set is not there to undo

    def close(self) -> None:
        for argv in chaos.netns_cleanup_argvs(self.tag, len(self.machines)):
            subprocess.run(argv, capture_output=True)

    def left(self) -> list[str]:
        """The lab's namespaces that still exist (should be none after close)."""
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return [line.split()[0] for line in out.splitlines() if line.startswith(f"flc-{self.tag}-")]


class Loopback:
    """No namespaces: every machine on this host's loopback; link faults are not injected."""

    def __enter__(self) -> Loopback:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def address(self, machine: str) -> str:
        return "127.0.0.1"

    def prefix(self, machine: str) -> list[str]:
        return []

    netem = False

    def degrade(self, machine: str, link) -> None:
        raise RuntimeError("link faults need network namespaces")

    restore = degrade

    def left(self) -> list[str]:
        return []


# --- the soak -------------------------------------------------------------------------------------------------------


@dataclass
class Soak:
    """A planned deployment in ``work`` under ``faults``; :meth:`run` until it ends or ``deadline``."""

    work: Path
    cfg: object
    overrides: list[str]
    machines: chaos.Machines
    net: object  # NetLab or Loopback
    env: dict
    faults: list[chaos.Fault]
    deadline: float
    log: list[dict] = field(default_factory=list)

    def folder(self, machine: str) -> Path:
        return self.work / "plan" / machine

    @property
    def run_dir(self) -> Path:
        return self.folder("cloud") / "run"

    def command(self, machine: str) -> list[str]:
        role = {"cloud": "cloud"}.get(machine, "edge" if machine.startswith("edge-") else "client")
        extra = ["--audit"] if role == "client" else []
        return [*self.net.prefix(machine), *FEDLORA, role, "--config", str(self.folder(machine)), *extra]

    def run(self, group: ProcessGroup) -> bool:
        """Start every machine, inject the faults, wait for the cloud's run to end; True when it finished."""
        for machine in [*self.machines.edges, *self.machines.ends]:
            group.start(machine, self.command(machine), self.env)
        time.sleep(20)  # the edges' SuperLinks and their devices first (any order works; this is quicker)
        group.start("cloud", self.command("cloud"), self.env)
        pending = list(self.faults)
        restores: list[tuple[float, dict, chaos.Fault]] = []  # (when, its log entry, fault)
        current, round_t0 = 0, time.time()
        while time.time() < self.deadline:
            training = self.training_round()  # the round the cloud last started (0: none yet)
            if training != current:
                current, round_t0 = training, time.time()
            stages = self.stages()
            # (no time into a round before the cloud starts one: round 0 has no faults)
            into = (time.time() - round_t0) / self.round_estimate()
            for fault in [f for f in pending if chaos.due(f, current, into, stages)]:
                if fault.kind in (chaos.KILL, chaos.NETEM, chaos.PARTITION) and any(
                        r[2].target == fault.target for r in restores):
                    continue  # that machine is still down or degraded: the fault waits
                pending.remove(fault)
                entry = self.fire(group, fault, current, stages)
                self.log.append(entry)
                if entry["fired_round"] is not None and fault.kind != chaos.KILL_RESIDENT:
                    restores.append((time.time() + fault.down_s, entry, fault))
            for item in [r for r in restores if r[0] <= time.time()]:
                restores.remove(item)
                self.restore(group, item[2], item[1], current)
            cloud = group.procs["cloud"]
            if cloud.poll() is not None and not any(r[2].target == "cloud" for r in restores):
                if cloud.returncode == 0 and (self.run_dir / "summary.json").is_file():
                    for _, entry, fault in restores:  # links still degraded, devices still down: put back
                        self.restore(group, fault, entry, current)
                    self.log += [{**f.to_dict(), "fired_round": None, "note": "never due"} for f in pending]
                    return True
                raise RuntimeError(f"the cloud exited with code {cloud.returncode} outside a fault; see "
                                   f"{group.log_dir / 'cloud.log'}")
            time.sleep(0.2)
        self.log += [{**f.to_dict(), "fired_round": None, "note": "deadline"} for f in pending]
        return False

    def round_estimate(self) -> float:
        """How long a round takes here: the median of the recorded rounds' wall time (before any, a guess)."""
        walls = sorted(float(r.get("wall_s") or 0.0) for r in read_rounds(self.run_dir))
        return max(5.0, walls[len(walls) // 2]) if walls else FIRST_ROUND_S

    def training_round(self) -> int:
        """The round the cloud last said it started (its log: ``round N: K client(s) training``), at
        least the one after the last recorded round (a restarted cloud resumes there)."""
        try:
            text = (self.folder("cloud") / "logs" / "run.log").read_text(errors="replace")
        except OSError:
            text = ""
        started = [int(m) for m in re.findall(r"fedlora: round (\d+): \d+ client\(s\) training", text)]
        done = len(read_rounds(self.run_dir))
        return max(started[-1] if started else 0, done + 1 if done else 0)

    def stages(self) -> dict[str, tuple[int, str]]:
        """END node -> (round, stage) its resident process serves now."""
        out = {}
        for end in self.machines.ends:
            try:
                busy = (read_status(self.folder(end)) or {}).get("busy")
            except (OSError, ValueError):  # read while being replaced
                continue
            if busy:
                out[end] = (int(busy.get("round", 0)), str(busy.get("stage", "")))
        return out

    def fire(self, group: ProcessGroup, fault: chaos.Fault, current: int, stages: dict) -> dict:
        entry = {**fault.to_dict(), "fired_round": current, "fired_at": time.strftime("%H:%M:%S"),
                 "stages_then": {k: list(v) for k, v in sorted(stages.items())}}
        if fault.kind == chaos.KILL:
            entry["pids"] = group.kill(fault.target, getattr(signal, fault.signal))
        elif fault.kind == chaos.KILL_RESIDENT:
            pid = (read_status(self.folder(fault.target)) or {}).get("pid")
            try:
                os.kill(int(pid), signal.SIGKILL)
                entry["pids"] = [int(pid)]
            except (TypeError, ValueError, ProcessLookupError):
                entry.update(fired_round=None, note="no resident process to kill")
        else:
            self.net.degrade(fault.target, fault.link if fault.kind == chaos.NETEM else None)
            entry["netem"] = self.net.netem
        print(f"[chaos] round {current}: {fault.kind} {fault.target} {fault.signal if fault.kind == chaos.KILL else ''}"
              f"{fault.link or ''} (for {fault.down_s}s; stages {entry['stages_then']})", flush=True)
        return entry

    def restore(self, group: ProcessGroup, fault: chaos.Fault, entry: dict, current: int) -> None:
        if fault.kind == chaos.KILL:
            proc = group.procs[fault.target]
            try:
                proc.wait(60)  # SIGTERM: the machine stops its own processes first
            except subprocess.TimeoutExpired:
                group.kill(fault.target)
                proc.wait(10)
            entry["exit_code"] = proc.returncode
            if fault.target == "cloud" and (self.run_dir / "summary.json").is_file():
                entry["note"] = "the run had finished; not started again"
            else:
                group.restart(fault.target)
        else:
            self.net.restore(fault.target)
        entry["restored_round"] = current
        print(f"[chaos] round {current}: {fault.target} back", flush=True)


def read_rounds(run_dir: Path) -> list[dict]:
    """The complete lines of ``rounds.jsonl`` (the last may be half written)."""
    path = run_dir / "rounds.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def machines_of(cfg) -> chaos.Machines:
    cells = placement(cfg)
    return chaos.Machines("cloud", [edge_name(c) for c in cells], [end_name(i) for ids in cells.values() for i in ids],
                          {end_name(i): edge_name(c) for c, ids in cells.items() for i in ids})


def soak(work: Path, settings: chaos.ChaosSettings, *, netns: bool = True, timeout_s: float = 3600.0,
         env: dict | None = None, extra_overrides: list[str] = ()) -> SoakResult:
    """Plan, run and check one soak in ``work``; every process and namespace is gone when it returns."""
    t0 = time.time()
    overrides = [*BASE_OVERRIDES, f"federation.rounds={settings.rounds}", f"seed={settings.seed}", *extra_overrides]
    cfg = compose(overrides)
    machines = machines_of(cfg)
    why_not = netns_usable() if netns else "--no-netns"
    if why_not is not None:  # link faults need namespaces: only the process faults then
        settings = replace(settings, netems=0, partitions=0)
        print(f"[chaos] no network namespaces ({why_not}): loopback, process faults only", flush=True)
    faults = chaos.fault_schedule(settings, machines)
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    net = NetLab(["cloud", *machines.edges, *machines.ends]) if why_not is None else Loopback()
    result = SoakResult(settings={**vars(settings), "overrides": overrides}, network="netns" if why_not is None else
                        f"loopback ({why_not})", faults=[], rounds=[], completed=False, problems=[], machines=machines)
    group = ProcessGroup(work / "logs")
    try:
        with net:
            plan = DeploySettings(cloud_hosts=[net.address("cloud")],
                                  edge_hosts={} if why_not else {e[5:]: [net.address(e)] for e in machines.edges})
            if why_not is not None:
                from fedlora.deploy.processes import free_port_run  # loopback: ports free on this host

                plan = replace(plan, base_port=free_port_run(3), runtime_port_base=free_port_run(9))
            write_plan(cfg, work / "plan", plan, overrides=overrides)
            run = Soak(work, cfg, overrides, machines, net, env, faults, deadline=t0 + timeout_s)
            try:
                result.completed = run.run(group)
            finally:
                group.stop()  # before the namespaces go
                result.faults = run.log
        result.namespaces_left = net.left()
    finally:
        group.stop()
        result.leftovers = group.leftovers()
    result.rounds = read_rounds(work / "plan" / "cloud" / "run")
    result.problems = check(cfg, result, work / "plan" / "cloud" / "run")
    result.wall_s = time.time() - t0
    return result


def check(cfg, result: SoakResult, run_dir: Path) -> list[str]:
    """The soak's invariants (:func:`fedlora.deploy.chaos.check_rounds`), the adapter, the clean-up."""
    from fedlora.roles.cloud import sample_clients  # the cloud's own sampling, over every planned device

    problems = [] if result.completed else ["the run did not complete before the deadline"]
    clients = sorted(int(e[4:]) for e in machines_of(cfg).ends)
    asked = {r: sample_clients(clients, cfg.federation, cfg.seed, r) for r in range(1, cfg.federation.rounds + 1)}
    if result.rounds:
        problems += chaos.check_rounds(result.rounds, expected_rounds=cfg.federation.rounds, asked=asked,
                                       examples_of=examples_of(cfg, clients))
    if result.completed:
        result.adapter = check_adapter(cfg, run_dir)
        problems += result.adapter.get("problems", [])
    if result.leftovers:
        problems.append(f"processes left running: {result.leftovers}")
    if result.namespaces_left:
        problems.append(f"network namespaces left: {result.namespaces_left}")
    return problems


def examples_of(cfg, clients: list[int]) -> dict[int, float]:
    """Each client's training examples, as its device counts them (its aggregation weight)."""
    from fedlora.data import client_examples  # torch: only for the checks
    from fedlora.data.tokens import tokenize
    from fedlora.model import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    n = cfg.federation.num_clients
    return {c: float(len(tokenize(client_examples(cfg.data, c, n, cfg.seed)[0], tokenizer, cfg.train.max_seq_len)))
            for c in clients}


def check_adapter(cfg, run_dir: Path) -> dict:
    """The final adapter: every tensor finite, and it loads onto the base with plain peft."""
    import numpy as np
    import torch
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    from fedlora.model import resolve_model_dir

    path = run_dir / "adapter"
    tensors = load_file(str(path / "adapter_model.safetensors"))
    problems = [f"adapter tensor {k} is not finite" for k, v in tensors.items() if not np.isfinite(v).all()]
    base = AutoModelForCausalLM.from_pretrained(resolve_model_dir(cfg.model), torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(path))
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    if len(loaded) < len(tensors) or not all(torch.isfinite(v).all() for v in loaded.values()):
        problems.append(f"peft loaded {len(loaded)} LoRA tensors (file: {len(tensors)}) or non-finite ones")
    norm = float(sum(float((v.astype(np.float64) ** 2).sum()) for v in tensors.values()) ** 0.5)
    return {"tensors": len(tensors), "peft_lora_tensors": len(loaded), "norm": norm, "problems": problems}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--short", action="store_true", help="CI's short soak (3 rounds, fewer faults)")
    parser.add_argument("--no-netns", action="store_true", help="loopback only (no link faults)")
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="give up (and clean up) after this long")
    parser.add_argument("--work", type=Path, help="work directory (default: a temporary one, deleted after)")
    parser.add_argument("--out", type=Path, default=RESULTS / "chaos_soak.json")
    args = parser.parse_args(argv)
    settings = replace(SHORT, seed=args.seed) if args.short else chaos.ChaosSettings(seed=args.seed, rounds=args.rounds)
    with tempfile.TemporaryDirectory(prefix="chaos-soak-") as tmp:
        work = args.work or Path(tmp)
        result = soak(work, settings, netns=not args.no_netns, timeout_s=args.timeout_s)
    report = result.report()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("network", "completed", "rounds", "problems", "faults", "wall_s")}, indent=2))
    return 0 if result.completed and not result.problems else 1


if __name__ == "__main__":
    sys.exit(main())
