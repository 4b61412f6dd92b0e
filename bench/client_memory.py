"""Peak memory and step time of ONE END client training SmolLM2-135M with LoRA.

What it measures
----------------
One END client's local training exactly as fedlora runs it (``load_base_model`` +
``wrap_lora`` + ``tokenize`` + ``train_local``): LoRA r=8 on q_proj,v_proj, batches of 4
sequences of exactly 256 tokens (synthetic chat examples long enough to be truncated to
``max_seq_len=256``; the batch shape is checked), a few optimiser steps. Every
configuration runs in a FRESH Python subprocess, so one configuration's peak cannot leak
into the next. Each child reports

* ``ru_maxrss`` (``resource.getrusage(RUSAGE_SELF)``, the process's peak resident set) and
  the current RSS at three points: after imports (torch, transformers, peft, fedlora),
  after loading the base model and wrapping it with LoRA, and after training;
* seconds per optimiser step (the first step separately: it allocates everything), and the
  CPU-seconds per step (CPU/wall close to the thread count means nothing else competed);
* the first step's training loss (variants that only change *how* the loss is computed
  must give the same number: a correctness check).

Configurations: the base model in fp32 and in bf16 (``model.dtype=bfloat16``), each with 1
and 2 torch threads (fedlora's code path as it is), plus variants (left out with ``--no-variants``):

* ``full``  - the loss over the FULL (tokens x 49,152) logits, as transformers computes
  it (fedlora before commit ec9397b, which now projects answer positions only): shows
  what the answer-only loss saved;
* ``ckpt``  - fedlora's ``train.gradient_checkpointing=true`` (recompute each decoder
  layer in backward);
* ``chunk`` - NOT in fedlora: the answer-only loss computed over ``--chunk`` positions at
  a time, each chunk's vocabulary projection recomputed in backward, so the (answer
  tokens x vocabulary) logits are never all alive at once (swapped in for
  ``fedlora.train.answer_loss`` in the child process only);
* ``bf16c`` (a dtype) - the bf16 base loaded from a copy of the model saved in bf16
  (``model=local``), so loading never pages in the fp32 weights first (what fedlora's
  cache could store per dtype);
* ``eval``  - server side: ``fedlora.train.evaluate`` on batches of ``--eval-batch``
  sequences (no training), for the server's memory;
* combinations, e.g. ``bf16c:2:chunk+ckpt``.

How to read it
--------------
``peak MiB`` is the number that decides whether a device fits: the issue's aim is < 1.5 GB
(1,430 MiB) so that a 2 GB Raspberry Pi can train. ``imports`` is torch + transformers +
peft + fedlora. An fp32 base is memory-mapped from the safetensors cache and paged in
when first used, so its ~515 MiB show up in ``peak`` rather than in ``model``; a bf16 base
converted at load time pages in the fp32 file AND holds the bf16 copy (``model`` column),
which ``bf16c`` avoids. ``peak`` minus the weights is what training adds (activations,
logits, gradients).
Linux reports ru_maxrss in KiB; this script prints MiB (and GB = 10^9 bytes for the aim).

Run (takes the benchmark lock itself; ~15 min on 2 cores):

    .venv/bin/python bench/client_memory.py                    # all configurations
    .venv/bin/python bench/client_memory.py --model tiny --no-lock --steps 2   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DEFAULT_LOCK,
    REPO,
    RESULTS,
    bench_lock,
    cpu_seconds,
    machine,
    maxrss_mib,
    provenance,
    rss_mib,
    table,
    write_json,
)

MARK = "@@CLIENT_MEMORY@@"
AIM_BYTES = 1.5e9
BASELINES = ["fp32:1", "fp32:2", "bf16:1", "bf16:2"]
VARIANTS = ["fp32:2:full", "fp32:2:ckpt", "fp32:2:chunk", "fp32:2:chunk+ckpt", "bf16:2:chunk+ckpt",
            "bf16c:2", "bf16c:2:ckpt", "bf16c:2:chunk+ckpt", "bf16c:1:chunk+ckpt", "fp32:2:eval"]
# bf16c: bf16 base loaded from a copy of the model saved in bf16 (model=local), so loading
# does not first page in the fp32 weights (what fedlora's cache could store per dtype).
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "bf16c": "bfloat16"}
BF16_DIR = Path(os.environ.get("FEDLORA_BENCH_CACHE", "~/.cache/fedlora-bench")).expanduser()


# ------------------------------------------------------------------------------ child


def synthetic_examples(n: int) -> list[dict]:
    """``n`` distinct chat examples whose answer alone is far longer than 256 tokens.

    The question is short (like the medical data's): after SmolLM2's chat template the
    prompt is ~40 tokens, so ~215 of the 256 positions are answer tokens carrying loss.
    """
    sentences = [
        "Common symptoms include fever, fatigue, headache, muscle aches and a dry cough.",
        "Treatment depends on the cause and may involve rest, fluids and medication.",
        "See a doctor at once if breathing becomes difficult or chest pain appears.",
        "Risk factors include smoking, obesity, high blood pressure and a family history.",
        "Diagnosis usually starts with a physical examination and a blood test.",
        "Most people recover within two weeks, but older adults may need longer.",
    ]
    out = []
    for i in range(n):
        answer = " ".join(sentences[(i + k) % len(sentences)] + f" (note {i}.{k})" for k in range(40))
        out.append(
            {
                "messages": [
                    {"role": "user", "content": f"What are the symptoms of condition number {i}?"},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return out


def _full_vocab_loss(model, batch):
    """fedlora's loss before commit ec9397b: transformers' own loss over full logits."""
    count = int((batch["labels"][:, 1:] != -100).sum())
    return model(**batch).loss * count, count


def _chunked_answer_loss(chunk: int):
    """Like fedlora.train.answer_loss, but the vocabulary projection + cross-entropy run
    over ``chunk`` answer positions at a time, each recomputed in backward, so the
    (answer tokens x vocabulary) logits are never all alive at once."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    def loss(model, batch):
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        decoder, head = inner.model, inner.get_output_embeddings()
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        count = int(mask.sum())
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        h, y = hidden[:, :-1][mask], labels[mask]

        def ce_sum(hc, yc):
            return F.cross_entropy(head(hc).float(), yc, reduction="sum")

        total = hidden.new_zeros((), dtype=torch.float32)
        for hc, yc in zip(h.split(chunk), y.split(chunk)):
            total = total + (checkpoint(ce_sum, hc, yc, use_reentrant=False) if torch.is_grad_enabled() else ce_sum(hc, yc))
        return total, count

    return loss


def phase_marker() -> tuple[dict[str, dict], Callable[[str], None]]:
    """(phases, mark): ``mark(name)`` records ru_maxrss, current RSS and time into ``phases``."""
    phases: dict[str, dict] = {}
    t_start = time.perf_counter()

    def mark(name: str) -> None:
        phases[name] = {"maxrss_mib": maxrss_mib(), "rss_mib": rss_mib(), "t_s": time.perf_counter() - t_start}

    return phases, mark


def synthetic_batches(tokenizer, n_examples: int, batch: int, seq: int) -> tuple[list[dict], list[int], int]:
    """(tokenized, first batch shape, answer tokens in it) of ``n_examples`` synthetic examples
    that are all exactly ``seq`` tokens long; SystemExit when they are not."""
    from fedlora.data import batches, tokenize

    tokenized = tokenize(synthetic_examples(n_examples), tokenizer, seq)
    lengths = {len(t["input_ids"]) for t in tokenized}
    first = next(batches(tokenized, batch, tokenizer.pad_token_id, shuffle=False, seed=0))
    shape = list(first["input_ids"].shape)
    if lengths != {seq} or shape != [batch, seq]:
        raise SystemExit(f"examples are not all {seq} tokens: lengths {sorted(lengths)}, batch {shape}")
    return tokenized, shape, int((first["labels"] != -100).sum())


def timed_steps(n: int, step: Callable[[int], tuple[float, int, float]]) -> list[dict]:
    """Run ``step(i) -> (loss, tokens, seconds)`` ``n`` times; wall, CPU-seconds and ru_maxrss of each."""
    steps = []
    for i in range(n):
        c0, t0 = cpu_seconds(), time.perf_counter()
        loss, tokens, seconds = step(i)
        steps.append({"s": seconds, "wall_s": time.perf_counter() - t0, "cpu_s": cpu_seconds() - c0,
                      "loss": loss, "tokens": tokens, "maxrss_mib": maxrss_mib()})
    return steps


def report(phases: dict, steps: list[dict], shape: list[int], answer_tokens: int, model, **extra) -> None:
    """Print the child's measurements as one MARK line of JSON (what :func:`spawn_child` reads)."""
    import torch

    data = {"phases": phases, "steps": steps, "batch_shape": shape, "answer_tokens_first_batch": answer_tokens,
            "params": sum(p.numel() for p in model.parameters()),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "torch_threads": torch.get_num_threads(), **extra}
    print(MARK + json.dumps(data), flush=True)


def child(args: argparse.Namespace) -> None:
    phases, mark = phase_marker()
    mark("start")
    import torch

    torch.set_num_threads(args.threads)
    from fedlora.config import compose
    from fedlora.model import load_base_model, wrap_lora
    from fedlora.runs.progress import quiet_libraries
    from fedlora.train import train_local

    quiet_libraries()
    mark("imports")

    variant = set(filter(None, args.variant.split("+")))
    unknown = variant - {"ckpt", "full", "chunk", "eval"}
    if unknown:
        raise SystemExit(f"unknown variant(s): {sorted(unknown)}")
    import fedlora.train

    if "full" in variant:
        fedlora.train.answer_loss = _full_vocab_loss
    if "chunk" in variant:
        fedlora.train.answer_loss = _chunked_answer_loss(args.chunk)
    model_overrides = [f"model={args.model}"]
    if args.dtype == "bf16c":
        model_overrides = ["model=local", f"model.path={bf16_dir(args.model)}"]
    cfg = compose(
        [
            *model_overrides,
            f"model.dtype={DTYPES[args.dtype]}",
            "lora=qv_r8",
            f"train.batch_size={args.batch}",
            f"train.max_seq_len={args.seq}",
            "train.local_steps=1",
            "train.grad_accum=1",
            f"train.eval_batch_size={args.eval_batch}",
            f"train.gradient_checkpointing={'ckpt' in variant}",
            "progress=false",
        ]
    )
    base, tokenizer = load_base_model(cfg.model)
    model = wrap_lora(base, cfg.lora, init_seed=cfg.seed)
    mark("model")

    n_examples = max(args.batch, args.eval_batch) * (args.steps + 1)
    tokenized, shape, answer_tokens = synthetic_batches(tokenizer, n_examples, args.batch, args.seq)
    mark("data")

    def step(i: int) -> tuple[float, int, float]:
        if "eval" in variant:
            # Server-side evaluation of one batch of eval_batch_size sequences (no grad).
            t0 = time.perf_counter()
            chunk = tokenized[i * args.eval_batch:(i + 1) * args.eval_batch]
            loss, tokens = fedlora.train.evaluate(model, chunk, args.eval_batch, pad_id=tokenizer.pad_token_id)
            return loss, tokens, time.perf_counter() - t0
        res = train_local(model, tokenized, cfg.train, pad_id=tokenizer.pad_token_id, seed=i)
        return res.loss, res.tokens, res.seconds

    steps = timed_steps(args.steps, step)
    mark("train")
    report(phases, steps, shape, answer_tokens, model)


def bf16_dir(model: str) -> Path:
    return BF16_DIR / f"{model}-bf16"


def prepare_bf16(model: str) -> None:
    """Save fedlora's base model in bf16 (once) for the bf16c configurations."""
    out = bf16_dir(model)
    if (out / "config.json").is_file():
        return
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedlora.config import compose
    from fedlora.model import resolve_model_dir

    src = resolve_model_dir(compose([f"model={model}"]).model)
    tmp = out.with_name(out.name + ".tmp")
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(tmp)
    AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
    tmp.rename(out)


# ----------------------------------------------------------------------------- parent


def parse_spec(spec: str) -> tuple[str, int, str]:
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] not in DTYPES:
        raise argparse.ArgumentTypeError(f"bad configuration {spec!r}; expected DTYPE:THREADS[:VARIANT], e.g. bf16:2:chunk")
    return parts[0], int(parts[1]), parts[2] if len(parts) == 3 else ""


def spawn_child(cmd: list[str], threads: int) -> tuple[dict | None, str, float]:
    """Run a measuring child (``cmd``) in a FRESH process with ``threads`` torch/OpenMP
    threads: (its reported data or None, its stderr/stdout tail on failure, wall seconds).

    The child's ru_maxrss starts at this process's peak RSS (Linux carries the peak across
    vfork+exec), so a parent that imports torch puts a ~250 MiB floor under every child
    peak; harmless for peaks above it, but keep the parent light when measuring small ones."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
    wall = time.perf_counter() - t0
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        return None, (proc.stderr or proc.stdout)[-2000:], wall
    return json.loads(lines[-1][len(MARK):]), "", wall


def run_config(args: argparse.Namespace, dtype: str, threads: int, variant: str) -> dict:
    cmd = [
        sys.executable, __file__, "--child", "--model", args.model, "--dtype", dtype, "--threads", str(threads),
        "--variant", variant, "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq),
        "--chunk", str(args.chunk), "--eval-batch", str(args.eval_batch),
    ]
    data, error, wall = spawn_child(cmd, threads)
    if data is None:
        return {"dtype": dtype, "threads": threads, "variant": variant or "-", "error": error}
    return summarise(dtype, threads, variant or "-", data, wall)


def summarise(dtype: str, threads: int, variant: str, data: dict, wall: float | None) -> dict:
    """One configuration's figures from the child's raw report (median over steps 2+)."""
    import statistics

    steps = data["steps"]
    later = steps[1:] or steps
    return {
        "dtype": dtype,
        "threads": threads,
        "variant": variant,
        "peak_mib": data["phases"]["train"]["maxrss_mib"],
        "peak_gb": data["phases"]["train"]["maxrss_mib"] * 2**20 / 1e9,
        "maxrss_imports_mib": data["phases"]["imports"]["maxrss_mib"],
        "maxrss_model_mib": data["phases"]["model"]["maxrss_mib"],
        "rss_imports_mib": data["phases"]["imports"]["rss_mib"],
        "rss_model_mib": data["phases"]["model"]["rss_mib"],
        "rss_after_train_mib": data["phases"]["train"]["rss_mib"],
        "first_step_s": steps[0]["s"],
        "step_s": statistics.median(s["s"] for s in later),
        "cpu_per_wall": statistics.median(s["cpu_s"] / max(1e-9, s["wall_s"]) for s in later),
        "first_loss": steps[0]["loss"],
        "fits_aim": data["phases"]["train"]["maxrss_mib"] * 2**20 < AIM_BYTES,
        "subprocess_wall_s": wall,
        "raw": data,
    }


def print_results(results: list[dict], settings: dict) -> None:
    ok = [r for r in results if "error" not in r]
    headers = ["dtype", "threads", "variant", "imports MiB", "model MiB", "peak MiB", "peak GB", "< 1.5 GB",
               "1st step s", "s/step", "cpu/wall", "1st loss"]
    rows = [
        [r["dtype"], r["threads"], r["variant"], r["maxrss_imports_mib"], r["maxrss_model_mib"], r["peak_mib"],
         r["peak_gb"], r["fits_aim"], r["first_step_s"], r["step_s"], r["cpu_per_wall"], f"{r['first_loss']:.4f}"]
        for r in ok
    ]
    print(f"\nOne END client: {settings['model']}, LoRA r=8 q,v, batch {settings['batch']} x {settings['seq']} tokens, "
          f"{settings['steps']} steps; ru_maxrss after imports / after model load / after training (MiB); "
          "s/step and cpu/wall = median over steps 2+ (eval rows: one batch of "
          f"{settings.get('eval_batch', 8)} sequences)")
    print(table(rows, headers, digits=2))
    for r in results:
        if "error" in r:
            print(f"FAILED {r['dtype']}:{r['threads']}:{r['variant']}")
    if ok:
        d = ok[0]["raw"]
        print(f"batch shape {d['batch_shape']}, answer (loss) tokens in the first batch {d['answer_tokens_first_batch']}, "
              f"params {d['params']:,} of which LoRA {d['trainable_params']:,}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="*", type=parse_spec,
                   help="DTYPE:THREADS[:VARIANT] (DTYPE fp32|bf16|bf16c; VARIANT full|chunk|ckpt|eval joined by +). "
                        f"Default: {' '.join(BASELINES)} {' '.join(VARIANTS)}")
    p.add_argument("--no-variants", action="store_true", help="only the plain fedlora configurations")
    p.add_argument("--model", default="smollm2", help="fedlora model config group (smollm2; tiny for a smoke test)")
    p.add_argument("--steps", type=int, default=4, help="optimiser steps per configuration (first reported apart)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence (every example exactly this long)")
    p.add_argument("--chunk", type=int, default=256, help="tokens per chunk for the chunked-CE variant")
    p.add_argument("--eval-batch", type=int, default=8, help="sequences per batch for the eval variant (server side)")
    p.add_argument("--lock", default=DEFAULT_LOCK, help="benchmark lock file (default %(default)s)")
    p.add_argument("--no-lock", action="store_true", help="do not take the lock (smoke tests only)")
    p.add_argument("--out", default=str(RESULTS / "client_memory.json"))
    p.add_argument("--merge", action="store_true",
                   help="replace only the given configurations in --out, keep the others (re-timing a few)")
    p.add_argument("--reprint", action="store_true", help="print the table of --out again, measure nothing")
    # child-only
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--variant", default="", help=argparse.SUPPRESS)
    p.add_argument("--prepare-bf16", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    if args.prepare_bf16:
        prepare_bf16(args.model)
        return

    settings = {"model": args.model, "steps": args.steps, "batch": args.batch, "seq": args.seq, "chunk": args.chunk,
                "eval_batch": args.eval_batch, "lora": "r=8 alpha=16 q_proj,v_proj", "aim_bytes": AIM_BYTES}
    if args.reprint:
        saved = json.loads(Path(args.out).read_text())
        results = [summarise(r["dtype"], r["threads"], r["variant"], r["raw"], r.get("subprocess_wall_s"))
                   if "raw" in r else r for r in saved["results"]]
        print_results(results, saved["settings"])
        return

    configs = args.configs or [parse_spec(s) for s in BASELINES + ([] if args.no_variants else VARIANTS)]
    if any(dtype == "bf16c" for dtype, _, _ in configs) and not (bf16_dir(args.model) / "config.json").is_file():
        print(f"[client_memory] saving a bf16 copy of the base model to {bf16_dir(args.model)} (once)", file=sys.stderr)
        subprocess.run([sys.executable, __file__, "--prepare-bf16", "--model", args.model], check=True, cwd=str(REPO))
    info = machine()
    results = []
    with bench_lock(None if args.no_lock else args.lock, what="client_memory"):
        info["loadavg_when_locked"] = [round(x, 2) for x in os.getloadavg()]
        for dtype, threads, variant in configs:
            print(f"[client_memory] {args.model} {dtype} threads={threads} variant={variant or '-'} ...",
                  file=sys.stderr, flush=True)
            r = run_config(args, dtype, threads, variant)
            if "error" in r:
                print(f"[client_memory]   FAILED:\n{r['error']}", file=sys.stderr)
            r["machine"] = {**info, "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]}
            results.append(r)
        info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]

    record = {
        **provenance("client_memory", info),
        "settings": settings,
        "results": results,
    }
    if args.merge and Path(args.out).is_file():
        # Re-measured configurations replace their earlier entries; the rest are kept.
        saved = json.loads(Path(args.out).read_text())
        fresh = {(r["dtype"], r["threads"], r["variant"]) for r in results}
        kept = [summarise(r["dtype"], r["threads"], r["variant"], r["raw"], r.get("subprocess_wall_s"))
                | {"machine": r.get("machine")}
                if "raw" in r else r
                for r in saved["results"] if (r["dtype"], r["threads"], r["variant"]) not in fresh]
        for r in kept:
            r.setdefault("machine", saved.get("machine"))
        record["results"] = kept + results
        record["merged_commands"] = saved.get("merged_commands", [saved.get("command")]) + [record["command"]]
        order = {(d, t, v or "-"): i for i, (d, t, v) in enumerate(parse_spec(x) for x in BASELINES + VARIANTS)}
        record["results"].sort(key=lambda r: order.get((r["dtype"], r["threads"], r["variant"]), 99))
    print_results(record["results"], settings)
    out = write_json(args.out, record)
    print(f"\nwrote {out}")
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
