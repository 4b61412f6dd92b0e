"""A chaos soak's pure half: the seeded fault schedule and the checks of a run's records.

A soak (``bench/chaos_soak.py``) runs a planned deployment -- cloud, edges and END devices,
each machine in its own network namespace -- while it injects the faults of
:func:`fault_schedule`: processes killed and started again at random moments of a round
(mid-stage included), links degraded (``tc netem`` delay, jitter and loss where the kernel has
netem, else a ``tbf`` rate cap and nftables random loss) and cut for a few seconds (a
partition). Afterwards :func:`check_rounds` says what a deployment promises
whatever happened: every round done once (a restarted cloud resumes, it loses none and
repeats none), every device asked in a round joined it or is in its dropped list with a
reason, no update counted twice. :func:`survival` tells each fault's outcome from the
records.

Nothing here starts a process or touches the network: the schedule is a list of
:class:`Fault` values (from the seed alone, the same on every machine), the checks read
``rounds.jsonl`` records, :func:`netns_argvs`, :func:`degrade_argvs` and the like only build
command lines.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

from fedlora.seeds import round_seed

KILL = "kill"  # a whole machine's process tree (SIGKILL or SIGTERM), started again after down_s
KILL_RESIDENT = "kill-resident"  # an END device's resident process only, while it serves a stage
NETEM = "netem"  # a machine's link degraded for down_s: delay, jitter and loss (or what the kernel has: Degrade)
PARTITION = "partition"  # a machine's link cut (everything dropped both ways) for down_s
KINDS = (KILL, KILL_RESIDENT, NETEM, PARTITION)
STAGES = ("advertise", "share-keys", "masked-input", "unmask")  # a secure round's device stages, in order
TIME = "time"  # a trigger: a fraction of a round's duration after the round started


class ChaosError(ValueError):
    """A fault schedule that cannot be made as asked (the message names the setting)."""


@dataclass(frozen=True)
class Fault:
    """One fault: what, to which machine (a plan node name), when, for how long."""

    id: int
    kind: str  # one of KINDS
    target: str  # "cloud", "edge-<cell>", "end-<n>"
    round: int  # the round it is aimed at (fired in a later one when that round ends first)
    trigger: str  # TIME, or a stage of STAGES: when the target's resident process serves it (KILL_RESIDENT)
    at: float  # TIME: how far into the round, as a fraction of a round's duration (the soak measures it)
    down_s: float  # the process stays dead / the link degraded this long
    signal: str = "SIGKILL"  # KILL: SIGKILL (a crash) or SIGTERM (a graceful stop)
    link: Degrade | None = None  # NETEM: how the link is degraded

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ChaosSettings:
    """How many faults of each kind over how many rounds (:func:`fault_schedule`)."""

    seed: int = 0
    rounds: int = 10
    device_kills: int = 4  # END devices killed (whole tree)
    resident_kills: int = 2  # END devices' resident process killed mid-stage
    edge_kills: int = 2
    cloud_kills: int = 2
    netems: int = 3  # links degraded (delay, jitter, loss)
    partitions: int = 2  # links cut for a few seconds
    spread: float = 1.0  # TIME faults fall at [0, spread) of a round's duration into their round
    down_s: tuple[float, float] = (3.0, 20.0)  # how long a killed process stays down
    netem_s: tuple[float, float] = (20.0, 60.0)
    partition_s: tuple[float, float] = (4.0, 12.0)


@dataclass
class Machines:
    """The deployment's machines by plan node name."""

    cloud: str
    edges: list[str]
    ends: list[str]
    cell_of: dict[str, str] = field(default_factory=dict)  # END node -> its edge node


def fault_schedule(settings: ChaosSettings, machines: Machines) -> list[Fault]:
    """The seeded faults of a soak, by round and offset (same seed, same schedule).

    Kills of the cloud and of edges are in distinct rounds, none in the last round (a cloud
    started again after its run finished would start a new run) nor the same round as another
    tier kill, so each tier fault is told apart in the records. END device faults may fall in
    any round, several in one. Resident kills are triggered by a stage (mid-stage by design),
    the others by a time offset into the round.
    """
    s = settings
    if s.rounds < 2:
        raise ChaosError(f"rounds={s.rounds}: a soak needs at least 2 rounds (faults are never in the last one)")
    tier = s.edge_kills + s.cloud_kills
    if tier > s.rounds - 1:
        raise ChaosError(f"{tier} edge/cloud kills need as many distinct rounds before the last; rounds={s.rounds}")
    if (s.edge_kills and not machines.edges) or ((s.device_kills or s.resident_kills) and not machines.ends):
        raise ChaosError("the deployment lacks the machines the schedule kills (edges or END devices)")
    for name in ("device_kills", "resident_kills", "edge_kills", "cloud_kills", "netems", "partitions"):
        if getattr(s, name) < 0:
            raise ChaosError(f"{name}={getattr(s, name)} must be >= 0")
    rng = random.Random(round_seed(s.seed, "chaos-schedule"))
    faults: list[tuple[str, str, int, str, float, float, str, Degrade | None]] = []
    tier_rounds = rng.sample(range(1, s.rounds), tier)
    for i, rnd in enumerate(tier_rounds):
        target = machines.cloud if i < s.cloud_kills else rng.choice(machines.edges)
        signal = "SIGKILL" if rng.random() < 0.75 else "SIGTERM"
        faults.append((KILL, target, rnd, TIME, _offset(rng, s), _uniform(rng, s.down_s), signal, None))
    for _ in range(s.device_kills):
        faults.append((KILL, rng.choice(machines.ends), rng.randrange(1, s.rounds + 1), TIME, _offset(rng, s),
                       _uniform(rng, s.down_s), "SIGKILL", None))
    for _ in range(s.resident_kills):
        faults.append((KILL_RESIDENT, rng.choice(machines.ends), rng.randrange(1, s.rounds + 1), rng.choice(STAGES), 0.0,
                       0.0, "SIGKILL", None))
    links = [*machines.edges, *machines.ends]
    for _ in range(s.netems):
        args = Degrade(rng.randrange(20, 150), rng.randrange(5, 30), rng.randrange(1, 6), rng.choice([256, 512, 1000, 2000]))
        faults.append((NETEM, rng.choice(links), rng.randrange(1, s.rounds + 1), TIME, _offset(rng, s),
                       _uniform(rng, s.netem_s), "", args))
    for _ in range(s.partitions):
        faults.append((PARTITION, rng.choice(links), rng.randrange(1, s.rounds + 1), TIME, _offset(rng, s),
                       _uniform(rng, s.partition_s), "", None))
    faults.sort(key=lambda f: (f[2], f[4], f[0], f[1]))
    return [Fault(i, kind, target, rnd, trig, off, down, sig, args)
            for i, (kind, target, rnd, trig, off, down, sig, args) in enumerate(faults)]


def _offset(rng: random.Random, s: ChaosSettings) -> float:
    return round(rng.uniform(0.0, s.spread), 3)


def _uniform(rng: random.Random, bounds: tuple[float, float]) -> float:
    return round(rng.uniform(*bounds), 1)


def due(fault: Fault, current_round: int, into: float, stage_of: dict[str, tuple[int, str]]) -> bool:
    """Whether ``fault`` fires now: the deployment is in ``current_round``, ``into`` of a round's
    duration into it; ``stage_of``: END node -> (round, stage) its resident process is serving now."""
    if current_round < fault.round:
        return False
    if fault.trigger == TIME:
        return current_round > fault.round or into >= fault.at
    busy = stage_of.get(fault.target)
    # A stage trigger whose round ended without the stage (e.g. the device was down): the next stage seen.
    return busy is not None and busy[0] >= fault.round and (busy[0] > fault.round or busy[1] == fault.trigger)


# --- checks of a finished run's records ----------------------------------------------------------------------------


def check_rounds(rounds: list[dict], *, expected_rounds: int, asked: dict[int, list[int]],
                 examples_of: dict[int, float] | None = None) -> list[str]:
    """What is wrong with a run's ``rounds.jsonl`` records (an empty list: nothing).

    ``asked``: round -> the clients the cloud asked in it; ``examples_of``: client -> its
    training examples (its aggregation weight), to tell that each participant's update was
    counted exactly once (the round's ``num_examples`` is their sum).
    """
    problems = []
    numbers = [r.get("round") for r in rounds]
    if numbers != list(range(1, expected_rounds + 1)):
        problems.append(f"rounds recorded {numbers}, not 1..{expected_rounds} once each (a round lost or repeated)")
    for record in rounds:
        problems += [f"round {record.get('round')}: {p}" for p in _check_round(record, asked, examples_of)]
    return problems


def _check_round(record: dict, asked: dict[int, list[int]], examples_of: dict[int, float] | None) -> list[str]:
    out = []
    participants = list(record.get("participants") or [])
    dropped = list(record.get("dropped") or [])
    dropped_ids = [d.get("client") for d in dropped]
    if len(set(participants)) != len(participants):
        out.append(f"a participant listed twice: {participants}")
    if len(set(dropped_ids)) != len(dropped_ids):
        out.append(f"a dropped client listed twice: {dropped_ids}")
    both = sorted(set(participants) & set(dropped_ids))
    if both:
        out.append(f"client(s) {both} both joined and dropped")
    for d in dropped:
        if not (isinstance(d.get("reason"), str) and d["reason"].strip()):
            out.append(f"client {d.get('client')} dropped without a reason")
    wanted = set(asked.get(record.get("round"), []))
    missing = sorted(wanted - set(participants) - set(dropped_ids))
    if missing:
        out.append(f"asked client(s) {missing} neither joined nor dropped")
    extra = sorted((set(participants) | set(dropped_ids)) - wanted)
    if extra:
        out.append(f"client(s) {extra} recorded but not asked")
    out += _check_secure(record, participants)
    if examples_of is not None and participants:
        want = sum(examples_of[c] for c in participants if c in examples_of)
        if abs(float(record.get("num_examples") or 0.0) - want) > 1e-6 * max(1.0, want):
            out.append(f"num_examples {record.get('num_examples')} is not the participants' {want} (an update counted "
                       "twice or not at all)")
    return out


def _check_secure(record: dict, participants: list[int]) -> list[str]:
    """Secure rounds: the cells' survivors are disjoint, make up the participants, and an aborted
    cell has none."""
    secure = record.get("secure")
    if secure is None:
        return []
    out, seen = [], []
    for cell, state in sorted((secure.get("cells") or {}).items()):
        survivors = list(state.get("survivors") or [])
        if not state.get("ok") and survivors:
            out.append(f"cell {cell} aborted but counts survivors {survivors}")
        seen += survivors
    if sorted(seen) != sorted(participants):
        out.append(f"the secure cells' survivors {sorted(seen)} are not the participants {sorted(participants)} "
                   "(one counted twice or not at all)")
    return out


def survival(faults: list[dict], rounds: list[dict], completed: bool, machines: Machines | None = None) -> dict:
    """Faults injected vs survived vs recovered, per kind.

    ``faults``: the soak's log, each a :meth:`Fault.to_dict` with ``fired_round`` (None: never
    fired) and ``restored_round``. Survived: the run completed with each round from the fault to
    its end recorded. Recovered: what it hit took part again afterwards -- a later round has the
    END device (for an edge: every device of its cell, ``machines.cell_of``) among its
    participants, for the cloud the rounds went on; a fault whose machine had no later round to
    show it in is counted under ``unobservable``."""
    recorded = {r.get("round") for r in rounds}
    joined = {r.get("round"): set(r.get("participants") or []) for r in rounds}
    cell_of = machines.cell_of if machines is not None else {}
    by_kind: dict[str, dict[str, int]] = {}
    for f in faults:
        row = by_kind.setdefault(f["kind"], {"scheduled": 0, "injected": 0, "survived": 0, "recovered": 0,
                                             "unobservable": 0})
        row["scheduled"] += 1
        if f.get("fired_round") is None:
            continue
        row["injected"] += 1
        # restored after the run's last round (the soak puts every link back at the end): through that round
        last = min(f.get("restored_round") or f["fired_round"], max(recorded, default=f["fired_round"]))
        if completed and all(r in recorded for r in range(f["fired_round"], last + 1)):
            row["survived"] += 1
        clients = _clients_of(f["target"], cell_of)
        later = [r for r in sorted(joined) if r > last]
        if f["target"] != "cloud" and not later:
            row["unobservable"] += 1
        elif f["target"] == "cloud" or any(clients <= joined[r] for r in later):
            row["recovered"] += 1 if completed else 0
    total = {k: sum(row[k] for row in by_kind.values()) for k in ("scheduled", "injected", "survived", "recovered",
                                                                 "unobservable")}
    return {"by_kind": by_kind, **total}


def _clients_of(target: str, cell_of: dict[str, str]) -> set[int]:
    """The END clients a machine's fault hits: an END device itself, an edge's every device."""
    if target.startswith("end-"):
        return {int(target[4:])}
    return {int(end[4:]) for end, edge in cell_of.items() if edge == target}


# --- network namespaces and netem, as command lines ---------------------------------------------------------------


def netns_name(tag: str, index: int) -> str:
    return f"flc-{tag}-{index}"


def hub_name(tag: str) -> str:
    return f"flc-{tag}-hub"


def node_address(subnet: int, index: int) -> str:
    """Machine ``index``'s address in the soak's 10.<subnet>.0.0/16 (index 0 is the bridge's)."""
    return f"10.{subnet}.{(index + 1) // 250}.{(index + 1) % 250 + 1}"


def netns_argvs(tag: str, subnet: int, count: int) -> list[list[str]]:
    """Commands that make a hub namespace with a bridge and ``count`` machine namespaces, each
    joined to the bridge by a veth pair (``eth0`` inside, ``v<i>`` on the hub), loopback up."""
    hub = hub_name(tag)
    argvs = [["ip", "netns", "add", hub], ["ip", "-n", hub, "link", "set", "lo", "up"],
             ["ip", "-n", hub, "link", "add", "br0", "type", "bridge"], ["ip", "-n", hub, "link", "set", "br0", "up"]]
    for i in range(count):
        ns = netns_name(tag, i)
        argvs += [["ip", "netns", "add", ns], ["ip", "-n", ns, "link", "set", "lo", "up"],
                  ["ip", "-n", hub, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", ns],
                  ["ip", "-n", hub, "link", "set", f"v{i}", "master", "br0"], ["ip", "-n", hub, "link", "set", f"v{i}", "up"],
                  ["ip", "-n", ns, "addr", "add", f"{node_address(subnet, i)}/16", "dev", "eth0"],
                  ["ip", "-n", ns, "link", "set", "eth0", "up"]]
    return argvs


def netns_cleanup_argvs(tag: str, count: int) -> list[list[str]]:
    """Commands that delete what :func:`netns_argvs` made (a namespace's veth goes with it)."""
    return [["ip", "netns", "del", netns_name(tag, i)] for i in range(count)] + [["ip", "netns", "del", hub_name(tag)]]


@dataclass(frozen=True)
class Degrade:
    """A degraded link: one-way delay with jitter, random loss, and a rate cap (0: none)."""

    delay_ms: int
    jitter_ms: int
    loss_pct: int
    rate_kbit: int = 0

    def netem_args(self) -> list[str]:
        return ["delay", f"{self.delay_ms}ms", f"{self.jitter_ms}ms", "loss", f"{self.loss_pct}%"]


CHAOS_TABLE = "fedlora_chaos"  # the nftables table a soak adds in a machine's namespace


def _in_ns(tag: str, index: int, argv: list[str], hub_side: bool = False) -> list[str]:
    return ["ip", "netns", "exec", hub_name(tag) if hub_side else netns_name(tag, index), *argv]


def degrade_argvs(tag: str, index: int, link: Degrade, *, netem: bool) -> list[list[str]]:
    """Commands that degrade machine ``index``'s link both ways. ``netem``: the kernel has
    ``sch_netem`` (delay, jitter and loss on both veth ends); without it (e.g. a minimal VM kernel)
    the delay cannot be made, so the link gets what the kernel has: a token-bucket rate cap
    (``tbf``: queueing delay under load) on both ends and random loss with nftables (``numgen``)."""
    dev, hub_dev = "eth0", f"v{index}"
    if netem:
        return [_in_ns(tag, index, ["tc", "qdisc", "replace", "dev", d, "root", "netem", *link.netem_args()], hub)
                for d, hub in ((dev, False), (hub_dev, True))]
    rate = link.rate_kbit or 1000
    shape = [_in_ns(tag, index, ["tc", "qdisc", "replace", "dev", d, "root", "tbf", "rate", f"{rate}kbit", "burst", "32kbit",
                                 "latency", f"{max(50, 4 * link.delay_ms)}ms"], hub)
             for d, hub in ((dev, False), (hub_dev, True))]
    return shape + _nft_drop_argvs(tag, index, f"numgen random mod 100 < {link.loss_pct}")


def partition_argvs(tag: str, index: int) -> list[list[str]]:
    """Commands that cut machine ``index``'s link both ways (nftables drops all it sends and receives
    on it; its loopback keeps working)."""
    return _nft_drop_argvs(tag, index, "")


def _nft_drop_argvs(tag: str, index: int, match: str) -> list[list[str]]:
    table = ["inet", CHAOS_TABLE]
    argvs = [_in_ns(tag, index, ["nft", "add", "table", *table])]
    for chain, hook, iface in (("out", "output", "oifname"), ("in", "input", "iifname")):
        argvs.append(_in_ns(tag, index, ["nft", "add", "chain", *table, chain, "{", "type", "filter", "hook", hook,
                                         "priority", "0", ";", "policy", "accept", ";", "}"]))
        argvs.append(_in_ns(tag, index, ["nft", "add", "rule", *table, chain, iface, '"eth0"', *match.split(), "drop"]))
    return argvs


def restore_argvs(tag: str, index: int) -> list[list[str]]:
    """Commands that undo :func:`degrade_argvs` and :func:`partition_argvs` (each may find nothing to undo)."""
    return [_in_ns(tag, index, ["tc", "qdisc", "del", "dev", "eth0", "root"]),
            _in_ns(tag, index, ["tc", "qdisc", "del", "dev", f"v{index}", "root"], True),
            _in_ns(tag, index, ["nft", "delete", "table", "inet", CHAOS_TABLE])]
