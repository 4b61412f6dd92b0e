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
better. ``fraction of the centralised gain = (base - method) / (base - central)`` is the share
of the centralised improvement a method achieves (the issue's aim for federated: >= 90%);
it is printed for every federated recipe, plain and secure, and for local-only. ``local``
shows what federating buys a client: if fed is well below local, clients gain from each
other. Every method is seeded; the held-out set is ~7,600 answer tokens at 128 examples.

Recipes (the quality table)
---------------------------
``--recipe "LABEL:OVERRIDE ..."`` (repeatable) names a federated recipe: Hydra overrides on top
of the bench's settings, e.g. ``--recipe "fedavgm:strategy=fedavgm strategy.server_momentum=0.5"``
or ``--recipe "R10xS1:federation.rounds=10 train.local_steps=1"``. Each recipe runs once per
``--privacy`` mode (``plain``: privacy=none; ``secure``: privacy=secagg, the masked fixed-point
sums of fedlora/secure). A recipe must keep the total training steps (rounds x local steps),
batch and sequence length of the bench (equal steps and tokens), else the bench stops. Without
``--recipe`` there is one, ``fedavg`` (the bench's settings as given). Results go to
``--out`` after every run (order: base, centralised, the federated runs, local-only last, so a run
cut short still has the federated-vs-centralised comparison); the table (recipe x privacy -> held-out loss and fraction of the
centralised gain, with centralised and local-only beside them) is printed at the end.

Experiments for closing a gap: ``--methods fed`` with ``--baseline-json`` reuses (b)/(c)
from an earlier run of the same settings. A FedAvg server learning rate X is
``strategy=fedavgm strategy.server_momentum=0 strategy.server_lr=X``.

Run (takes the benchmark lock; the defaults (one recipe, plain and secure) take ~40 min on 2
cores; ``--dry-run`` prints the plan and measured step/eval times):

    nohup .venv/bin/python bench/quality.py > bench/results/quality.log 2>&1 &
    .venv/bin/python bench/quality.py --methods fed --baseline-json bench/results/quality.json \
        --recipe "fedadam:strategy=fedadam" --recipe "R20xS1:federation.rounds=20 train.local_steps=1"
    .venv/bin/python bench/quality.py --model tiny --no-lock --rounds 1 --local-steps 1 --eval-examples 16  # smoke

Positional arguments are extra Hydra overrides for every method (a recipe's come after them).
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
# --privacy mode -> the overrides that select it for a federated run.
PRIVACY = {"plain": ["privacy=none"], "secure": ["privacy=secagg"]}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A federated way to spend the bench's steps: a label and Hydra overrides."""

    label: str
    overrides: tuple[str, ...]


def parse_recipe(text: str) -> Recipe:
    """``"LABEL:OVERRIDE OVERRIDE"`` (or just ``LABEL``) -> a :class:`Recipe`."""
    label, _, rest = text.partition(":")
    if not label.strip() or any("=" not in o for o in rest.split()):
        raise ValueError(f"--recipe {text!r}: expected 'LABEL:key=value key=value ...'")
    return Recipe(label.strip(), tuple(rest.split()))


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


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every method, e.g. train.lr=0.004")
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
    p.add_argument("--recipe", action="append", default=[], metavar="LABEL:OVERRIDES",
                   help="a federated recipe (repeatable; see 'Recipes' below); default: one, 'fedavg'")
    p.add_argument("--privacy", default="plain,secure", help="comma-separated subset of plain,secure: each recipe runs in each")
    p.add_argument("--baseline-json", default="",
                   help="take (b)/(c) results not run now from this earlier quality JSON (same data, "
                        "held-out set and steps; the base loss must match)")
    p.add_argument("--dry-run", action="store_true",
                   help="time 6 training steps and the held-out evaluation, print the plan and an estimate, exit")
    p.add_argument("--run-dir", default="", help="where the federated run directories go (default: a temp dir)")
    p.add_argument("--lock", default=DEFAULT_LOCK)
    p.add_argument("--no-lock", action="store_true", help="do not take the benchmark lock (smoke tests only)")
    p.add_argument("--out", default=str(RESULTS / "quality.json"))
    p.add_argument("--table", nargs="+", metavar="JSON", default=[],
                   help="run nothing: print the quality table of earlier result files (same base loss and steps; "
                        "their federated runs one after another, the first file's centralised and local-only)")
    args = p.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if set(args.methods) - {"fed", "central", "local"}:
        p.error(f"--methods: unknown {sorted(set(args.methods) - {'fed', 'central', 'local'})}")
    args.privacy = [m.strip() for m in args.privacy.split(",") if m.strip()]
    if not args.privacy or set(args.privacy) - set(PRIVACY):
        p.error(f"--privacy: a comma-separated subset of {', '.join(PRIVACY)}")
    try:
        args.recipes = [parse_recipe(r) for r in args.recipe] or [Recipe("fedavg", ())]
    except ValueError as exc:
        p.error(str(exc))
    if len({r.label for r in args.recipes}) != len(args.recipes):
        p.error("--recipe: labels must differ")
    return args


def recipe_config(args, data_path: str, recipe: Recipe, privacy: str, base_cfg):
    """(config, overrides) of one federated run; exits when it would not spend the bench's steps and tokens."""
    cfg, used = compose_all_available([*overrides(args, data_path), *recipe.overrides, *PRIVACY[privacy]])
    steps = lambda c: (c.federation.num_clients * c.federation.rounds * c.train.local_steps,  # noqa: E731
                       c.train.batch_size, c.train.max_seq_len, c.data.max_eval_examples)
    if steps(cfg) != steps(base_cfg):
        sys.exit(f"--recipe {recipe.label}: (total steps, batch, max_seq_len, eval examples) = {steps(cfg)}, the bench's "
                 f"are {steps(base_cfg)}: a recipe must spend the same steps and tokens (change rounds and local "
                 f"steps together)")
    return cfg, used


def run_recipe(cfg, used, recipe: Recipe, privacy: str, run_root: Path, base_loss: float) -> dict:
    """One federated run in-process (``run_federation`` + ``InProcessTransport``) -> its result record."""
    from fedlora.roles.cloud import run_federation
    from fedlora.roles.local import InProcessTransport

    n, R, S = cfg.federation.num_clients, cfg.federation.rounds, cfg.train.local_steps
    run_dir = run_root / f"{recipe.label}-{privacy}"
    print(f"[quality] (a) {recipe.label} [{privacy}]: {R} rounds x {n} clients x {S} steps {' '.join(recipe.overrides)} "
          f"-> {run_dir}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    summary = run_federation(cfg, run_dir, InProcessTransport(n))
    if abs(summary["base_eval_loss"] - base_loss) > 1e-6:
        sys.exit(f"{recipe.label} [{privacy}]: the run's base loss {summary['base_eval_loss']:.6f} is not the bench's "
                 f"{base_loss:.6f}: not the same held-out set/model")
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]
    secure = [r.get("secure") or {} for r in rounds]
    rec = {
        "recipe": recipe.label, "privacy": privacy, "overrides": list(recipe.overrides),
        "strategy": cfg.strategy.name, "rounds": R, "local_steps": S, "lr": cfg.train.lr,
        "lr_schedule": cfg.federation.lr_schedule, "steps": n * R * S,
        "eval_loss": summary["final_eval_loss"], "curve": [r["eval_loss"] for r in rounds],
        "participants_per_round": [len(r["participants"]) for r in rounds],
        "seconds": time.perf_counter() - t0, "run_dir": str(run_dir), "config_overrides": used,
    }
    if privacy == "secure":
        rec["clients_in_secure_sum"] = [s.get("clients_in_sum") for s in secure]
        rec["decode_error_bound"] = max((s.get("decode_error_bound") or 0.0) for s in secure)
    print(f"[quality]   {recipe.label} [{privacy}] {rec['eval_loss']:.4f} (curve {[round(x, 4) for x in rec['curve']]})",
          file=sys.stderr, flush=True)
    return rec


def fraction(res: dict, loss: float) -> float:
    """Share of the centralised improvement over the base model that ``loss`` achieves (nan without one)."""
    if "central" not in res:
        return float("nan")
    gain_c = res["base"]["eval_loss"] - res["central"]["eval_loss"]
    return (res["base"]["eval_loss"] - loss) / gain_c if gain_c > 0 else float("nan")


def quality_table(out: dict, n: int, R: int, S: int) -> str:
    """The quality table: base, centralised, local-only, then every recipe x privacy mode."""
    res = out["results"]
    base = res["base"]["eval_loss"]
    rows = [["base (no training)", "-", 0, base, 0.0, 0.0, None]]
    if "central" in res:
        rows.append([f"(b) centralised {n * R * S} steps" + (" [earlier run]" if res["central"].get("from") else ""),
                     "-", n * R * S, res["central"]["eval_loss"], base - res["central"]["eval_loss"], 1.0,
                     res["central"].get("seconds")])
    if "local" in res:
        rows.append([f"(c) local only {R * S} steps each (mean of {n})" + (" [earlier run]" if res["local"].get("from") else ""),
                     "-", R * S, res["local"]["eval_loss"], base - res["local"]["eval_loss"],
                     fraction(res, res["local"]["eval_loss"]), res["local"].get("seconds")])
    for rec in out.get("federated", []):
        what = f"(a) {rec['recipe']} ({rec['rounds']} rounds x {n} x {rec['local_steps']} steps, {rec['strategy']})"
        rows.append([what, rec["privacy"], rec["steps"],
                     rec["eval_loss"], base - rec["eval_loss"], rec["fraction"], rec["seconds"]])
    return table(rows, ["method", "privacy", "steps", "held-out loss", "gain vs base", "fraction of central gain", "wall s"],
                 digits=4)


def federated_records(doc: dict) -> list[dict]:
    """A result file's federated runs; a file from before the recipes (one plain FedAvg-family run under
    ``results.fed``) gives that one, labelled by its strategy."""
    if "federated" in doc:
        return list(doc["federated"])
    fed = doc["results"].get("fed")
    if fed is None:
        return []
    c = doc["config"]
    server_lr = doc.get("experiment", {}).get("fedavg_server_lr")  # the old bench-only FedAvg server lr
    label = c["strategy"]["name"] + (f", server lr {server_lr:g}" if server_lr else "")
    return [{"recipe": label, "privacy": "plain", "overrides": [], "strategy": c["strategy"]["name"],
             "rounds": c["federation"]["rounds"], "local_steps": c["train"]["local_steps"], "steps": fed["steps"],
             "eval_loss": fed["eval_loss"], "seconds": fed.get("seconds")}]


def print_tables(paths: list[str]) -> None:
    """The quality table of earlier result files: the first one's baselines, every file's federated runs."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    first = docs[0]
    for path, doc in zip(paths[1:], docs[1:]):
        base_differs = abs(doc["results"]["base"]["eval_loss"] - first["results"]["base"]["eval_loss"]) > 1e-6
        if base_differs or doc["steps"] != first["steps"]:
            sys.exit(f"--table: {path} has another base loss or steps than {paths[0]}: not the same settings")
    c = first["config"]
    n, R, S = c["federation"]["num_clients"], c["federation"]["rounds"], c["train"]["local_steps"]
    merged = {**first, "federated": [rec for doc in docs for rec in federated_records(doc)]}
    for rec in merged["federated"]:
        rec["fraction"] = fraction(first["results"], rec["eval_loss"])
    print(f"Quality ({', '.join(paths)}): {first['data']['held_out_examples']} held-out examples, {n} clients, "
          f"{n * R * S} steps per method, batch {c['train']['batch_size']}, max_seq_len {c['train']['max_seq_len']}, "
          f"lr {c['train']['lr']}")
    print(quality_table(merged, n, R, S))


def main() -> None:
    args = parse_args()
    if args.table:
        print_tables(args.table)
        return
    data_path = require_medical(args.data_path)

    import tempfile

    import torch

    from fedlora import adapters
    from fedlora.config import to_dict
    from fedlora.data import client_examples, eval_examples, tokenize
    from fedlora.roles.device import initial_adapter, lora_model
    from fedlora.runs.progress import quiet_libraries
    from fedlora.train import evaluate, train_local

    quiet_libraries()
    torch.set_num_threads(args.threads)
    cfg, used = compose_all_available(overrides(args, data_path))
    n, R, S = cfg.federation.num_clients, cfg.federation.rounds, cfg.train.local_steps
    methods = args.methods
    # Every recipe plain first, then every recipe secure (a run cut short still has the plain comparison).
    runs = [(r, m, *recipe_config(args, data_path, r, m, cfg)) for m in args.privacy for r in args.recipes] \
        if "fed" in methods else []
    freeze_a = cfg.strategy.name == "ffa_lora"
    info = machine()
    out: dict = {
        **provenance("quality", info),
        "overrides": used,
        "config": to_dict(cfg),
        "aim": AIM,
        "steps": {"fed_total": n * R * S, "central": n * R * S, "local_each": R * S},
        "recipes": [{"label": r.label, "overrides": list(r.overrides)} for r in args.recipes],
        "results": {},
        "federated": [],
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
        out["data"] = data_summary(splits, train_tok, held_out, union, cfg.train.max_seq_len)

        def reset() -> None:
            adapters.set_state(model, init)

        def held_out_loss() -> float:
            return evaluate(model, held_out, cfg.train.eval_batch_size, pad_id=pad)[0]

        def train_steps(tokenized, steps: int, seed: int):
            tc = dataclasses.replace(cfg.train, local_steps=steps)
            return train_local(model, tokenized, tc, pad_id=pad, seed=seed)

        if args.dry_run:
            dry_run(args, cfg, out, reset, held_out, held_out_loss, train_steps, union, len(runs))
            return

        reset()
        t0 = time.perf_counter()
        base = held_out_loss()
        out["results"]["base"] = {"eval_loss": base, "seconds": time.perf_counter() - t0}
        print(f"[quality] base held-out loss {base:.4f} ({len(held_out)} examples)", file=sys.stderr, flush=True)
        res = out["results"]
        if args.baseline_json:
            take_baseline(args.baseline_json, out, methods)
        save()

        # Centralised first and local-only last: a run cut short still has the federated-vs-central comparison.
        train_baselines([m for m in methods if m == "central"], res, cfg, union, train_tok, reset, train_steps, held_out_loss,
                        save)
        reset()

        run_root = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="fedlora-quality-"))
        for recipe, privacy, rcfg, rused in runs:
            rec = run_recipe(rcfg, rused, recipe, privacy, run_root, base)
            rec["fraction"] = fraction(res, rec["eval_loss"])
            out["federated"].append(rec)
            if recipe == runs[0][0] and privacy == "plain":  # the first recipe, plain: the older files' "fed"
                res["fed"] = rec
            save()
        train_baselines([m for m in methods if m == "local"], res, cfg, union, train_tok, reset, train_steps, held_out_loss,
                        save)
        out["total_seconds"] = time.perf_counter() - t_all
        info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]

    report(out, args, cfg, len(held_out))


def train_baselines(methods, res: dict, cfg, union, train_tok, reset, train_steps, held_out_loss, save) -> None:
    """(b) centralised on the union of the clients' training data and (c) each client alone, from the
    initial adapter, each evaluated on the shared held-out set (into ``res``)."""
    from fedlora.seeds import round_seed

    n, R, S = cfg.federation.num_clients, cfg.federation.rounds, cfg.train.local_steps
    if "central" in methods:
        print(f"[quality] (b) centralised: {n * R * S} steps on {len(union)} examples", file=sys.stderr, flush=True)
        reset()
        t0 = time.perf_counter()
        r = train_steps(union, n * R * S, round_seed(cfg.seed, "bench-central"))
        loss = held_out_loss()
        res["central"] = {"eval_loss": loss, "train_loss": r.loss, "steps": r.steps,
                          "train_seconds": r.seconds, "seconds": time.perf_counter() - t0}
        print(f"[quality]   central {loss:.4f}", file=sys.stderr, flush=True)
        save()

    if "local" in methods:
        per_client = []
        t0 = time.perf_counter()
        for c in range(n):
            reset()
            r = train_steps(train_tok[c], R * S, round_seed(cfg.seed, "bench-local", c))
            loss = held_out_loss()
            per_client.append({"client": c, "eval_loss": loss, "train_loss": r.loss, "examples": r.examples,
                               "train_seconds": r.seconds})
            print(f"[quality]   local client {c}: {loss:.4f} ({r.examples} examples)", file=sys.stderr, flush=True)
        losses = [x["eval_loss"] for x in per_client]
        res["local"] = {"eval_loss": statistics.mean(losses), "min": min(losses), "max": max(losses),
                        "steps_each": R * S, "clients": per_client, "seconds": time.perf_counter() - t0}
        save()


def data_summary(splits, train_tok, held_out, union, max_seq_len: int) -> dict:
    """What the clients hold and what the held-out set is (descriptive, in the result JSON)."""
    lengths = [len(t["input_ids"]) for t in union]
    out = {
        "clients_train_examples": [len(t) for t in train_tok],
        "clients_held_out_examples": [len(h) for _, h in splits],
        "union_train_examples": len(union),
        "held_out_examples": len(held_out),
        "held_out_answer_tokens": sum(sum(1 for x in t["labels"] if x != -100) for t in held_out),
        "share_at_max_seq_len": sum(1 for x in lengths if x >= max_seq_len) / len(lengths),
        "mean_tokens": sum(lengths) / len(lengths),
    }
    try:
        from fedlora.data.partition import question_type

        out["clients_question_types"] = [
            dict(collections.Counter(question_type(ex["messages"][-2]["content"]) for ex in tr).most_common(3))
            for tr, _ in splits
        ]
    except Exception:  # noqa: BLE001 - descriptive only
        pass
    return out


def take_baseline(path: str, out: dict, methods: list[str]) -> None:
    """(b)/(c) not run now from an earlier quality JSON of the same settings (exits when they differ)."""
    prior = json.loads(Path(path).read_text())
    res = out["results"]
    if abs(prior["results"]["base"]["eval_loss"] - res["base"]["eval_loss"]) > 1e-6:
        sys.exit(f"--baseline-json {path}: base loss {prior['results']['base']['eval_loss']:.6f} "
                 f"differs from this run's {res['base']['eval_loss']:.6f}: not the same held-out set/model")
    if prior.get("steps") != out["steps"]:
        sys.exit(f"--baseline-json {path}: its steps {prior.get('steps')} are not this run's {out['steps']}")
    for m in ("central", "local"):
        if m not in methods and m in prior["results"]:
            res[m] = {**prior["results"][m], "from": path}


def dry_run(args, cfg, out, reset, held_out, held_out_loss, train_steps, union, fed_runs: int) -> None:
    """Time 6 training steps and one held-out evaluation; print the plan and an estimate."""
    n, R, S = cfg.federation.num_clients, cfg.federation.rounds, cfg.train.local_steps
    reset()
    times = [train_steps(union, 1, i).seconds for i in range(6)]
    step = statistics.median(times[1:])
    print(f"step times (s): {[round(t, 2) for t in times]}")
    t0 = time.perf_counter()
    loss_a = held_out_loss()
    ev = time.perf_counter() - t0
    print(f"eval of {len(held_out)} examples: {ev:.1f}s (loss {loss_a:.5f})")
    steps = ("fed" in args.methods) * fed_runs + ("central" in args.methods) + ("local" in args.methods)
    evals = 1 + ("fed" in args.methods) * fed_runs * (R + 1) + ("central" in args.methods) + ("local" in args.methods) * n
    total = steps * n * R * S * step + evals * ev
    print(table([[n, R, S, cfg.train.batch_size, cfg.train.max_seq_len, fed_runs, step, ev, steps * n * R * S, total / 60]],
                ["clients", "R", "S", "batch", "max_seq_len", "fed runs", "s/step", "eval s", "steps (all methods)", "est. min"]))
    print(f"data: {out['data']}")


def report(out: dict, args, cfg, held_out_n: int) -> None:
    """Print the quality table and the verdict; write the JSON."""
    n, R, S = cfg.federation.num_clients, cfg.federation.rounds, cfg.train.local_steps
    res = out["results"]
    print(f"\nQuality on {held_out_n} shared held-out examples (Medical Meadow, {n} clients dirichlet by question_type, "
          f"batch {cfg.train.batch_size}, max_seq_len {cfg.train.max_seq_len}, lr {cfg.train.lr}, {n * R * S} steps "
          f"per method)")
    print(quality_table(out, n, R, S))
    if "local" in res:
        print(f"local only: min {res['local']['min']:.4f}  max {res['local']['max']:.4f}")
    if "fed" in res and "central" in res:
        out["recovered"] = res["fed"]["fraction"]
    fed = [r for r in out["federated"] if r["fraction"] == r["fraction"]]
    if fed:
        best = max(fed, key=lambda r: r["fraction"])
        verdict = "meets" if best["fraction"] >= AIM else "MISSES"
        print(f"best: {best['recipe']} [{best['privacy']}] {100 * best['fraction']:.1f}% of the centralised gain "
              f"-> {verdict} the >= {100 * AIM:.0f}% aim")
    write_json(args.out, out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
