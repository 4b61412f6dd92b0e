"""Authenticated encryption of shares and unmask responses: AES-256-GCM, random 96-bit nonce.

The associated data binds a ciphertext to its session, sender and receiver, so it cannot be
replayed into another session or redirected to another receiver: opening it there fails.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedlora.secure.errors import RejectedMessage
from fedlora.secure.prg import Randomness

NONCE_BYTES = 12
TAG_BYTES = 16


def seal(key: bytes, plaintext: bytes, associated_data: bytes, rng: Randomness = os.urandom) -> bytes:
    """``nonce || AES-GCM(key, nonce, plaintext, associated_data)``; ``key`` is 32 bytes.

    Each key here encrypts a handful of messages, so random nonces are far from colliding.
    """
    nonce = rng(NONCE_BYTES)
    return nonce + AESGCM(bytes(key)).encrypt(nonce, plaintext, associated_data)


def open_sealed(key: bytes, blob: bytes, associated_data: bytes, what: str) -> bytes:
    """The plaintext of a :func:`seal` output; :class:`RejectedMessage` naming ``what`` if the
    blob was altered, the key is wrong, or the associated data differs."""
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise RejectedMessage(f"{what}: ciphertext of {len(blob)} bytes is too short to be genuine")
    try:
        return AESGCM(bytes(key)).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated_data)
    except InvalidTag:
        raise RejectedMessage(f"{what}: authentication failed (altered, encrypted under another key, "
                              "or bound to another session/sender/receiver)") from None
