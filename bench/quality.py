"""Quality on real data: federated LoRA vs centralised LoRA vs each client alone.

What it measures
----------------
The Medical Meadow dev file (4,893 patient Q/A pairs) split over 10 END clients, non-IID
(``data.partitioner=dirichlet data.partition_by=question_type``, alpha 0.5). Three ways to
spend the SAME total number of optimiser steps (batch B, sequence <= L tokens, same lr):

(a) ``fed``     federated LoRA (FedAvg/FedIT by default): R rounds, every client (fraction
                1.0) does S local steps per round -> 10*R*S steps. Run in-process with
                ``run_federation`` + ``InProcessTransport`` (identical results to the Flower
                simulation, without Ray's extra processes on a 2-core machine);
(b) ``central`` one LoRA trained on the union of all clients' training examples for
                10*R*S steps (what a data centre holding everyone's data could do);
(c) ``local``   each client alone on its own training data for R*S steps (what a client
                gets without federating); reported as the mean (and min/max) over clients.

Everything starts from the same seeded LoRA initialisation and is evaluated on the SAME
held-out set: ``eval_examples(cfg.data, 10, seed)``, the union of the clients' held-out
splits, round-robin capped at ``--eval-examples``; loss = token-weighted mean
cross-entropy over answer tokens (``fedlora.train.evaluate``). (b) and (c) use fedlora's
own ``train_local`` / ``evaluate`` / ``tokenize`` / ``client_examples`` on the process-wide
PEFT model, reset to the initial adapter between methods: there is one training loop.

How to read it
--------------
``base`` is the loss of the untrained adapter (B = 0: the base model itself). Lower is
better. ``recovered = (base - fed) / (base - central)`` is the share of the centralised
improvement that federated training achieves without moving any data; the issue's aim is
>= 90%. ``local`` shows what federating buys a client: if fed is well below local, clients
gain from each other. Every method is seeded; the held-out set is ~7,600 answer tokens.

Experiments for closing a gap: ``--methods fed`` with ``--baseline-json`` reuses (b)/(c)
from an earlier run; ``--fedavg-server-lr X`` (bench-only, not a fedlora setting) applies
X times the mean delta on the server; any strategy via overrides (``strategy=fedadam``).

Run (takes the benchmark lock; the defaults took 31 min on 2 cores; ``--dry-run`` prints
the plan and measured step/eval times):

    nohup .venv/bin/python bench/quality.py > bench/results/quality.log 2>&1 &
    .venv/bin/python bench/quality.py --methods fed --baseline-json bench/results/quality.json strategy=fedadam
    .venv/bin/python bench/quality.py --model tiny --no-lock --rounds 1 --local-steps 1 --eval-examples 16  # smoke

Positional arguments are extra Hydra overrides (applied last; e.g. ``strategy=fedprox``).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DEFAULT_LOCK,
    MEDICAL,
    RESULTS,
    bench_lock,
    compose_all_available,
    machine,
    provenance,
    require_medical,
    table,
    write_json,
)

AIM = 0.90


def overrides(args: argparse.Namespace, data_path: str) -> list[str]:
    return [
        f"model={args.model}",
        f"topology={args.topology}",
        "data=medical",
        f"data.path={data_path}",
        "data.partitioner=dirichlet",
        "data.partition_by=question_type",
        f"data.max_eval_examples={args.eval_examples}",
        f"federation.num_clients={args.clients}",
        "federation.fraction=1.0",
        f"federation.min_clients={min(2, args.clients)}",
        f"federation.rounds={args.rounds}",
        f"train.local_steps={args.local_steps}",
        f"train.batch_size={args.batch}",
        f"train.max_seq_len={args.max_seq_len}",
        f"train.lr={args.lr}",
        "train.grad_accum=1",
        f"simulation.cpus_per_client={args.threads}",
        "simulation.threads_per_client=0",
        "progress=false",
        *args.overrides,
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. strategy=ffa_lora")
    p.add_argument("--data-path", default=MEDICAL, help="the Medical Meadow dev JSONL (default %(default)s)")
    p.add_argument("--model", default="smollm2", help="model config group (smollm2; tiny for a smoke test)")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", "-R", type=int, default=5)
    p.add_argument("--local-steps", "-S", type=int, default=4, help="local steps per client per round")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-examples", type=int, default=128, help="cap on the shared held-out set")
    p.add_argument("--topology", default="flat",
                   help="topology config group for (a) (flat: clients -> cloud; every device profile is made "
                        "always available so all clients train every round)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument("--methods", default="fed,central,local", help="comma-separated subset of fed,central,local")
    p.add_argument("--fedavg-server-lr", type=float, default=1.0,
                   help="EXPERIMENT (not a fedlora setting): FedAvg with a server learning rate, "
                        "next global = global + LR * mean delta (1.0 = plain FedAvg)")
    p.add_argument("--baseline-json", default="",
                   help="take (b)/(c) results not run now from this earlier quality JSON (same data, "
                        "held-out set and steps; the base loss must match)")
    p.add_argument("--dry-run", action="store_true",
                   help="time 6 training steps and the held-out evaluation, print the plan and an estimate, exit")
    p.add_argument("--run-dir", default="", help="where the federated run directory goes (default: a temp dir)")
    p.add_argument("--lock", default=DEFAULT_LOCK)
    p.add_argument("--no-lock", action="store_true", help="do not take the benchmark lock (smoke tests only)")
    p.add_argument("--out", default=str(RESULTS / "quality.json"))
    args = p.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if set(methods) - {"fed", "central", "local"}:
        p.error(f"--methods: unknown {sorted(set(methods) - {'fed', 'central', 'local'})}")
    data_path = require_medical(args.data_path)

    import tempfile

    import torch

    from fedlora import adapters
    from fedlora.config import to_dict
    from fedlora.data import client_examples, eval_examples, tokenize
    from fedlora.roles.cloud import run_federation
    from fedlora.roles.device import initial_adapter, lora_model
    from fedlora.roles.local import InProcessTransport
    from fedlora.runs.progress import quiet_libraries
    from fedlora.seeds import round_seed
    from fedlora.train import evaluate, train_local

    quiet_libraries()
    torch.set_num_threads(args.threads)
    cfg, used = compose_all_available(overrides(args, data_path))
    n, R, S = cfg.federation.num_clients, cfg.federation.rounds, cfg.train.local_steps
    freeze_a = cfg.strategy.name == "ffa_lora"
    info = machine()
    out: dict = {
        **provenance("quality", info),
        "overrides": used,
        "config": to_dict(cfg),
        "aim": AIM,
        "steps": {"fed_total": n * R * S, "central": n * R * S, "local_each": R * S},
        "results": {},
    }

    def save() -> None:
        write_json(args.out, out)

    with bench_lock(None if args.no_lock else args.lock, what="quality"):
        info["loadavg_when_locked"] = [round(x, 2) for x in os.getloadavg()]
        t_all = time.perf_counter()
        model, tokenizer = lora_model(cfg, freeze_a=freeze_a)
        init = initial_adapter(cfg, freeze_a=freeze_a)
        pad = tokenizer.pad_token_id

        # Data: every client's split (the same calls the clients make), and the shared held-out set.
        splits = [client_examples(cfg.data, c, n, cfg.seed) for c in range(n)]
        train_tok = [tokenize(tr, tokenizer, cfg.train.max_seq_len) for tr, _ in splits]
        held_out = tokenize(eval_examples(cfg.data, n, cfg.seed), tokenizer, cfg.train.max_seq_len)
        union = [ex for tok in train_tok for ex in tok]
        lengths = [len(t["input_ids"]) for t in union]
        out["data"] = {
            "clients_train_examples": [len(t) for t in train_tok],
            "clients_held_out_examples": [len(h) for _, h in splits],
            "union_train_examples": len(union),
            "held_out_examples": len(held_out),
            "held_out_answer_tokens": sum(sum(1 for x in t["labels"] if x != -100) for t in held_out),
            "share_at_max_seq_len": sum(1 for x in lengths if x >= cfg.train.max_seq_len) / len(lengths),
            "mean_tokens": sum(lengths) / len(lengths),
        }
        try:
            from fedlora.data.partition import question_type

            out["data"]["clients_question_types"] = [
                dict(collections.Counter(question_type(ex["messages"][-2]["content"]) for ex in tr).most_common(3))
                for tr, _ in splits
            ]
        except Exception:  # noqa: BLE001 - descriptive only
            pass

        def reset() -> None:
            adapters.set_state(model, init)

        def held_out_loss() -> float:
            return evaluate(model, held_out, cfg.train.eval_batch_size, pad_id=pad)[0]

        def train_steps(tokenized, steps: int, seed: int):
            tc = dataclasses.replace(cfg.train, local_steps=steps)
            return train_local(model, tokenized, tc, pad_id=pad, seed=seed)

        if args.dry_run:
            reset()
            times = [train_steps(union, 1, i).seconds for i in range(6)]
            step = statistics.median(times[1:])
            print(f"step times (s): {[round(t, 2) for t in times]}")
            t0 = time.perf_counter()
            loss_a = held_out_loss()
            ev = time.perf_counter() - t0
            # Same set sorted by length (less padding): what fedlora's evaluate could do.
            by_len = sorted(held_out, key=lambda t: len(t["input_ids"]))
            t0 = time.perf_counter()
            loss_b = evaluate(model, by_len, cfg.train.eval_batch_size, pad_id=pad)[0]
            ev_sorted = time.perf_counter() - t0
            print(f"eval of {len(held_out)} examples: {ev:.1f}s in file order (loss {loss_a:.5f}), "
                  f"{ev_sorted:.1f}s sorted by length (loss {loss_b:.5f})")
            total = 3 * n * R * S * step + (R + 1 + 1 + n + 1) * ev
            print(table([[n, R, S, cfg.train.batch_size, cfg.train.max_seq_len, step, ev, 3 * n * R * S, total / 60]],
                        ["clients", "R", "S", "batch", "max_seq_len", "s/step", "eval s", "steps (all methods)", "est. min"]))
            print(f"data: {out['data']}")
            return

        def record_base(loss: float, seconds: float | None) -> None:
            out["results"]["base"] = {"eval_loss": loss, "seconds": seconds}
            print(f"[quality] base held-out loss {loss:.4f} ({len(held_out)} examples)", file=sys.stderr, flush=True)
            save()

        if "fed" not in methods:  # else the federated run evaluates the initial adapter itself
            reset()
            t0 = time.perf_counter()
            record_base(held_out_loss(), time.perf_counter() - t0)

        if "fed" in methods and args.fedavg_server_lr != 1.0:
            if cfg.strategy.name != "fedavg":
                p.error("--fedavg-server-lr needs strategy=fedavg")
            import fedlora.roles.cloud
            from fedlora.aggregate.strategies import Strategy

            class ServerLRFedAvg(Strategy):
                def apply(self, global_state, mean_delta):
                    return super().apply(global_state, {k: v * args.fedavg_server_lr for k, v in mean_delta.items()})

            fedlora.roles.cloud.make_strategy = lambda scfg: ServerLRFedAvg(scfg)
            out["experiment"] = {"fedavg_server_lr": args.fedavg_server_lr}

        if "fed" in methods:
            run_dir = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="fedlora-quality-"))
            print(f"[quality] (a) federated: {R} rounds x {n} clients x {S} steps -> {run_dir}", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            summary = run_federation(cfg, run_dir, InProcessTransport(n))
            record_base(summary["base_eval_loss"], None)
            rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]
            out["results"]["fed"] = {
                "eval_loss": summary["final_eval_loss"],
                "curve": [r["eval_loss"] for r in rounds],
                "steps": n * R * S,
                "seconds": time.perf_counter() - t0,
                "run_dir": str(run_dir),
            }
            print(f"[quality]   fed {summary['final_eval_loss']:.4f} (curve {out['results']['fed']['curve']})",
                  file=sys.stderr, flush=True)
            save()

        if "central" in methods:
            print(f"[quality] (b) centralised: {n * R * S} steps on {len(union)} examples", file=sys.stderr, flush=True)
            reset()
            t0 = time.perf_counter()
            res = train_steps(union, n * R * S, round_seed(cfg.seed, "bench-central"))
            loss = held_out_loss()
            out["results"]["central"] = {"eval_loss": loss, "train_loss": res.loss, "steps": res.steps,
                                         "train_seconds": res.seconds, "seconds": time.perf_counter() - t0}
            print(f"[quality]   central {loss:.4f}", file=sys.stderr, flush=True)
            save()

        if "local" in methods:
            per_client = []
            t0 = time.perf_counter()
            for c in range(n):
                reset()
                res = train_steps(train_tok[c], R * S, round_seed(cfg.seed, "bench-local", c))
                loss = held_out_loss()
                per_client.append({"client": c, "eval_loss": loss, "train_loss": res.loss, "examples": res.examples,
                                   "train_seconds": res.seconds})
                print(f"[quality]   local client {c}: {loss:.4f} ({res.examples} examples)", file=sys.stderr, flush=True)
            losses = [r["eval_loss"] for r in per_client]
            out["results"]["local"] = {"eval_loss": statistics.mean(losses), "min": min(losses), "max": max(losses),
                                       "steps_each": R * S, "clients": per_client, "seconds": time.perf_counter() - t0}
            save()
        reset()
        out["total_seconds"] = time.perf_counter() - t_all
        info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]

    res = out["results"]
    if args.baseline_json:
        prior = json.loads(Path(args.baseline_json).read_text())
        if abs(prior["results"]["base"]["eval_loss"] - res["base"]["eval_loss"]) > 1e-6:
            sys.exit(f"--baseline-json {args.baseline_json}: base loss {prior['results']['base']['eval_loss']:.6f} "
                     f"differs from this run's {res['base']['eval_loss']:.6f}: not the same held-out set/model")
        for m in ("central", "local"):
            if m not in res and m in prior["results"]:
                res[m] = {**prior["results"][m], "from": args.baseline_json}
        save()
    rows = [["base (no training)", 0, res["base"]["eval_loss"], 0.0, None]]
    fed_label = cfg.strategy.name + (f", server lr {args.fedavg_server_lr:g}" if args.fedavg_server_lr != 1.0 else "")
    labels = {"fed": f"(a) federated {R}x{n}x{S} ({fed_label})", "central": f"(b) centralised {n * R * S}",
              "local": f"(c) local only {R * S} each (mean of {n})"}
    for m in ("fed", "central", "local"):
        if m in res:
            steps = n * R * S if m != "local" else R * S
            if res[m].get("from"):
                labels[m] += " [earlier run]"
            rows.append([labels[m], steps, res[m]["eval_loss"], res["base"]["eval_loss"] - res[m]["eval_loss"],
                         res[m].get("seconds")])
    print(f"\nQuality on {len(held_out)} shared held-out examples (Medical Meadow, {n} clients dirichlet by question_type, "
          f"batch {cfg.train.batch_size}, max_seq_len {cfg.train.max_seq_len}, lr {cfg.train.lr}, strategy {cfg.strategy.name})")
    print(table(rows, ["method", "steps", "held-out loss", "gain vs base", "wall s"], digits=4))
    if "local" in res:
        print(f"local only: min {res['local']['min']:.4f}  max {res['local']['max']:.4f}")
    if "fed" in res and "central" in res:
        gain_c = res["base"]["eval_loss"] - res["central"]["eval_loss"]
        rec = (res["base"]["eval_loss"] - res["fed"]["eval_loss"]) / gain_c if gain_c > 0 else float("nan")
        out["recovered"] = rec
        verdict = "meets" if rec >= AIM else "MISSES"
        print(f"recovered = (base - fed) / (base - central) = {100 * rec:.1f}%  -> {verdict} the >= {100 * AIM:.0f}% aim")
    save()
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
