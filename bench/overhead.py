"""Platform overhead of a federated round: how much of a round is NOT client training.

What it measures
----------------
A real Flower simulation (``server.simulation.simulate``: the ServerApp in this process,
virtual END clients in a Ray worker) with SmolLM2-135M, by default 4 clients, fraction
1.0, 3 rounds, 5 local steps each. ``simulation.cpus_per_client=2`` on a 2-core machine
means ONE Ray worker: clients train one after another, so the sum of their training
times is directly comparable to the round's wall time. From ``rounds.jsonl`` it computes
per round

* ``wall_s``   the server's round time (send, all clients train, receive, aggregate,
  evaluate, checkpoint);
* ``train_s``  sum over clients of ``client_train_s`` (pure ``train_local`` time);
* ``eval_s``   server-side held-out evaluation of the new global adapter;
* ``overhead`` = (wall - train - eval) / wall: messaging, (de)serialisation, Ray
  scheduling, config decoding, adapter get/set, aggregation, checkpointing;
* ``overhead incl. eval`` = (wall - train) / wall.

Round 1 also pays the Ray worker's start-up and its loading of the base model, so it is
reported apart from the steady-state rounds (2+); the steady-state line is the one to
compare with the issue's aim (overhead < 15%). The time before round 1 (Ray start, the
server's own model load and base evaluation) is shown as ``before round 1``.

With ``--inprocess`` (default on) the same configuration also runs through
``run_federation`` + ``InProcessTransport`` (no Flower, no Ray, same process): the
difference between the two overheads is what Flower + Ray add, the rest is fedlora's
own round loop.

Run (takes the benchmark lock itself; ~4-6 min on 2 cores):

    .venv/bin/python bench/overhead.py
    .venv/bin/python bench/overhead.py --local-steps 10 data=medical data.path="$PWD/../shared/data/medical_meadow_dev.jsonl"
    .venv/bin/python bench/overhead.py --model tiny --no-lock        # smoke test

Positional arguments are extra Hydra overrides (applied last).
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
from _common import (  # noqa: E402
    DEFAULT_LOCK,
    RESULTS,
    bench_lock,
    compose_all_available,
    machine,
    provenance,
    table,
    write_json,
)

AIM = 0.15


def overrides(args: argparse.Namespace) -> list[str]:
    return [
        f"model={args.model}",
        f"federation.num_clients={args.clients}",
        "federation.fraction=1.0",
        f"federation.min_clients={min(2, args.clients)}",
        f"federation.rounds={args.rounds}",
        f"train.local_steps={args.local_steps}",
        f"simulation.cpus_per_client={args.cpus_per_client}",
        "simulation.threads_per_client=0",
        "progress=false",
        *args.overrides,
    ]


def read_rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]


def per_round(rounds: list[dict]) -> list[dict]:
    out = []
    for r in rounds:
        train = sum(float(v) for v in r["client_train_s"].values() if v is not None)
        wall, ev = float(r["wall_s"]), float(r["eval_s"])
        out.append({
            "round": r["round"],
            "clients": len(r["client_train_s"]),
            "dropped": len(r["dropped"]),
            "wall_s": wall,
            "train_s": train,
            "eval_s": ev,
            "overhead_s": wall - train - ev,
            "overhead": (wall - train - ev) / wall,
            "overhead_incl_eval": (wall - train) / wall,
        })
    return out


def pooled(rows: list[dict]) -> dict | None:
    """Overhead over several rounds together (time-weighted, not a mean of ratios)."""
    if not rows:
        return None
    wall = sum(r["wall_s"] for r in rows)
    train = sum(r["train_s"] for r in rows)
    ev = sum(r["eval_s"] for r in rows)
    return {
        "rounds": [r["round"] for r in rows],
        "wall_s": wall,
        "train_s": train,
        "eval_s": ev,
        "overhead_s": wall - train - ev,
        "overhead_s_per_client": (wall - train - ev) / sum(r["clients"] for r in rows),
        "overhead": (wall - train - ev) / wall,
        "overhead_incl_eval": (wall - train) / wall,
    }


def run_mode(mode: str, cfg, base: Path) -> dict:
    run_dir = base / mode
    t0 = time.perf_counter()
    if mode == "flower":
        from server.simulation import simulate

        summary = simulate(cfg, run_dir)
    else:
        from fedlora.roles.cloud import run_federation
        from fedlora.roles.local import InProcessTransport

        summary = run_federation(cfg, run_dir, InProcessTransport(cfg.federation.num_clients))
    total = time.perf_counter() - t0
    rows = per_round(read_rounds(run_dir))
    return {
        "mode": mode,
        "run_dir": str(run_dir),
        "total_s": total,
        "before_round_1_s": total - sum(r["wall_s"] for r in rows),
        "rounds": rows,
        "round_1": pooled(rows[:1]),
        "steady": pooled(rows[1:]),
        "base_eval_loss": summary.get("base_eval_loss"),
        "final_eval_loss": summary.get("final_eval_loss"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. train.batch_size=2")
    p.add_argument("--model", default="smollm2", help="model config group (smollm2; tiny for a smoke test)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="rounds (round 1 is start-up; 2+ are steady state)")
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--cpus-per-client", type=int, default=2, help="Ray CPUs per virtual client (2 = one worker here)")
    p.add_argument("--inprocess", action=argparse.BooleanOptionalAction, default=True,
                   help="also run in-process (no Flower/Ray) to split framework from fedlora overhead")
    p.add_argument("--all-available", action=argparse.BooleanOptionalAction, default=True,
                   help="set every device profile's availability to 1 so all clients train every round")
    p.add_argument("--run-dir", default="", help="where the run directories go (default: a new temp dir)")
    p.add_argument("--lock", default=DEFAULT_LOCK)
    p.add_argument("--no-lock", action="store_true", help="do not take the benchmark lock (smoke tests only)")
    p.add_argument("--out", default=str(RESULTS / "overhead.json"))
    args = p.parse_args()

    from fedlora.config import to_dict
    from fedlora.runs.progress import quiet_libraries

    quiet_libraries()
    if args.all_available:
        cfg, used = compose_all_available(overrides(args))
    else:
        from fedlora.config import compose

        cfg, used = compose(overrides(args)), overrides(args)
    base = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="fedlora-overhead-"))
    info = machine()
    modes = ["flower"] + (["inprocess"] if args.inprocess else [])
    results = []
    with bench_lock(None if args.no_lock else args.lock, what="overhead"):
        info["loadavg_when_locked"] = [round(x, 2) for x in os.getloadavg()]
        for mode in modes:
            print(f"[overhead] running {mode} in {base / mode} ...", file=sys.stderr, flush=True)
            results.append(run_mode(mode, cfg, base))
        info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]

    headers = ["mode", "round", "wall s", "sum train s", "eval s", "overhead s", "overhead %", "incl. eval %"]
    rows = []
    for res in results:
        for r in res["rounds"]:
            label = f"{r['round']} (start-up)" if r["round"] == 1 else r["round"]
            rows.append([res["mode"], label, r["wall_s"], r["train_s"], r["eval_s"], r["overhead_s"],
                         100 * r["overhead"], 100 * r["overhead_incl_eval"]])
        for label, agg in (("steady (2+)", res["steady"]),):
            if agg and len(agg["rounds"]) > 1:
                rows.append([res["mode"], label, agg["wall_s"], agg["train_s"], agg["eval_s"], agg["overhead_s"],
                             100 * agg["overhead"], 100 * agg["overhead_incl_eval"]])
    print(f"\nPlatform overhead: {args.model}, {args.clients} clients, fraction 1.0, {args.rounds} rounds, "
          f"{args.local_steps} local steps, batch {cfg.train.batch_size}, data={cfg.data.source}, "
          f"cpus_per_client={args.cpus_per_client}, topology={getattr(getattr(cfg, 'topology', None), 'kind', 'flat')}")
    print(table(rows, headers, digits=2))
    for res in results:
        st = res["steady"]
        verdict = "-" if st is None else ("meets" if st["overhead"] < AIM else "MISSES")
        print(f"{res['mode']}: before round 1 {res['before_round_1_s']:.1f}s, total {res['total_s']:.1f}s; "
              + ("" if st is None else f"steady-state overhead {100 * st['overhead']:.1f}% "
                 f"({st['overhead_s_per_client']:.2f}s per client update) -> {verdict} the < {100 * AIM:.0f}% aim"))
    out = write_json(args.out, {
        **provenance("overhead", info),
        "overrides": used,
        "config": to_dict(cfg),
        "aim": AIM,
        "results": results,
    })
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
