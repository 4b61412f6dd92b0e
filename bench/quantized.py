"""A quantised frozen base: peak memory, s/step and held-out loss of ONE END client, per base precision.

What it measures
----------------
One END client's local training as fedlora runs it (``load_base_model`` with ``model.dtype`` and
``model.quantize``, ``wrap_lora``, ``train_local``), LoRA r=8 on q,v (fp32 adapter, as always), for
the base in fp32, bf16, LLM.int8 and NF4 (bitsandbytes, ``model.quantize=int8|nf4``; the linear
layers' non-quantised rest -- embedding, norms -- in ``model.dtype``), each with and without
gradient checkpointing, plus torchao's int8 weight-only route that PEFT also supports
(``ao-int8``: NOT in fedlora, applied in the child with ``torchao.quantization.quantize_``, to
compare the two routes). Every configuration runs in a FRESH subprocess (peak RSS = the child's
``ru_maxrss``), reusing ``client_memory.py``'s child helpers:

* memory/speed: batches of 4 x exactly 256 synthetic tokens, ``--steps`` optimiser steps; peak
  RSS after loading and after training, median s/step over steps 2+;
* quality (``--quality-steps`` > 0, the bases of ``--quality``, without checkpointing, which does
  not change the numerics): from the same seeded LoRA init, ``--quality-steps`` steps on client 0's wearable
  data (batch 4 x 128 tokens), then the held-out loss over ``--eval-examples`` examples of every
  client evaluated with the SAME base precision as trained; loss before and after.

Run (takes the benchmark lock; ~8 min on an idle 2-core machine):

    .venv/bin/python bench/quantized.py
    .venv/bin/python bench/quantized.py --model tiny --no-lock --steps 2 --quality-steps 2 --out /tmp/q.json fp32 nf4  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_LOCK, RESULTS, bench_lock, machine, provenance, table, write_json  # noqa: E402
from client_memory import phase_marker, spawn_child, synthetic_batches, timed_steps  # noqa: E402

MARK = "@@CLIENT_MEMORY@@"  # client_memory.spawn_child reads this marker
# name -> (model.dtype, model.quantize, torchao int8 weight-only in the child)
BASES = {"fp32": ("float32", "none", False), "bf16": ("bfloat16", "none", False),
         "int8": ("bfloat16", "int8", False), "nf4": ("bfloat16", "nf4", False),
         "int8-fp32": ("float32", "int8", False), "nf4-fp32": ("float32", "nf4", False),
         "ao-int8": ("bfloat16", "none", True)}
DEFAULT_CONFIGS = ["fp32", "fp32:ckpt", "bf16", "bf16:ckpt", "int8", "int8:ckpt", "nf4", "nf4:ckpt", "ao-int8"]
QUALITY_CONFIGS = ["fp32", "bf16", "int8", "nf4"]


def child(args: argparse.Namespace) -> None:
    phases, mark = phase_marker()
    mark("start")
    import torch

    torch.set_num_threads(args.threads)
    from fedlora.config import compose
    from fedlora.data import client_examples, eval_examples, tokenize
    from fedlora.model import load_base_model, wrap_lora
    from fedlora.runs.progress import quiet_libraries
    from fedlora.train import evaluate, train_local

    quiet_libraries()
    mark("imports")
    dtype, quantize, torchao = BASES[args.base]
    ckpt = args.variant == "ckpt"
    quality = args.quality_steps > 0
    seq = 128 if quality else args.seq
    cfg = compose([f"model={args.model}", f"model.dtype={dtype}", f"model.quantize={quantize}", "lora=qv_r8",
                   f"train.batch_size={args.batch}", f"train.max_seq_len={seq}", "train.grad_accum=1",
                   f"train.local_steps={args.quality_steps if quality else 1}", f"train.gradient_checkpointing={ckpt}",
                   "progress=false"])
    base, tokenizer = load_base_model(cfg.model)
    if torchao:
        # torchao only for this comparison row: fedlora's one route is bitsandbytes (fedlora/quantize.py)
        from torch import nn
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        head = base.get_output_embeddings()
        quantize_(base, Int8WeightOnlyConfig(), filter_fn=lambda m, _fqn: type(m) is nn.Linear and m is not head)
    model = wrap_lora(base, cfg.lora, init_seed=cfg.seed)
    mark("model")
    extra: dict = {"base": args.base, "variant": args.variant}
    if quality:
        train, _ = client_examples(cfg.data, 0, cfg.federation.num_clients, cfg.seed)
        tokenized = tokenize(train, tokenizer, seq)
        held = tokenize(eval_examples(cfg.data, cfg.federation.num_clients, cfg.seed)[:args.eval_examples], tokenizer, seq)
        pad = tokenizer.pad_token_id
        before = evaluate(model, held, 8, pad_id=pad)[0]
        t0 = time.perf_counter()
        res = train_local(model, tokenized, cfg.train, pad_id=pad, seed=1)
        after = evaluate(model, held, 8, pad_id=pad)[0]
        mark("train")
        extra |= {"eval_before": before, "eval_after": after, "train_loss": res.loss,
                  "train_s_per_step": (time.perf_counter() - t0) / res.steps, "held_out": len(held)}
        print(MARK + json.dumps({"phases": phases, **extra}), flush=True)
        return
    tokenized, shape, answer_tokens = synthetic_batches(tokenizer, args.batch * (args.steps + 1), args.batch, seq)

    def step(i: int) -> tuple[float, int, float]:
        r = train_local(model, tokenized, cfg.train, pad_id=tokenizer.pad_token_id, seed=i)
        return r.loss, r.tokens, r.seconds

    steps = timed_steps(args.steps, step)
    mark("train")
    print(MARK + json.dumps({"phases": phases, "steps": steps, "batch_shape": shape, **extra}), flush=True)


def run(args: argparse.Namespace, spec: str, quality: bool) -> dict:
    base, _, variant = spec.partition(":")
    cmd = [sys.executable, __file__, "--child", "--model", args.model, "--base", base, "--variant", variant,
           "--threads", str(args.threads), "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq),
           "--quality-steps", str(args.quality_steps if quality else 0), "--eval-examples", str(args.eval_examples)]
    print(f"[quantized] {spec} {'quality' if quality else 'memory'} ...", file=sys.stderr, flush=True)
    data, error, wall = spawn_child(cmd, args.threads)
    if data is None:
        print(f"[quantized]   FAILED:\n{error}", file=sys.stderr)
        return {"config": spec, "error": error}
    out = {"config": spec, "wall_s": wall, "maxrss_model_mib": data["phases"]["model"]["maxrss_mib"],
           "peak_mib": data["phases"]["train"]["maxrss_mib"], "raw": data}
    if quality:
        return out | {k: data[k] for k in ("eval_before", "eval_after", "train_loss", "train_s_per_step")}
    later = data["steps"][1:] or data["steps"]
    return out | {"step_s": statistics.median(s["s"] for s in later),
                  "cpu_per_wall": statistics.median(s["cpu_s"] / max(1e-9, s["wall_s"]) for s in later)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="*", help=f"BASE[:ckpt], BASE one of {', '.join(BASES)} "
                                              f"(default: {' '.join(DEFAULT_CONFIGS)})")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--quality-steps", type=int, default=4, help="0: no quality rows")
    p.add_argument("--quality", nargs="*", default=QUALITY_CONFIGS, help="bases of the quality rows (default %(default)s)")
    p.add_argument("--eval-examples", type=int, default=16)
    p.add_argument("--only-quality", action="store_true", help="no memory/speed rows")
    p.add_argument("--lock", default=DEFAULT_LOCK)
    p.add_argument("--no-lock", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "quantized.json"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--base", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    configs = [] if args.only_quality else args.configs or DEFAULT_CONFIGS
    for spec in configs + args.quality:
        if spec.partition(":")[0] not in BASES or spec.partition(":")[2] not in ("", "ckpt"):
            p.error(f"bad configuration {spec!r}: BASE[:ckpt], BASE one of {', '.join(BASES)}")
    info = machine()
    memory: list[dict] = []
    quality: list[dict] = []
    record = {**provenance("quantized", info), "settings": vars(args) | {"configs": configs},
              "memory": memory, "quality": quality}
    with bench_lock(None if args.no_lock else args.lock, what="quantized"):
        info["loadavg_when_locked"] = [round(x, 2) for x in os.getloadavg()]
        for spec in configs:
            memory.append(run(args, spec, quality=False) | {"loadavg_after": os.getloadavg()})
            write_json(args.out, record)  # each row as it comes: a long run on a busy machine keeps what it measured
        for base in args.quality if args.quality_steps > 0 else []:
            quality.append(run(args, base, quality=True) | {"loadavg_after": os.getloadavg()})
            write_json(args.out, record)
        info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    ok = [r for r in memory if "error" not in r]
    print(f"\nOne END client, {args.model}, LoRA r=8 q,v (fp32), batch {args.batch} x {args.seq}, {args.threads} threads")
    print(table([[r["config"], r["maxrss_model_mib"], r["peak_mib"], r["step_s"], r["cpu_per_wall"]] for r in ok],
                ["base", "after load MiB", "peak MiB", "s/step", "cpu/wall"]))
    good = [r for r in quality if "error" not in r]
    ref = next((r for r in good if r["config"] == "bf16"), None)
    if good:
        print(f"\nHeld-out loss after {args.quality_steps} steps on client 0's data (batch {args.batch} x 128), "
              f"{args.eval_examples} held-out examples, same init and seed")
        print(table([[r["config"], r["eval_before"], r["eval_after"],
                      r["eval_after"] - ref["eval_after"] if ref else None, r["train_s_per_step"]] for r in good],
                    ["base", "held-out before", "after", "after - bf16", "s/step (128 tok)"], digits=4))
    print(f"\nwrote {write_json(args.out, record)}")
    if any("error" in r for r in memory + quality):
        sys.exit(1)


if __name__ == "__main__":
    main()
