"""The split stream between a device and its edge (fedlora/deploy/stream*.py): the protocol without
sockets, then TLS on 127.0.0.1 with a test CA made by fedlora/deploy/pki.py. Seconds in all; every
thread and socket a test opens is closed by its end (checked)."""

from __future__ import annotations

import gc
import socket
import ssl
import threading
import time
import warnings

import numpy as np
import pytest

from fedlora import wire
from fedlora.deploy import pki
from fedlora.deploy.plan import DeploySettings, protocol_id, read_node, write_plan
from fedlora.deploy.stream import (
    FrameError,
    HandshakeRefused,
    PeerFailed,
    PeerGone,
    SplitStreamServer,
    StreamCredentials,
    StreamError,
    StreamLimits,
    StreamLink,
    echo_handler,
)
from fedlora.deploy.stream_protocol import (
    FRAME_MAGIC,
    HANDSHAKE_FRAME_BYTES,
    Bye,
    Challenge,
    DeviceHandshake,
    EdgeHandshake,
    Hello,
    Proof,
    Reply,
    Step,
    check_payload,
    decode_frame,
    encode_frame,
    expect,
    frame_length,
    parse_address,
    stream_port,
    tensor_bytes,
)
from fedlora.secure.identities import PlannedIdentities
from fedlora.secure.keys import IdentityKey

EDGE = "aggregator/neighbourhood-0-0"
RUN = "run-7"
FAST = StreamLimits(connect_timeout_s=5, handshake_timeout_s=5, step_timeout_s=5, close_timeout_s=5)


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def keys():
    """Identity keys of one edge and three devices; device-2 is left out of the registry."""
    k = {uid: IdentityKey.generate() for uid in (EDGE, "device-0", "device-1", "device-2")}
    registry = {uid: key.public_bytes for uid, key in k.items() if uid != "device-2"}
    return k, registry


def identities(keys, uid: str, registry: dict | None = None) -> PlannedIdentities:
    k, reg = keys
    reg = dict(registry if registry is not None else reg)
    reg.setdefault(uid, k[uid].public_bytes)  # a device always believes its own key is registered
    return PlannedIdentities(uid, k[uid], reg)


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """Two CAs, each with a server certificate for 127.0.0.1: the plan's, and a stranger's."""
    out = tmp_path_factory.mktemp("stream-pki")
    files = {}
    for name in ("plan", "other"):
        ca = pki.make_ca(f"{name} CA")
        server = pki.issue_server_cert(ca, f"{name} edge", ["127.0.0.1", "localhost"])
        pki.write_public(out / f"{name}-ca.pem", pki.cert_pem(ca.cert))
        pki.write_public(out / f"{name}-server.pem", pki.cert_pem(server.cert))
        pki.write_private(out / f"{name}-server.key", pki.key_pem(server.key))
        files[name] = (out / f"{name}-ca.pem", out / f"{name}-server.pem", out / f"{name}-server.key")
    return files


def edge_creds(keys, tls, which: str = "plan", registry: dict | None = None) -> StreamCredentials:
    _, cert, key = tls[which]
    return StreamCredentials.for_edge(identities(keys, EDGE, registry), cert, key)


def device_creds(keys, tls, uid: str = "device-0", registry: dict | None = None) -> StreamCredentials:
    return StreamCredentials.for_device(identities(keys, uid, registry), tls["plan"][0])


def server(keys, tls, handler_for=lambda device: echo_handler, *, server_round: int = 1, which: str = "plan",
           limits: StreamLimits = FAST, **kw) -> SplitStreamServer:
    return SplitStreamServer(edge_creds(keys, tls, which, kw.pop("registry", None)), ("127.0.0.1", 0), run_id=RUN,
                             server_round=server_round, handler_for=handler_for, limits=limits, **kw)


def connect(keys, tls, srv: SplitStreamServer, uid: str = "device-0", *, server_round: int = 1,
            limits: StreamLimits = FAST, registry: dict | None = None) -> StreamLink:
    return StreamLink.connect(device_creds(keys, tls, uid, registry), srv.address, edge=EDGE, run_id=RUN,
                              server_round=server_round, limits=limits)


def refusals(srv: SplitStreamServer, n: int = 1, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(srv._result.refused) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return list(srv._result.refused)


@pytest.fixture(autouse=True)
def no_leaks():
    """Every stream thread ends and no socket is left for the garbage collector to close."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        yield
        gc.collect()
    deadline = time.monotonic() + 5
    while any(t.name.startswith("split-stream") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("split-stream")]
    assert not [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


def activations(shape=(2, 16, 576), dtype=np.float32, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# ----------------------------------------------------------------- protocol, no sockets

def test_frames_round_trip_tensors_with_dtype_and_shape():
    x16, x32 = activations(dtype=np.float16), activations(seed=1)
    mask = np.ones((2, 16), dtype=np.int64)
    for message in (Step(0, "forward", x32), Step(3, "backward", x16), Reply(1, {"hidden": x32, "mask": mask}), Bye(4)):
        frame = encode_frame(message, 2**24)
        assert frame[:4] == FRAME_MAGIC
        assert frame_length(frame[:8], 2**24) == len(frame) - 8
        back = decode_frame(frame[8:])
        assert type(back) is type(message)
        for a, b in [(message, back)]:
            if isinstance(a, Bye):
                assert a == b
                continue
            pa, pb = a.payload, b.payload
            pa, pb = (pa, pb) if isinstance(pa, dict) else ({"x": pa}, {"x": pb})
            for name in pa:
                assert pb[name].dtype == pa[name].dtype and pb[name].shape == pa[name].shape
                np.testing.assert_array_equal(pb[name], pa[name])
    assert tensor_bytes({"hidden": x32, "mask": mask}) == x32.nbytes + mask.nbytes


def test_oversized_foreign_and_malformed_frames_are_refused():
    big = Step(0, "forward", np.zeros(1024, np.float32))
    with pytest.raises(FrameError, match="exceeds the stream's limit of 1000 bytes"):
        encode_frame(big, 1000)
    header = encode_frame(big, 2**20)[:8]
    with pytest.raises(FrameError, match="over the limit of 4096"):
        frame_length(header, 4096)  # refused from the header alone
    with pytest.raises(FrameError, match="not a fedlora split-stream frame"):
        frame_length(b"GET / HT", 4096)
    with pytest.raises(FrameError, match="malformed frame"):
        decode_frame(b"\x00garbage")
    with pytest.raises(FrameError, match="malformed frame"):
        decode_frame(wire.dumps(Bye(1), "something-else"))
    with pytest.raises(FrameError, match="not a split-stream message"):
        decode_frame(wire.dumps({"a": 1}, "split-stream"))
    # A Step whose payload is not tensors cannot be built, so neither can it be decoded.
    forged = wire.dumps(Bye(1), "split-stream").replace(b"Bye", b"Ste")
    with pytest.raises(FrameError):
        decode_frame(forged)
    with pytest.raises(ValueError, match="dtype bool"):
        check_payload(np.zeros(3, dtype=bool))
    with pytest.raises(ValueError, match="numpy array or a dict"):
        check_payload([1.0, 2.0])


def test_signed_handshake_admits_a_registered_device(keys):
    cert = b"edge certificate DER"
    device = DeviceHandshake(identities(keys, "device-0"), EDGE, RUN, 3)
    edge = EdgeHandshake(identities(keys, EDGE), cert, RUN, 3)
    challenge = edge.challenge(device.hello())
    assert edge.verify(device.prove(challenge, cert)) == "device-0"


def test_handshake_refuses_strangers_forgers_and_other_rounds(keys):
    cert = b"edge certificate DER"
    # Not in the edge's registry.
    stranger = DeviceHandshake(identities(keys, "device-2"), EDGE, RUN, 3)
    with pytest.raises(HandshakeRefused, match="not a device in the plan's registry"):
        EdgeHandshake(identities(keys, EDGE), cert, RUN, 3).challenge(stranger.hello())
    # Claims device-1 but signs with device-0's key.
    k, registry = keys
    forger = DeviceHandshake(PlannedIdentities("device-1", k["device-0"], {**registry, "device-1": k["device-0"].public_bytes}),
                             EDGE, RUN, 3)
    edge = EdgeHandshake(identities(keys, EDGE), cert, RUN, 3)
    proof = forger.prove(edge.challenge(forger.hello()), cert)
    with pytest.raises(HandshakeRefused, match="does not verify under the plan's key of 'device-1'"):
        edge.verify(proof)
    # Round 3's hello is refused in round 4; and round 3's proof under a round-4 hello does not verify.
    device = DeviceHandshake(identities(keys, "device-0"), EDGE, RUN, 3)
    old_edge = EdgeHandshake(identities(keys, EDGE), cert, RUN, 3)
    old_proof = device.prove(old_edge.challenge(device.hello()), cert)
    with pytest.raises(HandshakeRefused, match="round 3, but this edge serves round 4"):
        EdgeHandshake(identities(keys, EDGE), cert, RUN, 4).challenge(device.hello())
    replay = EdgeHandshake(identities(keys, EDGE), cert, RUN, 4)
    h = device.hello()
    replay.challenge(Hello(h.device, h.edge, h.run_id, 4, h.nonce))
    with pytest.raises(HandshakeRefused, match="does not verify"):
        replay.verify(old_proof)
    with pytest.raises(HandshakeRefused, match="run 'run-8'"):
        EdgeHandshake(identities(keys, EDGE), cert, "run-8", 3).challenge(device.hello())
    # A proof made for another TLS endpoint (another certificate) does not verify here.
    relay = EdgeHandshake(identities(keys, EDGE), cert, RUN, 3)
    d = DeviceHandshake(identities(keys, "device-0"), EDGE, RUN, 3)
    challenge = relay.challenge(d.hello())
    with pytest.raises(HandshakeRefused, match="another TLS endpoint"):
        d.prove(challenge, b"another certificate")  # the device checks the edge's signature first
    # The device refuses an edge signing with a key that is not the plan's key of that edge.
    impostor = EdgeHandshake(PlannedIdentities(EDGE, k["device-1"], {**registry, EDGE: k["device-1"].public_bytes}),
                             cert, RUN, 3)
    d = DeviceHandshake(identities(keys, "device-0"), EDGE, RUN, 3)
    with pytest.raises(HandshakeRefused, match="not that edge"):
        d.prove(impostor.challenge(d.hello()), cert)
    with pytest.raises(ValueError):
        Challenge(EDGE, b"short", b"x" * 64)
    with pytest.raises(ValueError):
        Proof(b"x" * 63)


def test_addresses_and_ports():
    assert parse_address("127.0.0.1:9201") == ("127.0.0.1", 9201)
    assert parse_address("[::1]:9201") == ("::1", 9201)
    assert stream_port(9201) == 19201
    for bad in ("localhost", "host:port", ":9000"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_address(bad)
    with pytest.raises(ValueError, match="not in 1024..65535"):
        stream_port(60000)
    with pytest.raises(ValueError, match="max_frame_bytes"):
        StreamLimits(max_frame_bytes=100)


# --------------------------------------------------------------------- TLS on loopback

def test_round_trip_of_activations_and_gradients(keys, tls):
    """A stateful handler (as the split maths' will be): forward keeps what backward needs."""
    def handler_for(device):
        saved = {}

        def handler(kind, payload):
            if kind == "forward":
                saved["x"] = payload
                return payload * 2.0
            if kind == "backward":
                return (payload.astype(np.float32) + saved["x"]).astype(payload.dtype)
            return {name: a + 1 for name, a in payload.items()}
        return handler

    x, g = activations(seed=1), activations(seed=2, dtype=np.float16)
    with server(keys, tls, handler_for) as srv:
        with connect(keys, tls, srv) as link:
            np.testing.assert_array_equal(link.forward(x), x * 2.0)
            back = link.backward(g)
            assert back.dtype == np.float16 and back.shape == g.shape
            np.testing.assert_array_equal(back, (g.astype(np.float32) + x).astype(np.float16))
            mask = np.arange(6, dtype=np.int64).reshape(2, 3)
            out = link.call("other", {"hidden": x, "mask": mask})
            np.testing.assert_array_equal(out["mask"], mask + 1)
        sent, received = link.bytes_sent, link.bytes_received  # frames both ways, handshake and goodbye included
        assert srv.wait(["device-0"], 5)
        streams = srv.close()
    outcome = streams.outcomes["device-0"]
    assert outcome.completed and outcome.steps == 3 and outcome.reason == ""
    assert sent > x.nbytes + g.nbytes and outcome.bytes_received == sent and outcome.bytes_sent == received
    assert streams.dropped() == {} and streams.refused == []


def test_a_device_ahead_of_its_edge_waits_for_it_then_gives_up(keys, tls):
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # free now, and nothing listens on it once closed
    srv = SplitStreamServer(edge_creds(keys, tls), ("127.0.0.1", port), run_id=RUN, server_round=1,
                            handler_for=lambda d: echo_handler, limits=FAST)
    timer = threading.Timer(0.3, srv.start)  # the edge opens its round a moment after the device dials
    timer.start()
    try:
        with StreamLink.connect(device_creds(keys, tls), ("127.0.0.1", port), edge=EDGE, run_id=RUN, server_round=1,
                                limits=FAST) as link:
            link.forward(activations())
    finally:
        timer.join()
        srv.close()
    late = StreamLimits(connect_timeout_s=0.3)
    with pytest.raises(PeerGone, match="cannot reach the edge .* within 0.3s"):
        StreamLink.connect(device_creds(keys, tls), ("127.0.0.1", port), edge=EDGE, run_id=RUN, server_round=1,
                           limits=late)


def test_wrong_ca_is_refused(keys, tls):
    with server(keys, tls, which="other") as srv:
        with pytest.raises(HandshakeRefused, match="no certificate of the plan's CA"):
            connect(keys, tls, srv)
        assert "TLS handshake failed" in refusals(srv)[0]
        assert srv.close().outcomes == {}


def test_unregistered_device_and_bad_signature_are_refused(keys, tls):
    k, registry = keys
    with server(keys, tls) as srv:
        with pytest.raises(HandshakeRefused, match="'device-2' is not a device in the plan's registry"):
            connect(keys, tls, srv, "device-2")
        # device-1's name with another key: the edge's registry has the real one.
        forged = PlannedIdentities("device-1", k["device-0"], {**registry, "device-1": k["device-0"].public_bytes})
        with pytest.raises(HandshakeRefused, match="does not verify under the plan's key of 'device-1'"):
            StreamLink.connect(StreamCredentials.for_device(forged, tls["plan"][0]), srv.address, edge=EDGE,
                               run_id=RUN, server_round=1, limits=FAST)
        assert len(refusals(srv, 2)) == 2
        # The refusals took no place: the real device-1 still gets its stream.
        with connect(keys, tls, srv, "device-1") as link:
            link.forward(activations())
        assert srv.wait(["device-1"], 5)
        assert srv.close().outcomes["device-1"].completed


def test_another_rounds_stream_and_a_second_stream_are_refused(keys, tls):
    with server(keys, tls, server_round=2, devices=["device-0"]) as srv:
        with pytest.raises(HandshakeRefused, match="stream for round 1, but this edge serves round 2"):
            connect(keys, tls, srv, server_round=1)
        with pytest.raises(HandshakeRefused, match="device-1 is not a split device of this edge in round 2"):
            connect(keys, tls, srv, "device-1", server_round=2)
        with connect(keys, tls, srv, server_round=2) as link:
            with pytest.raises(HandshakeRefused, match="already has a stream in round 2"):
                connect(keys, tls, srv, server_round=2)
            link.forward(activations())
        srv.close()


def test_edge_closing_mid_step_is_a_dropout_on_both_ends(keys, tls):
    started, release, result = threading.Event(), threading.Event(), {}

    def handler(kind, payload):
        started.set()
        release.wait(5)
        return payload

    def step(link):
        try:
            link.forward(activations())
        except StreamError as exc:
            result["device"] = exc

    with server(keys, tls, lambda d: handler) as srv:
        link = connect(keys, tls, srv)
        worker = threading.Thread(target=step, args=(link,))
        worker.start()
        assert started.wait(5)
        closer = threading.Thread(target=lambda: result.setdefault("edge", srv.close()))
        closer.start()
        worker.join(5)  # the device learns at once, while the edge's handler still computes
        release.set()
        closer.join(10)
    assert isinstance(result["device"], PeerGone) and link.closed
    outcome = result["edge"].outcomes["device-0"]
    assert not outcome.completed and "the edge closed round 1's streams" in outcome.reason
    assert result["edge"].dropped() == {"device-0": outcome.reason}


def test_device_disconnecting_mid_step_is_a_dropout_on_both_ends(keys, tls):
    started, release = threading.Event(), threading.Event()

    def handler(kind, payload):
        started.set()
        release.wait(5)
        return payload

    with server(keys, tls, lambda d: handler) as srv:
        link = connect(keys, tls, srv)
        link._channel.send(Step(0, "forward", activations()), FAST.max_frame_bytes, 5)
        assert started.wait(5)
        link._channel.sock.close()  # the device process dies mid-step: no goodbye
        release.set()
        assert srv.wait(["device-0"], 5)
        outcome = srv.close().outcomes["device-0"]
    assert not outcome.completed and "the device device-0 disconnected" in outcome.reason
    with pytest.raises(StreamError):  # and the device's own end is unusable
        link.forward(activations())


def test_timeouts_on_both_ends(keys, tls):
    quick = StreamLimits(connect_timeout_s=5, handshake_timeout_s=5, step_timeout_s=0.3)

    def slow(kind, payload):
        time.sleep(0.6)
        return payload

    with server(keys, tls, lambda d: slow, limits=FAST) as srv:
        link = connect(keys, tls, srv, limits=quick)
        with pytest.raises(PeerGone, match="sent nothing for 0.3s"):
            link.forward(activations())
        assert srv.wait(["device-0"], 5)
        srv.close()
    with server(keys, tls, limits=quick) as srv:
        with connect(keys, tls, srv, limits=quick) as link:
            link.forward(activations())
            time.sleep(0.6)  # longer than the edge waits for the next step
            with pytest.raises(PeerGone):
                link.forward(activations())
        assert srv.wait(["device-0"], 5)
        outcome = srv.close().outcomes["device-0"]
    assert not outcome.completed and outcome.steps == 1 and "timed out" in outcome.reason


def test_oversized_and_malformed_frames_are_refused_cleanly(keys, tls):
    small = StreamLimits(max_frame_bytes=64 * 1024, connect_timeout_s=5, handshake_timeout_s=5, step_timeout_s=5)
    big = np.zeros(32 * 1024, np.float32)  # 128 KiB
    with server(keys, tls, limits=small) as srv:
        # The device's own limit: refused before anything is sent.
        with pytest.raises(FrameError, match="exceeds the stream's limit"):
            connect(keys, tls, srv, limits=small).forward(big)
        # The edge's limit: the device announces more than the edge takes.
        with pytest.raises(PeerFailed, match="refused a frame of .* over the limit of 65536"):
            connect(keys, tls, srv, "device-1", limits=FAST).forward(big)
        assert srv.wait(["device-0", "device-1"], 5)
        streams = srv.close()
    assert "over the limit of 65536" in streams.outcomes["device-1"].reason
    assert "exceeds the stream's limit" in streams.outcomes["device-0"].reason  # the device said why it gave up
    with server(keys, tls) as srv:
        link = connect(keys, tls, srv)
        link._channel.sock.sendall(FRAME_MAGIC + (9).to_bytes(4, "big") + b"not wire!")
        with pytest.raises(PeerFailed, match="malformed frame"):
            expect(link._channel.recv(FAST.max_frame_bytes, 5), Reply, "the edge")
        link.close()
        assert srv.wait(["device-0"], 5)
        assert "malformed frame" in srv.close().outcomes["device-0"].reason


def test_steps_out_of_order_or_miscounted_are_refused(keys, tls):
    with server(keys, tls) as srv:
        link = connect(keys, tls, srv)
        link._channel.send(Step(1, "forward", activations()), FAST.max_frame_bytes, 5)  # step 1 before step 0
        with pytest.raises(PeerFailed, match="sent step 1, expected 0"):
            expect(link._channel.recv(FAST.max_frame_bytes, 5), Reply, "the edge")
        link.close()
        other = connect(keys, tls, srv, "device-1")
        other.forward(activations())
        other.steps = 5  # a goodbye that does not match what the edge answered
        other.close()
        assert srv.wait(["device-0", "device-1"], 5)
        streams = srv.close()
    assert "sent step 1, expected 0" in streams.outcomes["device-0"].reason
    assert "said goodbye after 5 steps, but 1 were answered" in streams.outcomes["device-1"].reason
    assert not streams.outcomes["device-1"].completed


def test_oversized_hello_from_a_stranger_is_refused(keys, tls):
    with server(keys, tls) as srv:
        context = ssl.create_default_context(cafile=str(tls["plan"][0]))
        with socket.create_connection(srv.address, timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            sock.sendall(FRAME_MAGIC + (10 * 2**20).to_bytes(4, "big"))
            sock.settimeout(5)
            reply = sock.recv(HANDSHAKE_FRAME_BYTES)
        assert f"over the limit of {HANDSHAKE_FRAME_BYTES}" in refusals(srv)[0]
        assert b"over the limit" in reply  # told why, in a Refused frame
        srv.close()


@pytest.mark.parametrize("one_at_a_time", [True, False])
def test_handlers_of_concurrent_devices_take_turns_by_default(keys, tls, one_at_a_time):
    active, most, lock = [0], [0], threading.Lock()

    def handler(kind, payload):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.2)
        with lock:
            active[0] -= 1
        return payload

    with server(keys, tls, lambda d: handler, one_handler_at_a_time=one_at_a_time) as srv:
        links = [connect(keys, tls, srv, d) for d in ("device-0", "device-1")]
        workers = [threading.Thread(target=link.forward, args=(activations(),)) for link in links]
        for w in workers:
            w.start()
        for w in workers:
            w.join(10)
        for link in links:
            link.close()
        assert srv.wait(["device-0", "device-1"], 5)
        assert all(o.completed for o in srv.close().outcomes.values())
    assert most[0] == (1 if one_at_a_time else 2)


def test_handler_failure_drops_only_that_device(keys, tls):
    def handler_for(device):
        def handler(kind, payload):
            if device == "device-0":
                raise RuntimeError("shape mismatch at the cut")
            return payload
        return handler

    with server(keys, tls, handler_for) as srv:
        with pytest.raises(PeerFailed, match="RuntimeError: shape mismatch at the cut"):
            connect(keys, tls, srv).forward(activations())
        with connect(keys, tls, srv, "device-1") as link:
            link.forward(activations())
        assert srv.wait(["device-0", "device-1"], 5)
        streams = srv.close()
    assert list(streams.dropped()) == ["device-0"] and streams.outcomes["device-1"].completed


def test_credentials_from_a_plans_folders(tmp_path, tiny_config):
    """The plan's own files are enough: the edge's server certificate and key, the device's CA,
    both identity keys and the registry."""
    cfg = tiny_config("federation.num_clients=4", "topology.suburban_cells=1", "topology.neighbourhoods_per_suburban=1")
    nodes = write_plan(cfg, tmp_path / "deploy", DeploySettings())
    edge_node = next(n for n in nodes.values() if n.role == "edge")
    end_node = next(n for n in nodes.values() if n.role == "end" and n.upstream == edge_node.name)
    edge = StreamCredentials.from_node(read_node(tmp_path / "deploy" / edge_node.name))
    device = StreamCredentials.from_node(read_node(tmp_path / "deploy" / end_node.name))
    with pytest.raises(ValueError, match="between an edge and its END devices"):
        StreamCredentials.from_node(read_node(tmp_path / "deploy" / "cloud"))
    x = activations()
    with SplitStreamServer(edge, ("127.0.0.1", 0), run_id=RUN, server_round=1, handler_for=lambda d: echo_handler,
                           limits=FAST) as srv:
        with StreamLink.connect(device, ("127.0.0.1", srv.address[1]), edge=protocol_id(edge_node.name), run_id=RUN,
                                server_round=1, limits=FAST) as link:
            np.testing.assert_array_equal(link.forward(x), x)
        assert srv.wait([protocol_id(end_node.name)], 5)
        assert srv.close().outcomes[protocol_id(end_node.name)].completed


# ------------------------------------------------ the split maths' link over the stream

class _EdgeHalf:
    """The shape of fedlora.split.EdgeHalf (forward, backward, step over blocks and params), with one
    linear block as the edge's middle: enough to check that the stream carries its calls exactly."""

    def __init__(self, seed: int, dtype=None):
        import torch  # only these tests need torch

        torch.manual_seed(seed)
        self.blocks = [torch.nn.Linear(576, 576, dtype=dtype or torch.float32)]
        self.params = list(self.blocks[0].parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-3)
        self._pending = None

    def forward(self, hidden, attention_mask):
        import torch  # only these tests need torch

        with torch.enable_grad():
            received = hidden.detach().requires_grad_(True)
            out = self.blocks[0](received) * attention_mask.to(received.dtype).unsqueeze(-1)
        self._pending = (received, out)
        return out.detach()

    def backward(self, grad):
        import torch  # only these tests need torch

        received, out = self._pending
        out.backward(grad)
        return received.grad.detach(), float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params])))

    def step(self, lr, clip_coef):
        for p in self.params:
            p.grad.mul_(clip_coef)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def test_split_link_over_the_stream_equals_the_in_process_calls(keys, tls):
    import torch  # only these tests need torch

    from fedlora.deploy.split_link import StreamSplitLink, edge_half_handler, from_wire, to_wire

    remote_edge, local_edge = _EdgeHalf(0), _EdgeHalf(0)
    hidden = torch.randn(2, 16, 576)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 12:] = 0
    with server(keys, tls, lambda device: edge_half_handler(remote_edge)) as srv:
        with connect(keys, tls, srv) as stream:
            link = StreamSplitLink(stream)
            for _ in range(2):
                out = link.forward(hidden, mask)
                grad = torch.randn_like(out)
                back, norm = link.backward(grad)
                link.step(1e-3, 0.5)
                want_out = local_edge.forward(hidden, mask)
                want_back, want_norm = local_edge.backward(grad)
                local_edge.step(1e-3, 0.5)
                assert torch.equal(out, want_out) and torch.equal(back, want_back) and norm == want_norm
            with pytest.raises(PeerFailed, match="unknown split call 'sideways'"):
                stream.call("sideways", {})
        assert srv.wait(["device-0"], 5)
        outcome = srv.close().outcomes["device-0"]
    for p, q in zip(remote_edge.params, local_edge.params):
        assert torch.equal(p, q)  # the edge's LoRA-side state took the same optimiser steps
    assert link.exchanges == 2 and link.steps == 2
    assert link.tensor_bytes_up == 2 * (hidden.numel() * 4 + mask.numel() + out.numel() * 4 + 16)
    assert not outcome.completed and outcome.steps == 6 and "unknown split call" in outcome.reason
    # bfloat16 crosses as float32 and comes back as bfloat16, value for value.
    b = torch.randn(3, 5).to(torch.bfloat16)
    assert to_wire(b).dtype == np.float32 and torch.equal(from_wire(to_wire(b), torch.bfloat16), b)
