"""The split stream over loopback TLS: round-trip latency and throughput of activation-sized tensors.

What it measures
----------------
One device and one edge in two processes on this machine (the edge in a child process, as in
a deployment; 127.0.0.1). For each payload -- by default SmolLM2's activations at the cut for
batch 4 x seq 256 x hidden 576 in float32 (2.36 MB) and float16 (1.18 MB), and one token's
(1 x 1 x 576 float32: the fixed cost of a step) -- it times round trips (the device sends the
tensor, the edge answers with a tensor of the same size, as forward and backward do) over
three transports, side by side in one run:

* ``tcp``: the raw bytes over plain TCP (a 4-byte length, ``sendall`` of the array's buffer,
  ``recv_into`` a preallocated buffer): the floor;
* ``tls``: the same raw bytes over TLS 1.3 with the plan-style certificates (EC P-384, the CA
  made by ``fedlora.deploy.pki``): what encryption costs;
* ``stream``: ``StreamLink.forward`` against a ``SplitStreamServer`` answering with
  ``echo_handler``: TLS + the wire codec (fedlora.wire frames, dtype/shape checks, copies).

Per transport and payload: the median, 10th and 90th percentile round trip, the throughput
(2 x payload bytes / median round trip: both directions carry a tensor), the ratio to ``tcp``
and ``tls``, and the device process's CPU time per round trip (its half of the work: the edge
does the mirror image; unlike wall time it hardly moves when others load the machine). Also
the time to open a stream (TCP + TLS + the signed handshake: both Ed25519 signatures and
checks), paid once per device and round.

The handler is an echo, so no model compute is in these figures: they are the transport's
own cost per split step, to compare with a step's compute on the device and the edge.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import ssl
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_LOCK, RESULTS, bench_lock, provenance, table, write_json  # noqa: E402

from fedlora.deploy import pki  # noqa: E402
from fedlora.deploy.stream import SplitStreamServer, StreamCredentials, StreamLimits, StreamLink, echo_handler  # noqa: E402
from fedlora.secure.identities import PlannedIdentities  # noqa: E402
from fedlora.secure.keys import IdentityKey  # noqa: E402

EDGE = "aggregator/bench"
RUN = "bench"
PAYLOADS = {  # name -> (shape, dtype)
    "4x256x576 fp32": ((4, 256, 576), "float32"),
    "4x256x576 fp16": ((4, 256, 576), "float16"),
    "1x1x576 fp32": ((1, 1, 576), "float32"),
}
_LEN = struct.Struct(">I")
LIMITS = StreamLimits(step_timeout_s=60, max_frame_bytes=64 * 2**20)


# ----------------------------------------------------------------- key material

def make_pki(folder: Path) -> dict:
    ca = pki.make_ca("bench CA")
    server = pki.issue_server_cert(ca, "bench edge", ["127.0.0.1", "localhost"])
    pki.write_public(folder / "ca.pem", pki.cert_pem(ca.cert))
    pki.write_public(folder / "server.pem", pki.cert_pem(server.cert))
    pki.write_private(folder / "server.key", pki.key_pem(server.key))
    return {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}


def identities(seeds: dict[str, bytes], me: str) -> PlannedIdentities:
    keys = {uid: IdentityKey.from_seed(seed) for uid, seed in seeds.items()}
    return PlannedIdentities(me, keys[me], {uid: k.public_bytes for uid, k in keys.items()})


# ---------------------------------------------------------------- edge (child)

def _recv_exact(sock, buf: memoryview) -> bool:
    got = 0
    while got < len(buf):
        k = sock.recv_into(buf[got:])
        if k == 0:
            return False
        got += k
    return True


def _echo_raw(sock) -> None:
    header = bytearray(4)
    while _recv_exact(sock, memoryview(header)):
        body = bytearray(_LEN.unpack(header)[0])
        if not _recv_exact(sock, memoryview(body)):
            return
        sock.sendall(_LEN.pack(len(body)))
        sock.sendall(body)


def edge_main(mode: str, files: dict, seeds: dict, ready, stop) -> None:
    """Serve one transport until ``stop``: raw echo (tcp, tls) or a SplitStreamServer (stream)."""
    if mode == "stream":
        creds = StreamCredentials.for_edge(identities(seeds, EDGE), files["cert"], files["key"])
        with SplitStreamServer(creds, ("127.0.0.1", 0), run_id=RUN, server_round=1,
                               handler_for=lambda device: echo_handler, limits=LIMITS) as server:
            ready.put(server.address[1])
            stop.wait()
        return
    listener = socket.create_server(("127.0.0.1", 0))
    ready.put(listener.getsockname()[1])
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if mode == "tls":
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(str(files["cert"]), str(files["key"]))
        conn = context.wrap_socket(conn, server_side=True)
    with conn, listener:
        _echo_raw(conn)


# -------------------------------------------------------------- device (parent)

def _raw_client(mode: str, port: int, files: dict):
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if mode == "tls":
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_verify_locations(cafile=str(files["ca"]))
        sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
    return sock


def _raw_round_trip(sock, x: np.ndarray, out: bytearray) -> None:
    sock.sendall(_LEN.pack(x.nbytes))
    sock.sendall(memoryview(x).cast("B"))
    header = bytearray(4)
    _recv_exact(sock, memoryview(header))
    _recv_exact(sock, memoryview(out))
    np.frombuffer(out, dtype=x.dtype).reshape(x.shape)


def time_transport(mode: str, files: dict, seeds: dict, payloads: dict, reps: dict, connects: int) -> dict:
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    edge = ctx.Process(target=edge_main, args=(mode, files, seeds, ready, stop), daemon=True)
    edge.start()
    try:
        port = ready.get(timeout=60)
        result: dict = {"round_trip_s": {}}
        if mode == "stream":
            creds = {uid: StreamCredentials.for_device(identities(seeds, uid), files["ca"])
                     for uid in seeds if uid != EDGE}
            devices = iter(sorted(creds))
            opens = []
            for _ in range(connects):  # a stream per device and round: each open is a fresh device
                t0 = time.perf_counter()
                link = StreamLink.connect(creds[next(devices)], ("127.0.0.1", port), edge=EDGE, run_id=RUN,
                                          server_round=1, limits=LIMITS)
                opens.append(time.perf_counter() - t0)
                link.close()
            result["open_s"] = opens
            link = StreamLink.connect(creds[next(devices)], ("127.0.0.1", port), edge=EDGE, run_id=RUN,
                                      server_round=1, limits=LIMITS)
            step = link.forward
        else:
            link = _raw_client(mode, port, files)
        with link:
            for name, x in payloads.items():
                out = bytearray(x.nbytes)
                times = []
                for i in range(reps[name] + 3):  # three warm-up round trips
                    if i == 3:
                        cpu0 = time.process_time()
                    t0 = time.perf_counter()
                    if mode == "stream":
                        y = step(x)
                        assert y.shape == x.shape and y.dtype == x.dtype
                    else:
                        _raw_round_trip(link, x, out)
                    if i >= 3:
                        times.append(round(time.perf_counter() - t0, 6))
                result["round_trip_s"][name] = times
                result.setdefault("device_cpu_s", {})[name] = (time.process_time() - cpu0) / len(times)
        return result
    finally:
        stop.set()
        edge.join(30)
        if edge.is_alive():
            edge.terminate()
            edge.join(5)


def summarise(raw: dict, payloads: dict) -> list[dict]:
    rows = []
    for name, x in payloads.items():
        med = {m: statistics.median(raw[m]["round_trip_s"][name]) for m in raw}
        for mode, r in raw.items():
            times = sorted(r["round_trip_s"][name])
            q = statistics.quantiles(times, n=10)
            rows.append({"payload": name, "bytes": x.nbytes, "transport": mode, "median_ms": med[mode] * 1e3,
                         "p10_ms": q[0] * 1e3, "p90_ms": q[-1] * 1e3, "mb_per_s": 2 * x.nbytes / med[mode] / 1e6,
                         "x_tcp": med[mode] / med["tcp"], "x_tls": med[mode] / med["tls"], "n": len(times),
                         "device_cpu_ms": r["device_cpu_s"][name] * 1e3})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=100, help="timed round trips per big payload (small: 10x)")
    p.add_argument("--connects", type=int, default=20, help="streams opened to time the handshake")
    p.add_argument("--lock", default=DEFAULT_LOCK, help="benchmark lock file (default %(default)s)")
    p.add_argument("--no-lock", action="store_true", help="do not take the lock (smoke tests only)")
    p.add_argument("--out", default=str(RESULTS / "stream.json"))
    args = p.parse_args()

    rng = np.random.default_rng(0)
    payloads = {name: rng.standard_normal(shape).astype(dtype) for name, (shape, dtype) in PAYLOADS.items()}
    reps = {name: args.reps * (10 if x.nbytes < 65536 else 1) for name, x in payloads.items()}
    seeds = {uid: os.urandom(32) for uid in [EDGE] + [f"device-{i}" for i in range(args.connects + 1)]}
    info = provenance("stream")
    with tempfile.TemporaryDirectory() as tmp, bench_lock(None if args.no_lock else args.lock, what="stream"):
        files = make_pki(Path(tmp))
        t0 = time.time()
        raw = {mode: time_transport(mode, files, seeds, payloads, reps, args.connects) for mode in ("tcp", "tls", "stream")}
        wall = time.time() - t0
    rows = summarise(raw, payloads)
    opens = sorted(raw["stream"]["open_s"])
    record = {**info, "wall_s": wall, "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
              "rows": rows, "open_stream_ms": {"median": statistics.median(opens) * 1e3, "min": opens[0] * 1e3,
                                               "max": opens[-1] * 1e3, "n": len(opens)},
              "raw_s": raw}
    out = write_json(args.out, record)
    print(table([[r["payload"], r["bytes"], r["transport"], r["median_ms"], r["p10_ms"], r["p90_ms"], r["mb_per_s"],
                  r["x_tcp"], r["x_tls"], r["device_cpu_ms"]] for r in rows],
                ["payload", "bytes", "transport", "median ms", "p10 ms", "p90 ms", "MB/s (both ways)", "x tcp", "x tls",
                 "device CPU ms"]))
    o = record["open_stream_ms"]
    print(f"\nopening a stream (TCP + TLS 1.3 + signed handshake): median {o['median']:.2f} ms "
          f"(min {o['min']:.2f}, max {o['max']:.2f}, n={o['n']})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
