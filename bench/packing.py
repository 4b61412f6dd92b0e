"""Packed secure uploads in bytes: what a client sends per secure round vs its fp32 adapter, per bit width.

For SmolLM2-135M LoRA updates (``r8_qv``: r=8 on q,v, 460,800 values, the default adapter;
``r16_all``: r=16 on every linear layer, 4,884,480 values; shapes from ``bench/secagg.py``) it
runs one real cell session of ``--clients`` clients (default 10, the quality bench's flat
cell) per bit width b and packing (``off``: every coordinate as 32 bits, as before;
``auto``: the value coordinates in Z_2^k, k = b + ceil(log2 n), n = the ring's client bound)
and counts the bytes of the messages each client really sends, serialised as on the network
(``fedlora.secure.rounds.message``, the bytes a deployed device puts into its Flower reply):
the masked input alone and all four uploads (keys, shares, masked input, unmask response).
Ratios are against the fp32 adapter (``4 x values``, what a plain round uploads). Each session
is unmasked and decoded, and the decoded sum is checked to be the same with and without
packing (the packing changes only the wire form).

``--ring-clients 256`` sizes the ring for 256 clients instead of the cell (the issue's
example: b = 16 -> 24 bits).

Quality (``--quality NAME=JSON ...``): the held-out losses of ``bench/quality.py --methods fed``
runs (plain fp32 and secure at each b) are put into the same table. Bytes are exact and
deterministic; only the quality runs need the benchmark lock, and they take it themselves.

    .venv/bin/python bench/packing.py
    .venv/bin/python bench/packing.py --quality fp32=q-fp32.json b16=q-b16.json b12=q-b12.json b8=q-b8.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, provenance, table, write_json  # noqa: E402
from secagg import lora_shapes  # noqa: E402

BITS = (16, 12, 8)
UPLOADS = ("advertise", "share_keys", "masked_input", "unmask")


def cell_bytes(size: str, n: int, bits: int, sum_clients: int, seed: int = 0) -> dict:
    """One real cell session of ``n`` clients; the bytes each client sends, per message kind."""
    from fedlora.secure import EncodingConfig, NeighbourhoodAggregator, decode_sum
    from fedlora.secure.encoding import TensorLayout
    from fedlora.secure.identities import SimulatedIdentities
    from fedlora.secure.rounds import message, threshold_for
    from fedlora.secure.simulation import Enrolment
    from fedlora.secure.unmasker import remove_masks

    shapes = lora_shapes(size)
    zeros = {name: np.zeros(shape, np.float32) for name, shape in shapes}
    layout = TensorLayout.of(zeros)
    enc = EncodingConfig(bits=bits, clip=0.05, max_examples=20, sum_clients=sum_clients)
    enrol = Enrolment(SimulatedIdentities(1000 + seed))
    unmasker = enrol.unmasker("cloud", 1)
    header = enrol.cell_header(run_id="bench-packing", server_round=1, cell="cell0", aggregator="agg0", unmasker=unmasker,
                               global_adapter=zeros, threshold=threshold_for(n, 0.6, 100), max_clients=n, encoding=enc)
    ids = [f"c{i:03d}" for i in range(n)]
    clients = {u: enrol.client(u, header) for u in ids}
    agg = NeighbourhoodAggregator("agg0", enrol.enroll("agg0"), enrol.registry, header)
    sent = {s: [] for s in UPLOADS}

    def send(stage, msg):
        sent[stage].append(len(message(msg)))
        return msg

    for u in ids:
        agg.receive_advert(send("advertise", clients[u].advertise(header)))
    roster = agg.close_advertising()
    for u in roster.members:
        agg.receive_shares(send("share_keys", clients[u].share_keys(roster)))
    deliveries = agg.close_sharing()
    rng = np.random.default_rng(seed)  # bench data: LoRA-delta-like values, std 1e-3
    float_sum = {name: np.zeros(shape) for name, shape in shapes}
    for u in ids:
        update = {name: (rng.standard_normal(shape) * 1e-3).astype(np.float32) for name, shape in shapes}
        for name in update:
            float_sum[name] += update[name]
        agg.receive_masked_input(send("masked_input", clients[u].masked_input(deliveries[u], clients[u].encode(update, 20))))
    request, masked = agg.close_upload()
    for u in request.survivors:
        agg.receive_unmask_response(send("unmask", clients[u].unmask(request)))
    plain = remove_masks(masked, [unmasker.unmask_cell(agg.close_unmask())])
    decoded = decode_sum(plain.vector, layout, enc, plain.clients)
    fp32 = 4 * layout.num_values
    # the decoded mean against the float mean of the same updates (every client has n_max: weight 1)
    err = np.concatenate([(decoded.total[k] / 20 - float_sum[k]).ravel() / n for k in float_sum])
    scale = np.concatenate([np.abs(v).ravel() / n for v in float_sum.values()])
    return {"size": size, "values": layout.num_values, "clients": n, "bits": bits, "ring_clients": sum_clients,
            "ring_bits": enc.value_bits, "fp32_bytes": fp32,
            "masked_input_bytes": max(sent["masked_input"]), "upload_bytes": max(map(sum, zip(*sent.values()))),
            "per_message_bytes": {s: max(v) for s, v in sent.items()}, "decoded": decoded,
            "mean_abs_err_of_mean": float(np.mean(np.abs(err))), "rel_err_of_mean": float(np.mean(np.abs(err)) / np.mean(scale))}


def measure(sizes: list[str], n: int, ring_clients: int) -> list[dict]:
    rows = []
    for size in sizes:
        for bits in BITS:
            off = cell_bytes(size, n, bits, 0)
            on = cell_bytes(size, n, bits, ring_clients or n)
            same = all(np.array_equal(off["decoded"].total[k], on["decoded"].total[k]) for k in off["decoded"].total)
            for row in (off, on):
                row["packing"] = "auto" if row["ring_clients"] else "off"
                row["decoded_sum_same_as_unpacked"] = same
                row["masked_input_ratio"] = row["masked_input_bytes"] / row["fp32_bytes"]
                row["upload_ratio"] = row["upload_bytes"] / row["fp32_bytes"]
                del row["decoded"]
                rows.append(row)
    return rows


def quality_rows(specs: list[str]) -> dict:
    """NAME=JSON of bench/quality.py runs -> {name: {eval_loss, base, gain, secure settings}}."""
    out = {}
    for spec in specs:
        name, path = spec.split("=", 1)
        q = json.loads(Path(path).read_text())
        cfg, res = q["config"], q["results"]
        base, fed = res["base"]["eval_loss"], res["fed"]["eval_loss"]
        out[name] = {"eval_loss": fed, "base": base, "gain": base - fed, "curve": res["fed"]["curve"],
                     "privacy": cfg["privacy"]["mode"], "bits": cfg["privacy"]["bits"],
                     "packing": cfg["privacy"].get("packing", "off"), "overrides": q["overrides"], "json": path}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="r8_qv,r16_all")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--ring-clients", type=int, default=0, help="size the ring for this many clients (0: the cell)")
    p.add_argument("--quality", nargs="*", default=[], help="NAME=JSON of bench/quality.py runs (fp32, b16, b12, b8)")
    p.add_argument("--out", default=str(RESULTS / "packing.json"))
    args = p.parse_args()
    rows = measure([s for s in args.sizes.split(",") if s], args.clients, args.ring_clients)
    quality = quality_rows(args.quality)
    write_json(args.out, {**provenance("packing", machine()), "rows": rows, "quality": quality})
    print(f"Secure upload bytes per client and round / fp32 adapter bytes ({args.clients} clients in the cell, "
          "exact sizes of the serialised messages)")
    print(table([[r["size"], r["values"], r["bits"], r["packing"], r["ring_bits"], r["masked_input_bytes"],
                  r["masked_input_ratio"], r["upload_bytes"], r["upload_ratio"], r["decoded_sum_same_as_unpacked"],
                  r["rel_err_of_mean"]] for r in rows],
                ["adapter", "values", "b", "packing", "ring bits", "masked input B", "/ fp32", "all uploads B", "/ fp32",
                 "same sum", "|mean err| / |mean|"], digits=4))
    if quality:
        fp32 = quality.get("fp32")
        print("\nQuality (bench/quality.py --methods fed, held-out loss; lower is better)")
        print(table([[name, q["privacy"], q["bits"] if q["privacy"] != "none" else "fp32", q["packing"], q["eval_loss"],
                      q["gain"], q["gain"] / fp32["gain"] if fp32 and fp32["gain"] > 0 else None]
                     for name, q in quality.items()],
                    ["run", "privacy", "b", "packing", "held-out loss", "gain vs base", "gain / fp32 gain"], digits=4))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
