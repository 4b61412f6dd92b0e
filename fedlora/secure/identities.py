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
key come from its node folder written by ``fedlora deploy plan`` (the same names as its
SuperNode authentication keys), and randomness comes from ``os.urandom``.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from fedlora.seeds import simulation_secret
from fedlora.secure.errors import SecAggError
from fedlora.secure.keys import IdentityKey
from fedlora.secure.prg import SeededStream

REGISTRY_FORMAT = "fedlora-secagg-registry/v1"


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


def protocol_id(name: str) -> str:
    """A plan's node name as the secure protocol names it: ``cloud``, ``end-3`` ->
    ``device-3``, ``edge-<cell>`` -> ``aggregator/<cell>``."""
    from fedlora.secure.rounds import CLOUD_ID, aggregator_id, device_id

    if name == "cloud":
        return CLOUD_ID
    if name.startswith("end-") and name[4:].isdigit():
        return device_id(int(name[4:]))
    if name.startswith("edge-") and len(name) > 5:
        return aggregator_id(name[5:])
    raise IdentityError(f"registry entry {name!r} is not a node name of a plan (cloud, edge-<cell>, end-<n>)")


def read_registry(path: Path) -> dict[str, bytes]:
    """A plan's ``secagg_registry.json`` as {protocol id: Ed25519 public key}."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise IdentityError(f"cannot read the secure-aggregation registry {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != REGISTRY_FORMAT or not isinstance(doc.get("devices"), dict):
        raise IdentityError(f"{path} is not a fedlora secure-aggregation registry (format {REGISTRY_FORMAT})")
    keys = {}
    for name, entry in doc["devices"].items():
        try:
            key = base64.b64decode(entry["ed25519_public_key"], validate=True)
        except (KeyError, TypeError, ValueError):
            key = b""
        if len(key) != 32:
            raise IdentityError(f"{path}: entry {name!r} has no valid 32-byte Ed25519 public key")
        keys[protocol_id(name)] = key
    return keys


class PlannedIdentities(Identities):
    """A deployed machine's keys: the plan's registry plus its own Ed25519 key; os.urandom."""

    def __init__(self, me: str, key: IdentityKey, registry: dict[str, bytes]):
        if registry.get(me) != key.public_bytes:
            raise IdentityError(f"this machine's identity key is not the one the registry has for {me!r}: "
                                "the node folder and the registry come from different plans")
        self.me, self._key, self.registry = me, key, dict(registry)
        self._local: dict[str, IdentityKey] = {}

    @classmethod
    def from_folder(cls, folder: Path | str) -> PlannedIdentities:
        """From a node folder of ``fedlora deploy plan`` (its node.yaml names the files)."""
        from fedlora.deploy.pki import load_pem_key
        from fedlora.deploy.plan import IDENTITY_KEY, REGISTRY_FILE, read_node

        node = read_node(folder)  # PlanError when it is not a node folder
        folder, name = node.folder, node.name
        try:
            key = IdentityKey(load_pem_key(folder / IDENTITY_KEY))
        except (OSError, ValueError, TypeError) as exc:
            raise IdentityError(f"cannot load this node's identity key {folder / IDENTITY_KEY}: {exc}") from None
        return cls(protocol_id(name), key, read_registry(folder / REGISTRY_FILE))

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

