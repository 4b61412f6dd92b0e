"""Encoding of adapter updates into Z_2^32: overflow guard, fixed point, rounding, weights."""

import numpy as np
import pytest

from fedlora.secure.encoding import (
    EncodingConfig,
    TensorLayout,
    adapter_digest,
    calibrate_clip,
    check_encoded,
    check_overflow,
    decode_sum,
    encode_update,
    from_ring,
    max_summands,
    stochastic_round,
    to_ring,
)
from fedlora.secure.errors import UnsafeEncoding
from fedlora.secure.prg import SeededStream

SHAPES = {"l0.lora_B.weight": (48, 40), "l1.lora_B.weight": (40, 50)}
LAYOUT = TensorLayout(tuple(sorted(SHAPES.items())))


def _updates(n, seed, scale=0.01):
    rng = np.random.default_rng(seed)  # test data only; masks and rounding never use numpy.random
    return [{k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in SHAPES.items()} for _ in range(n)]


# ---------------------------------------------------------------------------- overflow


def test_overflow_guard_at_the_design_bound():
    assert max_summands(16) == 65_538
    check_overflow(65_538, 16)
    with pytest.raises(UnsafeEncoding, match=r"65539 summands of 16-bit values .* at most 65,538 summands fit"):
        check_overflow(65_539, 16)
    with pytest.raises(UnsafeEncoding, match="use bits <= 15"):
        check_overflow(100_000, 16)
    check_overflow(2, 31)  # 2 * (2^30 - 1) = 2^31 - 2
    with pytest.raises(UnsafeEncoding):
        check_overflow(3, 31)
    with pytest.raises(UnsafeEncoding, match="bits=32 must be an integer in 2..31"):
        check_overflow(1, 32)
    with pytest.raises(UnsafeEncoding, match="count coordinate"):
        check_overflow(1000, 8, max_examples=10_000_000)


def test_exactly_at_the_bound_the_sum_does_not_wrap_and_one_more_would():
    """n * L at the bound still decodes to n * L; with one more summand it would wrap."""
    L, n = 2**15 - 1, 65_538
    total = (to_ring(np.array([L])).astype(np.uint64) * n % 2**32).astype(np.uint32)
    assert from_ring(total)[0] == n * L
    wrapped = (to_ring(np.array([L])).astype(np.uint64) * (n + 1) % 2**32).astype(np.uint32)
    assert from_ring(wrapped)[0] != (n + 1) * L


def test_config_refuses_unsafe_settings():
    with pytest.raises(UnsafeEncoding):
        EncodingConfig(bits=40)
    with pytest.raises(ValueError, match="clip=0.0 must be a positive finite number"):
        EncodingConfig(clip=0.0)
    with pytest.raises(ValueError, match=r"clip_per_tensor\['x'\]=nan"):
        EncodingConfig(clip_per_tensor={"x": float("nan")})
    cfg = EncodingConfig(clip=0.05, clip_per_tensor={"b": 0.01, "a": 0.02})
    assert cfg.clip_per_tensor == (("a", 0.02), ("b", 0.01))
    assert cfg.clip_for("b") == 0.01 and cfg.clip_for("z") == 0.05


# ---------------------------------------------------------------------- ring and rounding


def test_twos_complement_round_trip_and_wrapping_sum():
    q = np.array([-32767, -1, 0, 1, 32767], dtype=np.int64)
    ring = to_ring(q)
    assert ring.dtype == np.uint32 and ring.tolist() == [2**32 - 32767, 2**32 - 1, 0, 1, 32767]
    assert from_ring(ring).tolist() == q.tolist()
    # Adding in uint32 (wrapping) then reading as int32 gives the signed sum.
    rng = np.random.default_rng(0)
    values = rng.integers(-32767, 32768, size=(50, 100))
    acc = np.zeros(100, np.uint32)
    for row in values:
        acc += to_ring(row)
    assert np.array_equal(from_ring(acc), values.sum(axis=0))


def test_stochastic_rounding_is_unbiased_and_within_one():
    x = np.full(200_000, 2.3)
    x[100_000:] = -7.75
    q = stochastic_round(x, SeededStream(bytes(32)))
    assert set(np.unique(q[:100_000])) == {2, 3} and set(np.unique(q[100_000:])) == {-8, -7}
    # Means within 5 standard errors of the true values (deterministic stream, so no flakes).
    for part, value, p in ((q[:100_000], 2.3, 0.3), (q[100_000:], -7.75, 0.25)):
        se = np.sqrt(p * (1 - p) / part.size)
        assert abs(part.mean() - value) < 5 * se
    assert np.all(np.abs(q - x) < 1)
    integers = np.arange(-5.0, 6.0)
    assert np.array_equal(stochastic_round(integers, SeededStream(bytes(32))), integers.astype(np.int64))


def test_rounding_randomness_comes_from_the_seeded_stream():
    x = np.linspace(-3, 3, 1000) + 0.5
    a = stochastic_round(x, SeededStream(b"\x01" * 32))
    assert np.array_equal(a, stochastic_round(x, SeededStream(b"\x01" * 32)))
    assert not np.array_equal(a, stochastic_round(x, SeededStream(b"\x02" * 32)))


# ------------------------------------------------------------------------------ encoding


def test_encode_clips_weights_and_appends_the_count():
    cfg = EncodingConfig(bits=16, clip=0.05, max_examples=100)
    update = {k: np.full(s, 1.0, np.float32) for k, s in SHAPES.items()}  # far beyond the clip
    update["l0.lora_B.weight"][0, 0] = -1.0
    q = encode_update(update, 50, LAYOUT, cfg, SeededStream(bytes(32)))
    assert q.dtype == np.uint32 and q.shape == (LAYOUT.size,)
    signed = from_ring(q[:-1])
    half = (cfg.levels + 1) // 2  # clip(1.0) * (50/100) * L = L / 2 = 16383.5 -> 16383 or 16384
    assert set(np.unique(signed)) <= {-half, -half + 1, half - 1, half}
    assert q[-1] == 50
    # More examples than max_examples counts as max_examples, in the weight and in the count.
    capped = encode_update(update, 10_000, LAYOUT, cfg, SeededStream(bytes(32)))
    assert capped[-1] == 100 and np.max(np.abs(from_ring(capped[:-1]))) == cfg.levels
    check_encoded(capped, LAYOUT, cfg)


def test_encode_refuses_bad_updates_with_the_tensor_named():
    cfg = EncodingConfig()
    good = _updates(1, 0)[0]
    with pytest.raises(ValueError, match="lacks tensor 'l1.lora_B.weight'"):
        encode_update({"l0.lora_B.weight": good["l0.lora_B.weight"]}, 1, LAYOUT, cfg, SeededStream(bytes(32)))
    bad = dict(good, **{"l1.lora_B.weight": np.zeros((50, 40), np.float32)})
    with pytest.raises(ValueError, match=r"'l1.lora_B.weight' has shape \(50, 40\), the cell layout says \(40, 50\)"):
        encode_update(bad, 1, LAYOUT, cfg, SeededStream(bytes(32)))
    nan = dict(good)
    nan["l0.lora_B.weight"] = good["l0.lora_B.weight"].copy()
    nan["l0.lora_B.weight"][3, 3] = np.nan
    with pytest.raises(ValueError, match="'l0.lora_B.weight' has NaN"):
        encode_update(nan, 1, LAYOUT, cfg, SeededStream(bytes(32)))
    with pytest.raises(ValueError, match="num_examples=0 must be a positive integer"):
        encode_update(good, 0, LAYOUT, cfg, SeededStream(bytes(32)))
    with pytest.raises(ValueError, match="exceed"):
        check_encoded(np.full(LAYOUT.size, 40_000, np.uint32), LAYOUT, cfg)


def test_decoded_average_within_one_step_with_equal_counts():
    """All clients with n_max examples: every rounding error < 1 step, so the mean's too."""
    cfg = EncodingConfig(bits=16, clip=0.05, max_examples=500)
    updates = _updates(12, 1)
    total = np.zeros(LAYOUT.size, np.uint32)
    for i, u in enumerate(updates):
        total += encode_update(u, 500, LAYOUT, cfg, SeededStream(bytes([i]) * 32))
    decoded = decode_sum(total, LAYOUT, cfg, clients=12)
    assert decoded.examples == 12 * 500 and decoded.clients == 12
    mean = decoded.mean()
    for name in SHAPES:
        exact = np.mean([u[name].astype(np.float64) for u in updates], axis=0)
        err = np.max(np.abs(mean[name] - exact))
        assert decoded.mean_error_bound(name) == pytest.approx(cfg.step(name))
        assert err < cfg.step(name), f"{name}: max error {err:.3g} >= one step {cfg.step(name):.3g}"
        assert err > 0  # quantisation happened: the test would notice a no-op encoder


def test_weighted_average_with_unequal_counts_within_its_bound():
    cfg = EncodingConfig(bits=16, clip=0.05, max_examples=1000)
    updates, counts = _updates(8, 2), [1000, 700, 350, 999, 120, 800, 640, 1000]
    total = np.zeros(LAYOUT.size, np.uint32)
    for i, (u, n) in enumerate(zip(updates, counts)):
        total += encode_update(u, n, LAYOUT, cfg, SeededStream(bytes([i]) * 32))
    decoded = decode_sum(total, LAYOUT, cfg, clients=8)
    assert decoded.examples == sum(counts)
    for name in SHAPES:
        exact = sum(n * u[name].astype(np.float64) for u, n in zip(updates, counts)) / sum(counts)
        err = np.max(np.abs(decoded.mean()[name] - exact))
        assert err < decoded.mean_error_bound(name)
        # The example-weighted total follows WeightedSum.total's convention.
        exact_total = sum(n * u[name].astype(np.float64) for u, n in zip(updates, counts))
        assert np.max(np.abs(decoded.total[name] - exact_total)) < 8 * cfg.step(name) * cfg.max_examples


def test_per_tensor_clip_buys_precision():
    """A LoRA-sized clip gives ~100x the precision of a range of 8 (the design's warning)."""
    updates = _updates(6, 3, scale=0.002)
    errors = {}
    for clip in (8.0, 0.01):
        cfg = EncodingConfig(clip_per_tensor={k: clip for k in SHAPES}, max_examples=10)
        total = np.zeros(LAYOUT.size, np.uint32)
        for i, u in enumerate(updates):
            total += encode_update(u, 10, LAYOUT, cfg, SeededStream(bytes([i]) * 32))
        mean = decode_sum(total, LAYOUT, cfg, 6).mean()
        errors[clip] = max(np.max(np.abs(mean[k] - np.mean([u[k] for u in updates], axis=0))) for k in SHAPES)
    assert errors[0.01] * 100 < errors[8.0]


def test_calibrate_clip_from_a_public_reference():
    ref = {"a": np.array([0.001, -0.004]), "b": np.zeros(3)}
    assert calibrate_clip(ref, margin=4.0, floor=1e-6) == {"a": pytest.approx(0.016), "b": 1e-6}


def test_decode_refuses_a_sum_whose_masks_did_not_cancel():
    cfg = EncodingConfig(max_examples=100)
    garbage = np.full(LAYOUT.size, 123_456_789, np.uint32)
    with pytest.raises(ValueError, match="count coordinate 123456789 is impossible for 5 clients"):
        decode_sum(garbage, LAYOUT, cfg, clients=5)
    with pytest.raises(UnsafeEncoding):
        decode_sum(garbage, LAYOUT, EncodingConfig(bits=16), clients=70_000)


def test_adapter_digest_sees_every_bit():
    state = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    base = adapter_digest(state)
    state["l1.lora_B.weight"][5, 5] = np.float32(1e-30)
    assert adapter_digest(state) != base
    assert adapter_digest({"x": np.zeros((2, 3), np.float32)}) != adapter_digest({"x": np.zeros((3, 2), np.float32)})


def test_a_layout_with_a_negative_dimension_is_refused():
    """Found by a 3000-example fuzz run: a forged header's layout with a dimension -1 decoded, then the
    client's signature check could not encode it (ValueError instead of a rejected message)."""
    with pytest.raises(ValueError, match="non-negative"):
        TensorLayout((("a", (-1, 3)),))
    assert TensorLayout((("a", (0, 3)),)).num_values == 0
