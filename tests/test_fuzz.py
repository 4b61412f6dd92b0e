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
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora import transcript, wire
from fedlora.round_settings import RoundSettingsError

EXAMPLES = int(os.environ.get("FEDLORA_FUZZ_EXAMPLES", "0"))
# The most a decoder may allocate for one input of at most a few KB: far below what a length field
# of 2^32 (or 2^64) would make it reserve, far above what the largest legitimate decode here needs.
ALLOC_LIMIT = 4 * 2**20


def fuzz(examples: int):
    """Hypothesis settings of one decoder: ``examples`` in CI (or FEDLORA_FUZZ_EXAMPLES), derandomised."""
    return settings(max_examples=EXAMPLES or examples, derandomize=True, database=None, deadline=timedelta(seconds=5),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], print_blob=True)


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


@fuzz(1500)
@given(wire_values)
def test_wire_round_trips_every_value_it_carries(value):
    back = wire.loads(wire.dumps(value, "v"), "v")
    assert transcript.encode(wire._enc(back)) == transcript.encode(wire._enc(value))


def test_wire_loads_gives_a_value_or_a_wire_error():
    seeds = [wire.dumps(v, "k") for v in ([1, -2, 3.5, "x", b"y", None, True], {"a": np.arange(6, dtype="<i8").reshape(2, 3)},
                                          frozenset({1, 2}), (np.zeros((0, 4), np.float32),))]

    @fuzz(2000)
    @given(wire_inputs(seeds))
    def run(data):
        decodes_cleanly(lambda d: wire.loads(d, "k"), data, (wire.WireError,))

    run()
