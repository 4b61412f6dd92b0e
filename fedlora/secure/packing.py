"""Masked vectors on the wire in a ring sized to the sum: b + ceil(log2 n) bits per value coordinate.

A sum of n values in ``[-L, L]`` (``L = 2^(b-1) - 1``) lies in ``[-nL, nL]``, which the signed
ring Z_2^k holds exactly for ``k = b + ceil(log2 n)`` (:func:`~fedlora.secure.encoding.ring_bits`;
n is the header's public ``EncodingConfig.sum_clients``, so every party derives the same k).
Because 2^k divides 2^32, everything the protocol computes in uint32 -- masks, sums, mask
removal -- is also right modulo 2^k: the low k bits of a uint32 result are the result in Z_2^k.
So a client masks in uint32 as before and sends only the low k bits of each value coordinate
(a PRG word reduced mod 2^k is uniform in Z_2^k, so the packed ``y_u`` still looks uniform);
aggregators unpack, add and reduce mod 2^k; the decoder sign-extends from k bits. The example
count (up to ``n * n_max``) stays one full 32-bit word at the end.

Packed form: the value coordinates' low k bits, least significant bit first, concatenated and
padded with zero bits to a whole byte, then the count as 4 little-endian bytes -- a uint8 array
of :func:`packed_size` bytes. Unpacked (``sum_clients = 0``) the vector is the uint32 array
of before, so unpacked sessions are byte-for-byte what they were.
"""

from __future__ import annotations

import numpy as np

from fedlora.secure.encoding import EncodingConfig, TensorLayout

# Values packed per step: a multiple of 8 keeps every chunk on a byte boundary; 2^16 bounds the
# bit-level scratch arrays (32 bytes per value) to 2 MiB on a small device.
_CHUNK = 1 << 16


def packed(config: EncodingConfig) -> bool:
    """Whether masked vectors of this encoding travel packed (``sum_clients`` > 0)."""
    return config.sum_clients > 0


def packed_size(layout: TensorLayout, config: EncodingConfig) -> int:
    """Bytes of one masked vector on the wire: ``ceil(values * k / 8) + 4`` packed, else ``4 * size``."""
    if not packed(config):
        return 4 * layout.size
    return -(-layout.num_values * config.value_bits // 8) + 4


def reduce(vector: np.ndarray, config: EncodingConfig) -> np.ndarray:
    """``vector`` (uint32: value coordinates, then the count last, as in every
    :class:`~fedlora.secure.encoding.TensorLayout`) with its value coordinates reduced mod 2^k,
    in place; returned."""
    if packed(config) and config.value_bits < 32:
        np.bitwise_and(vector[:-1], np.uint32((1 << config.value_bits) - 1), out=vector[:-1])
    return vector


def pack(vector: np.ndarray, layout: TensorLayout, config: EncodingConfig) -> np.ndarray:
    """The wire form of a masked uint32 vector: itself unpacked, else a uint8 array of
    :func:`packed_size` bytes holding the low k bits of each value coordinate and the count word."""
    if not isinstance(vector, np.ndarray) or vector.dtype != np.uint32 or vector.shape != (layout.size,):
        raise ValueError(f"a masked vector is a uint32 vector of length {layout.size}")
    if not packed(config):
        return vector
    k, values = config.value_bits, vector[: layout.count_index]
    out = np.empty(packed_size(layout, config), dtype=np.uint8)
    for start in range(0, values.size, _CHUNK):
        chunk = np.ascontiguousarray(values[start:start + _CHUNK], dtype="<u4")
        bits = np.unpackbits(chunk.view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")[:, :k]
        data = np.packbits(bits.reshape(-1), bitorder="little")
        out[start * k // 8: start * k // 8 + data.size] = data
    out[-4:] = np.array([vector[layout.count_index]], dtype="<u4").view(np.uint8)
    return out


def unpack(data: np.ndarray, layout: TensorLayout, config: EncodingConfig) -> np.ndarray:
    """The uint32 vector (value coordinates in ``[0, 2^k)``) of a packed masked vector; ValueError
    unless ``data`` is exactly what :func:`pack` makes for this layout and encoding (right
    dtype and length, zero padding bits)."""
    if not packed(config):
        if not isinstance(data, np.ndarray) or data.dtype != np.uint32 or data.shape != (layout.size,):
            raise ValueError(f"must be a uint32 vector of length {layout.size}")
        return data
    size, k, n = packed_size(layout, config), config.value_bits, layout.num_values
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape != (size,):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"must be {size} packed bytes ({n} values of {k} bits, then a 32-bit count), got {got}")
    pad = size * 8 - 32 - n * k
    if pad and int(data[-5]) >> (8 - pad):
        raise ValueError("the padding bits after the packed values are not zero")
    out = np.empty(layout.size, dtype=np.uint32)
    for start in range(0, n, _CHUNK):
        count = min(_CHUNK, n - start)
        raw = data[start * k // 8: -(-(start + count) * k // 8)]
        bits = np.unpackbits(raw, bitorder="little")[: count * k].reshape(count, k)
        words = np.zeros((count, 32), dtype=np.uint8)
        words[:, :k] = bits
        out[start:start + count] = np.packbits(words, axis=1, bitorder="little").view("<u4").reshape(count)
    out[layout.count_index] = data[-4:].view("<u4")[0]
    return out
