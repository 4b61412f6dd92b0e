"""Smoke test of bench/secagg.py: both secure-aggregation paths recover the sum of the same updates.

Small (5 clients, one dropped before upload, a 34,560-parameter rank-1 adapter) so it runs in
a few seconds; the timings themselves are the benchmark's business, not asserted here.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
# A bench script that cannot be imported is a broken benchmark: an error here, never a skip.
import secagg  # noqa: E402 (importable only once bench/ is on sys.path)


def test_fedlora_cell_recovers_the_sum_within_quantisation_and_uploads_about_fp32():
    row = secagg.fedlora_cell(5, "r1_q", drops=1)
    assert "aborted" not in row and row["survivors"] == 4
    # each survivor's stochastic rounding errs by < 1 step; nothing is clipped (std 1e-3 vs clip 0.05)
    assert 0 < row["max_abs_err_sum"] < 4 * row["quant_step"]
    assert row["upload_bytes"] / (4 * row["params"]) < 1.05


def test_flower_secaggplus_reproduction_recovers_the_sum_and_uploads_int64():
    row = secagg.flower_cell(5, "r1_q", drops=1)
    assert row["survivors"] == 4
    # the masks cancel: the end-to-end result is bit-identical to quantise + add + decode
    assert row["maskfree_bit_identical"]
    assert 0 < row["max_abs_err_sum"] < 4 * row["quant_step"]
    assert 1.95 < row["upload_bytes"] / (4 * row["params"]) < 2.2
