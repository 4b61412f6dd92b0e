"""Secure aggregation in numbers: fedlora.secure vs Flower's legacy SecAgg+, same vectors, same clients.

For SmolLM2-135M LoRA updates -- r=8 on q,v (460,800 parameters) and r=16 on every linear
layer (4,884,480; from the model's shapes: hidden 576, MLP 1536, 30 layers, 3 KV heads of
64) -- filled with LoRA-delta-like values (normal, std 1e-3, float32, a fresh draw per
client), in cells of 10, 100 and 1,000 clients, it measures:

1. client crypto time per round (fedlora: advertise + share_keys + encode + masked_input +
   unmask; Flower: setup + share_keys + collect_masked_vectors + unmask), next to the local
   training time of one round (``--local-steps`` x the fastest SmolLM2 step measured in
   ``bench/results/client_memory.json``; aim < 5 %);
2. upload bytes per client per round vs the plaintext fp32 update (aim <= 1.0x);
3. side by side, in one run: time per round on the client and server side, upload bytes and
   the max abs error of the decoded SUM against the float64 sum of the same float32 updates;
4. unmasking time at the unmasking tier vs the number of clients that drop after sharing
   keys and before uploading (the expensive case: their pairwise masks must be rebuilt).

fedlora is driven only through ``fedlora.secure``'s public API, in the order of
``run_cell_session`` (which it calls): ``Enrolment`` (over ``SimulatedIdentities``) for identities and the signed header,
``CellClient``/``NeighbourhoodAggregator``/``Unmasker`` role objects wrapped in timers,
then ``remove_masks`` + ``decode_sum`` at the cloud. Defaults as shipped: b = 16, clip 0.05,
complete graph up to 100 clients with t = n // 2 + 1, Harary k = 52, t = 37 at n = 1,000
(``secagg_plus_parameters``). Every client has n_max = 20 examples (weight 1).

Flower 1.41's SecAgg+ lives only on the legacy API (``secaggplus_mod`` +
``SecAggPlusWorkflow``). What is reproduced, exactly:

* client: the mod's own stage functions ``_setup``, ``_share_keys``,
  ``_collect_masked_vectors`` and ``_unmask`` of ``flwr.client.mod.secure_aggregation.
  secaggplus_mod`` are called with a ``SecAggPlusState`` and the config dicts the workflow
  sends (no Message/Context/gRPC around them): SECP384R1 key pairs in PEM, pycryptodome
  Shamir over GF(2^128) in 16-byte chunks, Fernet share encryption, quantisation with
  clipping range 8.0 and quantisation range 2^22, stochastic rounding with numpy's global
  RNG, masks from ``pseudo_rand_gen`` (numpy RandomState with a 32-bit seed) as int64
  arrays mod 2^32, the weight factor as an extra array;
* server: the arithmetic of ``SecAggPlusWorkflow`` re-typed here around Flower's own
  primitives (it cannot run without a Grid): the ring neighbour sets of ``setup_stage``,
  the ciphertext routing of ``share_keys_stage``, ``bytes_to_ndarray`` + ``parameters_addition``
  + ``parameters_mod`` of ``collect_masked_vectors_stage`` and the ``unmask_stage`` loop
  (``combine_shares``, ``pseudo_rand_gen``, ``generate_shared_key``, ``dequantize``, the
  offset and the 1 / total-weight factor).
* ``max_weight`` is set to the clients' example count (20), so every weight is exactly 1
  -- Flower's most precise setting; with its default ``max_weight=1000`` each update is
  multiplied by 0.02 before quantisation (``flower_err_default_weight`` column, computed on
  the mask-free path).
* Bytes: payload bytes of what each client sends (keys, ciphertexts, ``np.save`` of the
  masked int64 arrays, share lists; fedlora: every field of its messages), no envelope.

What fits the time cap (``--quick`` runs a smaller set): fedlora runs whole cells end to end
(every client, every stage) except n = 1,000 at 4.9 M, where all 1,000 clients advertise
and share keys for real and a sample of ``--sample`` clients encode and mask (their unmask
response is vector-size independent: taken from the 460,800 run). Flower runs whole cells
at n = 10; at n = 100 and 1,000 its SecAgg+ costs seconds per client (pure-Python Shamir,
numpy RandomState masks), so a sample of ``--sample`` clients runs every client stage for
real (their neighbours' share ciphertexts are real Fernet encryptions under real ECDH keys of
well-formed random shares), the server's per-client unmask cost (combine t real shares +
regenerate the mask, or rebuild a dropped client's pair masks) is measured on the sample and
multiplied out (marked ``extrapolated``), and the decoding error comes from the mask-free
path (quantise every client, add mod 2^32, dequantise as the workflow does) -- shown
bit-identical to the masked end-to-end result at n = 10.

Run (takes the benchmark lock itself; the default set took 18 min wall on the shared 2-core box
under load 4-8, the two end-to-end n = 1,000 cells 4-5 min each -- over the ~15 min aim):

    python bench/secagg.py            # default set, results in bench/results/secagg.json + .log
    python bench/secagg.py --quick    # smoke run (~30 s): bench/results/secagg_quick.json
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_LOCK, RESULTS, bench_lock, code_version, machine, table, write_json  # noqa: E402

from fedlora.secure import EncodingConfig, NeighbourhoodAggregator, Stage, TensorLayout, decode_sum  # noqa: E402
from fedlora.secure.graph import secagg_plus_parameters  # noqa: E402
from fedlora.secure.identities import SimulatedIdentities  # noqa: E402
from fedlora.secure.session import run_cell_session  # noqa: E402
from fedlora.secure.simulation import Enrolment  # noqa: E402

# SmolLM2-135M (HuggingFaceTB/SmolLM2-135M config.json): hidden 576, intermediate 1536,
# 30 layers, 9 heads / 3 KV heads of 64 -> q,o: 576x576, k,v: 576->192.
SMOLLM2 = {"hidden": 576, "intermediate": 1536, "layers": 30, "kv_dim": 3 * 64}
PROJ = {  # name: (in_features, out_features)
    "self_attn.q_proj": (576, 576), "self_attn.k_proj": (576, 192), "self_attn.v_proj": (576, 192),
    "self_attn.o_proj": (576, 576), "mlp.gate_proj": (576, 1536), "mlp.up_proj": (576, 1536),
    "mlp.down_proj": (1536, 576),
}
SIZES = {"r8_qv": (8, ("self_attn.q_proj", "self_attn.v_proj")), "r16_all": (16, tuple(PROJ)),
         "r1_q": (1, ("self_attn.q_proj",))}  # r1_q (34,560): the smoke test only
VALUE_STD = 1e-3
EXAMPLES = 20  # every client trains on 20 examples (5 steps x batch 4) and has weight 1
FLWR_CLIP, FLWR_QRANGE, FLWR_MOD = 8.0, 2**22, 2**32  # SecAggPlusWorkflow defaults
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
_clock = ["cpu"]


def clock() -> float:
    """The clock every stage is timed with: process CPU time by default (single-threaded
    crypto on a shared 2-core box: wall time there mostly measures the other users), or
    wall time with ``--clock wall``."""
    return CLOCKS[_clock[0]]()


def lora_shapes(size: str) -> list[tuple[str, tuple[int, int]]]:
    """PEFT's tensor names and shapes of a SmolLM2-135M LoRA adapter (A: r x in, B: out x r)."""
    rank, modules = SIZES[size]
    out = []
    for layer in range(SMOLLM2["layers"]):
        for m in modules:
            fin, fout = PROJ[m]
            prefix = f"base_model.model.model.layers.{layer}.{m}"
            out += [(f"{prefix}.lora_A.weight", (rank, fin)), (f"{prefix}.lora_B.weight", (fout, rank))]
    return out


def num_params(size: str) -> int:
    return sum(math.prod(s) for _, s in lora_shapes(size))


class Updates(Mapping):
    """Client -> (update, examples), drawn on access (deterministic per client) so 1,000 x 4.9 M
    float32 updates never sit in memory at once."""

    def __init__(self, ids: list[str], size: str, seed: int):
        self.ids, self.shapes, self.seed = ids, lora_shapes(size), seed
        self.index = {u: i for i, u in enumerate(ids)}
        self.total = sum(math.prod(s) for _, s in self.shapes)

    def flat(self, u: str) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.index[u]])
        return rng.standard_normal(self.total, dtype=np.float32) * np.float32(VALUE_STD)

    def tensors(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        out, pos = {}, 0
        for name, shape in self.shapes:
            n = math.prod(shape)
            out[name] = flat[pos:pos + n].reshape(shape)
            pos += n
        return out

    def __getitem__(self, u: str):
        return self.tensors(self.flat(u)), EXAMPLES

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def float_sum(self, ids) -> np.ndarray:
        acc = np.zeros(self.total, dtype=np.float64)
        for u in ids:
            acc += self.flat(u)
        return acc


# ---------------------------------------------------------------------------- helpers


class Timed:
    """Wraps a role object: every method call adds its seconds to ``times[name]`` and the
    payload bytes of what it returns to ``bytes[name]``."""

    def __init__(self, obj: Any):
        self._obj, self.times, self.bytes = obj, {}, {}

    def __getattr__(self, name: str):
        attr = getattr(self._obj, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            t0 = clock()
            try:
                result = attr(*args, **kwargs)
            finally:
                self.times[name] = self.times.get(name, 0.0) + clock() - t0
            self.bytes[name] = self.bytes.get(name, 0) + payload_bytes(result)
            return result

        return call


def payload_bytes(obj: Any) -> int:
    """Bytes of a message's fields: bytes/str as is, arrays by nbytes, ints as 8, recursively."""
    if obj is None:
        return 0
    if isinstance(obj, (bytes, bytearray)):
        return len(obj)
    if isinstance(obj, str):
        return len(obj.encode())
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, (bool, int, float, np.integer, np.floating)):
        return 8
    if dataclasses.is_dataclass(obj):
        return sum(payload_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if isinstance(obj, Mapping):
        return sum(payload_bytes(k) + payload_bytes(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return sum(payload_bytes(x) for x in obj)
    return 0


def pick(ids: list, count: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(ids, size=min(count, len(ids)), replace=False).tolist()) if count else []


# ------------------------------------------------------------------------------ fedlora

CLIENT_STAGES = ("advertise", "share_keys", "encode", "masked_input", "unmask")
UPLOADS = ("advertise", "share_keys", "masked_input", "unmask")


def fedlora_cell(n: int, size: str, *, drops: int = 0, seed: int = 0, sample: int | None = None) -> dict:
    """One fedlora cell round. ``sample``: only that many clients encode + mask (no unmasking)."""
    ids = [f"c{i:04d}" for i in range(n)]
    updates = Updates(ids, size, seed)
    k, t = secagg_plus_parameters(n)
    enrol = Enrolment(SimulatedIdentities(int.from_bytes(os.urandom(8), "big")))  # keys and rounding from a fresh secret seed
    for u in ids:
        enrol.enroll(u)
    unmasker = Timed(enrol.unmasker("cloud", 1))
    layout_ref = {name: np.zeros(shape, dtype=np.float32) for name, shape in updates.shapes}
    config = EncodingConfig(max_examples=EXAMPLES)
    header = enrol.cell_header(run_id="bench", server_round=1, cell="cell0", aggregator="agg0", unmasker=unmasker._obj,
                               global_adapter=layout_ref, threshold=t, max_clients=n, encoding=config)
    layout = TensorLayout.of(layout_ref)
    clients = {u: Timed(enrol.client(u, header)) for u in ids}
    aggregator = Timed(NeighbourhoodAggregator("agg0", enrol.enroll("agg0"), enrol.registry, header, cloud_id="cloud"))
    row: dict[str, Any] = {"system": "fedlora", "n": n, "size": size, "params": updates.total, "k": k, "t": t,
                           "drops": drops}
    if sample is not None:  # advertise + share keys for all, then encode + mask for a sample
        for u in ids:
            aggregator.receive_advert(clients[u].advertise(header))
        roster = aggregator.close_advertising()
        for u in roster.members:
            aggregator.receive_shares(clients[u].share_keys(roster))
        deliveries = aggregator.close_sharing()
        sampled = pick(ids, sample, seed + 1)
        for u in sampled:
            clients[u].masked_input(deliveries[u], clients[u].encode(*updates[u]))
        row.update(how=f"sampled: all {n} advertise + share keys, {len(sampled)} encode + mask", measured=sampled)
    else:
        dropped = set(pick(ids, drops, seed + 2))
        outcome = run_cell_session(header, clients, updates, aggregator, unmasker,
                                   drop_at={u: Stage.MASKED_INPUT for u in dropped})
        if not outcome.ok:
            row.update(how="end to end", aborted=str(outcome.aborted))
            return row
        t0 = clock()
        plain = outcome.unmasked()
        decoded = decode_sum(plain.vector, layout, config, plain.clients)
        cloud_s = clock() - t0
        got = np.concatenate([decoded.total[name].ravel() for name, _ in layout.tensors]) / EXAMPLES
        # layout.tensors is name-sorted; the float sum is in Updates order: reorder it.
        ref = updates.float_sum(outcome.survivors)
        ref = np.concatenate([updates.tensors(ref)[name].ravel() for name, _ in layout.tensors])
        row.update(how="end to end", survivors=len(outcome.survivors), measured=list(outcome.survivors),
                   max_abs_err_sum=float(np.max(np.abs(got - ref))),
                   mean_abs_err_sum=float(np.mean(np.abs(got - ref))),
                   quant_step=config.step(layout.tensors[0][0]),
                   aggregator_s=sum(aggregator.times.values()), unmask_s=unmasker.times.get("unmask_cell", 0.0),
                   cloud_decode_s=cloud_s)
        row["server_s"] = row["aggregator_s"] + row["unmask_s"] + cloud_s
    measured = row["measured"]
    per_client = [sum(clients[u].times.get(s, 0.0) for s in CLIENT_STAGES) for u in measured]
    row["client_s_mean"] = statistics.fmean(per_client)
    row["client_s_max"] = max(per_client)
    row["client_stage_s"] = {s: statistics.fmean(clients[u].times.get(s, 0.0) for u in measured) for s in CLIENT_STAGES}
    row["upload_bytes"] = statistics.fmean(sum(clients[u].bytes.get(s, 0) for s in UPLOADS) for u in measured)
    row["upload_stage_bytes"] = {s: statistics.fmean(clients[u].bytes.get(s, 0) for u in measured) for s in UPLOADS}
    del row["measured"]
    return row


# ------------------------------------------------------------------------------- Flower


def _flwr():
    """Flower's SecAgg+ pieces (imported late: flwr resets logging on import)."""
    import importlib
    import logging

    # (the package's __init__ exports a function of the same name as the module)
    mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    from flwr.common import bytes_to_ndarray, ndarrays_to_parameters
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import encrypt, generate_shared_key
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_combine,
        factor_extract,
        get_parameters_shape,
        parameters_addition,
        parameters_mod,
        parameters_multiply,
        parameters_subtraction,
    )
    from flwr.common.secure_aggregation.quantization import dequantize, quantize
    from flwr.common.secure_aggregation.secaggplus_constants import Key
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen, share_keys_plaintext_concat
    from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

    logging.getLogger("flwr").setLevel(logging.WARNING)
    return argparse.Namespace(**{k: v for k, v in locals().items() if k not in ("logging", "importlib")})


def flwr_neighbours(nids: list[int], num_shares: int, seed: int) -> dict[int, set[int]]:
    """``SecAggPlusWorkflow.setup_stage``: shuffle, then a ring of num_shares (self included)."""
    order = list(nids)
    np.random.default_rng(seed).shuffle(order)
    half, n = num_shares >> 1, len(order)
    return {nid: {order[(i + off) % n] for off in range(-half, half + 1)} for i, nid in enumerate(order)}


def flwr_params(n: int, k: int, t: int) -> tuple[int, int]:
    """(num_shares, threshold) matching fedlora's graph: everyone for complete cells, else k + 1 (odd)."""
    num_shares = n if k == n - 1 else k + 1
    if num_shares != n and num_shares % 2 == 0:
        num_shares += 1  # the workflow makes it odd itself
    return num_shares, t


def flwr_setup_config(F, n: int, num_shares: int, t: int, max_weight: float) -> dict:
    K = F.Key
    return {K.SAMPLE_NUMBER: n, K.SHARE_NUMBER: num_shares, K.THRESHOLD: t, K.CLIPPING_RANGE: FLWR_CLIP,
            K.TARGET_RANGE: FLWR_QRANGE, K.MOD_RANGE: FLWR_MOD, K.MAX_WEIGHT: max_weight}


def _ndarrays(updates: Updates, u: str) -> list[np.ndarray]:
    return list(updates[u][0].values())


def flwr_decode(F, masked_or_plain: list[np.ndarray], active: int) -> list[np.ndarray]:
    """The tail of ``unmask_stage``: mod, extract the weight factor, dequantize, offset, divide."""
    recon = F.parameters_mod(masked_or_plain, FLWR_MOD)
    q_total_ratio, recon = F.factor_extract(recon)
    inv = FLWR_QRANGE / q_total_ratio
    out = F.dequantize(recon, FLWR_CLIP, FLWR_QRANGE)
    offset = -(active - 1) * FLWR_CLIP
    for vec in out:
        vec += offset
        vec *= inv
    return out


def flwr_maskfree(F, updates: Updates, ids: list[str], max_weight: float, rng_seed: int | None = None) -> list[np.ndarray]:
    """What SecAgg+ decodes when the masks cancel: the client's quantisation, summed mod 2^32, decoded."""
    total = None
    for i, u in enumerate(ids):
        if rng_seed is not None:
            np.random.seed(rng_seed + i)  # same draws as the masked run's stochastic rounding
        ratio = EXAMPLES / max_weight
        q_ratio = round(ratio * FLWR_QRANGE)
        params = F.parameters_multiply(_ndarrays(updates, u), q_ratio / FLWR_QRANGE)
        q = F.factor_combine(q_ratio, F.quantize(params, FLWR_CLIP, FLWR_QRANGE))
        q = [a.astype(np.int64) for a in q]
        total = q if total is None else F.parameters_mod(F.parameters_addition(total, q), FLWR_MOD)
    return flwr_decode(F, total, len(ids))


def flwr_error(updates: Updates, ids: list[str], decoded_mean: list[np.ndarray]) -> float:
    """Max abs error of the decoded SUM (mean x clients, weights are 1) vs the float64 sum."""
    got = np.concatenate([a.ravel() for a in decoded_mean]) * len(ids)
    return float(np.max(np.abs(got - updates.float_sum(ids))))


def flwr_cell_setup(n: int, size: str, seed: int):
    """Flower's pieces, the cell's clients and updates, (num_shares, t) and the ring neighbours."""
    ids = [f"c{i:04d}" for i in range(n)]
    k, t = secagg_plus_parameters(n)
    num_shares, t = flwr_params(n, k, t)
    nids = list(range(1, n + 1))
    return _flwr(), ids, Updates(ids, size, seed), num_shares, t, nids, flwr_neighbours(nids, num_shares, seed)


def flower_cell(n: int, size: str, *, drops: int = 0, seed: int = 0, max_weight: float = float(EXAMPLES)) -> dict:
    """One SecAgg+ round, end to end, every client (the mod's stage functions) and the workflow's server math."""
    F, ids, updates, num_shares, t, nids, neigh = flwr_cell_setup(n, size, seed)
    K = F.Key
    name = dict(zip(nids, ids))
    times = {nid: {} for nid in nids}
    up = {nid: {} for nid in nids}
    server = {}

    def timed(sink: dict, key: str, fn, *args):
        t0 = clock()
        out = fn(*args)
        sink[key] = sink.get(key, 0.0) + clock() - t0
        return out

    states = {}
    cfg0 = flwr_setup_config(F, n, num_shares, t, max_weight)
    for nid in nids:
        st = F.mod.SecAggPlusState()
        st.nid = nid
        res = timed(times[nid], "setup", F.mod._setup, st, dict(cfg0))
        up[nid]["setup"] = len(res[K.PUBLIC_KEY_1]) + len(res[K.PUBLIC_KEY_2])
        states[nid] = st
    pks = {nid: [states[nid].pk1, states[nid].pk2] for nid in nids}
    fwd_ct = {nid: [] for nid in nids}
    fwd_src = {nid: [] for nid in nids}
    for nid in nids:
        res = timed(times[nid], "share_keys", F.mod._share_keys, states[nid], {str(v): pks[v] for v in neigh[nid]})
        up[nid]["share_keys"] = 8 * len(res[K.DESTINATION_LIST]) + sum(map(len, res[K.CIPHERTEXT_LIST]))
        t0 = clock()
        for dst, ct in zip(res[K.DESTINATION_LIST], res[K.CIPHERTEXT_LIST]):
            fwd_ct[dst].append(ct)
            fwd_src[dst].append(nid)
        server["route"] = server.get("route", 0.0) + clock() - t0
    node = {u: nid for nid, u in name.items()}
    dead = {node[u] for u in pick(ids, drops, seed + 2)}  # the same clients as fedlora_cell drops
    active = [nid for nid in nids if nid not in dead]
    masked = None
    for nid in nids:
        if nid in dead:
            continue
        params = F.ndarrays_to_parameters(_ndarrays(updates, name[nid]))
        np.random.seed(10_000 + active.index(nid))  # for the bit-exact check against the mask-free path
        res = timed(times[nid], "collect_masked_vectors", F.mod._collect_masked_vectors, states[nid],
                    {K.CIPHERTEXT_LIST: fwd_ct[nid], K.SOURCE_LIST: fwd_src[nid]}, EXAMPLES, params)
        blobs = res[K.MASKED_PARAMETERS]
        up[nid]["collect_masked_vectors"] = sum(map(len, blobs))
        t0 = clock()
        vec = [F.bytes_to_ndarray(b) for b in blobs]
        masked = vec if masked is None else F.parameters_addition(masked, vec)
        server["sum"] = server.get("sum", 0.0) + clock() - t0
    t0 = clock()
    masked = F.parameters_mod(masked, FLWR_MOD)
    server["sum"] += clock() - t0
    active_set = set(active)
    collected = {nid: [] for nid in nids}
    for nid in active:
        cfg = {K.ACTIVE_NODE_ID_LIST: list(neigh[nid] & active_set), K.DEAD_NODE_ID_LIST: list(neigh[nid] & dead)}
        res = timed(times[nid], "unmask", F.mod._unmask, states[nid], cfg)
        up[nid]["unmask"] = 8 * len(res[K.NODE_ID_LIST]) + sum(map(len, res[K.SHARE_LIST]))
        for owner, share in zip(res[K.NODE_ID_LIST], res[K.SHARE_LIST]):
            collected[owner].append(share)
    # unmask_stage's loop
    t0 = clock()
    shapes = F.get_parameters_shape(masked)
    for nid, shares in collected.items():
        if len(shares) < t:
            raise RuntimeError(f"Flower SecAgg+: not enough shares for node {nid}")
        secret = F.combine_shares(shares)
        if nid in active_set:
            masked = F.parameters_subtraction(masked, F.pseudo_rand_gen(secret, FLWR_MOD, shapes))
        else:
            for v in neigh[nid] - {nid}:
                key = F.generate_shared_key(F.bytes_to_private_key(secret), F.bytes_to_public_key(pks[v][0]))
                mask = F.pseudo_rand_gen(key, FLWR_MOD, shapes)
                masked = F.parameters_addition(masked, mask) if nid > v else F.parameters_subtraction(masked, mask)
    mean = flwr_decode(F, masked, len(active))
    server["unmask"] = clock() - t0
    active_ids = [name[nid] for nid in active]
    exact = flwr_maskfree(F, updates, active_ids, max_weight, rng_seed=10_000)
    bit_identical = all(np.array_equal(a, b) for a, b in zip(mean, exact))
    per_client = [sum(times[nid].values()) for nid in active]
    stages = ("setup", "share_keys", "collect_masked_vectors", "unmask")
    return {"system": "flower", "n": n, "size": size, "params": updates.total, "num_shares": num_shares, "t": t,
            "drops": drops, "how": "end to end", "survivors": len(active),
            "client_s_mean": statistics.fmean(per_client), "client_s_max": max(per_client),
            "client_stage_s": {s: statistics.fmean(times[nid].get(s, 0.0) for nid in active) for s in stages},
            "upload_bytes": statistics.fmean(sum(up[nid].values()) for nid in active),
            "upload_stage_bytes": {s: statistics.fmean(up[nid].get(s, 0) for nid in active) for s in stages},
            "server_s": sum(server.values()), "server_stage_s": server, "unmask_s": server["unmask"],
            "max_abs_err_sum": flwr_error(updates, active_ids, mean),
            "maskfree_bit_identical": bit_identical, "quant_step": 2 * FLWR_CLIP / FLWR_QRANGE}


def flower_sampled(n: int, size: str, *, sample: int, seed: int = 0, drop_levels: tuple[int, ...] = (0,),
                   error: bool = True) -> dict:
    """SecAgg+ at a size too slow to run whole: ``sample`` clients for real, server costs per client x n."""
    F, ids, updates, num_shares, t, nids, neigh = flwr_cell_setup(n, size, seed)
    K = F.Key
    cfg0 = flwr_setup_config(F, n, num_shares, t, float(EXAMPLES))
    states, setup_s = {}, {}
    for nid in nids:  # every client makes its two SECP384R1 pairs (cheap, and the others' keys are needed)
        st = F.mod.SecAggPlusState()
        st.nid = nid
        t0 = clock()
        F.mod._setup(st, dict(cfg0))
        setup_s[nid] = clock() - t0
        states[nid] = st
    pks = {nid: [states[nid].pk1, states[nid].pk2] for nid in nids}
    chunks = lambda secret_len: (secret_len // 16 + 1)  # noqa: E731  (pad to 16, then one 16-byte share per chunk)
    sampled = [nids[i] for i in pick(list(range(n)), sample, seed + 1)]
    rows = []
    for nid in sampled:
        st = states[nid]
        times, up = {"setup": setup_s[nid]}, {"setup": len(st.pk1) + len(st.pk2)}
        t0 = clock()
        res = F.mod._share_keys(st, {str(v): pks[v] for v in neigh[nid]})
        times["share_keys"] = clock() - t0
        up["share_keys"] = 8 * len(res[K.DESTINATION_LIST]) + sum(map(len, res[K.CIPHERTEXT_LIST]))
        # What the neighbours would forward to nid: real encryptions (real ECDH of their sk2 and
        # nid's pk2) of well-formed shares -- random bytes of the real share lengths.
        cts, srcs = [], []
        for v in sorted(neigh[nid] - {nid}):
            key = F.generate_shared_key(F.bytes_to_private_key(states[v].sk2), F.bytes_to_public_key(st.pk2))
            b_share = os.urandom(4 + 16 * chunks(32))
            sk_share = os.urandom(4 + 16 * chunks(len(states[v].sk1)))
            cts.append(F.encrypt(key, F.share_keys_plaintext_concat(v, nid, b_share, sk_share)))
            srcs.append(v)
        params = F.ndarrays_to_parameters(_ndarrays(updates, ids[nid - 1]))
        t0 = clock()
        res = F.mod._collect_masked_vectors(st, {K.CIPHERTEXT_LIST: cts, K.SOURCE_LIST: srcs}, EXAMPLES, params)
        times["collect_masked_vectors"] = clock() - t0
        up["collect_masked_vectors"] = sum(map(len, res[K.MASKED_PARAMETERS]))
        blobs = res[K.MASKED_PARAMETERS]
        t0 = clock()
        res = F.mod._unmask(st, {K.ACTIVE_NODE_ID_LIST: sorted(neigh[nid]), K.DEAD_NODE_ID_LIST: []})
        times["unmask"] = clock() - t0
        up["unmask"] = 8 * len(res[K.NODE_ID_LIST]) + sum(map(len, res[K.SHARE_LIST]))
        # Server, per client: add its upload; unmask it as an active client (combine t real
        # shares of a 32-byte seed, regenerate and subtract its self mask) and as a dropped one
        # (combine t real shares of its PEM sk1, rebuild and remove its pair masks).
        acc = [F.bytes_to_ndarray(b) for b in blobs]
        t0 = clock()
        vec = [F.bytes_to_ndarray(b) for b in blobs]
        acc = F.parameters_addition(acc, vec)
        add_s = clock() - t0
        shapes = F.get_parameters_shape(acc)
        seed_shares = F.create_shares(os.urandom(32), t, num_shares)[:t]
        t0 = clock()
        secret = F.combine_shares(seed_shares)
        acc = F.parameters_subtraction(acc, F.pseudo_rand_gen(secret, FLWR_MOD, shapes))
        active_s = clock() - t0
        sk_shares = F.create_shares(st.sk1, t, num_shares)[:t]
        t0 = clock()
        secret = F.combine_shares(sk_shares)
        for v in neigh[nid] - {nid}:
            key = F.generate_shared_key(F.bytes_to_private_key(secret), F.bytes_to_public_key(pks[v][0]))
            mask = F.pseudo_rand_gen(key, FLWR_MOD, shapes)
            acc = F.parameters_addition(acc, mask) if nid > v else F.parameters_subtraction(acc, mask)
        dead_s = clock() - t0
        rows.append({"times": times, "up": up, "add_s": add_s, "active_s": active_s, "dead_s": dead_s})
    stages = ("setup", "share_keys", "collect_masked_vectors", "unmask")
    add_s = statistics.fmean(r["add_s"] for r in rows)
    active_s = statistics.fmean(r["active_s"] for r in rows)
    dead_s = statistics.fmean(r["dead_s"] for r in rows)
    out = {"system": "flower", "n": n, "size": size, "params": updates.total, "num_shares": num_shares, "t": t,
           "drops": 0, "how": f"sampled: {len(rows)} clients run every stage; server = per-client costs x n (extrapolated)",
           "survivors": n,
           "client_s_mean": statistics.fmean(sum(r["times"].values()) for r in rows),
           "client_s_max": max(sum(r["times"].values()) for r in rows),
           "client_stage_s": {s: statistics.fmean(r["times"][s] for r in rows) for s in stages},
           "upload_bytes": statistics.fmean(sum(r["up"].values()) for r in rows),
           "upload_stage_bytes": {s: statistics.fmean(r["up"][s] for r in rows) for s in stages},
           "server_per_client_s": {"add": add_s, "unmask_active": active_s, "unmask_dropped": dead_s},
           "server_s": n * (add_s + active_s), "unmask_s": n * active_s,
           "unmask_vs_drops_s": {d: (n - d) * active_s + d * dead_s for d in drop_levels},
           "quant_step": 2 * FLWR_CLIP / FLWR_QRANGE}
    if error:
        out["max_abs_err_sum"] = flwr_error(updates, ids, flwr_maskfree(F, updates, ids, float(EXAMPLES)))
        out["error_how"] = "mask-free path (every client quantised, summed mod 2^32, decoded)"
    return out


# ---------------------------------------------------------------------------------- main


def training_seconds(local_steps: int) -> tuple[float, str]:
    """Local training time of one round: local_steps x the fastest SmolLM2 step measured."""
    path = RESULTS / "client_memory.json"
    data = json.loads(path.read_text())
    best = min(data["results"], key=lambda r: r["step_s"])
    what = (f"{local_steps} x {best['step_s']:.2f} s ({best['dtype']}, {best['threads']} threads, {best['variant']}) "
            f"from {path.name}")
    return local_steps * best["step_s"], what


def plan(quick: bool) -> dict:
    if quick:
        return {"cells": [(10, "r8_qv", "full"), (30, "r8_qv", "full"), (10, "r16_all", "full")],
                "flower_sampled": [], "drops": {10: (0, 1, 4)}, "sample": 2}
    return {
        "cells": [(10, "r8_qv", "full"), (10, "r16_all", "full"), (100, "r8_qv", "full"), (100, "r16_all", "full"),
                  (1000, "r8_qv", "full"), (1000, "r16_all", "sampled")],
        "flower_sampled": [(100, "r8_qv"), (100, "r16_all"), (1000, "r8_qv"), (1000, "r16_all")],
        "drops": {10: (0, 1, 4), 100: (0, 10, 49), 1000: (0, 100)},
        "sample": 2,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run (~30 s)")
    ap.add_argument("--sample", type=int, default=None, help="clients timed in sampled cells (default 2)")
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--clock", choices=tuple(CLOCKS), default="cpu", help="time stages in CPU (default) or wall seconds")
    ap.add_argument("--no-lock", action="store_true", help="do not take the benchmark lock (smoke runs only)")
    ap.add_argument("--only", nargs="+", default=None, metavar="N:SIZE",
                    help="run only these cells of the plan, e.g. 1000:r16_all (use with --out)")
    ap.add_argument("--out", default=None, help="result json (default bench/results/secagg[_quick].json)")
    args = ap.parse_args(argv)
    p = plan(args.quick)
    if args.only:
        keep = {tuple(x.split(":")) for x in args.only}
        p["cells"] = [c for c in p["cells"] if (str(c[0]), c[1]) in keep]
        p["flower_sampled"] = [c for c in p["flower_sampled"] if (str(c[0]), c[1]) in keep]
    _clock[0] = args.clock
    sample = args.sample or p["sample"]
    out = Path(args.out) if args.out else RESULTS / ("secagg_quick.json" if args.quick else "secagg.json")
    train_s, train_what = training_seconds(args.local_steps)
    info = machine()
    rows: list[dict] = []
    log = io.StringIO()

    def say(*a):
        print(*a, flush=True)
        print(*a, file=log)

    t_start = time.time()
    with bench_lock(None if args.no_lock else DEFAULT_LOCK, what="secagg"):
        info["loadavg_when_locked"] = [round(x, 2) for x in os.getloadavg()]
        for n, size, how in p["cells"]:
            levels = p["drops"].get(n, (0,)) if size == "r8_qv" else (0,)
            for d in (levels if how == "full" else (0,)):
                t0 = time.time()
                row = fedlora_cell(n, size, drops=d, sample=None if how == "full" else sample)
                row["wall_s"] = time.time() - t0
                rows.append(row)
                say(f"fedlora n={n} {size} drops={d}: client {row.get('client_s_mean', 0):.3f} s, "
                    f"server {row.get('server_s', float('nan')):.3f} s, err {row.get('max_abs_err_sum', float('nan')):.2e} "
                    f"({row['wall_s']:.0f} s wall)")
            if n <= 10:
                for d in (levels if size == "r8_qv" else (0,)):
                    t0 = time.time()
                    row = flower_cell(n, size, drops=d)
                    row["wall_s"] = time.time() - t0
                    if d == 0:
                        dw = flower_default_weight_error(n, size)
                        row["flower_err_default_weight"] = dw
                    rows.append(row)
                    say(f"flower  n={n} {size} drops={d}: client {row['client_s_mean']:.3f} s, server {row['server_s']:.3f} s, "
                        f"err {row['max_abs_err_sum']:.2e}, mask-free bit-identical {row['maskfree_bit_identical']} "
                        f"({row['wall_s']:.0f} s wall)")
        for n, size in p["flower_sampled"]:
            t0 = time.time()
            row = flower_sampled(n, size, sample=sample, drop_levels=p["drops"].get(n, (0,)),
                                 error=not (n >= 1000 and size == "r16_all"))
            row["wall_s"] = time.time() - t0
            rows.append(row)
            say(f"flower  n={n} {size} sampled: client {row['client_s_mean']:.3f} s, server~ {row['server_s']:.1f} s, "
                f"err {row.get('max_abs_err_sum', float('nan')):.2e} ({row['wall_s']:.0f} s wall)")
        info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    total_s = time.time() - t_start
    fill_sampled_unmask(rows)
    say("")
    say(report(rows, train_s, train_what))
    say(f"\ntotal {total_s:.0f} s")
    result = {"benchmark": "secagg",
              "command": "python bench/secagg.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
              "machine": info, "code": code_version(),
              "settings": {"clock": args.clock, "value_std": VALUE_STD, "examples": EXAMPLES,
                           "fedlora_encoding": dataclasses.asdict(EncodingConfig(max_examples=EXAMPLES)),
                           "flower": {"clipping_range": FLWR_CLIP, "quantization_range": FLWR_QRANGE,
                                      "modulus_range": FLWR_MOD, "max_weight": float(EXAMPLES)},
                           "sizes": {s: num_params(s) for s in SIZES}, "sample": sample,
                           "training_s": train_s, "training": train_what, "total_s": total_s},
              "results": rows}
    write_json(out, result)
    out.with_suffix(".log").write_text(log.getvalue())
    print(f"wrote {out} and {out.with_suffix('.log')}")
    return 0


def flower_default_weight_error(n: int, size: str) -> float:
    """Flower's error with its default max_weight=1000 for 20-example clients (mask-free path)."""
    F = _flwr()
    ids = [f"c{i:04d}" for i in range(n)]
    updates = Updates(ids, size, 0)
    return flwr_error(updates, ids, flwr_maskfree(F, updates, ids, 1000.0))


def fill_sampled_unmask(rows: list[dict]) -> None:
    """fedlora's sampled cell has no unmask stage: borrow the (vector-size independent) unmask
    response time and bytes of the end-to-end cell with the same n."""
    for r in rows:
        if r["system"] == "fedlora" and r["how"].startswith("sampled"):
            src = next((x for x in rows if x["system"] == "fedlora" and x["n"] == r["n"] and x["how"] == "end to end"
                        and x["drops"] == 0), None)
            if src:
                r["client_stage_s"]["unmask"] = src["client_stage_s"]["unmask"]
                r["upload_stage_bytes"]["unmask"] = src["upload_stage_bytes"]["unmask"]
                r["client_s_mean"] += src["client_stage_s"]["unmask"]
                r["upload_bytes"] += src["upload_stage_bytes"]["unmask"]
                r["how"] += f"; unmask response from the {src['size']} cell"


def report(rows: list[dict], train_s: float, train_what: str) -> str:
    lines = [f"Local training per round: {train_s:.1f} s = {train_what}; stage times in {_clock[0]} seconds", ""]
    base = [r for r in rows if r["drops"] == 0 and "aborted" not in r]
    head = ["system", "n", "params", "client s", "% of training", "upload MB", "x fp32", "server s", "max |err| sum",
            "how"]
    body = []
    for r in sorted(base, key=lambda r: (r["n"], r["params"], r["system"])):
        fp32 = 4 * r["params"]
        body.append([r["system"], r["n"], f"{r['params']:,}", r["client_s_mean"], 100 * r["client_s_mean"] / train_s,
                     r["upload_bytes"] / 1e6, r["upload_bytes"] / fp32, r.get("server_s"),
                     f"{r['max_abs_err_sum']:.2e}" if "max_abs_err_sum" in r else "-",
                     r["how"][:60]])
    lines.append(table(body, head, digits=3))
    lines += ["", "Unmasking tier vs dropouts (drops after sharing keys, before upload):", ""]
    body = []
    for r in rows:
        if r["system"] == "fedlora" and r["how"] == "end to end":
            body.append(["fedlora", r["n"], f"{r['params']:,}", r["drops"], r.get("unmask_s"), r.get("server_s"),
                         r.get("aborted", "ok")[:50], "measured"])
        elif r["system"] == "flower" and r["how"] == "end to end":
            body.append(["flower", r["n"], f"{r['params']:,}", r["drops"], r.get("unmask_s"), r.get("server_s"), "ok",
                         "measured"])
        elif r["system"] == "flower" and "unmask_vs_drops_s" in r:
            for d, s in r["unmask_vs_drops_s"].items():
                body.append(["flower", r["n"], f"{r['params']:,}", d, s, None, "-", "extrapolated"])
    lines.append(table(sorted(body, key=lambda b: (b[1], b[2], b[0], b[3])),
                       ["system", "n", "params", "drops", "unmask s", "server s", "outcome", "how"], digits=3))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
