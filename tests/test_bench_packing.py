"""Smoke test of bench/packing.py: real messages of a packed cell weigh k bits per value and decode the same sum."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
# A bench script that cannot be imported is a broken benchmark: an error here, never a skip.
import packing  # noqa: E402 (importable only once bench/ is on sys.path)


def test_packed_cell_messages_weigh_k_bits_per_value_and_decode_the_same_sum():
    off = packing.cell_bytes("r1_q", 3, 8, 0)
    on = packing.cell_bytes("r1_q", 3, 8, 3)  # k = 8 + 2
    assert off["ring_bits"] == 32 and on["ring_bits"] == 10 and on["values"] == 34_560
    overhead = off["masked_input_bytes"] - 4 * (on["values"] + 1)  # sid, sender, signature, framing
    assert 0 < overhead < 400
    assert on["masked_input_bytes"] == on["values"] * 10 // 8 + 4 + overhead
    assert on["per_message_bytes"]["share_keys"] == off["per_message_bytes"]["share_keys"]
    for k in off["decoded"].total:
        assert np.array_equal(off["decoded"].total[k], on["decoded"].total[k])
