"""The unmasking tier (the cloud by default, a sub-urban cell optionally) for one round.

It holds one fresh X25519 key per round, whose public half the cloud writes into the
headers of the cells it unmasks; survivors seal their revealed shares to it. From a cell's
:class:`UnmaskBundle` it re-checks everything (header, roster signatures, session id, the
aggregator's request, who survived and who dropped), opens the responses, rebuilds

- b_v for every survivor v (its self mask) and
- s_v for every client v that shared keys but did not upload (the pair masks survivors made
  with it; the rebuilt key must match v's advertised public key),

and returns the cell's total mask as a :class:`CellMask`. It never sees a sum here: the
masked sum comes up through the tiers, possibly added to other cells' sums, and
:func:`remove_masks` subtracts the masks of exactly the cells in it.

Any failure -- fewer than t usable shares of any secret, shares that disagree, a bundle
that does not check out -- raises :class:`CellAborted` naming what was wrong, and nothing is
returned for that cell. Responses that fail to open are skipped (a sender counts as
silent), so one corrupted response does not sink a cell with enough others.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import NoReturn

import numpy as np

from fedlora.secure import aead, shamir
from fedlora.secure.errors import CellAborted, RejectedMessage
from fedlora.secure.keys import UNMASK_TRANSPORT, AgreementKey, DeviceRegistry, pair_key
from fedlora.secure.masks import add_mask, pair_seed, pair_sign
from fedlora.secure.messages import (
    MASK_KEY,
    SELF_MASK,
    CellMask,
    MaskedSum,
    Stage,
    UnmaskBundle,
    UnmaskedSum,
    UnmaskRequest,
    compute_session_id,
    decode_revealed,
    unmask_associated_data,
)
from fedlora.secure.packing import reduce
from fedlora.secure.prg import SEED_BYTES, Randomness


class Unmasker:
    """Rebuilds the masks of the cells that name ``device_id`` as their unmasker, this round."""

    def __init__(self, device_id: str, registry: DeviceRegistry, *, cloud_id: str = "cloud",
                 rng: Randomness = os.urandom):
        self.device_id = device_id
        self._registry = registry
        self._cloud_id = cloud_id
        self._key = AgreementKey.generate(rng)
        # Sessions already unmasked: a second bundle for one session (e.g. with another
        # survivor set, to difference two sums) is refused.
        self._unmasked: set[bytes] = set()

    @property
    def public_key(self) -> bytes:
        """This round's X25519 public key, for the ``unmasker_key`` field of the headers."""
        return self._key.public_bytes

    def unmask_cell(self, bundle: UnmaskBundle) -> CellMask:
        """The total mask of one cell's masked sum over its survivors, or :class:`CellAborted`."""
        cell = bundle.header.header.cell

        def abort(reason: str) -> NoReturn:
            raise CellAborted(cell, Stage.UNMASK.value, reason)

        try:
            header = bundle.header.verify(self._registry, self._cloud_id)
            bundle.roster.verify(self._registry, header.digest())
        except RejectedMessage as exc:
            abort(str(exc))
        if header.unmasker != self.device_id or header.unmasker_key != self.public_key:
            abort(f"the header names unmasker {header.unmasker!r} with another round key; {self.device_id!r} cannot open it")
        roster, request, t = bundle.roster, bundle.request, header.threshold
        sid = compute_session_id(header, roster)
        if sid in self._unmasked:
            abort("this session was already unmasked once; a second unmasking is refused")
        if request.sid != sid or request.signer != header.aggregator:
            abort("the unmask request is not the cell aggregator's request for this session")
        try:
            self._registry.check(request.signer, UnmaskRequest.signed_bytes(sid, request.survivors, request.dropped),
                                 request.signature, "unmask request")
        except RejectedMessage as exc:
            abort(str(exc))
        members = set(roster.members)
        shared, survivors = tuple(bundle.shared), tuple(request.survivors)
        if not set(shared) <= members or list(shared) != sorted(set(shared)):
            abort("the set of clients that shared keys is not a sorted subset of the roster")
        if not set(survivors) <= set(shared):
            abort(f"survivors {sorted(set(survivors) - set(shared))} never shared keys")
        dropped = tuple(c for c in shared if c not in set(survivors))
        if tuple(request.dropped) != dropped:
            abort("the request's dropped clients are not exactly those that shared keys but did not upload")
        if len(survivors) < t:
            abort(f"{len(survivors)} survivors, t={t} needed")
        graph = header.neighbour_graph(roster.members)
        try:
            graph.check_threshold(t)
        except ValueError as exc:
            abort(str(exc))

        shares, skipped = self._collect_shares(bundle, sid, graph, set(survivors), set(dropped))
        note = f" ({len(skipped)} responses unusable: {'; '.join(skipped)})" if skipped else ""

        def rebuild(owner: str, kind: str) -> bytes:
            got = shares.get((owner, kind), [])
            if len(got) < t:
                abort(f"only {len(got)} shares of the {kind} secret of {owner!r} arrived, t={t} needed{note}")
            try:
                return shamir.combine_bytes(got, t, SEED_BYTES)
            except shamir.ShamirError as exc:
                abort(f"shares of the {kind} secret of {owner!r} are unusable: {exc}")

        mask = np.zeros(header.layout.size, dtype=np.uint32)
        for v in survivors:
            add_mask(mask, rebuild(v, SELF_MASK), +1, header.prg)
        for v in dropped:
            key = AgreementKey.from_private_bytes(rebuild(v, MASK_KEY))
            if key.public_bytes != roster.advert(v).mask_key:
                abort(f"the rebuilt mask key of {v!r} does not match the key it advertised: corrupted shares")
            for w in sorted(graph.neighbours(v) & set(survivors)):
                seed = pair_seed(key, roster.advert(w).mask_key, sid=sid, owner=v, peer=w)
                add_mask(mask, seed, pair_sign(w, v), header.prg)  # the sign w used in y_w
        self._unmasked.add(sid)
        return CellMask(cell, sid, len(survivors), reduce(mask, header.encoding))

    def _collect_shares(self, bundle: UnmaskBundle, sid: bytes, graph, survivors: set[str], dropped: set[str]
                        ) -> tuple[dict[tuple[str, str], list[shamir.Share]], list[str]]:
        """Open every response; ``{(owner, kind): shares}`` from the usable ones, and why others were not."""
        roster, unmasker = bundle.roster, self.device_id
        shares: dict[tuple[str, str], list[shamir.Share]] = {}
        skipped: list[str] = []
        seen: set[str] = set()
        for response in bundle.responses:
            sender = response.sender
            try:
                if response.sid != sid or sender not in survivors or sender in seen:
                    raise RejectedMessage(f"response of {sender!r} is for another session, not from a survivor, or repeated")
                seen.add(sender)
                key = pair_key(self._key, roster.advert(sender).share_key, sid=sid, purpose=UNMASK_TRANSPORT,
                               me=unmasker, peer=sender)
                plain = aead.open_sealed(key, response.ciphertext, unmask_associated_data(sid, sender, unmasker),
                                         f"unmask response of {sender!r}")
                got_sid, got_sender, revealed = decode_revealed(plain)
                if (got_sid, got_sender) != (sid, sender):
                    raise RejectedMessage(f"unmask response of {sender!r} names another session or sender")
                mine: dict[tuple[str, str], shamir.Share] = {}
                for share in revealed:
                    wanted = SELF_MASK if share.owner in survivors else MASK_KEY if share.owner in dropped else None
                    if share.kind != wanted:
                        raise RejectedMessage(f"unmask response of {sender!r} reveals a {share.kind} share of "
                                              f"{share.owner!r}, which the request did not ask for")
                    holds = sender == share.owner or sender in graph.neighbours(share.owner)
                    if not holds or share.x != graph.share_x(sender):
                        raise RejectedMessage(f"unmask response of {sender!r} has a share of {share.owner!r} "
                                              "it cannot hold")
                    if (share.owner, share.kind) in mine:
                        raise RejectedMessage(f"unmask response of {sender!r} repeats a share of {share.owner!r}")
                    mine[(share.owner, share.kind)] = shamir.Share(share.x, share.y)
            except RejectedMessage as exc:
                skipped.append(str(exc))
                continue
            for slot, share in mine.items():
                shares.setdefault(slot, []).append(share)
        return shares, skipped


def remove_masks(total: MaskedSum, masks: Iterable[CellMask]) -> UnmaskedSum:
    """``total - sum(masks)`` in Z_2^32: the plain quantised sum of the cells in ``total``.

    Needs exactly one mask per cell in the sum, covering as many clients as the sum does. A
    cell without a mask (it aborted) cannot be taken out of a sum afterwards: the tier must
    add again without it.
    """
    by_cell: dict[str, CellMask] = {}
    for mask in masks:
        if mask.cell in by_cell:
            raise ValueError(f"two masks for cell {mask.cell!r}")
        by_cell[mask.cell] = mask
    missing = sorted(total.cells - set(by_cell))
    if missing:
        raise ValueError(f"cells {missing} are in the masked sum but have no mask (aborted or not unmasked); "
                         "the tiers must add the masked sums again without them")
    extra = sorted(set(by_cell) - total.cells)
    if extra:
        raise ValueError(f"masks given for cells {extra}, which are not in the masked sum")
    clients = sum(m.clients for m in by_cell.values())
    if clients != total.clients:
        raise ValueError(f"the masks cover {clients} clients, the masked sum {total.clients}")
    plain = total.vector.copy()
    for cell in sorted(by_cell):
        if by_cell[cell].vector.shape != plain.shape:
            raise ValueError(f"mask of cell {cell!r} has shape {by_cell[cell].vector.shape}, the sum {plain.shape}")
        np.subtract(plain, by_cell[cell].vector, out=plain)
    return UnmaskedSum(total.cells, total.clients, plain)

