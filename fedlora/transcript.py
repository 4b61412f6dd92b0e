"""Canonical bytes for everything that is signed, hashed, derived from or encrypted.

Signatures, session ids, HKDF ``info`` strings, AES-GCM associated data and share
plaintexts must mean the same on every device and must never be confusable: with plain
concatenation ``"ab" + "c" == "a" + "bc"``, so one transcript could pose as another. Each
field here is typed and length-prefixed, and :func:`decode` accepts only the exact bytes
:func:`encode` produces (no trailing bytes, minimal integers).

Fields: ``bytes``, ``str`` (UTF-8), non-negative ``int`` and tuples/lists of fields.

The secure-aggregation protocol (:mod:`fedlora.secure`) signs and derives from these bytes,
and the message codec (:mod:`fedlora.wire`) frames every message with them; so this module
sits below both and imports nothing of fedlora.
"""

from __future__ import annotations

import hashlib
from typing import Union

Field = Union[bytes, str, int, tuple, list]

_BYTES, _STR, _INT, _TUPLE = b"B", b"S", b"I", b"T"
_LEN = 4  # bytes of big-endian length prefix; every field we encode is far below 4 GiB
# Deepest nesting of tuples decode accepts: far above anything fedlora encodes (a wire value of depth 64
# is about 200 levels here), far below Python's recursion limit, so deep input is a ValueError.
MAX_DEPTH = 256


def encode(*fields: Field) -> bytes:
    """The canonical encoding of ``fields`` (as one tuple)."""
    out = bytearray()
    _encode_into(out, tuple(fields))
    return bytes(out)


def digest(*fields: Field) -> bytes:
    """SHA-256 of :func:`encode` of ``fields`` (32 bytes)."""
    return hashlib.sha256(encode(*fields)).digest()


def decode(data: bytes) -> tuple:
    """Inverse of :func:`encode`: the tuple of fields. Raises ValueError on anything else."""
    value, end = _decode_at(bytes(data), 0, 0)
    if end != len(data):
        raise ValueError(f"{len(data) - end} trailing bytes after the transcript")
    if not isinstance(value, tuple):
        raise ValueError("a transcript must be a tuple of fields")
    return value


def _encode_into(out: bytearray, value: Field) -> None:
    if isinstance(value, bool):  # bool is an int subclass; refuse rather than guess
        raise TypeError("transcript fields cannot be bool; use 0/1")
    if isinstance(value, (bytes, bytearray, memoryview)):
        tag, body = _BYTES, bytes(value)
    elif isinstance(value, str):
        tag, body = _STR, value.encode("utf-8")
    elif isinstance(value, int):
        if value < 0:
            raise ValueError(f"transcript integers must be non-negative, got {value}")
        tag, body = _INT, value.to_bytes((value.bit_length() + 7) // 8, "big")
    elif isinstance(value, (tuple, list)):
        out += _TUPLE + len(value).to_bytes(_LEN, "big")
        for item in value:
            _encode_into(out, item)
        return
    else:
        raise TypeError(f"cannot put a {type(value).__name__} in a transcript")
    out += tag + len(body).to_bytes(_LEN, "big") + body


def _decode_at(data: bytes, pos: int, depth: int) -> tuple[Field, int]:
    if depth > MAX_DEPTH:
        raise ValueError(f"transcript nested deeper than {MAX_DEPTH} levels")
    if pos + 1 + _LEN > len(data):
        raise ValueError("transcript truncated")
    tag = data[pos : pos + 1]
    size = int.from_bytes(data[pos + 1 : pos + 1 + _LEN], "big")
    pos += 1 + _LEN
    if tag == _TUPLE:
        items = []
        for _ in range(size):
            item, pos = _decode_at(data, pos, depth + 1)
            items.append(item)
        return tuple(items), pos
    if pos + size > len(data):
        raise ValueError("transcript truncated")
    body = data[pos : pos + size]
    pos += size
    if tag == _BYTES:
        return body, pos
    if tag == _STR:
        return body.decode("utf-8"), pos
    if tag == _INT:
        if body[:1] == b"\x00":
            raise ValueError("non-minimal integer in transcript")
        return int.from_bytes(body, "big"), pos
    raise ValueError(f"unknown transcript tag {tag!r}")
