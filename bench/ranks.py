"""Heterogeneous LoRA ranks: quality and bytes of a mixed-rank federation against all devices at the
smallest and all at the largest rank.

What it runs
------------
Three in-process federations (``fedlora.roles.cloud.run_federation`` with ``InProcessTransport``, the
same round loop as ``fedlora run``) on the same seed, data, clients and sampling:

* ``all-small``: ``lora.r=R_SMALL`` for every device;
* ``mixed``: ``lora.r=R_LARGE`` (the global adapter), the ``phone`` profile (half the devices) at
  ``topology.profiles.phone.lora_r=R_SMALL``: they train the first R_SMALL components and send
  their update zero-padded (fedlora/aggregate/ranks.py);
* ``all-large``: ``lora.r=R_LARGE`` for every device;
* ``all-small-same-scale``: ``lora.r=R_SMALL`` with ``lora.alpha`` scaled by R_SMALL/R_LARGE, so its
  LoRA scaling alpha/r is the mixed and all-large runs' alpha/R_LARGE (a mixed run's small devices
  train at that scaling): separates the rank from the step size alpha/r.

It reports the final held-out loss (the cloud's evaluation of the global adapter), the bytes the
devices uploaded as sent (``rounds.jsonl`` ``bytes.up``: a padded update is the global adapter's
size), and what the uploads would be if each device sent only its own rank's tensors (plain mode
could; secure aggregation needs the fixed padded shape).

Run (takes the benchmark lock; a few minutes on 2 cores with the tiny model):

    .venv/bin/python bench/ranks.py
    .venv/bin/python bench/ranks.py --model smollm2 --rounds 2 --clients 4   # SmolLM2, short
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_LOCK, RESULTS, bench_lock, machine, provenance, table, write_json  # noqa: E402


def federation(name: str, args: argparse.Namespace, overrides: list[str], work: Path) -> dict:
    from fedlora.config import compose
    from fedlora.roles.cloud import run_federation
    from fedlora.roles.local import InProcessTransport

    profiles = [f"topology.profiles.{p}.availability=1.0" for p in ("rpi4", "phone", "car", "laptop")]
    mix = ["topology.profile_mix.phone=0.5", "topology.profile_mix.laptop=0.5", "topology.profile_mix.rpi4=0",
           "topology.profile_mix.car=0"]
    cfg = compose([f"model={args.model}", "topology=flat", f"federation.num_clients={args.clients}",
                   f"federation.rounds={args.rounds}", "federation.fraction=1.0", f"train.local_steps={args.steps}",
                   f"train.max_seq_len={args.seq}", f"data.records_per_client={args.records}", "train.lr=0.005",
                   f"data.max_eval_examples={args.eval_examples}", f"lora.alpha={args.alpha}", "progress=false",
                   *profiles, *mix, *overrides])
    t0 = time.perf_counter()
    summary = run_federation(cfg, work / name, InProcessTransport(args.clients))
    rounds = [json.loads(line) for line in (work / name / "rounds.jsonl").read_text().splitlines()]
    up = sum(sum(r["bytes"]["up"].values()) for r in rounds)
    phone = {c for c, p in _tree(cfg).profile_of.items() if p == "phone"}
    own = 0
    for r in rounds:
        for c in r["participants"]:
            per = summary["adapter_bytes_per_client"]
            own += per * (args.r_small / cfg.lora.r) if c in phone and cfg.topology.profiles["phone"].lora_r else per
    return {"name": name, "overrides": overrides, "final_eval_loss": summary["final_eval_loss"],
            "base_eval_loss": summary["base_eval_loss"], "eval_loss_per_round": [r["eval_loss"] for r in rounds],
            "upload_bytes_sent": up, "upload_bytes_at_own_rank": int(own), "wall_s": time.perf_counter() - t0,
            "adapter_bytes_global": summary["adapter_bytes_per_client"]}


def _tree(cfg):
    from fedlora.run_settings import resolve_run

    return resolve_run(cfg).tree


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--r-small", type=int, default=2)
    p.add_argument("--r-large", type=int, default=8)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--records", type=int, default=16)
    p.add_argument("--eval-examples", type=int, default=16)
    p.add_argument("--lock", default=DEFAULT_LOCK)
    p.add_argument("--no-lock", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "ranks.json"))
    args = p.parse_args()
    same_scale = args.alpha * args.r_small // args.r_large  # all-small at the global adapter's scaling alpha/R
    runs = {"all-small": [f"lora.r={args.r_small}"],
            "all-small-same-scale": [f"lora.r={args.r_small}", f"lora.alpha={same_scale}"],
            "mixed": [f"lora.r={args.r_large}", f"topology.profiles.phone.lora_r={args.r_small}"],
            "all-large": [f"lora.r={args.r_large}"]}
    info = machine()
    results = []
    with bench_lock(None if args.no_lock else args.lock, what="ranks"), tempfile.TemporaryDirectory() as tmp:
        info["loadavg_when_locked"] = [round(x, 2) for x in os.getloadavg()]
        for name, overrides in runs.items():
            print(f"[ranks] {name} ...", file=sys.stderr, flush=True)
            results.append(federation(name, args, overrides, Path(tmp)))
        info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"\n{args.model}, flat, {args.clients} clients (half 'phone'), {args.rounds} rounds x {args.steps} steps, "
          f"ranks {args.r_small} / {args.r_large}")
    print(table([[r["name"], r["base_eval_loss"], r["final_eval_loss"], r["upload_bytes_sent"], r["upload_bytes_at_own_rank"]]
                 for r in results], ["federation", "held-out base", "final", "upload B (sent)", "upload B (own rank)"],
                digits=4))
    print(f"\nwrote {write_json(args.out, {**provenance('ranks', info), 'settings': vars(args), 'results': results})}")


if __name__ == "__main__":
    main()
