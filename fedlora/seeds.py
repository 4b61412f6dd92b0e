"""Every seed fedlora derives, in one place: from the run seed and a purpose to a seed, a draw
or a generator, identical in every process (never ``hash()``, which Python randomises).

Four encodings of the parts exist because runs must reproduce bit for bit: each function
below keeps the exact bytes its callers have always hashed, so changing one would change the
client samples, the world, the data order or the simulated keys of every run. Use the one
whose purpose fits; a new purpose is a new first part (a string), not a new function.

- :func:`round_seed`: per-round choices of the round loop (sampling, training seeds).
- :func:`world_seed` and :func:`world_draw`: the simulated world (device profiles, home cells,
  availability, mobility, boarding vehicles).
- :func:`data_rng`: orders in the data pipeline (held-out split, batches, partitions).
- :func:`simulation_secret`: SIMULATION ONLY secret bytes of a secure round (keys, masks).

It imports only :mod:`fedlora.transcript` (which imports nothing of fedlora), so every layer may use it.
"""

from __future__ import annotations

import hashlib
import json
import random

from fedlora import transcript


def round_seed(*parts: object) -> int:
    """A 31-bit seed for one choice of the round loop: the clients sampled in a round and the
    secure top-up (``fedlora.roles.cloud``), a client's training seed (``fedlora.roles.device``),
    the quality benchmark's baselines.

    SHA-256 of ``json.dumps(parts, default=str)``: 1 and "1" give different seeds, anything
    JSON cannot hold (a numpy integer) is written as its ``str``.
    """
    digest = hashlib.sha256(json.dumps(parts, default=str).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def world_seed(*parts: object) -> int:
    """A 31-bit seed for building the simulated world (``fedlora.world.topology``: who gets
    which device profile, which home cell).

    SHA-256 of ``repr(parts)``, not of JSON as :func:`round_seed`: the same parts give a
    different seed there, and each keeps its own so existing worlds and samples stay as they were.
    """
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def world_draw(*parts: object) -> float:
    """A uniform draw in [0, 1) fixed by its parts (seed, purpose, round, client): whether a
    device is available (``fedlora.world.netsim``), hands over or moves far and where to
    (``fedlora.world.mobility``), boards which vehicle (``fedlora.world.topology``).

    Hash-based (BLAKE2b-64 of ``repr(parts)``) rather than a shared generator, so one client's
    draw does not depend on which other clients exist or in which order they are asked.
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def data_rng(purpose: str, *parts: object) -> random.Random:
    """A :class:`random.Random` for one order in the data pipeline (``fedlora.data``): the
    held-out split, the batch order, the wearable records, the file partition.

    Seeded with the string ``fedlora-<purpose>:<part>:<part>...`` (Random hashes a string seed
    with SHA-512), so the order is the same in every process.
    """
    return random.Random(f"fedlora-{purpose}" + "".join(f":{p}" for p in parts))


def simulation_secret(seed: int, *purpose: object) -> bytes:
    """SIMULATION ONLY: 32 secret-looking bytes of a secure round, fixed by the run seed and a
    purpose (("identity", device) for an Ed25519 key, ("rng", ...) for a random stream), used by
    ``fedlora.secure.identities.SimulatedIdentities``. Anyone who knows the seed knows them.

    SHA-256 of the canonical transcript (:mod:`fedlora.transcript`) of
    ``("fedlora/simulation", str(seed), (str(p) for p in purpose))``: typed and length-prefixed,
    so no two purposes share bytes.
    """
    return transcript.digest("fedlora/simulation", str(seed), tuple(str(p) for p in purpose))
