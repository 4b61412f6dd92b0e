"""Split learning benchmarks (issue 12): device memory, bytes and round time, the cut choice.

``memory``  Peak memory (ru_maxrss) of ONE device training SmolLM2-135M with LoRA (r=8 on q,v,
            batches of 4 x 256 tokens, bf16 base + gradient checkpointing, 2 optimiser steps), each
            configuration in a fresh subprocess: the full model (plain FL), and a split device that
            holds ONLY its ends -- a Llama of k+m blocks with the embeddings, the norm and the head,
            loaded tensor by tensor from the cached bf16 safetensors -- training through a real
            cross-process link (multiprocessing pipe) with an edge process that holds the middle
            blocks. The split device's first-step loss must equal the full device's (same data,
            same seed): the split is exact.
``quality`` Held-out loss per round on the Medical Meadow file (non-IID) at the same device steps:
            plain FL, all split, a mix (tiny 4-block model, in-process).
``network`` Bytes per device per round and the simulated round time, split vs plain FL, on the
            small6g tree (8 devices) at two access-link speeds, over local steps; the crossover
            (the local steps from which split sends more bytes than the adapter). Network model
            only (fedlora/world/netsim.py with fedlora/world/splitplan.py's compute estimates).
``choice``  For each device profile of the tree (and a 512 MB Pi Zero 2 W): the chosen cut against
            fixed cuts: estimated memory, step time, whether it fits.
``secure``  Bytes of the update each device uploads per round (``rounds.jsonl`` access-link bytes less the
            activations, per device), full and split (k=1, m=1), plain and under secure aggregation
            (32-bit words and packed): tiny 4-block model, 8 laptops on small6g, one round, in-process.
            Bytes only, so it takes no bench lock.

    python bench/split.py memory [--cuts 1:0,2:1]   # takes the bench lock; ~3 min on 2 cores
    python bench/split.py network
    python bench/split.py choice
    python bench/split.py quality                   # takes the bench lock; ~3 min
    python bench/split.py secure                    # ~2 min
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, bench_lock, maxrss_mib, provenance, rss_mib, table, write_json  # noqa: E402

MARK = "SPLITBENCH "
STEPS, BATCH, SEQ = 2, 4, 256


# ------------------------------------------------------------------------------ memory


def _train_cfg():
    from fedlora.config import TrainConfig

    return TrainConfig(local_steps=STEPS, batch_size=BATCH, max_seq_len=SEQ, lr=2e-3, gradient_checkpointing=True)


def _model_cfg():
    from fedlora.config import ModelConfig, TinyModelConfig

    # FEDLORA_SPLIT_BENCH_MODEL=tiny: a smoke test of the bench itself with the 4-block tiny model.
    if os.environ.get("FEDLORA_SPLIT_BENCH_MODEL") == "tiny":
        return ModelConfig(source="tiny", dtype="bfloat16", tiny=TinyModelConfig(num_hidden_layers=4))
    return ModelConfig(source="smollm2", dtype="bfloat16")


def _data(tokenizer):
    from client_memory import synthetic_batches

    return synthetic_batches(tokenizer, 8, BATCH, SEQ)[0]


def _device_only_model(k: int, m: int):
    """A Llama of the device's k + m blocks, embeddings, norm and head, read tensor by tensor from
    the bf16 cache (the middle blocks are never loaded)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, LlamaForCausalLM

    from fedlora.model import _dtype_copy, load_tokenizer, resolve_model_dir

    cfg = _model_cfg()
    where = _dtype_copy(cfg, Path(resolve_model_dir(cfg)))
    config = AutoConfig.from_pretrained(where)
    total = config.num_hidden_layers
    keep = list(range(k)) + list(range(total - m, total))  # device block i <- original block keep[i]
    config.num_hidden_layers = k + m
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    own = model.state_dict()
    with safe_open(str(where / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            target = name
            if ".layers." in name:
                idx = int(name.split(".layers.")[1].split(".")[0])
                if idx not in keep:
                    continue
                target = name.replace(f".layers.{idx}.", f".layers.{keep.index(idx)}.")
            if target in own:
                with torch.no_grad():
                    own[target].copy_(f.get_tensor(name))
    model.tie_weights()
    model.requires_grad_(False)
    model.config.use_cache = False
    return model, load_tokenizer(cfg), total


def _edge_process(conn, k: int, m: int) -> None:
    """The edge: the whole base (it holds the middle; memory is not measured here), its blocks' LoRA."""
    from fedlora.config import LoraConfig
    from fedlora.model import load_base_model, wrap_lora
    from fedlora.split import EdgeHalf, SplitCut

    base, _ = load_base_model(_model_cfg())
    model = wrap_lora(base, LoraConfig(), init_seed=42)
    model.train()
    edge = EdgeHalf(model, SplitCut(k, m), _train_cfg())
    conn.send("ready")
    while True:
        op, *args = conn.recv()
        if op == "forward":
            conn.send(edge.forward(*args))
        elif op == "backward":
            conn.send(edge.backward(*args))
        elif op == "step":
            edge.step(*args)
        else:
            conn.send(edge.seconds)
            return


class PipeLink:
    """A SplitLink over a multiprocessing pipe (the bench's cross-process link; a deployment's is a TLS stream)."""

    def __init__(self, conn):
        self.conn, self.bytes_up, self.bytes_down = conn, 0, 0

    def forward(self, hidden, attention_mask):
        self.conn.send(("forward", hidden.detach(), attention_mask.to(__import__("torch").uint8)))
        out = self.conn.recv()
        self.bytes_up += hidden.numel() * hidden.element_size() + attention_mask.numel()
        self.bytes_down += out.numel() * out.element_size()
        return out

    def backward(self, grad):
        self.conn.send(("backward", grad.detach()))
        back, norm = self.conn.recv()
        self.bytes_up += grad.numel() * grad.element_size()
        self.bytes_down += back.numel() * back.element_size() + 8
        return back, norm

    def step(self, lr, clip_coef):
        self.conn.send(("step", lr, clip_coef))
        self.bytes_up += 16


def child(kind: str, k: int, m: int) -> None:
    import torch

    torch.set_num_threads(1)
    from fedlora.config import LoraConfig
    from fedlora.model import wrap_lora
    from fedlora.train import train_local

    out = {"kind": kind, "k": k, "m": m, "rss_imports_mib": rss_mib()}
    t0 = time.perf_counter()
    if kind == "full":
        from fedlora.model import load_base_model

        base, tok = load_base_model(_model_cfg())
        model = wrap_lora(base, LoraConfig(), init_seed=42)
        out["rss_model_mib"] = rss_mib()
        out["base_loss"] = _first_batch_loss(model, tok, None)
        result = train_local(model, _data(tok), _train_cfg(), pad_id=tok.pad_token_id, seed=3)
        out["blocks_on_device"] = len(base.model.layers)
    else:
        import multiprocessing as mp

        from fedlora.split import DeviceHalf, SplitCut

        ctx = mp.get_context("spawn")
        mine, theirs = ctx.Pipe()
        edge = ctx.Process(target=_edge_process, args=(theirs, k, m))
        edge.start()
        base, tok, total = _device_only_model(k, m)
        model = wrap_lora(base, LoraConfig(), init_seed=42)
        out["rss_model_mib"] = rss_mib()
        assert conn_ready(mine)
        link = PipeLink(mine)
        half = DeviceHalf(model, SplitCut(k, m), link)  # on the device's own k+m-block model
        # B = 0 at the LoRA init, so the first batch's loss is the base model's whatever A is: it must
        # equal the full device's (the device's renumbered blocks get another A than the full model's).
        out["base_loss"] = _first_batch_loss(model, tok, half.hidden)
        result = train_local(model, _data(tok), _train_cfg(), pad_id=tok.pad_token_id, seed=3, split=half)
        mine.send(("close",))
        out["edge_seconds"] = mine.recv()
        edge.join(60)
        out.update(blocks_on_device=len(base.model.layers), model_blocks=total, bytes_up=link.bytes_up,
                   bytes_down=link.bytes_down)
    out.update(peak_mib=maxrss_mib(), first_loss=result.loss, steps=result.steps, seconds=time.perf_counter() - t0)
    print(MARK + json.dumps(out), flush=True)


def _first_batch_loss(model, tok, hidden_of) -> float:
    import torch

    from fedlora.data import batches
    from fedlora.train import answer_loss

    batch = next(batches(_data(tok), BATCH, tok.pad_token_id, shuffle=False, seed=0))
    with torch.no_grad():
        loss, count = answer_loss(model, batch, hidden_of=hidden_of)
    return float(loss) / count


def conn_ready(conn) -> bool:
    return conn.recv() == "ready"


def memory(args) -> None:
    runs = [("full", 0, 0)] + [("split", int(c.split(":")[0]), int(c.split(":")[1])) for c in args.cuts.split(",")]
    results = []
    with bench_lock(what="split memory"):
        for kind, k, m in runs:
            cmd = [sys.executable, __file__, "_child", kind, str(k), str(m)]
            env = dict(os.environ, OMP_NUM_THREADS="1")
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)), None)
            if line is None:
                raise SystemExit(f"{kind} {k}:{m} failed:\n{proc.stderr[-3000:]}")
            results.append(json.loads(line[len(MARK):]))
    rows = [[r["kind"], f"{r['k']}:{r['m']}" if r["kind"] == "split" else "-", r["blocks_on_device"],
             r["rss_imports_mib"], r["rss_model_mib"], r["peak_mib"], r["peak_mib"] - r["rss_imports_mib"],
             r["base_loss"], r["first_loss"], r["seconds"] / r["steps"]] for r in results]
    print(table(rows, ["device", "k:m", "blocks", "imports MiB", "model MiB", "peak MiB", "peak-imports", "base loss",
                       "train loss", "s/step"], digits=4))
    write_json(RESULTS / "split_memory.json", {**provenance("split memory", vars(args)), "results": results})


# ------------------------------------------------------------------------------ network


def _smollm2_shape():
    from fedlora.world.splitplan import ModelShape

    lora = 8 * 576 + 576 * 8 + 8 * 576 + 192 * 8  # q: A 8x576 + B 576x8; v: A 8x576 + B 192x8 (r=8)
    return ModelShape(num_layers=30, hidden=576, intermediate=1536, vocab=49152, heads=9, kv_heads=3, tied=True,
                      weight_bytes=4, lora_per_layer=lora)


def network(args) -> None:
    from fedlora.config import compose
    from fedlora.run_settings import resolve_run
    from fedlora.world.netsim import SplitTraffic, simulate_round
    from fedlora.world.splitplan import SplitCut, choose

    shape = _smollm2_shape()
    adapter = shape.lora_per_layer * shape.num_layers * 4  # fp32, every block
    act = shape.activation_bytes(BATCH, SEQ)  # fp32 base: 4 x 256 x 576 x 4 = 2.36 MB
    msg_up = act + BATCH * SEQ  # activations + padding mask
    rows, out = [], []
    for mbps in args.speeds:
        cfg = compose(["topology=small6g", "privacy=none", "federation.num_clients=8", "topology.mobility.model=none",
                       f"topology.links.end_neighbourhood.bandwidth_mbps={mbps}", "model.dtype=float32",
                       f"train.batch_size={BATCH}", f"train.max_seq_len={SEQ}"])
        tree = resolve_run(cfg).tree
        clients = tree.clients
        for steps in args.steps:
            train = cfg.train
            train.local_steps = steps
            plain_s, split_s, traffic, up_split = {}, {}, {}, {}
            for c in clients:
                access = tree.links[tree.first_hop(tree.initial[c])]
                full = choose(shape, train, tree.profile(c), access, split=False)
                plain_s[c] = steps * full.step_s * tree.profile(c).compute_speed  # reference seconds
                cut = SplitCut(1, 0)
                tokens = BATCH * SEQ
                dev_flops = (cut.k * 6 * shape.block_params * tokens + 3 * shape.vocab * shape.hidden * tokens)
                edge_flops = (shape.num_layers - 1) * 6 * shape.block_params * tokens
                split_s[c] = steps * dev_flops / (train.split.reference_gflops * 1e9)
                traffic[c] = SplitTraffic(steps, steps * (msg_up + act + 16), steps * (2 * act + 8),
                                          steps * edge_flops / (train.split.reference_gflops * 1e9), train.split.edge_speed)
                up_split[c] = shape.lora_per_layer * 1 * 4  # the device's own block's tensors
            p = simulate_round(tree, tree.initial, 1, selected=clients, train_s=plain_s, adapter_bytes=adapter, seed=0)
            s = simulate_round(tree, tree.initial, 1, selected=clients, train_s=split_s, adapter_bytes=adapter,
                               up_bytes=up_split, seed=0, split=traffic)
            survivors = len(p.survivors)
            per_dev_plain = (p.bytes_up["end->neighbourhood"] + p.bytes_down["end->neighbourhood"]) / survivors
            per_dev_split = (s.bytes_up["end->neighbourhood"] + s.bytes_down["end->neighbourhood"]) / len(s.survivors)
            out.append({"access_mbps": mbps, "local_steps": steps, "bytes_per_device_plain": per_dev_plain,
                        "bytes_per_device_split": per_dev_split, "round_s_plain": p.sim_network_s,
                        "round_s_split": s.sim_network_s})
            rows.append([mbps, steps, per_dev_plain / 1e6, per_dev_split / 1e6, p.sim_network_s, s.sim_network_s])
    crossover = {}
    for mbps in args.speeds:
        more = [o["local_steps"] for o in out if o["access_mbps"] == mbps and
                o["bytes_per_device_split"] > o["bytes_per_device_plain"]]
        crossover[mbps] = min(more) if more else None
    print(table(rows, ["access Mbit/s", "local steps", "MB/device plain", "MB/device split", "round s plain",
                       "round s split"]))
    print(f"adapter {adapter / 1e6:.2f} MB (fp32, r=8 q,v, 30 blocks); activations {act / 1e6:.2f} MB per message; "
          f"split sends more bytes than plain from local steps: {crossover}")
    write_json(RESULTS / "split_network.json", {**provenance("split network", {"speeds": args.speeds,
                                                                                "steps": args.steps}),
                                                 "results": out, "crossover_steps": crossover})


# ------------------------------------------------------------------------------ choice


def choice(args) -> None:
    from fedlora.config import DeviceProfileConfig, compose
    from fedlora.run_settings import resolve_run
    from fedlora.world.splitplan import SplitCut, choose, device_memory_mb, step_seconds

    cfg = compose(["topology=small6g", "privacy=none", "model.dtype=bfloat16", "train.gradient_checkpointing=true"])
    tree = resolve_run(cfg).tree
    shape = _smollm2_shape()
    shape = type(shape)(**{**shape.__dict__, "weight_bytes": 2})
    profiles = dict(tree.profiles)
    profiles["pizero2"] = DeviceProfileConfig(compute_speed=0.05, memory_gb=0.5, uplink_mbps=20, downlink_mbps=50,
                                              latency_ms=20)
    access = tree.links["end->neighbourhood"]
    fixed = [SplitCut(1, 0), SplitCut(2, 1), SplitCut(4, 4), SplitCut(8, 8), SplitCut(15, 14)]
    rows, out = [], []
    for name, prof in sorted(profiles.items()):
        for n_split in args.split_in_cell:
            chosen = choose(shape, cfg.train, prof, access, split=True, split_in_cell=n_split)
            full = choose(shape, cfg.train, prof, access, split=False)
            entry = {"profile": name, "split_in_cell": n_split, "chosen": chosen.record(), "full": full.record(),
                     "fixed": {}}
            for cut in fixed:
                mem = device_memory_mb(shape, cut, cfg.train)
                entry["fixed"][f"{cut.k}:{cut.m}"] = {
                    "step_s": step_seconds(shape, cut, cfg.train, prof, access, n_split), "memory_mb": mem,
                    "fits": mem <= prof.memory_gb * 1024 * cfg.train.split.usable_memory}
            out.append(entry)
            fx = " ".join(f"{k}={v['step_s']:.2f}{'' if v['fits'] else '!'}" for k, v in entry["fixed"].items())
            rows.append([name, prof.memory_gb, n_split, f"{chosen.cut.k}:{chosen.cut.m}", chosen.step_s, chosen.memory_mb,
                         f"{full.step_s:.2f}{'' if full.fits else '!'}", fx])
    print(table(rows, ["profile", "mem GB", "split/cell", "chosen k:m", "step s", "MB", "full step s",
                       "fixed cuts k:m=step s (! = does not fit)"]))
    write_json(RESULTS / "split_choice.json", {**provenance("split choice", {}), "results": out})


# ------------------------------------------------------------------------------ quality


def quality(args) -> None:
    """Held-out loss per round on the medical data (non-IID) at the same device steps: plain FL, every
    device split, and a mix (auto: the phones split). Tiny model (4 blocks) in-process."""
    import tempfile

    from _common import MEDICAL, require_medical

    from fedlora.config import compose
    from fedlora.roles.cloud import run_federation
    from fedlora.roles.local import InProcessTransport

    require_medical(MEDICAL)
    base = ["model=tiny", "model.tiny.num_hidden_layers=4", "data=medical", f"data.path={MEDICAL}", "privacy=none",
            "topology=small6g", "topology.mobility.model=none", "federation.num_clients=8", "federation.fraction=0.5",
            f"federation.rounds={args.rounds}", "train.local_steps=2", "train.max_seq_len=128",
            "data.max_eval_examples=32", "progress=false", "train.lr=0.01"]
    runs = {"plain": [], "split": ["train.mode=split", "train.split.k=1", "train.split.m=1"],
            "mix": ["train.mode=auto", "topology.profiles.phone.memory_gb=0.216", "train.split.runtime_mb=0"]}
    out = {}
    with bench_lock(what="split quality"), tempfile.TemporaryDirectory() as tmp:
        for name, extra in runs.items():
            run_dir = Path(tmp) / name
            run_federation(compose(base + extra), run_dir, InProcessTransport(8))
            recs = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
            out[name] = {"eval_loss": [r["eval_loss"] for r in recs],
                         "split_devices": [len((r.get("split") or {}).get("split_clients", [])) for r in recs],
                         "devices": [len(r["participants"]) for r in recs]}
    rows = [[name, " ".join(f"{x:.4f}" for x in o["eval_loss"]), " ".join(f"{s}/{d}" for s, d in
                                                                         zip(o["split_devices"], o["devices"]))]
            for name, o in out.items()]
    print(table(rows, ["run", "held-out loss per round", "split/devices per round"]))
    write_json(RESULTS / "split_quality.json", {**provenance("split quality", {"base": base, "runs": runs}),
                                                 "results": out})


# ------------------------------------------------------------------------------ secure


def secure(args) -> None:
    """Per device and round, the bytes of its upload besides the activations: full vs split, plain vs secure."""
    import tempfile

    from fedlora.config import compose
    from fedlora.roles.cloud import run_federation
    from fedlora.roles.local import InProcessTransport

    base = ["model=tiny", "model.tiny.num_hidden_layers=4", "topology=small6g", "topology.mobility.model=none",
            "federation.num_clients=8", "federation.rounds=1", "federation.fraction=1.0", "train.local_steps=2",
            "train.max_seq_len=128", "data.records_per_client=12", "data.max_eval_examples=8", "progress=false",
            "topology.profile_mix={rpi4: 0, phone: 0, car: 0, laptop: 1.0}", "topology.profiles.laptop.availability=1.0"]
    privacy = {"plain": ["privacy=none"], "secagg": ["privacy=secagg", "privacy.clip=1.0"],
               "secagg packed": ["privacy=secagg", "privacy.clip=1.0", "privacy.packing=auto"]}
    modes = {"full": [], "split 1:1": ["train.mode=split", "train.split.k=1", "train.split.m=1"]}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for (p, p_extra), (m, m_extra) in ((a, b) for a in privacy.items() for b in modes.items()):
            run_dir = Path(tmp) / f"{p}-{m}".replace(" ", "_").replace(":", "")
            run_federation(compose(base + p_extra + m_extra), run_dir, InProcessTransport(8))
            (r,) = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
            up = r["bytes"]["up"]["end->neighbourhood"]
            act = (r.get("split") or {}).get("activation_bytes", {}).get("up", {}).get("end->neighbourhood", 0)
            out[f"{p}, {m}"] = {"devices": len(r["participants"]), "access_up_bytes": up, "activation_up_bytes": act,
                                "update_bytes_per_device": (up - act) / len(r["participants"])}
    rows = [[name, o["devices"], f"{o['update_bytes_per_device']:,.0f}", f"{o['activation_up_bytes']:,}"]
            for name, o in out.items()]
    print(table(rows, ["run", "devices", "update B / device", "activations B (all)"]))
    write_json(RESULTS / "split_secure.json", {**provenance("split secure"), "config": {"base": base, "privacy": privacy,
                                                                                       "modes": modes}, "results": out})


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    mem = sub.add_parser("memory")
    mem.add_argument("--cuts", default="1:0,2:1")
    net = sub.add_parser("network")
    net.add_argument("--speeds", type=float, nargs="+", default=[1000.0, 20.0])
    net.add_argument("--steps", type=int, nargs="+", default=[1, 2, 5, 10, 20])
    ch = sub.add_parser("choice")
    ch.add_argument("--split-in-cell", type=int, nargs="+", default=[1, 8])
    q = sub.add_parser("quality")
    q.add_argument("--rounds", type=int, default=3)
    sub.add_parser("secure")
    args = ap.parse_args()
    {"memory": memory, "network": network, "choice": choice, "quality": quality, "secure": secure}[args.what](args)


if __name__ == "__main__":
    main()
