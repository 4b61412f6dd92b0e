"""A safe, self-describing binary encoding for what travels between fedlora processes.

Cell requests and results (``fedlora.roles.neighbourhood``) and secure-aggregation messages come from
other machines, so they are never unpickled. Everything is built on the canonical,
length-prefixed transcript encoding (:mod:`fedlora.transcript`) with one type tag
per value:

    None, bool, int (any sign), float (exact hex), str, bytes, tuple/list, dict, frozenset,
    numpy arrays (a fixed list of dtypes, shape checked against the bytes), and dataclasses
    from an explicit list of known types (``register``), rebuilt through their constructor
    so their own validation runs. A type that subclasses :class:`Checked` also has every field checked
against its annotation (:func:`check_fields`): a sender cannot put a list or None where a message
says bytes and make a receiver's check fail with a TypeError instead of refusing the message.

:func:`loads` raises :class:`WireError` (a ValueError) naming what is wrong for any input
:func:`dumps` could not have produced; it never executes code from the input.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import sys
import types
import typing
from enum import Enum
from typing import Any, Union

import numpy as np

from fedlora import transcript

MAGIC = "fedlora/wire/v1"
_DTYPES = {"<f2", "<f4", "<f8", "<u4", "<i4", "<i8", "<u8", "|u1"}  # <f2: split-learning activations in half precision
_TYPES: dict[str, type] = {}
_MAX_DEPTH = 64


class WireError(ValueError):
    """Bytes that are not a valid fedlora wire message (malformed, unknown type, bad array)."""


def register(*classes: type) -> None:
    """Allow dataclasses / enums of these types on the wire (by qualified name)."""
    for cls in classes:
        _TYPES[f"{cls.__module__}.{cls.__qualname__}"] = cls


def dumps(value: Any, kind: str) -> bytes:
    """Encode ``value`` as a message of ``kind`` (checked again by :func:`loads`)."""
    return transcript.encode(MAGIC, kind, _enc(value))


def loads(data: bytes, kind: str) -> Any:
    """Decode a message of ``kind``; :class:`WireError` for anything else."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"a {kind} must be bytes, got {type(data).__name__}")
    try:
        fields = transcript.decode(bytes(data))
    except RecursionError:
        raise WireError(f"malformed {kind}: nested too deeply") from None
    except ValueError as exc:
        raise WireError(f"malformed {kind}: {exc}") from None
    if len(fields) != 3 or fields[0] != MAGIC:
        raise WireError(f"not a fedlora wire message (expected {MAGIC!r})")
    if fields[1] != kind:
        raise WireError(f"expected a {kind}, got a {fields[1]!r}")
    try:
        return _dec(fields[2], 0)
    except WireError:
        raise
    except RecursionError:
        raise WireError(f"malformed {kind}: nested too deeply") from None
    except (ValueError, TypeError, KeyError, IndexError) as exc:  # a constructor refusing its fields
        raise WireError(f"malformed {kind}: {type(exc).__name__}: {exc}") from None


def _enc(v: Any) -> tuple:
    if v is None:
        return ("N",)
    if isinstance(v, bool):
        return ("b", int(v))
    if isinstance(v, Enum):
        return ("e", _name(type(v)), _enc(v.value))
    if isinstance(v, (int, np.integer)):
        return ("i", int(v < 0), abs(int(v)))
    if isinstance(v, (float, np.floating)):
        return ("f", float(v).hex())
    if isinstance(v, str):
        return ("s", v)
    if isinstance(v, (bytes, bytearray)):
        return ("y", bytes(v))
    if isinstance(v, np.ndarray):
        a = np.ascontiguousarray(v)
        a = a.astype(a.dtype.newbyteorder("<"), copy=False) if a.dtype.byteorder == ">" else a
        if a.dtype.str not in _DTYPES:
            raise TypeError(f"arrays of dtype {a.dtype} cannot go on the wire")
        return ("a", a.dtype.str, tuple(int(d) for d in a.shape), a.tobytes())
    if isinstance(v, (tuple, list)):
        return ("t" if isinstance(v, tuple) else "l", tuple(_enc(x) for x in v))
    if isinstance(v, frozenset):
        return ("z", tuple(sorted((_enc(x) for x in v), key=transcript.encode)))
    if isinstance(v, dict):
        return ("d", tuple((_enc(k), _enc(x)) for k, x in v.items()))
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        name = _name(type(v))
        return ("c", name, tuple((f.name, _enc(getattr(v, f.name))) for f in dataclasses.fields(v) if f.init))
    raise TypeError(f"a {type(v).__name__} cannot go on the wire")


def _name(cls: type) -> str:
    name = f"{cls.__module__}.{cls.__qualname__}"
    if _TYPES.get(name) is not cls:
        raise TypeError(f"type {name} is not registered for the wire")
    return name


def _dec(f: Any, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise WireError("wire value nested too deeply")
    if not isinstance(f, tuple) or not f or not isinstance(f[0], str):
        raise WireError("wire value without a type tag")
    tag, rest = f[0], f[1:]

    def need(n: int) -> None:
        if len(rest) != n:
            raise WireError(f"wire value {tag!r} has {len(rest)} fields, expected {n}")

    if tag == "N":
        need(0)
        return None
    if tag == "b":
        need(1)
        if rest[0] not in (0, 1):
            raise WireError("a bool is 0 or 1")
        return bool(rest[0])
    if tag == "i":
        need(2)
        if rest[0] not in (0, 1) or not isinstance(rest[1], int):
            raise WireError("malformed integer")
        return -rest[1] if rest[0] else rest[1]
    if tag == "f":
        need(1)
        try:
            return float.fromhex(_typed(rest[0], str))
        except (ValueError, OverflowError):
            raise WireError(f"malformed float {rest[0]!r}") from None
    if tag == "s":
        need(1)
        return _typed(rest[0], str)
    if tag == "y":
        need(1)
        return _typed(rest[0], bytes)
    if tag == "a":
        need(3)
        dtype, shape, body = _typed(rest[0], str), _typed(rest[1], tuple), _typed(rest[2], bytes)
        if dtype not in _DTYPES or not all(isinstance(d, int) for d in shape):
            raise WireError(f"array of dtype {dtype!r} or shape {shape!r} is not allowed")
        if math.prod(shape) * np.dtype(dtype).itemsize != len(body):
            raise WireError(f"array of shape {shape} and dtype {dtype} needs {math.prod(shape) * np.dtype(dtype).itemsize} "
                            f"bytes, got {len(body)}")
        return np.frombuffer(body, dtype=np.dtype(dtype)).reshape(shape).copy()
    if tag in ("t", "l", "z"):
        need(1)
        items = [_dec(x, depth + 1) for x in _typed(rest[0], tuple)]
        return tuple(items) if tag == "t" else items if tag == "l" else frozenset(items)
    if tag == "d":
        need(1)
        out = {}
        for pair in _typed(rest[0], tuple):
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise WireError("malformed mapping entry")
            out[_dec(pair[0], depth + 1)] = _dec(pair[1], depth + 1)
        return out
    if tag in ("c", "e"):
        need(2)
        cls = _TYPES.get(_typed(rest[0], str))
        if cls is None:
            raise WireError(f"unknown wire type {rest[0]!r}")
        if tag == "e":
            if not (isinstance(cls, type) and issubclass(cls, Enum)):
                raise WireError(f"{rest[0]!r} is not an enum")
            return cls(_dec(rest[1], depth + 1))
        if not dataclasses.is_dataclass(cls):
            raise WireError(f"{rest[0]!r} is not a message type")
        names = {fl.name for fl in dataclasses.fields(cls) if fl.init}
        kwargs = {}
        for pair in _typed(rest[1], tuple):
            if not isinstance(pair, tuple) or len(pair) != 2 or pair[0] not in names or pair[0] in kwargs:
                raise WireError(f"unknown or repeated field in a {rest[0]}")
            kwargs[pair[0]] = _dec(pair[1], depth + 1)
        return cls(**kwargs)
    raise WireError(f"unknown wire tag {tag!r}")


def _typed(value: Any, kind: type) -> Any:
    if not isinstance(value, kind):
        raise WireError(f"expected {kind.__name__}, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------- field types


def check_fields(value: Any) -> None:
    """Raise ValueError naming the first field of the dataclass ``value`` that is not of its annotated type.

    Understood: ``bytes``, ``str``, ``bool``, ``int`` (never a bool), ``float`` (an int too),
    ``np.ndarray``, dataclasses and enums by class, ``X | None``, ``tuple[X, ...]``, ``tuple[X, Y]``,
    ``frozenset[X]``, ``list[X]``, ``dict[K, V]`` and bare ``dict``/``list``; anything else (``Any``, a
    Mapping the constructor normalises) is the constructor's own to check."""
    hints = _hints(type(value))
    for f in dataclasses.fields(value):
        if f.init and f.name in hints and not _matches(getattr(value, f.name), hints[f.name]):
            raise ValueError(f"{type(value).__name__}.{f.name} must be {_describe(hints[f.name])}, "
                             f"got a {type(getattr(value, f.name)).__name__}")


class Checked:
    """Base of a message dataclass whose fields are checked against their annotations on construction."""

    def __post_init__(self) -> None:
        check_fields(self)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
    if origin in (frozenset, list):
        return isinstance(value, origin) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    if hint is int:  # numpy's integers too (in-process values); from the wire only Python's
        return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if hint in (bytes, str, bool, dict, list, np.ndarray) or dataclasses.is_dataclass(hint) \
            or (isinstance(hint, type) and issubclass(hint, Enum)):
        return isinstance(value, hint)
    return True  # Any, Mapping, ...: the constructor checks (or normalises) these itself


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
