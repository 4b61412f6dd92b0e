"""Upper tiers (sub-urban, cloud): add masked sums of cells, nothing else.

A neighbourhood hands up a :class:`~fedlora.secure.messages.MaskedSum`; any tier above adds
the masked sums of its children in Z_2^32 (the value coordinates in the packed ring Z_2^k
under packing: the cloud sizes k for the most clients any unmasked sum of the round holds)
and hands the result up. Masks are additive, so
any number of tiers composes, and what a tier holds is uniformly random to it. Only the
unmasker, with every cell's :class:`~fedlora.secure.messages.CellMask`, turns the top sum
into a plain one (:func:`~fedlora.secure.unmasker.remove_masks`).

A cell whose unmasking aborted has no mask and cannot be subtracted later, so a tier adds
only cells the unmasker reports as unmasked (or forwards per-cell sums and lets the cloud
choose).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from fedlora.secure.encoding import EncodingConfig
from fedlora.secure.messages import MaskedSum
from fedlora.secure.packing import reduce


def add_masked(parts: Iterable[MaskedSum], encoding: EncodingConfig) -> MaskedSum:
    """What an upper tier (sub-urban, cloud) does: add masked sums of disjoint cells in Z_2^32.

    Refuses a cell that appears twice (it would be counted twice), vectors of different
    lengths, and a total number of clients the encoding (its ring) cannot sum without wrapping.
    """
    parts = list(parts)
    if not parts:
        raise ValueError("no masked sums to add")
    cells: set[str] = set()
    for part in parts:
        twice = cells & part.cells
        if twice:
            raise ValueError(f"cells {sorted(twice)} appear in two masked sums; each cell is added once")
        cells |= part.cells
        if part.vector.dtype != np.uint32 or part.vector.shape != parts[0].vector.shape:
            raise ValueError(f"masked sum of cells {sorted(part.cells)} is not a uint32 vector of shape "
                             f"{parts[0].vector.shape}")
    clients = sum(p.clients for p in parts)
    encoding.check_capacity(clients)
    vector = parts[0].vector.copy()
    for part in parts[1:]:
        np.add(vector, part.vector, out=vector)
    return MaskedSum(frozenset(cells), clients, reduce(vector, encoding))
