"""Where the secure rounds' long-lived keys and secret randomness come from.

Every role of a secure round asks an :class:`Identities` for three things:

- ``own(uid)``: an Ed25519 key this process holds (the cloud's, this edge's aggregator
  key, this device's);
- ``public(uid)``: the registered public key of another party (``None`` when it is not
  registered: the cloud leaves it out of the round's signed registry, and the protocol
  then refuses that party's messages);
- ``rng(*purpose)``: secret randomness (stochastic rounding, X25519 keys, mask seeds,
  Shamir coefficients, graph seeds).

:class:`SimulatedIdentities` derives all of it from the run seed: reproducible, and
SIMULATION ONLY (anyone who knows the seed can sign as any device and recompute every
mask). :class:`PlannedIdentities` is a deployment's: the registry and this machine's own
key, which ``fedlora.deploy.plan`` reads from its node folder (``NodeFolder.identities``), and
randomness from ``os.urandom``.
"""

from __future__ import annotations

import os

from fedlora.secure.errors import SecAggError
from fedlora.secure.keys import IdentityKey
from fedlora.secure.prg import SeededStream
from fedlora.seeds import simulation_secret


class IdentityError(SecAggError, ValueError):
    """A key is missing, malformed, or not this machine's to use."""


class Identities:
    def own(self, uid: str) -> IdentityKey:
        raise NotImplementedError

    def public(self, uid: str) -> bytes | None:
        raise NotImplementedError

    def rng(self, *purpose: object) -> SeededStream:
        raise NotImplementedError

    def local(self, uid: str) -> IdentityKey:
        """A key for a logical party this process plays itself (the sub-urban unmasker kept
        by the cloud): derived in simulation, fresh per process in a deployment."""
        raise NotImplementedError


class SimulatedIdentities(Identities):
    """SIMULATION ONLY: every key and every secret derived from the run seed
    (:func:`fedlora.seeds.simulation_secret`); the one source of simulated identities, for the
    federation's rounds, the edge processes of a simulation and the in-process cells of the tests
    and benchmarks (:class:`fedlora.secure.simulation.Enrolment`)."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def own(self, uid: str) -> IdentityKey:
        return IdentityKey.from_seed(simulation_secret(self.seed, "identity", uid))

    def public(self, uid: str) -> bytes:
        return self.own(uid).public_bytes

    def rng(self, *purpose: object) -> SeededStream:
        """Reproducible secret randomness for one purpose (e.g. device, round, stage)."""
        return SeededStream(simulation_secret(self.seed, "rng", *purpose))

    local = own


class PlannedIdentities(Identities):
    """A deployed machine's keys: the plan's registry plus its own Ed25519 key; os.urandom."""

    def __init__(self, me: str, key: IdentityKey, registry: dict[str, bytes]):
        if registry.get(me) != key.public_bytes:
            raise IdentityError(f"this machine's identity key is not the one the registry has for {me!r}: "
                                "the node folder and the registry come from different plans")
        self.me, self._key, self.registry = me, key, dict(registry)
        self._local: dict[str, IdentityKey] = {}

    def own(self, uid: str) -> IdentityKey:
        if uid != self.me:
            raise IdentityError(f"this machine is {self.me!r}; it holds no key for {uid!r}")
        return self._key

    def public(self, uid: str) -> bytes | None:
        return self.registry.get(uid)

    def rng(self, *purpose: object) -> SeededStream:
        return SeededStream(os.urandom(32))

    def local(self, uid: str) -> IdentityKey:
        if uid not in self._local:
            self._local[uid] = IdentityKey.generate()
        return self._local[uid]

