"""One cell's whole session in one process: the reference order of calls between the roles.

Used by the tests and as the template for the round loop, where each arrow below is a
message between machines:

    cloud:       header = SignedHeader.sign(CellHeader(...), cloud_identity, "cloud")
    clients:     advert_u   = client_u.advertise(header)                    -> aggregator
    aggregator:  roster     = aggregator.close_advertising()                -> clients
    clients:     shares_u   = client_u.share_keys(roster)                   -> aggregator
    aggregator:  deliveries = aggregator.close_sharing()                    -> each client
    clients:     y_u        = client_u.masked_input(delivery_u, q_u)        -> aggregator
    aggregator:  request, masked_sum = aggregator.close_upload()            request -> survivors,
                                                                            masked_sum -> tiers above
    clients:     response_u = client_u.unmask(request)                      -> aggregator (sealed)
    aggregator:  bundle     = aggregator.close_unmask()                     -> unmasker
    unmasker:    cell_mask  = unmasker.unmask_cell(bundle)                  -> cloud
    cloud:       plain = remove_masks(add_masked(masked sums), cell masks); decode_sum(plain, ...)

A client that raises :class:`RejectedMessage` (or is told to drop) simply stops taking
part, as a device that lost its connection would; a :class:`CellAborted` ends the cell.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedlora.secure.aggregator import NeighbourhoodAggregator
from fedlora.secure.client import CellClient
from fedlora.secure.errors import CellAborted, RejectedMessage
from fedlora.secure.messages import CellMask, MaskedSum, SignedHeader, Stage, UnmaskedSum
from fedlora.secure.unmasker import Unmasker, remove_masks

# A client's contribution: its update and example count (encoded by the client), or an
# already encoded uint32 vector q_u (encoding.encode_update).
ClientInput = np.ndarray | tuple[Mapping[str, np.ndarray], int]


@dataclass
class CellOutcome:
    """How one cell's session ended.

    ``masked_sum`` is what the aggregator hands to the tier above (None if the cell aborted
    before uploads closed); ``mask`` is what the unmasker hands the cloud (None if the cell
    aborted at any stage). Nothing decodable exists without both.
    """

    cell: str
    masked_sum: MaskedSum | None = None
    mask: CellMask | None = None
    aborted: CellAborted | None = None
    survivors: tuple[str, ...] = ()
    # Client -> why it is not among the survivors ("dropped at <stage>" or the rejection).
    dropped: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.aborted is None

    def unmasked(self) -> UnmaskedSum:
        """This cell's plain quantised sum (only when it did not abort)."""
        if not self.ok:
            raise ValueError(f"cell {self.cell!r} aborted, it has no sum: {self.aborted}")
        return remove_masks(self.masked_sum, [self.mask])


def run_cell_session(signed_header: SignedHeader, clients: Mapping[str, CellClient], inputs: Mapping[str, ClientInput],
                     aggregator: NeighbourhoodAggregator, unmasker: Unmasker, *,
                     drop_at: Mapping[str, Stage] | None = None,
                     global_adapter: Mapping[str, np.ndarray] | None = None) -> CellOutcome:
    """Run stages 2-6 for one cell and say how it ended (never raises for dropouts or aborts).

    ``drop_at[u]`` is the first stage client u skips (it sends nothing from then on), to
    simulate devices that disappear; ``global_adapter``, if given, is checked by every
    client against the header's digest.
    """
    missing = sorted(set(clients) - set(inputs))
    if missing:
        raise ValueError(f"clients {missing} have no input for cell {signed_header.header.cell!r}")
    drop_at = dict(drop_at or {})
    outcome = CellOutcome(cell=signed_header.header.cell)

    def active(client_id: str, stage: Stage) -> bool:
        if drop_at.get(client_id) == stage:
            outcome.dropped[client_id] = f"dropped at {stage.value}"
            del drop_at[client_id]  # and stays away for every later stage
        return client_id not in outcome.dropped

    def attempt(client_id: str, action) -> None:
        try:
            action()
        except RejectedMessage as exc:
            outcome.dropped[client_id] = f"rejected: {exc}"

    try:
        for u in sorted(clients):
            if active(u, Stage.ADVERTISE):
                attempt(u, lambda: aggregator.receive_advert(clients[u].advertise(signed_header, global_adapter)))
        roster = aggregator.close_advertising()
        for u in roster.members:
            if active(u, Stage.SHARE_KEYS):
                attempt(u, lambda: aggregator.receive_shares(clients[u].share_keys(roster)))
        deliveries = aggregator.close_sharing()
        for u, delivery in deliveries.items():
            if active(u, Stage.MASKED_INPUT):
                attempt(u, lambda: aggregator.receive_masked_input(
                    clients[u].masked_input(delivery, _encoded(clients[u], inputs[u]))))
        request, outcome.masked_sum = aggregator.close_upload()
        outcome.survivors = request.survivors
        for u in request.survivors:
            if active(u, Stage.UNMASK):
                attempt(u, lambda: aggregator.receive_unmask_response(clients[u].unmask(request)))
        outcome.mask = unmasker.unmask_cell(aggregator.close_unmask())
    except CellAborted as exc:
        outcome.aborted, outcome.mask = exc, None
    for u in clients:
        if u not in outcome.survivors and u not in outcome.dropped:
            outcome.dropped[u] = "left out when the cell aborted"
    return outcome


def _encoded(client: CellClient, value: ClientInput) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    update, num_examples = value
    return client.encode(update, num_examples)
