"""Personalisation on non-IID data: each client's held-out loss for the global adapter, its personal one, local-only.

What it measures
----------------
Per dataset, two in-process federations (``run_federation`` + ``InProcessTransport``: the same
rounds as the Flower simulation), flat topology, no secure aggregation, every client in every
round (availability 1, fraction 1.0), R rounds of S local steps:

- ``fedsa_lora``: FedSA-LoRA (A averaged, each client keeps its B): its personal model (global A +
  its own B);
- ``feddpa`` with ``strategy.local_baseline=true``: FedDPA's shared adapter, whose training is
  exactly FedAvg's (tested), so its ``global`` column IS the FedAvg global adapter; its personal model
  (global + local adapter, both active); and each client trained alone (R local rounds of S steps
  on its own data, from the same seeded initialisation): ``local-only``.

Every loss is on the client's OWN held-out examples (``client_examples(...)[1]``: the part of its
data it never trains on), token-weighted answer cross-entropy (``fedlora.train.evaluate``), read
from the runs' ``summary.json`` ``personal`` (:func:`fedlora.roles.personal_eval.personal_report`).
``base`` is the untrained model on the same examples.

Datasets: ``wearable`` (the default embedded data: each client's user profile shifts its readings
and advice) and ``medical`` (Medical Meadow dev split by question type with the ``natural``
partitioner: one question type per client, 9 clients -- the most non-IID split the file allows).

How to read it: lower is better; ``personal < global`` means keeping part of the adapter on the
device pays on that device's own data; ``personal < local-only`` means federating still helps the
personal model. Costs: FedDPA trains twice per round (shared, then local); FedSA sends A only.

Run (takes the benchmark lock):

    .venv/bin/python bench/personal.py --model tiny                    # ~2 min on 2 cores
    .venv/bin/python bench/personal.py --model smollm2 --datasets wearable --clients 4 -R 3 -S 3 --batch 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
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

MEDICAL_CLIENTS = 9  # one per question type (fedlora.data.partition.QUESTION_TYPES)


def dataset_overrides(name: str, args: argparse.Namespace) -> list[str]:
    if name == "wearable":
        return ["data=wearable", f"federation.num_clients={args.clients}", f"data.records_per_client={args.records}"]
    if name == "medical":
        return ["data=medical", f"data.path={require_medical(args.data_path)}", "data.partitioner=natural",
                "data.partition_by=question_type", f"federation.num_clients={MEDICAL_CLIENTS}"]
    raise SystemExit(f"--datasets: unknown dataset {name!r} (wearable, medical)")


def base_losses(cfg, clients: list[int]) -> dict[str, float]:
    """Each client's held-out loss of the untrained model (the adapter's B is zero)."""
    from fedlora import adapters
    from fedlora.roles.device import initial_adapter, lora_model
    from fedlora.roles.personal_eval import client_held_out
    from fedlora.train import evaluate

    model, tokenizer = lora_model(cfg, freeze_a=False)
    adapters.set_state(model, initial_adapter(cfg, freeze_a=False))
    return {str(c): evaluate(model, client_held_out(cfg, c, tokenizer), cfg.train.eval_batch_size,
                             pad_id=tokenizer.pad_token_id)[0] for c in clients}


def one_dataset(name: str, args: argparse.Namespace, work: Path) -> dict:
    from fedlora.roles.cloud import run_federation
    from fedlora.roles.local import InProcessTransport

    common = [f"model={args.model}", "topology=flat", "privacy=none", "federation.fraction=1.0",
              "federation.min_clients=1", f"federation.rounds={args.rounds}", f"train.local_steps={args.local_steps}",
              f"train.batch_size={args.batch}", f"train.max_seq_len={args.max_seq_len}", f"train.lr={args.lr}",
              "progress=false", *dataset_overrides(name, args), *args.overrides]
    runs, seconds = {}, {}
    for strategy in ("fedsa_lora", "feddpa"):
        cfg, used = compose_all_available([*common, f"strategy={strategy}", "strategy.local_baseline=true"
                                           if strategy == "feddpa" else "strategy.local_baseline=false"])
        t0 = time.perf_counter()
        summary = run_federation(cfg, work / f"{name}-{strategy}", InProcessTransport(cfg.federation.num_clients))
        seconds[strategy] = time.perf_counter() - t0
        runs[strategy] = summary
    sa, dpa = runs["fedsa_lora"]["personal"]["clients"], runs["feddpa"]["personal"]["clients"]
    clients = sorted(set(sa) & set(dpa), key=int)
    base = base_losses(cfg, [int(c) for c in clients])
    rows = {c: {"examples": dpa[c]["examples"], "base": base[c], "global_fedavg": dpa[c]["global"],
                "personal_fedsa": sa[c]["personal"], "personal_feddpa": dpa[c]["personal"],
                "local_only": dpa[c]["local_only"]} for c in clients}
    columns = ("base", "global_fedavg", "personal_fedsa", "personal_feddpa", "local_only")
    mean = {k: statistics.fmean(r[k] for r in rows.values()) for k in columns}
    wins = {k: sum(r[k] < r["global_fedavg"] for r in rows.values()) for k in ("personal_fedsa", "personal_feddpa",
                                                                                "local_only")}
    return {"dataset": name, "overrides": used, "clients": rows, "mean": mean, "clients_better_than_global": wins,
            "bytes_up_per_client": {s: runs[s]["adapter_bytes_per_client"] for s in runs}, "wall_s": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides, applied last")
    p.add_argument("--model", default="tiny", help="model config group (tiny, smollm2)")
    p.add_argument("--datasets", default="wearable,medical")
    p.add_argument("--data-path", default=MEDICAL, help="the Medical Meadow dev JSONL (default %(default)s)")
    p.add_argument("--clients", type=int, default=8, help="wearable clients (medical: one per question type, 9)")
    p.add_argument("--records", type=int, default=64, help="wearable records per client")
    p.add_argument("--rounds", "-R", type=int, default=5)
    p.add_argument("--local-steps", "-S", type=int, default=5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lock", default=DEFAULT_LOCK)
    p.add_argument("--no-lock", action="store_true", help="do not take the benchmark lock (smoke tests only)")
    p.add_argument("--out", default="", help="result JSON (default bench/results/personal-<model>.json)")
    args = p.parse_args()
    out_path = args.out or str(RESULTS / f"personal-{args.model}.json")
    from fedlora.runs.progress import quiet_libraries

    quiet_libraries()
    info = machine()
    out = {**provenance("personal", info), "datasets": []}
    with bench_lock(None if args.no_lock else args.lock, what="personal"), tempfile.TemporaryDirectory() as tmp:
        for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
            result = one_dataset(name, args, Path(tmp))
            out["datasets"].append(result)
            write_json(out_path, out)
            rows = [[c, r["examples"], r["base"], r["global_fedavg"], r["personal_fedsa"], r["personal_feddpa"],
                     r["local_only"]] for c, r in result["clients"].items()]
            m = result["mean"]
            rows.append(["mean", "", m["base"], m["global_fedavg"], m["personal_fedsa"], m["personal_feddpa"],
                         m["local_only"]])
            print(f"\n{name}: held-out loss on each client's own data (lower is better); "
                  f"wall {json.dumps({k: round(v) for k, v in result['wall_s'].items()})} s")
            print(table(rows, ["client", "examples", "base", "global (FedAvg)", "FedSA personal", "FedDPA personal",
                               "local-only"], digits=4))
            print(f"clients better than the global adapter: {result['clients_better_than_global']} of "
                  f"{len(result['clients'])}; upload per client per round: {result['bytes_up_per_client']} bytes")
    print(f"\nwrote {out_path}")


if __name__ == "__main__":
    main()
