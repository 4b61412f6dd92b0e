"""Property-based fuzzing of everything that parses bytes from another machine (issue 15).

Each decoder gets thousands of inputs in total: random bytes, and valid encodings mutated (bit flips,
truncation, inserted and deleted bytes, a length field set huge or off by one, a value of the
message replaced by a value of another type). The only allowed outcomes are a correct decode or the
module's own clear error: no other exception, no hang (hypothesis' deadline), and no allocation
beyond a few MB driven by a length field (tracemalloc's peak while decoding a small input).

Reproducible in CI: derandomised, a fixed number of examples per decoder. For a longer local run:
``FEDLORA_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest -q tests/test_fuzz.py`` (examples per decoder).
"""

from __future__ import annotations

import json
import os
import tracemalloc
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora import transcript, wire
from fedlora.round_settings import RoundSettingsError

EXAMPLES = int(os.environ.get("FEDLORA_FUZZ_EXAMPLES", "0"))
# The most a decoder may allocate for one input of at most a few KB: far below what a length field
# of 2^32 (or 2^64) would make it reserve, far above what the largest legitimate decode here needs.
ALLOC_LIMIT = 4 * 2**20


def fuzz(examples: int, deadline_s: float = 5.0):
    """Hypothesis settings of one decoder: ``examples`` in CI (or FEDLORA_FUZZ_EXAMPLES), derandomised;
    an input that takes longer than ``deadline_s`` to decode (twice) is a hang."""
    return settings(max_examples=EXAMPLES or examples, derandomize=True, database=None,
                    deadline=timedelta(seconds=deadline_s),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], print_blob=False)


def decodes_cleanly(decode, data, allowed: tuple[type[BaseException], ...], limit: int = ALLOC_LIMIT):
    """``decode(data)``'s value, or None when it raised one of ``allowed``; any other exception fails the
    test, as does a peak allocation over ``limit`` bytes."""
    tracemalloc.start()
    try:
        return decode(data)
    except allowed:
        return None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak <= limit, f"decoding {len(data) if hasattr(data, '__len__') else '?'} bytes allocated {peak:,} bytes"


# --------------------------------------------------------------------------- mutations


def length_fields(data: bytes) -> list[int]:
    """Offsets of the 4-byte length prefixes of a transcript encoding (fedlora.transcript), in order."""
    out: list[int] = []

    def walk(pos: int) -> int:
        if pos + 5 > len(data):
            raise IndexError(pos)
        tag, size = data[pos:pos + 1], int.from_bytes(data[pos + 1:pos + 5], "big")
        out.append(pos + 1)
        pos += 5
        if tag == b"T":
            for _ in range(size):
                pos = walk(pos)
            return pos
        return pos + size

    try:
        walk(0)
    except IndexError:
        pass
    return out


HUGE = (0xFFFFFFFF, 0xFFFFFFFE, 0x80000000, 0x7FFFFFFF, 1 << 24, 1 << 20)


@st.composite
def mutated(draw, seeds: list[bytes], *, transcript_framed: bool = True) -> bytes:
    """One of ``seeds`` with 1-4 mutations (or, one time in eight, random bytes)."""
    if draw(st.integers(0, 7)) == 0:
        return draw(st.binary(max_size=256))
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        op = draw(st.sampled_from(("flip", "truncate", "length", "length", "insert", "delete", "byte")))
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[i:]
        elif op == "length":
            fields = length_fields(bytes(data)) if transcript_framed else []
            at = draw(st.sampled_from(fields)) if fields else i
            old = int.from_bytes(data[at:at + 4], "big")
            new = draw(st.sampled_from(HUGE + ((old + 1) & 0xFFFFFFFF, max(old - 1, 0), 0)))
            data[at:at + 4] = new.to_bytes(4, "big")
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 16))]
        else:
            data[i] = draw(st.integers(0, 255))
    return bytes(data)


# Values of every type the wire carries, to put where another type belongs.
wire_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=12)
    | st.binary(max_size=40) | st.sampled_from([np.zeros(3, np.uint32), np.ones((2, 2), np.float32), np.zeros(0, "<f2")]),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner) | st.dictionaries(st.text(max_size=6), inner,
                                                                                          max_size=3),
    max_leaves=8)


def _wire_nodes(node, path=()) -> list[tuple]:
    """Paths to every wire value inside a decoded wire transcript (each a tuple with a type tag)."""
    out = []
    if isinstance(node, tuple) and node and isinstance(node[0], str) and len(node[0]) == 1:
        out.append(path)
    if isinstance(node, tuple):
        for i, child in enumerate(node):
            out += _wire_nodes(child, path + (i,))
    return out


def _replace(node, path, value):
    if not path:
        return value
    return node[:path[0]] + (_replace(node[path[0]], path[1:], value),) + node[path[0] + 1:]


@st.composite
def confused(draw, seeds: list[bytes]) -> bytes:
    """A valid wire message with one value (a field, an item, a whole message) swapped for a value of
    another type: a decoder that trusts the types it gets breaks on these, not on random bytes."""
    magic, kind, body = transcript.decode(draw(st.sampled_from(seeds)))
    nodes = _wire_nodes(body)
    path = draw(st.sampled_from(nodes))
    for _ in range(draw(st.integers(1, 2))):
        body = _replace(body, path, wire._enc(draw(wire_values)))
        nodes = _wire_nodes(body)
        path = draw(st.sampled_from(nodes))
    return transcript.encode(magic, kind, body)


def wire_inputs(seeds: list[bytes]):
    return st.one_of(mutated(seeds), confused(seeds))


# --------------------------------------------------------------------------- transcript and wire


def test_transcript_decode_is_exact_or_a_value_error():
    seeds = [transcript.encode("a", b"\x00" * 9, 0, 2**40, ("x", ("y", (1, 2)), [])), transcript.encode(), b""]

    @fuzz(1500)
    @given(mutated(seeds) | st.binary(max_size=128))
    def run(data):
        value = decodes_cleanly(transcript.decode, data, (ValueError,))
        if value is not None:
            assert transcript.encode(*value) == data  # only the canonical encoding decodes

    run()


def test_transcript_refuses_deep_nesting_with_a_value_error():
    deep = b"T\x00\x00\x00\x01" * 100_000 + b"T\x00\x00\x00\x00"
    with pytest.raises(ValueError):
        transcript.decode(deep)


@fuzz(1000)
@given(wire_values)
def test_wire_round_trips_every_value_it_carries(value):
    back = wire.loads(wire.dumps(value, "v"), "v")
    assert transcript.encode(wire._enc(back)) == transcript.encode(wire._enc(value))


def test_wire_loads_gives_a_value_or_a_wire_error():
    seeds = [wire.dumps(v, "k") for v in ([1, -2, 3.5, "x", b"y", None, True], {"a": np.arange(6, dtype="<i8").reshape(2, 3)},
                                          frozenset({1, 2}), (np.zeros((0, 4), np.float32),))]

    @fuzz(1500)
    @given(wire_inputs(seeds))
    def run(data):
        decodes_cleanly(lambda d: wire.loads(d, "k"), data, (wire.WireError,))

    run()


# --------------------------------------------------------------------------- secure aggregation

class Session:
    """One real cell session (4 clients, t=3), every message kept as bytes, and the roles rebuilt
    at any stage, fresh for each fuzzed input (so inputs do not see each other's effects)."""

    def __init__(self):
        from fedlora.secure.aggregator import NeighbourhoodAggregator
        from fedlora.secure.encoding import EncodingConfig, TensorLayout, encode_update
        from fedlora.secure.identities import SimulatedIdentities
        from fedlora.secure.prg import SeededStream
        from fedlora.secure.rounds import message
        from fedlora.secure.simulation import Enrolment

        self.fed = fed = Enrolment(SimulatedIdentities(15))
        self.state = {"w": np.zeros((2, 3), np.float32)}
        self.ids = [f"device-{i}" for i in range(4)]
        unmasker = fed.unmasker("cloud", 1)
        self.header = fed.cell_header(run_id="r", server_round=1, cell="n", aggregator="agg", unmasker=unmasker,
                                      global_adapter=self.state, threshold=3, max_clients=4)
        self._aggregator = lambda: NeighbourhoodAggregator("agg", fed.enroll("agg"), fed.registry, self.header)
        clients = {u: fed.client(u, self.header) for u in self.ids}
        agg = self._aggregator()
        self.adverts = [clients[u].advertise(self.header) for u in self.ids]
        for a in self.adverts:
            agg.receive_advert(a)
        self.roster = agg.close_advertising()
        self.after_advert = {u: clients[u].export_state() for u in self.ids}
        self.shares = [clients[u].share_keys(self.roster) for u in self.ids]
        for s in self.shares:
            agg.receive_shares(s)
        self.deliveries = agg.close_sharing()
        self.after_shares = {u: clients[u].export_state() for u in self.ids}
        layout, config = TensorLayout.of(self.state), EncodingConfig()
        self.q = {u: encode_update({"w": np.full((2, 3), 0.01, np.float32)}, 5, layout, config, SeededStream(b"\x01" * 32))
                  for u in self.ids}
        self.inputs = [clients[u].masked_input(self.deliveries[u], self.q[u]) for u in self.ids]
        for m in self.inputs:
            agg.receive_masked_input(m)
        self.request, self.masked_sum = agg.close_upload()
        self.after_inputs = {u: clients[u].export_state() for u in self.ids}
        self.responses = [clients[u].unmask(self.request) for u in self.ids]
        for r in self.responses:
            agg.receive_unmask_response(r)
        self.bundle = agg.close_unmask()
        self.mask = fed.unmasker("cloud", 1).unmask_cell(self.bundle)
        self.message = message

    def aggregator(self, stage: str):
        """A fresh aggregator that has received every client's messages before ``stage``."""
        agg = self._aggregator()
        steps = [("advertise", self.adverts, agg.receive_advert, agg.close_advertising),
                 ("share-keys", self.shares, agg.receive_shares, agg.close_sharing),
                 ("masked-input", self.inputs, agg.receive_masked_input, agg.close_upload)]
        for name, msgs, receive, close in steps:
            if name == stage:
                break
            for m in msgs:
                receive(m)
            close()
        return agg

    def client(self, saved: bytes):
        from fedlora.secure.client import CellClient

        return CellClient.restore(saved, self.fed.enroll("device-0"), self.fed.registry, rng=self.fed.rng("fuzz"))


@pytest.fixture(scope="module")
def session():
    return Session()


def _secure_errors():
    from fedlora.secure.errors import CellAborted, RejectedMessage, ShareRequestRefused

    return RejectedMessage, CellAborted, ShareRequestRefused


def _secure_cases(s: Session):
    """(name, valid messages, what a receiver does with the decoded bytes) for every message of a session."""
    from fedlora.secure import messages as m
    from fedlora.secure.rounds import read_message

    def to_aggregator(cls, stage, method):
        return lambda data: getattr(s.aggregator(stage), method)(read_message(data, cls))

    def to_client(cls, saved, method, *extra):
        return lambda data: getattr(s.client(saved["device-0"]), method)(read_message(data, cls), *extra)

    def to_unmasker(data):
        return s.fed.unmasker("cloud", 1).unmask_cell(read_message(data, m.UnmaskBundle))

    def cell_client(data):  # a device given a header by a forged cloud or aggregator
        return s.fed.client("device-0", s.header).advertise(read_message(data, m.SignedHeader), s.state)

    return [
        ("header", [s.header], cell_client),
        ("advertise-keys", s.adverts, to_aggregator(m.AdvertiseKeys, "advertise", "receive_advert")),
        ("roster", [s.roster], to_client(m.Roster, s.after_advert, "share_keys")),
        ("share-keys", s.shares, to_aggregator(m.ShareKeys, "share-keys", "receive_shares")),
        ("share-delivery", [s.deliveries["device-0"]],
         to_client(m.ShareDelivery, s.after_shares, "masked_input", s.q["device-0"])),
        ("masked-input", s.inputs, to_aggregator(m.MaskedInput, "masked-input", "receive_masked_input")),
        ("unmask-request", [s.request], to_client(m.UnmaskRequest, s.after_inputs, "unmask")),
        ("unmask-bundle", [s.bundle], to_unmasker),
        ("masked-sum", [s.masked_sum], lambda data: read_message(data, m.MaskedSum)),
        ("cell-mask", [s.mask], lambda data: read_message(data, m.CellMask)),
    ]


SECURE_NAMES = ["header", "advertise-keys", "roster", "share-keys", "share-delivery", "masked-input", "unmask-request",
                "unmask-bundle", "masked-sum", "cell-mask"]


@pytest.mark.parametrize("name", SECURE_NAMES)
def test_secure_messages_are_handled_or_rejected(session, name):
    """Each secure-aggregation message, fuzzed, through the role that receives it: it is handled or
    refused with the protocol's own error (RejectedMessage, CellAborted, ShareRequestRefused)."""
    _, valid, receive = next(c for c in _secure_cases(session) if c[0] == name)
    seeds = [session.message(v) for v in valid]
    for data in seeds:  # the valid messages are handled (the harness itself is right)
        receive(data)
    allowed = _secure_errors()

    @fuzz(150)
    @given(wire_inputs(seeds))
    def run(data):
        decodes_cleanly(receive, data, allowed, limit=16 * 2**20)

    run()


def test_share_and_unmask_payloads_decode_or_are_rejected():
    from fedlora.secure.errors import RejectedMessage
    from fedlora.secure.messages import RevealedShare, SharePayload, decode_revealed, encode_revealed

    seeds = [SharePayload(b"s" * 32, "device-1", "device-2", 3, 2**200, 2**255).encode(),
             encode_revealed(b"s" * 32, "device-1", (RevealedShare("device-2", "self-mask", 1, 2**100),
                                                     RevealedShare("device-3", "mask-key", 2, 5)))]

    @fuzz(800)
    @given(mutated(seeds))
    def run(data):
        decodes_cleanly(SharePayload.decode, data, (RejectedMessage,))
        decodes_cleanly(decode_revealed, data, (RejectedMessage,))

    run()


# --------------------------------------------------------------------------- cloud <-> edge


def _round_settings():
    from fedlora.config import compose
    from fedlora.run_settings import resolve_run

    return resolve_run(compose(["model=tiny"])).round_settings(1, {"proximal_mu": 0.0, "freeze_a": False})


@pytest.fixture(scope="module")
def cell_messages(session):
    """A plain and a secure cell request, and an edge's result for each."""
    from fedlora.aggregate.sums import WeightedSum
    from fedlora.roles.neighbourhood import ACCEPTED, DROPPED, CellRequest, CellResult, ClientStatus
    from fedlora.secure.encoding import EncodingConfig
    from fedlora.secure.identities import SimulatedIdentities
    from fedlora.secure.rounds import SecureOutcome, SecureRound, SecureSettings, secure_layout

    settings = _round_settings()
    arrays = {"a": np.zeros((2, 3), np.float32)}
    plain = CellRequest("run", 1, "neighbourhood-0-0", [0, 1], arrays, settings, {"a": (2, 3)})
    result = CellResult("neighbourhood-0-0", {0: ClientStatus(0, ACCEPTED, None, 1.5, 24, 0.5, 5.0),
                                              1: ClientStatus(1, DROPPED, "client error: boom")},
                        WeightedSum({"a": np.ones((2, 3))}, 5.0, 1), {"num_examples": 5.0, "train_loss": 2.5})
    sr = SecureRound(identities=SimulatedIdentities(1), run_id="run", server_round=1, clients=[0, 1, 2],
                     cells_above={"neighbourhood-0-0": "cloud"},
                     settings=SecureSettings(EncodingConfig(), 0.6, "cloud", "aes128-ctr", 100),
                     layout=secure_layout({"a": (2, 3)}))
    secure = CellRequest("run", 1, "neighbourhood-0-0", [0, 1, 2], arrays, settings, {"a": (2, 3)},
                         secure=sr.cell("neighbourhood-0-0", [0, 1, 2], arrays))
    outcome = SecureOutcome(masked=session.masked_sum, bundle=session.bundle, survivors=[0, 1, 2],
                            dropped={"share-keys": [2]})
    secure_result = CellResult("neighbourhood-0-0", {c: ClientStatus(c, ACCEPTED, None, 1.0) for c in (0, 1, 2)},
                               secure=outcome)
    return plain, result, secure, secure_result


def test_cell_requests_decode_or_are_a_cell_wire_error(cell_messages):
    from fedlora.roles.neighbourhood import CellRequest, CellWireError

    plain, _, secure, _ = cell_messages

    @fuzz(250)
    @given(wire_inputs([plain.to_bytes(), secure.to_bytes()]))
    def run(data):
        decodes_cleanly(CellRequest.from_bytes, data, (CellWireError,), limit=16 * 2**20)

    run()


def test_edge_results_are_merged_or_the_cell_is_dropped(cell_messages):
    """An edge's reply, fuzzed, through what the cloud does with it (server/edge.py decode_result): a
    usable result or the cell's clients dropped with the reason -- never an exception."""
    from server.edge import decode_result

    plain, result, secure, secure_result = cell_messages
    seeds = [result.to_bytes(), secure_result.to_bytes()]
    assert decode_result(plain, _Reply(seeds[0])).accepted == [0]

    @fuzz(300)
    @given(wire_inputs(seeds), st.booleans())
    def run(data, is_secure):
        got = decodes_cleanly(lambda d: decode_result(secure if is_secure else plain, _Reply(d)), data, ())
        assert sorted(got.clients) == sorted((secure if is_secure else plain).clients)

    run()


def test_an_edge_reply_with_unhashable_dropped_clients_drops_the_cell(cell_messages):
    """Found by the fuzzer (its inputs vary with the session's keys): a list among a cell's dropped clients raised
    TypeError in the cloud's check; the outcome's fields are typed, so the reply is refused at decode."""
    import dataclasses

    from server.edge import decode_result

    _, _, secure, secure_result = cell_messages
    for dropped in ({"share-keys": [[2]]}, {"share-keys": [{"x": 1}]}, {"share-keys": 2}):
        bad = dataclasses.replace(secure_result, secure=dataclasses.replace(secure_result.secure))
        object.__setattr__(bad.secure, "dropped", dropped)  # past the constructor's check, as a forged reply is
        got = decode_result(secure, _Reply(bad.to_bytes()))
        assert got.accepted == [] and sorted(got.clients) == [0, 1, 2]


class _Reply:
    """What server/edge.py reads of a Flower reply message: its content, no error."""

    def __init__(self, data: bytes):
        from fedlora import protocol

        self.content = {protocol.CELL: {protocol.CELL_RESULT_KEY: data}}

    def has_error(self) -> bool:
        return False


# --------------------------------------------------------------------------- the device's channel and split stream


def test_device_channel_frames_decode_or_are_a_clear_error():
    from fedlora.deploy import channel

    seeds = [channel.encode_request("train", "{}", {"a": np.zeros((2, 2), np.float32)}, run=3, stage="s", round=2,
                                    payload=b"p"),
             channel.encode_reply({"arrays": {"a": np.ones(3, np.float32)}, "reply": b"r", "metrics": {"n": 1.0},
                                   "stats": {"t": 2}}),
             channel.encode_reply(error="boom")]

    @fuzz(600)
    @given(wire_inputs(seeds))
    def run(data):
        decodes_cleanly(channel.decode_request, data, (wire.WireError,))
        decodes_cleanly(channel.decode_reply, data, (wire.WireError, channel.ChannelError))

    run()


def test_device_channel_refuses_a_huge_frame_before_reading_it():
    import socket
    import struct

    from fedlora.deploy import channel

    @fuzz(200)
    @given(st.integers(0, 2**64 - 1), st.binary(max_size=64))
    def run(size, body):
        a, b = socket.socketpair()
        with a, b:
            a.sendall(struct.pack(">Q", size) + body)
            a.shutdown(socket.SHUT_WR)
            got = decodes_cleanly(channel.recv_frame, b, (channel.ChannelError,))
            assert got is None or (size <= len(body) and got == body[:size])

    run()


def test_split_stream_frames_decode_or_are_a_frame_error():
    from fedlora.deploy import stream_protocol as sp

    messages = [sp.Hello("device-1", "edge-n", "run", 3, b"n" * 32), sp.Challenge("edge-n", b"m" * 32, b"s" * 64),
                sp.Proof(b"s" * 64), sp.Admitted(), sp.Refused("no"), sp.Failed("gone"), sp.Bye(4),
                sp.Step(0, "forward", {"h": np.zeros((2, 3), np.float16), "mask": np.ones((2, 3), np.int64)}),
                sp.Reply(0, np.zeros(4, np.float32))]
    frames = [sp.encode_frame(m, 2**20) for m in messages]

    def decode(frame: bytes):
        length = sp.frame_length(frame[:sp.HEADER_BYTES], sp.HANDSHAKE_FRAME_BYTES)
        return sp.decode_frame(frame[sp.HEADER_BYTES:sp.HEADER_BYTES + length])

    @fuzz(600)
    @given(st.one_of(mutated(frames, transcript_framed=False),
                     st.builds(lambda f, body: f[:sp.HEADER_BYTES] + body, st.sampled_from(frames),
                               wire_inputs([f[sp.HEADER_BYTES:] for f in frames]))))
    def run(frame):
        decodes_cleanly(decode, frame, (sp.FrameError,))

    run()


# --------------------------------------------------------------------------- round settings


def _json_mutations(doc):
    """A round-settings document with one value replaced, a key dropped or added (JSON-level fuzzing)."""
    leaves = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20) \
        | st.sampled_from(["${oc.env:HOME}", "${nope}", "${model.dtype}", "${oc.decode:'[1]'}", "1e999", "NaN"])
    values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                              max_size=3), max_leaves=6)

    def paths(node, prefix=()):
        out = [prefix] if prefix else []
        if isinstance(node, dict):
            for k, v in node.items():
                out += paths(v, prefix + (k,))
        return out

    @st.composite
    def build(draw):
        d = json.loads(json.dumps(doc))
        for _ in range(draw(st.integers(1, 3))):
            path = draw(st.sampled_from(paths(d) or [("version",)]))
            parent = d
            for k in path[:-1]:
                parent = parent[k] if isinstance(parent, dict) and isinstance(parent.get(k), dict) else parent
            if not isinstance(parent, dict):
                continue
            op = draw(st.sampled_from(("replace", "replace", "delete", "add")))
            if op == "replace":
                parent[path[-1]] = draw(values)
            elif op == "delete":
                parent.pop(path[-1], None)
            else:
                parent[draw(st.text(max_size=8))] = draw(values)
        return json.dumps(d)

    return build()


def test_round_settings_decode_or_are_a_round_settings_error():
    from fedlora.protocol import decode_settings, encode_settings

    text = encode_settings(_round_settings())
    assert decode_settings(text) == _round_settings()

    @fuzz(500)
    @given(st.one_of(_json_mutations(json.loads(text)), mutated([text.encode()], transcript_framed=False)))
    def run(data):
        if isinstance(data, bytes):
            data = data.decode("utf-8", "replace")
        decodes_cleanly(decode_settings, data, (RoundSettingsError,), limit=32 * 2**20)

    run()


def test_device_settings_apply_or_are_a_value_error():
    from fedlora.round_settings import LOCAL_KEYS, apply_device_settings

    base = _round_settings()
    item = st.builds(lambda k, v: f"{k}={v}", st.sampled_from(sorted(LOCAL_KEYS) + ["model.name", "lora.r", ""]),
                     st.sampled_from(["2", "bfloat16", "true", "-1", "${oc.env:HOME}", "[1,2]", "{a: 1}", "", "1e999",
                                      "nf4", "9" * 40, "'x'"]) | st.text(max_size=10))

    @fuzz(300)
    @given(st.lists(item, max_size=4).map(" ".join) | st.text(max_size=40))
    def run(text):
        decodes_cleanly(lambda t: apply_device_settings(base, t), text, (ValueError,), limit=32 * 2**20)

    run()


# --------------------------------------------------------------------------- plan folders and node configs


@pytest.fixture(scope="module")
def plan_folder(tmp_path_factory):
    from fedlora.config import compose
    from fedlora.deploy.plan import write_plan

    out = tmp_path_factory.mktemp("fuzz-plan") / "deploy"
    write_plan(compose(["model=tiny", "federation.num_clients=4"]), out, overrides=["model=tiny", "federation.num_clients=4"])
    return out / "end-0"


def test_node_folders_read_or_are_a_plan_error(plan_folder, tmp_path_factory):
    """A node folder whose node.yaml, registry or config.yaml is damaged: read, or the plan's own errors."""
    import shutil

    from fedlora.config import ConfigError
    from fedlora.deploy.plan import REGISTRY_FILE, PlanError, read_node
    from fedlora.secure.identities import IdentityError

    files = {"node.yaml": (plan_folder / "node.yaml").read_bytes(), REGISTRY_FILE: (plan_folder / REGISTRY_FILE).read_bytes(),
             "config.yaml": (plan_folder / "config.yaml").read_bytes()}
    work = tmp_path_factory.mktemp("fuzz-node") / "end-0"
    shutil.copytree(plan_folder, work)

    def load(folder):
        node = read_node(folder, "end")
        node.identities()
        _ = node.name, node.role, node.data_file()
        return node.config()

    structured = st.sampled_from(["", "a: [", "\t", "- 1\n- 2", "name: end-0\nrole: end\n", "{role: end, name: [1]}",
                                  '{"format": 1, "devices": {"x": {}}}', "!!python/object:os.system {}",
                                  "a: " + "[" * 200, "\x96\x00"]).map(str.encode)

    load(work)  # the valid folder reads (and the first example does not pay for the imports)

    @fuzz(150, deadline_s=30)
    @given(st.sampled_from(sorted(files)), st.one_of(mutated(list(files.values()), transcript_framed=False), structured))
    def run(name, data):
        for other, original in files.items():
            (work / other).write_bytes(data if other == name else original)
        decodes_cleanly(load, work, (PlanError, IdentityError, ConfigError), limit=64 * 2**20)

    run()


def test_a_self_referencing_config_yaml_is_a_config_error(tmp_path):
    """``&a [*a]``: omegaconf recurses until Python's limit (about a second; far longer under tracemalloc,
    hence not in the fuzzed folders above) -- still the config's own error."""
    from fedlora.config import ConfigError, load_yaml

    (tmp_path / "config.yaml").write_text("&a [*a]")
    with pytest.raises(ConfigError):
        load_yaml(tmp_path / "config.yaml", files=False)


# --------------------------------------------------------------------------- data loaders


def test_dataset_files_load_or_are_a_data_error(tmp_path_factory):
    """A device's own dataset file (JSON, JSONL, CSV), damaged: its examples, or a DataError."""
    from fedlora.data.errors import DataError
    from fedlora.data.files import file_examples

    rows = [{"instruction": "Say hi", "input": "", "output": "hi"}, {"instruction": "Add", "input": "1+1", "output": "2"}]
    chat = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    seeds = {".jsonl": ["".join(json.dumps(r) + "\n" for r in rows).encode(), json.dumps(chat[0]).encode() + b"\n"],
             ".json": [json.dumps(rows).encode(), json.dumps(chat).encode()],
             ".csv": [b"instruction,input,output\nSay hi,,hi\nAdd,1+1,2\n",
                      b'messages\n"[{""role"": ""user"", ""content"": ""q""}, {""role"": ""assistant"", ""content"": ""a""}]"\n']}
    folder = tmp_path_factory.mktemp("fuzz-data")
    counter = iter(range(10**9))
    for ext, datas in seeds.items():  # the valid files load (and the first example does not pay for the imports)
        (folder / f"seed{ext}").write_bytes(datas[0])
        assert file_examples(str(folder / f"seed{ext}"), 0)[0]

    @fuzz(40, deadline_s=30)
    @given(st.sampled_from(sorted(seeds)).flatmap(lambda ext: st.tuples(st.just(ext),
                                                                        mutated(seeds[ext], transcript_framed=False))))
    def run(case):
        ext, data = case
        path = folder / f"d{next(counter)}{ext}"
        path.write_bytes(data)
        decodes_cleanly(lambda p: file_examples(str(p), p.stat().st_mtime_ns), path, (DataError,), limit=256 * 2**20)

    run()
