"""Shamir secret sharing over the prime field GF(2^521 - 1).

A secret (a 32-byte seed or key, read as an integer) is the constant term of a random
polynomial of degree ``threshold - 1``; holder ``x`` gets the point ``(x, f(x))``. Any
``threshold`` points give the secret back by Lagrange interpolation at 0; fewer reveal
nothing. The Mersenne prime 2^521 - 1 is larger than any 32-byte secret, so a secret is a
field element as is (no reduction, no bias).

:func:`combine` checks what it is given: too few shares, the same holder twice, or extra
shares that do not lie on the polynomial through the others are errors, never a wrong
secret returned quietly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from fedlora.secure.prg import Randomness

PRIME = 2**521 - 1
_ELEMENT_BYTES = 66  # 528 bits: enough to draw a uniform 521-bit value by rejection


class ShamirError(ValueError):
    """Shares that cannot (safely) give a secret back."""


class TooFewShares(ShamirError):
    pass


class DuplicateShare(ShamirError):
    pass


class InconsistentShares(ShamirError):
    pass


@dataclass(frozen=True)
class Share:
    """One point of the sharing polynomial: holder ``x`` (1..P-1) and ``y = f(x)``."""

    x: int
    y: int


def random_element(rng: Randomness = os.urandom) -> int:
    """A uniform element of the field, by rejection from 521 random bits."""
    while True:
        value = int.from_bytes(rng(_ELEMENT_BYTES), "big") & PRIME  # PRIME is 521 one-bits
        if value < PRIME:
            return value


def evaluate(coefficients: Sequence[int], x: int) -> int:
    """``sum(c_i * x^i) mod P`` (Horner); ``coefficients[0]`` is the constant term."""
    acc = 0
    for c in reversed(coefficients):
        acc = (acc * x + c) % PRIME
    return acc


def split(secret: int, threshold: int, holders: Sequence[int], rng: Randomness = os.urandom) -> list[Share]:
    """Shares of ``secret`` for each x in ``holders``; any ``threshold`` of them rebuild it.

    Raises ValueError for a secret outside the field, a threshold outside
    ``1..len(holders)``, or holder x-coordinates that repeat or fall outside ``1..P-1``.
    """
    if not 0 <= secret < PRIME:
        raise ValueError("the secret must be an integer in [0, 2^521 - 1)")
    if not 1 <= threshold <= len(holders):
        raise ValueError(f"threshold={threshold} must be between 1 and the number of holders ({len(holders)})")
    _check_xs(holders)
    coefficients = [secret] + [random_element(rng) for _ in range(threshold - 1)]
    return [Share(x, evaluate(coefficients, x)) for x in holders]


def combine(shares: Sequence[Share], threshold: int) -> int:
    """The secret behind ``shares`` (at least ``threshold`` of them).

    All shares are used: the secret is interpolated from the first ``threshold`` (by x) and
    every further share must lie on the same polynomial, so a corrupted share among more
    than ``threshold`` is detected (:class:`InconsistentShares`) rather than returning a
    wrong secret. Raises :class:`TooFewShares` and :class:`DuplicateShare` as named.
    """
    if threshold < 1:
        raise ValueError(f"threshold must be >= 1, got {threshold}")
    by_x: dict[int, int] = {}
    for share in shares:
        if not 0 < share.x < PRIME or not 0 <= share.y < PRIME:
            raise ShamirError(f"share x={share.x} is not a point of the field")
        if share.x in by_x:
            if by_x[share.x] == share.y:
                raise DuplicateShare(f"share x={share.x} was given twice")
            raise DuplicateShare(f"two different shares claim holder x={share.x}")
        by_x[share.x] = share.y
    if len(by_x) < threshold:
        raise TooFewShares(f"{len(by_x)} shares given, {threshold} needed to rebuild the secret")
    points = sorted(by_x.items())
    basis, extra = points[:threshold], points[threshold:]
    xs = [x for x, _ in basis]
    # f(x) = sum_i c_i prod_{j != i} (x - x_j) with c_i = y_i / prod_{j != i}(x_i - x_j),
    # computed once and reused for the secret (x = 0) and for checking every extra share.
    coefficients = [y * w % PRIME for (_, y), w in zip(basis, _barycentric_weights(xs))]
    for x, y in extra:
        if _interpolate(xs, coefficients, x) != y:
            raise InconsistentShares(f"share x={x} does not lie on the polynomial through the other "
                                     f"{threshold} shares: at least one share is corrupted")
    return _interpolate(xs, coefficients, 0)


def split_bytes(secret: bytes, threshold: int, holders: Sequence[int], rng: Randomness = os.urandom) -> list[Share]:
    """:func:`split` of a byte string (big-endian integer; length restored by :func:`combine_bytes`)."""
    if len(secret) * 8 > 520:
        raise ValueError(f"a {len(secret)}-byte secret does not fit the field; at most 65 bytes")
    return split(int.from_bytes(secret, "big"), threshold, holders, rng)


def combine_bytes(shares: Sequence[Share], threshold: int, length: int) -> bytes:
    """:func:`combine`, returned as ``length`` big-endian bytes."""
    value = combine(shares, threshold)
    if value.bit_length() > 8 * length:
        raise InconsistentShares(f"the rebuilt secret does not fit in {length} bytes: the shares are not of such a secret")
    return value.to_bytes(length, "big")


def _check_xs(xs: Sequence[int]) -> None:
    seen = set()
    for x in xs:
        if not 0 < x < PRIME:
            raise ValueError(f"holder x={x} must be in 1..2^521-2 (x=0 is the secret itself)")
        if x in seen:
            raise ValueError(f"holder x={x} appears twice")
        seen.add(x)


def _barycentric_weights(xs: Sequence[int]) -> list[int]:
    """w_i = 1 / prod_{j != i} (x_i - x_j), with one modular inversion for all (Montgomery)."""
    dens = []
    for i, xi in enumerate(xs):
        d = 1
        for j, xj in enumerate(xs):
            if i != j:
                d = d * (xi - xj) % PRIME
        dens.append(d)
    prefix = [1]
    for d in dens:
        prefix.append(prefix[-1] * d % PRIME)
    inv = pow(prefix[-1], -1, PRIME)
    weights = [0] * len(dens)
    for i in range(len(dens) - 1, -1, -1):
        weights[i] = inv * prefix[i] % PRIME
        inv = inv * dens[i] % PRIME
    return weights


def _interpolate(xs: Sequence[int], coefficients: Sequence[int], x: int) -> int:
    """f(x) for the polynomial of degree < len(xs) with barycentric ``coefficients`` (see combine)."""
    diffs = [(x - xi) % PRIME for xi in xs]
    n = len(xs)
    if 0 in diffs:  # x is one of the basis points: f(x_i) = c_i prod_{j != i}(x_i - x_j) = y_i
        i = diffs.index(0)
        acc = coefficients[i]
        for j in range(n):
            if j != i:
                acc = acc * ((xs[i] - xs[j]) % PRIME) % PRIME
        return acc
    # Prefix/suffix products of (x - x_j) give every prod_{j != i} without inversions.
    prefix = [1] * (n + 1)
    for i in range(n):
        prefix[i + 1] = prefix[i] * diffs[i] % PRIME
    acc, suffix = 0, 1
    for i in range(n - 1, -1, -1):
        acc += coefficients[i] * prefix[i] % PRIME * suffix
        suffix = suffix * diffs[i] % PRIME
    return acc % PRIME
