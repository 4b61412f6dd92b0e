"""The masks of one cell: self masks, pairwise masks and their signs.

``y_u = q_u + PRG(b_u) + sum_{v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv)  (mod 2^32)``

over u's neighbours v that shared keys (U2). Client ids compare as strings (the roster
order), so for each pair exactly one side adds and the other subtracts the same mask, and
pair masks cancel in any sum that holds both. What is left in a cell's masked sum over the
survivors U3 is ``sum_{u in U3} PRG(b_u)`` plus, for every dropped v, the pair masks the
survivors made with it -- exactly what the unmasker rebuilds from the revealed shares.
"""

from __future__ import annotations

import numpy as np

from fedlora.secure.keys import PAIR_MASK, AgreementKey, pair_key
from fedlora.secure.prg import mask_vector


def pair_sign(owner: str, peer: str) -> int:
    """+1 if ``owner`` adds the pair mask with ``peer`` to its input, -1 if it subtracts it."""
    if owner == peer:
        raise ValueError(f"a client has no pair mask with itself ({owner!r})")
    return 1 if peer > owner else -1


def pair_seed(own_mask_key: AgreementKey, peer_mask_key: bytes, *, sid: bytes, owner: str, peer: str) -> bytes:
    """s_uv: the seed of the pair mask between ``owner`` and ``peer`` (same from either side)."""
    return pair_key(own_mask_key, peer_mask_key, sid=sid, purpose=PAIR_MASK, me=owner, peer=peer)


def add_mask(acc: np.ndarray, seed: bytes, sign: int, prg: str) -> None:
    """``acc += sign * PRG(seed)`` in Z_2^32, in place (uint32 arithmetic wraps by design)."""
    mask = mask_vector(seed, acc.size, prg)
    if sign > 0:
        np.add(acc, mask, out=acc)
    else:
        np.subtract(acc, mask, out=acc)


def mask_input(encoded: np.ndarray, self_seed: bytes, pair_seeds: dict[str, bytes], owner: str, prg: str) -> np.ndarray:
    """``y_u`` from ``q_u`` (``encoded``), b_u and ``{peer: s_uv}``; a new array."""
    y = np.array(encoded, dtype=np.uint32, copy=True)
    add_mask(y, self_seed, +1, prg)
    for peer in sorted(pair_seeds):
        add_mask(y, pair_seeds[peer], pair_sign(owner, peer), prg)
    return y
