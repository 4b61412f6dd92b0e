"""Pseudo-random generator: a 32-byte seed -> a vector of uint32 masks (and a seeded byte stream).

Masks must come from a cryptographic generator: anyone who can predict a mask can remove it.
``numpy.random`` is not one, so it is never used here.

- ``aes128-ctr`` (default): key = seed[0:16], initial counter block = seed[16:32]; the
  keystream is AES-128 of successive counter blocks (the 128-bit block is the counter, as
  in NIST SP 800-38A). Fast wherever the CPU has AES instructions (x86 AES-NI, ARMv8 AES).
- ``chacha20``: key = the whole seed, 16-byte nonce/counter block all zero (RFC 8439
  block function from counter 0). For CPUs without AES instructions (e.g. Raspberry Pi 4),
  where software AES is slow and not constant-time.

Keystream bytes are read as little-endian uint32, so a seed gives the same mask on every
platform. Every party of one cell must use the same kind (the cell header names it).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

AES128_CTR = "aes128-ctr"
CHACHA20 = "chacha20"
PRG_KINDS = (AES128_CTR, CHACHA20)
SEED_BYTES = 32

# A source of secret random bytes: ``os.urandom`` in production, a SeededStream in tests.
Randomness = Callable[[int], bytes]


def _encryptor(seed: bytes, kind: str):
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != SEED_BYTES:
        raise ValueError(f"a PRG seed must be {SEED_BYTES} bytes, "
                         f"got {len(seed) if isinstance(seed, (bytes, bytearray)) else type(seed).__name__}")
    seed = bytes(seed)
    if kind == AES128_CTR:
        return Cipher(algorithms.AES(seed[:16]), modes.CTR(seed[16:])).encryptor()
    if kind == CHACHA20:
        return Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    raise ValueError(f"PRG kind {kind!r} is not one of {PRG_KINDS}")


def keystream(seed: bytes, num_bytes: int, kind: str = AES128_CTR) -> bytes:
    """The first ``num_bytes`` bytes of the keystream of ``seed``."""
    if num_bytes < 0:
        raise ValueError(f"num_bytes must be >= 0, got {num_bytes}")
    return _encryptor(seed, kind).update(bytes(num_bytes))


def mask_vector(seed: bytes, length: int, kind: str = AES128_CTR) -> np.ndarray:
    """``length`` pseudo-random uint32 values, a deterministic function of (seed, kind).

    Promises: uniform over Z_2^32 to anyone without the seed; identical on every platform
    (little-endian words of the keystream); a read-only array (add it into a buffer).
    """
    if length < 0:
        raise ValueError(f"mask length must be >= 0, got {length}")
    return np.frombuffer(keystream(seed, 4 * length, kind), dtype="<u4")


def aes_hardware_available() -> bool:
    """Whether this CPU advertises AES instructions (x86 ``aes`` flag, ARM ``aes`` feature)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            for line in f:
                key = line.split(":", 1)[0].strip().lower()
                if key in ("flags", "features") and "aes" in line.split(":", 1)[1].split():
                    return True
    except OSError:
        pass
    return False


def default_prg_kind() -> str:
    """AES-128-CTR where the CPU has AES instructions, else ChaCha20."""
    return AES128_CTR if aes_hardware_available() else CHACHA20


class SeededStream:
    """A deterministic stream of cryptographically strong bytes from a 32-byte seed.

    Used for stochastic rounding (a fresh secret seed per upload) and, with fixed seeds, to
    make tests reproducible. Each call continues the keystream where the last stopped.
    """

    def __init__(self, seed: bytes, kind: str = AES128_CTR):
        self._enc = _encryptor(seed, kind)

    def __call__(self, num_bytes: int) -> bytes:
        """The next ``num_bytes`` bytes (so a SeededStream is a :data:`Randomness`)."""
        return self._enc.update(bytes(num_bytes))

    def uniform(self, count: int) -> np.ndarray:
        """``count`` float64 values uniform on [0, 1) with 32-bit resolution."""
        words = np.frombuffer(self(4 * count), dtype="<u4")
        return words.astype(np.float64) * (1.0 / 2.0**32)
