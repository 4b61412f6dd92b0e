"""Bounded poisoning: one malicious device among honest ones, with and without the defences, plain and secure.

What it measures
----------------
A federation of ``--clients`` always-available devices, every one of them in every round; device
``--attacker`` follows the protocol but sends a harmful update each round:

- ``scale100``  its honest update x100;
- ``signflip``  its honest update negated;
- ``random``    plain: N(0, 1) values in every coordinate; secure: uniformly random ring values (Z_2^32);
- ``count``     an inflated example count (x1000) with a sign-flipped update: plain, the count is its
                weight; secure, the count slot (values can only be weighted up by scaling them: scale100).

Per (mode, defence, attack): the L2 norm of the global adapter's change over the run (``||w_R - w_0||``,
the trainable tensors) and the held-out loss at the end, beside the honest run's (``attack=none``).
Defences, plain (``privacy=none``): none (fedavg), ``norm`` (``strategy.norm_bound``), ``median``
(``strategy=fedmedian``), ``trimmed`` (``strategy=fedtrimmedavg``, cutting one update at each end of a
cell); secure (``privacy=secagg``): none,
``bounds`` (``privacy.bound_check=true``), ``bounds+norm`` (and ``strategy.norm_bound``, devices clip).

How the malicious device is injected (bench and tests only, never in fedlora/): plain, a transport ``fault``
that rewrites its reply; secure, its own session state: after it trains and encodes honestly at the first
stage, the encoded vector it keeps is replaced, and at the masked-input stage it skips the honest client's
own range check (``check_encoded``) -- a compromised device runs what code it likes. Everything else (keys,
shares, masks, signatures) is the real protocol, so its masked input is valid and signed.

Run (takes the benchmark lock):

    .venv/bin/python bench/poisoning.py --model tiny                         # a few minutes
    .venv/bin/python bench/poisoning.py --model smollm2 --rounds 2 --attacks scale100,signflip
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
from _common import DEFAULT_LOCK, MEDICAL, RESULTS, bench_lock, provenance, require_medical, table, write_json

ATTACKS = ("none", "scale100", "signflip", "random", "count")
PLAIN_DEFENCES = {"none": [], "norm": ["strategy.norm_bound={B}"], "median": ["strategy=fedmedian"],
                  "trimmed": ["strategy=fedtrimmedavg", "strategy.trim_fraction={T}"]}
SECURE_DEFENCES = {"none": [], "bounds": ["privacy.bound_check=true"],
                   "bounds+norm": ["privacy.bound_check=true", "strategy.norm_bound={B}"]}
COUNT_FACTOR = 1000
ORDER = (("plain", "none"), ("secure", "none"), ("plain", "median"), ("secure", "bounds"), ("plain", "norm"),
         ("secure", "bounds+norm"), ("plain", "trimmed"))
HEADERS = ["mode", "defence", "attack", "||w_R-w_0||", "eval loss", "attacker in sum", "attacker dropped"]


def poison_update(update: dict, attack: str, rng: np.random.Generator) -> dict:
    """A plain update as the attacker sends it."""
    if attack == "scale100":
        return {k: (v * 100).astype(v.dtype) for k, v in update.items()}
    if attack in ("signflip", "count"):
        return {k: (-v).astype(v.dtype) for k, v in update.items()}
    if attack == "random":
        return {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in update.items()}
    raise ValueError(f"unknown attack {attack!r}")


def poison_encoded(encoded: np.ndarray, attack: str, rng: np.random.Generator) -> np.ndarray:
    """An honestly encoded uint32 vector (values, then the count slot) as the attacker uploads it."""
    from fedlora.secure.encoding import from_ring, to_ring  # lazy: bench imports fedlora after sys.path is set

    values, count = from_ring(encoded[:-1]), int(encoded[-1])
    out = encoded.copy()
    if attack == "scale100":
        out[:-1] = to_ring(values * 100)
    elif attack in ("signflip", "count"):
        out[:-1] = to_ring(-values)
        if attack == "count":
            out[-1] = min(count * COUNT_FACTOR, 2**32 - 1)
    elif attack == "random":
        out[:-1] = rng.integers(0, 2**32, size=values.size, dtype=np.uint64).astype(np.uint32)
    else:
        raise ValueError(f"unknown attack {attack!r}")
    return out


def malicious_transport(num_clients: int, attacker: int, attack: str, seed: int = 0):
    """An :class:`~fedlora.roles.local.InProcessTransport` whose device ``attacker`` sends ``attack``."""
    from fedlora import wire  # lazy: as above
    from fedlora.roles.local import InProcessTransport
    from fedlora.roles.neighbourhood import ClientReply

    rng = np.random.default_rng(seed)

    def fault(server_round, reply):
        if reply.client != attacker or reply.error is not None or attack == "none":
            return reply
        metrics = dict(reply.metrics)
        if attack == "count":
            metrics["num_examples"] = int(metrics["num_examples"]) * COUNT_FACTOR
        return ClientReply(reply.client, poison_update(reply.update, attack, rng), metrics, bytes_up=reply.bytes_up)

    class Malicious(InProcessTransport):
        def exchange(self, server_round, stage, payloads, arrays, settings, on_reply):
            if attack == "none" or attacker not in payloads:
                return super().exchange(server_round, stage, payloads, arrays, settings, on_reply)
            # its masked input skips the honest device's own range check; every other device runs the real code
            skip = mock.patch("fedlora.secure.client.check_encoded", lambda *a: None) \
                if stage == "masked-input" else contextlib.nullcontext()
            with skip:
                out = super().exchange(server_round, stage, {attacker: payloads[attacker]}, arrays, settings, on_reply)
            rest = {c: p for c, p in payloads.items() if c != attacker}
            out += super().exchange(server_round, stage, rest, arrays, settings, on_reply) if rest else []
            if stage == "advertise" and attacker in self.device_state:  # replace what it will upload
                session, state = self.device_state[attacker]
                saved = wire.loads(state, "secagg-device-state")
                saved["encoded"] = poison_encoded(saved["encoded"], attack, rng)
                self.device_state[attacker] = (session, wire.dumps(saved, "secagg-device-state"))
            return sorted(out, key=lambda r: r.client)

    return Malicious(num_clients, fault=fault)


def adapter_change(run_dir: Path, initial: dict) -> float:
    """``||w_R - w_0||``: the final global adapter (the run's last checkpoint) against its initial state."""
    from fedlora.runs import report  # lazy: as above

    _, arrays, _ = report.load_checkpoint(run_dir)
    final = {k[len("adapter/"):]: v for k, v in arrays.items() if k.startswith("adapter/")}
    return math.sqrt(sum(float(np.sum((final[k].astype(np.float64) - initial[k]) ** 2)) for k in initial))


def run_one(overrides: list[str], attack: str, clients: int, attacker: int, run_dir: Path) -> dict:
    """One federation; -> the row's figures and what the rounds dropped."""
    from fedlora.config import compose  # lazy: as above
    from fedlora.roles.cloud import run_federation
    from fedlora.runs import report

    cfg = compose(overrides)
    t0 = time.perf_counter()
    summary = run_federation(cfg, run_dir, malicious_transport(clients, attacker, attack, cfg.seed))
    wall = time.perf_counter() - t0
    rounds = report.read_rounds(run_dir)
    refused = sorted({d["reason"].split(":")[0] + (": out of bounds" if "out of bounds" in d["reason"] else "")
                      for r in rounds for d in r["dropped"] if d["client"] == attacker})
    return {"final_eval_loss": summary["final_eval_loss"], "base_eval_loss": summary["base_eval_loss"],
            "attacker_in_sum_rounds": sum(attacker in r["participants"] for r in rounds), "rounds": len(rounds),
            "attacker_dropped_reasons": refused, "wall_s": wall}


def initial_state(overrides: list[str]) -> dict:
    """The initial global adapter every run of the matrix starts from (same seed, A and B both trained)."""
    from fedlora.config import compose  # lazy: as above
    from fedlora.roles.device import initial_adapter

    return {k: v.astype(np.float64) for k, v in initial_adapter(compose(overrides), freeze_a=False).items()}


def base_overrides(args: argparse.Namespace) -> list[str]:
    data = [] if args.data == "wearable" else ["data=file", f"data.path={require_medical(args.data_path)}"]
    tree = ["topology=small6g", "topology.suburban_cells=1", "topology.neighbourhoods_per_suburban=2"]
    return [f"model={args.model}", *data, *(tree if args.topology == "tree" else ["topology=flat"]),
            f"federation.num_clients={args.clients}", f"federation.rounds={args.rounds}", "federation.fraction=1.0",
            f"federation.min_clients={min(2, args.clients)}", f"train.local_steps={args.local_steps}",
            f"train.max_seq_len={args.max_seq_len}", f"train.batch_size={args.batch}", f"train.lr={args.lr}",
            f"data.records_per_client={args.records}", f"data.max_eval_examples={args.eval_examples}",
            "topology.profile_mix={rpi4: 0, phone: 0, car: 0, laptop: 1.0}", "topology.profiles.laptop.availability=1.0",
            "topology.mobility.model=none", "progress=false", *args.overrides]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    p.add_argument("--model", default="tiny", help="model config group (tiny | smollm2)")
    p.add_argument("--data", default="medical", choices=("medical", "wearable"))
    p.add_argument("--data-path", default=MEDICAL)
    p.add_argument("--topology", default="tree", choices=("tree", "flat"),
                   help="tree: 1 sub-urban cell > 2 neighbourhood cells (robust rules per cell), flat: one cell")
    p.add_argument("--clients", type=int, default=6, help="END devices (default: 3 per neighbourhood cell)")
    p.add_argument("--attacker", type=int, default=0)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--max-seq-len", type=int, default=96)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--records", type=int, default=12, help="data.records_per_client (n_max)")
    p.add_argument("--eval-examples", type=int, default=32)
    p.add_argument("--norm-bound", type=float, default=0.0,
                   help="strategy.norm_bound for the norm defences (0: 2x the largest honest update norm, measured)")
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--modes", default="plain,secure")
    p.add_argument("--lock", default=DEFAULT_LOCK)
    p.add_argument("--no-lock", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "poisoning.json"))
    args = p.parse_args()
    attacks = args.attacks.split(",")
    with bench_lock(None if args.no_lock else args.lock, what="poisoning"), tempfile.TemporaryDirectory() as tmp:
        rows, results = [], []
        base = base_overrides(args)
        bound = args.norm_bound or calibrate_bound(base, args, Path(tmp))
        initial = initial_state(base)
        modes = args.modes.split(",")
        per_cell = args.clients // 2 if args.topology == "tree" else args.clients
        for mode, defence in ORDER:  # interleaved, so that a cut-short run still has both modes' main rows
            if mode not in modes:
                continue
            privacy = ["privacy=none"] if mode == "plain" else ["privacy=secagg", "privacy.clip=0.05"]
            extra = (PLAIN_DEFENCES if mode == "plain" else SECURE_DEFENCES)[defence]
            for attack in attacks:
                run_dir = Path(tmp) / f"{mode}-{defence}-{attack}"
                trim = max(0.2, 1.01 / per_cell)  # cut at least one update at each end of a cell
                over = base + privacy + [e.format(B=bound, T=f"{min(trim, 0.49):.3f}") for e in extra]
                res = run_one(over, attack, args.clients, args.attacker, run_dir)
                res.update(mode=mode, defence=defence, attack=attack, adapter_change=adapter_change(run_dir, initial))
                results.append(res)
                rows.append([mode, defence, attack, res["adapter_change"], res["final_eval_loss"],
                             f"{res['attacker_in_sum_rounds']}/{res['rounds']}", "; ".join(res["attacker_dropped_reasons"])])
                print(table([rows[-1]], HEADERS, digits=4), flush=True)
                write_json(args.out, {**provenance("poisoning", {"argv": sys.argv, "norm_bound": bound, "overrides": base}),
                                      "results": results})
        print("\n" + table(rows, HEADERS, digits=4))
        print(f"wrote {args.out}")


def calibrate_bound(base: list[str], args: argparse.Namespace, tmp: Path) -> float:
    """2x the largest honest update norm of round 1 (plain, no attack): a bound honest devices do not reach."""
    from fedlora.config import compose  # lazy: as above
    from fedlora.roles.cloud import run_federation
    from fedlora.roles.local import InProcessTransport
    from fedlora.run_settings import resolve_run

    norms = []

    def watch(server_round, reply):
        if reply.error is None and server_round == 1:
            norms.append(math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in reply.update.values())))
        return reply

    cfg = compose(base + ["privacy=none", "federation.rounds=1"])
    resolve_run(cfg)
    run_federation(cfg, tmp / "calibrate", InProcessTransport(args.clients, fault=watch))
    bound = 2 * max(norms)
    print(f"honest update norms, round 1: {', '.join(f'{n:.4g}' for n in norms)} -> norm bound {bound:.4g}", flush=True)
    return bound


if __name__ == "__main__":
    main()
