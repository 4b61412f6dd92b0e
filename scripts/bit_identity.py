"""Bit-identity check for changes that must not change behaviour (a refactor, a re-layout).

Run it on the code before and after the change and compare what it prints:

    python scripts/bit_identity.py OUT_DIR              # four tiny in-process federations
    python scripts/bit_identity.py --compare RUN_A RUN_B   # two run directories (e.g. fedlora run)

The first form runs four federations with the tiny model in this process (small6g with
secure aggregation and mobility; secure + mobile + HierFAVG; flat FedAdam; secure FFA-LoRA)
and prints a digest of each final adapter and of its rounds.jsonl. ``privacy=secagg_dp`` is
left out on purpose: its noise comes from ``os.urandom`` and is never bit-identical. The
timing fields of a round record (``wall_s``, ``eval_s``, ``client_train_s`` and
``sim_network_s``, which adds measured training seconds) are removed before hashing: they hold
measured seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

TIMING = ("wall_s", "eval_s", "client_train_s", "sim_network_s")
BASE = ["model=tiny", "train.local_steps=2", "train.max_seq_len=96", "data.records_per_client=10",
        "data.max_eval_examples=6", "progress=false", "federation.num_clients=8"]
RUNS = {
    "default-tiny": [],
    "secure-mobile-hierfavg": ["privacy=secagg", "topology.cloud_sync_every=2", "federation.rounds=4",
                               "topology.mobility.handover_prob=0.5"],
    "flat-fedadam": ["topology=flat", "privacy=none", "strategy=fedadam"],
    "secagg-ffa": ["privacy=secagg", "strategy=ffa_lora", "federation.rounds=2"],
}


def rounds_without_timing(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


def digests(run_dir: Path) -> tuple[str, str]:
    """(adapter digest, rounds.jsonl digest without timing fields) of one run directory."""
    adapter = hashlib.sha256((run_dir / "adapter" / "adapter_model.safetensors").read_bytes()).hexdigest()[:16]
    rounds = hashlib.sha256(json.dumps(rounds_without_timing(run_dir), sort_keys=True).encode()).hexdigest()[:16]
    return adapter, rounds


def run_all(out: Path, names: list[str]) -> None:
    # fedlora imports torch: only when federations are run, not for --compare
    from fedlora.config import compose
    from fedlora.roles.cloud import run_federation
    from fedlora.roles.local import InProcessTransport

    for name in names:
        cfg = compose([*BASE, f"model.cache_dir={out / 'cache'}", *RUNS[name]])
        run_dir = out / name
        run_federation(cfg, run_dir, InProcessTransport(cfg.federation.num_clients))
        adapter, rounds = digests(run_dir)
        print(f"{name}: adapter {adapter} rounds {rounds}", flush=True)


def compare(a: Path, b: Path) -> int:
    (adapter_a, _), (adapter_b, _) = digests(a), digests(b)
    rounds_a, rounds_b = rounds_without_timing(a), rounds_without_timing(b)
    print(f"adapter {adapter_a} vs {adapter_b}: {'identical' if adapter_a == adapter_b else 'DIFFERENT'}")
    print(f"rounds.jsonl ({len(rounds_a)} rounds, timing fields removed): "
          f"{'identical' if rounds_a == rounds_b else 'DIFFERENT'}")
    for x, y in zip(rounds_a, rounds_b):
        for key in sorted(set(x) | set(y)):
            if x.get(key) != y.get(key):
                print(f"  round {x.get('round')} {key}: {str(x.get(key))[:80]} | {str(y.get(key))[:80]}")
    return 0 if adapter_a == adapter_b and rounds_a == rounds_b else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path, help="folder for the four in-process runs")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("RUN_A", "RUN_B"))
    parser.add_argument("--only", nargs="*", choices=sorted(RUNS), help="run only these")
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    if args.out is None:
        parser.error("give OUT_DIR, or --compare RUN_A RUN_B")
    run_all(args.out, args.only or list(RUNS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
