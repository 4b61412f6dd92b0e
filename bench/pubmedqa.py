"""PubMedQA accuracy, base vs federated: train on part of the expert-labelled rows, score the rest.

Reads ``../shared/data/pubmedqa_dev.jsonl`` (500 PQA-L rows: question, context, long_answer,
label yes/no/maybe; see that folder's README) in place. A seeded shuffle puts ``--test`` rows
aside; the others become a training file (the prompt ``fedlora.tasks.choice_prompt`` builds:
abstract, question, "Answer with one of: yes, no, maybe."; the answer: the label, then the
conclusion) split IID across ``--clients`` clients, trained with ``run_federation`` +
``InProcessTransport`` (the simulation's round code in one process). Then the base and the
federated adapter score the test rows with ``fedlora.tasks``: each option's log-likelihood
after the prompt (acc: sum, acc_norm: per byte; macro-F1 over the three labels). Always
answering ``yes`` is the majority baseline (55% on all 500 rows; printed for the test rows).

    python bench/pubmedqa.py                      # SmolLM2, under the bench lock
    python bench/pubmedqa.py --model tiny --no-lock --test 12 --rounds 1 --local-steps 1   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, SHARED_DATA, bench_lock, provenance, table, write_json


def split_rows(rows: list[dict], n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, test): a seeded shuffle, the first ``n_test`` rows for the test."""
    from fedlora.seeds import data_rng  # after _common put the repo on sys.path

    order = list(range(len(rows)))
    data_rng("pubmedqa-bench", seed).shuffle(order)
    return [rows[i] for i in order[n_test:]], [rows[i] for i in order[:n_test]]


def training_file(rows: list[dict], path: Path) -> Path:
    """Alpaca rows: the choice prompt, answered by the label and the conclusion."""
    from fedlora.tasks import YES_NO_MAYBE, choice_prompt

    with open(path, "w") as f:
        for r in rows:
            prompt = choice_prompt(r["question"], YES_NO_MAYBE, r["context"])[0]["content"]
            f.write(json.dumps({"instruction": prompt, "output": f"{r['label']}. {r['long_answer']}"}) + "\n")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    p.add_argument("--data-path", default=str(SHARED_DATA / "pubmedqa_dev.jsonl"))
    p.add_argument("--test", type=int, default=100, help="rows scored (the rest train)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--local-steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-seq-len", type=int, default=384)
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--lock", default="/tmp/fedlora-bench.lock")
    p.add_argument("--no-lock", action="store_true", help="smoke tests with --model tiny only")
    p.add_argument("--out", default=str(RESULTS / "pubmedqa.json"))
    args = p.parse_args()
    if not Path(args.data_path).is_file():
        sys.exit(f"pubmedqa: {args.data_path} is missing (the project's shared data folder next to the checkout; "
                 "or pass --data-path)")
    # the model stack only once the arguments are good
    from fedlora.config import compose
    from fedlora.data import file_rows
    from fedlora.roles.cloud import run_federation
    from fedlora.roles.local import InProcessTransport
    from fedlora.swap import AdapterSet
    from fedlora.tasks import choice_items, choice_scores, option_logprobs

    train, test = split_rows(file_rows(args.data_path), args.test, args.seed)
    items = choice_items(test)
    result = {**provenance("pubmedqa"), "args": vars(args), "train_rows": len(train), "test_rows": len(test),
              "test_labels": {k: sum(r["label"] == k for r in test) for k in ("yes", "no", "maybe")}}
    with bench_lock(None if args.no_lock else args.lock, what="pubmedqa"), tempfile.TemporaryDirectory() as tmp:
        result["load_average_before"] = os.getloadavg()
        data = training_file(train, Path(tmp) / "pubmedqa_train.jsonl")
        cfg = compose([f"model={args.model}", "data=file", f"data.path={data}", "data.max_eval_examples=16",
                       "data.accuracy_examples=0", f"federation.num_clients={args.clients}", "federation.fraction=1.0",
                       f"federation.rounds={args.rounds}", f"train.local_steps={args.local_steps}",
                       f"train.batch_size={args.batch_size}", f"train.max_seq_len={args.max_seq_len}", f"train.lr={args.lr}",
                       "topology=flat", "privacy=none", "progress=false", f"seed={args.seed}"])
        t0 = time.perf_counter()
        summary = run_federation(cfg, Path(tmp) / "run", InProcessTransport(args.clients))
        result["train_s"] = time.perf_counter() - t0
        result["held_out_loss"] = {"base": summary["base_eval_loss"], "federated": summary["final_eval_loss"]}
        adapters = AdapterSet(cfg.model, {"federated": Path(tmp) / "run" / "adapter"})
        tok = adapters.tokenizer

        def score(model) -> dict:
            t = time.perf_counter()
            lp = option_logprobs(model, tok, items, max_seq_len=args.max_seq_len, batch_size=cfg.train.eval_batch_size)
            scores = choice_scores(items, lp)
            return {**scores, "predicted": {k: scores["predicted"].count(k) for k in ("yes", "no", "maybe")},
                    "seconds": time.perf_counter() - t}

        with adapters.base_only():
            result["base"] = score(adapters.model)
        adapters.use("federated")
        result["federated"] = score(adapters.model)
        result["load_average_after"] = os.getloadavg()
    result["always_yes_acc"] = result["test_labels"]["yes"] / len(test)
    print(table([(name, result[name]["acc"], result[name]["acc_norm"], result[name]["macro_f1"], result[name]["predicted"])
                 for name in ("base", "federated")], ["model", "acc", "acc_norm", "macro-F1", "predicted"]))
    print(f"always 'yes': {result['always_yes_acc']:.2f}; held-out loss {result['held_out_loss']['base']:.3f} -> "
          f"{result['held_out_loss']['federated']:.3f}; training {result['train_s']:.0f}s")
    print(f"wrote {write_json(args.out, result)}")


if __name__ == "__main__":
    main()
