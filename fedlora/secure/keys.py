"""Keys: Ed25519 identities and the registry of enrolled devices, X25519 agreement, HKDF.

- Every device and every aggregator has a long-lived Ed25519 identity; the cloud keeps a
  :class:`DeviceRegistry` (device id -> public key) and publishes it. A message signed by a
  device that is not enrolled is refused: an unregistered device cannot join a cell.
- Each round a client makes two fresh X25519 keys: one (``c``) to encrypt shares and
  unmask responses, one (``s``) from which its pairwise masks are agreed.
- :func:`derive_key` turns an X25519 shared secret into a key with HKDF-SHA256 whose
  ``info`` names the purpose, the session id and the parties, so a key from one session,
  purpose or pair is useless in any other.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedlora import transcript
from fedlora.secure.errors import RejectedMessage, UnknownDevice
from fedlora.secure.prg import Randomness

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
KDF_LABEL = "fedlora/secagg/v1"


class IdentityKey:
    """A device's (or aggregator's) long-lived Ed25519 signing key."""

    def __init__(self, private: Ed25519PrivateKey):
        self._private = private
        self.public_bytes = private.public_key().public_bytes_raw()

    @classmethod
    def generate(cls, rng: Randomness = os.urandom) -> IdentityKey:
        return cls.from_seed(rng(32))

    @classmethod
    def from_seed(cls, seed: bytes) -> IdentityKey:
        """The key whose RFC 8032 private seed is ``seed`` (32 bytes)."""
        return cls(Ed25519PrivateKey.from_private_bytes(bytes(seed)))

    def sign(self, message: bytes) -> bytes:
        """A 64-byte Ed25519 signature of ``message``."""
        return self._private.sign(message)


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is a valid Ed25519 signature of ``message`` under ``public_key``."""
    try:
        Ed25519PublicKey.from_public_bytes(bytes(public_key)).verify(bytes(signature), message)
    except (InvalidSignature, ValueError):
        return False
    return True


class DeviceRegistry:
    """Device id -> Ed25519 public key: who may take part, kept by the cloud.

    Devices, neighbourhood aggregators and the cloud itself are enrolled here; every role
    gets a (public) copy to check signatures with.
    """

    def __init__(self, keys: dict[str, bytes] | None = None):
        self._keys: dict[str, bytes] = {}
        for device_id, key in (keys or {}).items():
            self.enroll(device_id, key)

    def enroll(self, device_id: str, public_key: bytes) -> None:
        """Add a device. Re-enrolling the same key is a no-op; a different key is refused
        (a key change must be an explicit :meth:`revoke` first)."""
        if not isinstance(device_id, str) or not device_id:
            raise ValueError(f"device ids are non-empty strings, got {device_id!r}")
        if len(public_key) != PUBLIC_KEY_BYTES:
            raise ValueError(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes, got {len(public_key)} for {device_id!r}")
        known = self._keys.get(device_id)
        if known is not None and known != bytes(public_key):
            raise ValueError(f"device {device_id!r} is already enrolled with a different key; revoke it first")
        self._keys[device_id] = bytes(public_key)

    def revoke(self, device_id: str) -> None:
        self._keys.pop(device_id, None)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._keys))

    def __len__(self) -> int:
        return len(self._keys)

    def public_key(self, device_id: str) -> bytes:
        """The enrolled key of ``device_id``; raises :class:`UnknownDevice` if it has none."""
        try:
            return self._keys[device_id]
        except KeyError:
            raise UnknownDevice(f"device {device_id!r} is not in the registry, so it cannot take part") from None

    def check(self, device_id: str, message: bytes, signature: bytes, what: str) -> None:
        """Raise unless ``signature`` is ``device_id``'s signature of ``message``.

        ``what`` names the message in the error (e.g. ``"masked input of client-3"``).
        """
        if not verify_signature(self.public_key(device_id), message, signature):
            raise RejectedMessage(f"{what}: signature does not verify under the registered key of {device_id!r} "
                                  "(tampered, replayed from another session, or signed by someone else)")


class AgreementKey:
    """A fresh X25519 key pair for one session."""

    def __init__(self, private: X25519PrivateKey):
        self._private = private
        self.public_bytes = private.public_key().public_bytes_raw()

    @classmethod
    def generate(cls, rng: Randomness = os.urandom) -> AgreementKey:
        return cls.from_private_bytes(rng(32))

    @classmethod
    def from_private_bytes(cls, private: bytes) -> AgreementKey:
        if len(private) != 32:
            raise ValueError(f"an X25519 private key is 32 bytes, got {len(private)}")
        return cls(X25519PrivateKey.from_private_bytes(bytes(private)))

    def private_bytes(self) -> bytes:
        """The raw 32 private bytes (what a client secret-shares for its mask key)."""
        return self._private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                           serialization.NoEncryption())

    def agree(self, peer_public: bytes, peer: str = "peer") -> bytes:
        """The 32-byte X25519 shared secret with ``peer_public``.

        Raises :class:`RejectedMessage` for a malformed or low-order peer key (which would
        give an all-zero, publicly known secret).
        """
        try:
            return self._private.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))
        except ValueError as exc:
            raise RejectedMessage(f"X25519 key of {peer} is unusable ({exc})") from None


def derive_key(shared_secret: bytes, *, sid: bytes, purpose: str, parties: Sequence[str], length: int = 32) -> bytes:
    """HKDF-SHA256 (no salt) of ``shared_secret`` with ``info`` = (label, purpose, sid, parties).

    Both ends must list ``parties`` in the same order (callers sort them).
    """
    info = transcript.encode(KDF_LABEL, purpose, bytes(sid), tuple(parties))
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(bytes(shared_secret))


# Purposes of the keys derived from X25519 agreements (the HKDF info names one of them).
SHARE_TRANSPORT = "share-transport"  # seals shares from one client to another (c keys)
PAIR_MASK = "pair-mask"  # seed of the pairwise mask between two clients (s keys)
UNMASK_TRANSPORT = "unmask-transport"  # seals a survivor's unmask response to the unmasker (c key)


def pair_key(own: AgreementKey, peer_public: bytes, *, sid: bytes, purpose: str, me: str, peer: str) -> bytes:
    """The 32-byte key ``me`` and ``peer`` both derive for ``purpose`` in session ``sid``.

    Symmetric: parties enter HKDF sorted, so ``pair_key(a, B, me=a, peer=b)`` equals
    ``pair_key(b, A, me=b, peer=a)``.
    """
    secret = own.agree(peer_public, peer)
    return derive_key(secret, sid=sid, purpose=purpose, parties=sorted((me, peer)))
