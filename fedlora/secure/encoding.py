"""Adapter update <-> vector in Z_2^32: clipping, fixed point, stochastic rounding, weights.

A client's update ``{name: float32 ndarray}`` with ``n_u`` examples becomes one uint32
vector ``q_u`` that can be masked and summed with wrap-around:

1. clip each tensor to ``[-c, c]`` (``c`` per tensor or global; LoRA deltas are small, so
   ``c`` should be calibrated to them -- a range of 8.0 would leave almost no precision);
2. weight by ``w_u = n_u / n_max`` (``n_max`` = ``max_examples``, a public bound; a client
   with more examples counts as ``n_max``), so the sum is the example-weighted sum;
3. scale to b-bit signed fixed point, ``L = 2^(b-1) - 1`` levels per side, step ``c / L``;
4. round stochastically (unbiased: ``E[q] = x``), randomness from a seeded cryptographic
   stream (:class:`~fedlora.secure.prg.SeededStream`), never ``numpy.random``;
5. embed as two's complement in Z_2^32, and append ``n_u`` as one more coordinate so the
   example count travels masked and is only ever seen as a sum.

Overflow: a sum of ``n`` values in ``[-L, L]`` stays in int32 iff ``n * L <= 2^31 - 1``
(65,538 summands at b = 16), and the count coordinate needs ``n * n_max <= 2^32 - 1``.
:func:`check_overflow` refuses anything else -- a wrapped sum would decode silently wrong.

Packing (``EncodingConfig.sum_clients`` > 0, :mod:`fedlora.secure.packing`): the value
coordinates travel in the smaller ring Z_2^k, ``k = ring_bits(b, sum_clients)``, which holds a
sum of up to ``sum_clients`` inputs exactly; the count coordinate stays in Z_2^32.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedlora.secure.errors import UnsafeEncoding
from fedlora.secure.prg import SeededStream

AdapterState = dict[str, np.ndarray]

DEFAULT_BITS = 16
# LoRA deltas after a round of local training are ~1e-3..1e-2 per entry; 0.05 keeps those
# unclipped with a step of 1.5e-6 at b = 16. Calibrate per tensor with calibrate_clip().
DEFAULT_CLIP = 0.05
DEFAULT_MAX_EXAMPLES = 10_000
_INT32_MAX = 2**31 - 1
_UINT32_MAX = 2**32 - 1


def levels(bits: int) -> int:
    """Quantisation levels on each side of zero at ``bits``-bit signed fixed point."""
    return 2 ** (bits - 1) - 1


def max_summands(bits: int) -> int:
    """The most b-bit values whose sum cannot leave int32: floor((2^31 - 1) / (2^(b-1) - 1))."""
    return _INT32_MAX // levels(bits)


def ring_bits(bits: int, sum_clients: int) -> int:
    """Width k of the ring Z_2^k that holds a sum of ``sum_clients`` b-bit values exactly:
    ``b + ceil(log2 n)`` (at most 32), since ``n * (2^(b-1) - 1) <= 2^(k-1) - 1`` then."""
    if not isinstance(sum_clients, int) or sum_clients < 1:
        raise ValueError(f"sum_clients={sum_clients} must be an integer >= 1")
    return min(32, bits + (sum_clients - 1).bit_length())


def check_overflow(num_summands: int, bits: int, max_examples: int | None = None, ring: int = 32) -> None:
    """Raise :class:`UnsafeEncoding` unless summing ``num_summands`` encoded updates is exact.

    Needs ``num_summands * (2^(bits-1) - 1) <= 2^(ring-1) - 1`` (the signed coordinates, in
    Z_2^ring; ring = 32 unless packed) and, if ``max_examples`` is given,
    ``num_summands * max_examples <= 2^32 - 1`` (the count).
    """
    if not isinstance(bits, int) or not 2 <= bits <= 31:
        raise UnsafeEncoding(f"bits={bits} must be an integer in 2..31 (signed fixed point inside Z_2^32)")
    if num_summands < 1:
        raise ValueError(f"num_summands={num_summands} must be >= 1")
    if num_summands * levels(bits) > _INT32_MAX:
        safe_bits = max((b for b in range(2, 32) if num_summands * levels(b) <= _INT32_MAX), default=None)
        hint = f"use bits <= {safe_bits}" if safe_bits else "no bit width is safe"
        raise UnsafeEncoding(
            f"{num_summands} summands of {bits}-bit values can reach {num_summands * levels(bits):,} > 2^31 - 1, "
            f"so the sum could wrap in Z_2^32; at bits={bits} at most {max_summands(bits):,} summands fit ({hint})")
    if ring < 32 and num_summands * levels(bits) > 2 ** (ring - 1) - 1:
        raise UnsafeEncoding(
            f"{num_summands} summands of {bits}-bit values can reach {num_summands * levels(bits):,} > 2^{ring - 1} - 1, "
            f"so the sum could wrap in the packed ring Z_2^{ring}; at most {(2 ** (ring - 1) - 1) // levels(bits):,} "
            "summands fit (size the ring for more clients: EncodingConfig.sum_clients)")
    if max_examples is not None and num_summands * max_examples > _UINT32_MAX:
        raise UnsafeEncoding(
            f"{num_summands} summands with up to max_examples={max_examples} examples each can reach "
            f"{num_summands * max_examples:,} > 2^32 - 1 in the count coordinate; lower max_examples")


@dataclass(frozen=True)
class EncodingConfig:
    """How a cell encodes updates; all fields are public and fixed in the cell header."""

    # b: bits of signed fixed point per coordinate (the sum is exact for <= max_summands(b) clients).
    bits: int = DEFAULT_BITS
    # Global clip c: each coordinate is clipped to [-c, c] before scaling (step = c / (2^(b-1)-1)).
    clip: float = DEFAULT_CLIP
    # Per-tensor clip values overriding ``clip`` (a mapping is accepted, stored sorted).
    clip_per_tensor: tuple[tuple[str, float], ...] | Mapping[str, float] = ()
    # n_max: an update is weighted by min(n_u, n_max) / n_max; its count slot carries min(n_u, n_max).
    max_examples: int = DEFAULT_MAX_EXAMPLES
    # n: the most client inputs any sum of this encoding may hold before it is unmasked; the value
    # coordinates then travel packed in Z_2^ring_bits(b, n) (fedlora.secure.packing). 0 = not packed:
    # every coordinate travels as 32 bits in Z_2^32.
    sum_clients: int = 0

    def __post_init__(self) -> None:
        per = self.clip_per_tensor
        items = tuple(sorted((per.items() if isinstance(per, Mapping) else per)))
        object.__setattr__(self, "clip_per_tensor", tuple((str(k), float(v)) for k, v in items))
        object.__setattr__(self, "clip", float(self.clip))
        check_overflow(1, self.bits)
        for name, value in (("clip", self.clip),) + tuple((f"clip_per_tensor[{k!r}]", v) for k, v in self.clip_per_tensor):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"encoding {name}={value} must be a positive finite number")
        if not isinstance(self.max_examples, int) or not 1 <= self.max_examples <= _UINT32_MAX:
            raise ValueError(f"encoding max_examples={self.max_examples} must be an integer in 1..2^32-1")
        if not isinstance(self.sum_clients, int) or self.sum_clients < 0:
            raise ValueError(f"encoding sum_clients={self.sum_clients} must be an integer >= 0 (0 = not packed)")
        if self.sum_clients:
            self.check_capacity(self.sum_clients)

    @property
    def levels(self) -> int:
        return levels(self.bits)

    @property
    def value_bits(self) -> int:
        """k: the value coordinates live in Z_2^k (32 unless packed); the count always in Z_2^32."""
        return ring_bits(self.bits, self.sum_clients) if self.sum_clients else 32

    def clip_for(self, name: str) -> float:
        return dict(self.clip_per_tensor).get(name, self.clip)

    def step(self, name: str) -> float:
        """One quantisation step of tensor ``name`` in the weighted domain (``c / L``)."""
        return self.clip_for(name) / self.levels

    def check_capacity(self, num_summands: int) -> None:
        """:func:`check_overflow` for this encoding (in its packed ring, and for at most
        ``sum_clients`` inputs when packed)."""
        if self.sum_clients and num_summands > self.sum_clients:
            raise UnsafeEncoding(f"{num_summands} inputs in one sum, but the packed ring Z_2^{self.value_bits} is "
                                 f"sized for at most sum_clients={self.sum_clients}")
        check_overflow(num_summands, self.bits, self.max_examples, self.value_bits)

    def fields(self) -> tuple:
        """Canonical transcript fields (floats as exact hex); the ring only when packed, so an
        unpacked header's transcript (and its session's masks) is what it was before packing."""
        packed = (("ring", self.sum_clients, self.value_bits),) if self.sum_clients else ()
        return ("encoding", self.bits, self.clip.hex(), tuple((k, v.hex()) for k, v in self.clip_per_tensor),
                self.max_examples) + packed


@dataclass(frozen=True)
class TensorLayout:
    """Tensor names and shapes in vector order (sorted by name), then the count slot."""

    tensors: tuple[tuple[str, tuple[int, ...]], ...]
    offsets: dict[str, tuple[int, int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tensors = tuple((str(n), tuple(int(d) for d in s)) for n, s in self.tensors)
        if any(d < 0 for _, shape in tensors for d in shape):
            raise ValueError("layout tensor dimensions must be non-negative")
        names = [n for n, _ in tensors]
        if names != sorted(set(names)):
            raise ValueError("layout tensors must be sorted by name and unique")
        object.__setattr__(self, "tensors", tensors)
        offsets, start = {}, 0
        for name, shape in tensors:
            size = math.prod(shape)
            offsets[name] = (start, start + size)
            start += size
        object.__setattr__(self, "offsets", offsets)

    @classmethod
    def of(cls, state: Mapping[str, np.ndarray]) -> TensorLayout:
        """The layout of an adapter state (e.g. the global adapter of the round)."""
        return cls(tuple((name, tuple(state[name].shape)) for name in sorted(state)))

    @property
    def num_values(self) -> int:
        """Coordinates holding tensor values."""
        return sum(math.prod(s) for _, s in self.tensors)

    @property
    def size(self) -> int:
        """Length of an encoded vector: the values, then the example count."""
        return self.num_values + 1

    @property
    def count_index(self) -> int:
        return self.num_values

    def fields(self) -> tuple:
        return ("layout", tuple((n, tuple(s)) for n, s in self.tensors))

    def check(self, update: Mapping[str, np.ndarray]) -> None:
        """Raise ValueError naming the first tensor that is missing, extra, misshapen or not finite."""
        expected = dict(self.tensors)
        for name in sorted(set(expected) - set(update)):
            raise ValueError(f"update lacks tensor {name!r} that the cell layout has")
        for name in sorted(set(update) - set(expected)):
            raise ValueError(f"update has tensor {name!r} that the cell layout lacks")
        for name, shape in self.tensors:
            value = np.asarray(update[name])
            if tuple(value.shape) != shape:
                raise ValueError(f"tensor {name!r} has shape {tuple(value.shape)}, the cell layout says {shape}")
            if not np.all(np.isfinite(value)):
                raise ValueError(f"tensor {name!r} has NaN or infinite values; refusing to encode it")


def calibrate_clip(reference: Mapping[str, np.ndarray], *, margin: float = 4.0, floor: float = 1e-6) -> dict[str, float]:
    """Per-tensor clip values from a public reference delta: ``margin * max|x|`` (at least ``floor``).

    Use something every party may know, e.g. the previous round's average delta (the cloud
    has it); never a single client's update, which the clip values would then leak.
    """
    if margin <= 0 or floor <= 0:
        raise ValueError(f"margin={margin} and floor={floor} must be positive")
    return {name: max(floor, margin * float(np.max(np.abs(v))) if np.size(v) else floor) for name, v in sorted(reference.items())}


def stochastic_round(x: np.ndarray, stream: SeededStream) -> np.ndarray:
    """Round each value down or up at random so that ``E[result] = x`` (int64).

    ``floor(x) + 1`` with probability ``frac(x)`` (resolution 2^-32), else ``floor(x)``;
    ``|result - x| < 1`` always.
    """
    x = np.asarray(x, dtype=np.float64)
    low = np.floor(x)
    up = stream.uniform(x.size).reshape(x.shape) < (x - low)
    return low.astype(np.int64) + up


def to_ring(q: np.ndarray) -> np.ndarray:
    """Signed integers -> two's complement in Z_2^32 (uint32)."""
    return (np.asarray(q, dtype=np.int64) & _UINT32_MAX).astype(np.uint32)


def from_ring(v: np.ndarray, ring: int = 32) -> np.ndarray:
    """uint32 in Z_2^ring -> the signed value it represents (as int64); only the low ``ring``
    bits count (a sum computed in uint32 is right mod 2^ring, since 2^ring divides 2^32)."""
    signed = np.ascontiguousarray(v, dtype=np.uint32).view(np.int32).astype(np.int64)
    if ring == 32:
        return signed
    low, half = signed & ((1 << ring) - 1), 1 << (ring - 1)
    return (low ^ half) - half


def effective_examples(num_examples: int, config: EncodingConfig) -> int:
    """The count an update is weighted by: ``min(n_u, n_max)``; refuses ``n_u < 1``."""
    if not isinstance(num_examples, (int, np.integer)) or num_examples < 1:
        raise ValueError(f"num_examples={num_examples} must be a positive integer (a client without examples sends nothing)")
    return int(min(num_examples, config.max_examples))


def encode_update(update: Mapping[str, np.ndarray], num_examples: int, layout: TensorLayout, config: EncodingConfig,
                  rounding: SeededStream) -> np.ndarray:
    """The uint32 vector ``q_u`` of one client's update (length ``layout.size``).

    Coordinates ``[0, num_values)``: ``round(clip(x) * w_u * L / c)`` in two's complement,
    each in ``[-L, L]``; coordinate ``count_index``: ``min(n_u, n_max)``.
    """
    layout.check(update)
    count = effective_examples(num_examples, config)
    weight = count / config.max_examples
    L = config.levels
    out = np.empty(layout.size, dtype=np.uint32)
    for name, _ in layout.tensors:
        start, stop = layout.offsets[name]
        c = config.clip_for(name)
        scaled = np.clip(np.asarray(update[name], dtype=np.float64).ravel(), -c, c) * (weight * L / c)
        # c * (L / c) can land a hair above L in floating point; keep the promise |q| <= L.
        np.clip(scaled, -L, L, out=scaled)
        out[start:stop] = to_ring(stochastic_round(scaled, rounding))
    out[layout.count_index] = count
    return out


def check_encoded(vector: np.ndarray, layout: TensorLayout, config: EncodingConfig) -> None:
    """Raise ValueError unless ``vector`` could be an output of :func:`encode_update`."""
    if not isinstance(vector, np.ndarray) or vector.dtype != np.uint32 or vector.shape != (layout.size,):
        got = f"{vector.dtype} {vector.shape}" if isinstance(vector, np.ndarray) else type(vector).__name__
        raise ValueError(f"an encoded update is a uint32 vector of length {layout.size}, got {got}")
    signed = from_ring(vector[: layout.count_index])
    if signed.size and int(np.max(np.abs(signed))) > config.levels:
        raise ValueError(f"encoded values exceed +-{config.levels} ({config.bits}-bit fixed point); "
                         "their sum could wrap")
    count = int(vector[layout.count_index])
    if not 1 <= count <= config.max_examples:
        raise ValueError(f"encoded example count {count} is outside 1..max_examples={config.max_examples}")


@dataclass
class DecodedSum:
    """What unmasking a sum gives: the example-weighted sum of clipped updates and the counts.

    ``total[name] = sum_u n_u * clip(x_u)`` (the convention of ``WeightedSum.total``, up to
    quantisation), ``examples = sum_u n_u``, ``clients`` = number of updates in the sum.
    Individual counts are never known: only their sum travels.
    """

    total: AdapterState
    examples: int
    clients: int
    config: EncodingConfig

    def mean(self) -> AdapterState:
        """The example-weighted average update (float32)."""
        return {k: (v / self.examples).astype(np.float32) for k, v in self.total.items()}

    def mean_error_bound(self, name: str) -> float:
        """Bound on ``|mean - exact weighted mean of the clipped updates|`` per coordinate of
        ``name``: each update's rounding error is < 1 step, so the bound is
        ``clients * step * n_max / examples`` -- exactly one step when every client has n_max."""
        return self.clients * self.config.step(name) * self.config.max_examples / self.examples


def decode_sum(plain: np.ndarray, layout: TensorLayout, config: EncodingConfig, clients: int) -> DecodedSum:
    """Decode an unmasked sum of ``clients`` encoded updates.

    Checks the count coordinate: it must lie in ``[clients, clients * n_max]``; anything else
    means the masks did not cancel (a wrong or tampered sum), and decoding is refused.
    """
    config.check_capacity(clients)
    if not isinstance(plain, np.ndarray) or plain.dtype != np.uint32 or plain.shape != (layout.size,):
        got = f"{plain.dtype} {plain.shape}" if isinstance(plain, np.ndarray) else type(plain).__name__
        raise ValueError(f"a sum to decode is a uint32 vector of length {layout.size}, got {got}")
    examples = int(plain[layout.count_index])
    if not clients <= examples <= clients * config.max_examples:
        raise ValueError(f"count coordinate {examples} is impossible for {clients} clients with 1..{config.max_examples} "
                         "examples each: the masks did not cancel (wrong or tampered sum)")
    signed = from_ring(plain[: layout.count_index], config.value_bits)
    total = {}
    for name, shape in layout.tensors:
        start, stop = layout.offsets[name]
        total[name] = signed[start:stop].astype(np.float64).reshape(shape) * (config.step(name) * config.max_examples)
    return DecodedSum(total=total, examples=examples, clients=clients, config=config)


def adapter_digest(state: Mapping[str, np.ndarray]) -> bytes:
    """SHA-256 over names, shapes, dtypes and little-endian bytes of an adapter, name order.

    The header carries the digest of the round's global adapter so a client can check it
    trains from the adapter every other client got.
    """
    h = hashlib.sha256(b"fedlora/adapter/v1")
    for name in sorted(state):
        value = np.ascontiguousarray(state[name])
        value = value.astype(value.dtype.newbyteorder("<"), copy=False)
        for part in (name.encode(), repr(tuple(value.shape)).encode(), value.dtype.str.encode()):
            h.update(len(part).to_bytes(4, "big") + part)
        h.update(value.tobytes())
    return h.digest()
