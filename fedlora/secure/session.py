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

:func:`run_cell_session` is the round loop's own driver (:func:`fedlora.secure.rounds.drive_cells`)
over an in-memory exchange: every message is serialised as on the network, and a client that
raises :class:`RejectedMessage` (or is told to drop) simply stops taking part, as a device that
lost its connection would; a :class:`CellAborted` ends the cell.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedlora.secure.aggregator import NeighbourhoodAggregator
from fedlora.secure.client import CellClient
from fedlora.secure.errors import CellAborted, RejectedMessage
from fedlora.secure.messages import CellMask, MaskedSum, Roster, ShareDelivery, SignedHeader, Stage, UnmaskedSum, UnmaskRequest
from fedlora.secure.rounds import NO_REPLY, STAGES, CellRun, drive_cells, message, read_message
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
    devices = sorted(clients)  # the exchange names END client i by its index
    run = CellRun(signed_header.header.cell, list(range(len(devices))), aggregator=aggregator,
                  of={u: i for i, u in enumerate(devices)}, joins={i: b"" for i in range(len(devices))})
    session = _InProcessClients(signed_header, global_adapter, devices, clients, inputs, drop_at or {})
    drive_cells([run], session.exchange)
    return _outcome(run, devices, unmasker)


@dataclass
class _Reply:
    """A client's answer to one stage as the exchange hands it back (serialised message or error)."""

    update: bytes | None = None
    error: str | None = None
    bytes_up: int = 0


@dataclass
class _InProcessClients:
    """The exchange of an in-process cell: each payload straight to its :class:`CellClient`."""

    signed_header: SignedHeader
    global_adapter: Mapping[str, np.ndarray] | None
    devices: list[str]
    clients: Mapping[str, CellClient]
    inputs: Mapping[str, ClientInput]
    drop_at: Mapping[str, Stage]

    def exchange(self, stage: str, _requests: list, payloads: dict[int, bytes]) -> dict[int, _Reply]:
        replies = {}
        for c, payload in payloads.items():
            u = self.devices[c]
            if u in self.drop_at and STAGES.index(Stage(self.drop_at[u]).value) <= STAGES.index(stage):
                continue  # gone from its drop stage on
            try:
                replies[c] = _Reply(message(self._answer(stage, u, payload)))
            except RejectedMessage as exc:
                replies[c] = _Reply(error=f"rejected: {exc}")
        return replies

    def _answer(self, stage: str, u: str, payload: bytes):
        client = self.clients[u]
        if stage == Stage.ADVERTISE.value:
            return client.advertise(self.signed_header, self.global_adapter)
        if stage == Stage.SHARE_KEYS.value:
            return client.share_keys(read_message(payload, Roster))
        if stage == Stage.MASKED_INPUT.value:
            return client.masked_input(read_message(payload, ShareDelivery), _encoded(client, self.inputs[u]))
        return client.unmask(read_message(payload, UnmaskRequest))


def _outcome(run: CellRun, devices: list[str], unmasker: Unmasker) -> CellOutcome:
    """The session's :class:`CellOutcome`, unmasking the cell's bundle unless it aborted."""
    outcome = CellOutcome(cell=run.cell, masked_sum=run.outcome.masked, aborted=run.abort)
    if run.unmask_request is not None:
        outcome.survivors = tuple(run.unmask_request.survivors)
    if outcome.aborted is None:
        try:
            outcome.mask = unmasker.unmask_cell(run.outcome.bundle)
        except CellAborted as exc:
            outcome.aborted = exc
    for c, (_, why, _) in run.status.items():  # refused by the aggregator, or refused to go on
        if why != NO_REPLY:
            outcome.dropped[devices[c]] = why
    for stage in STAGES:
        for c in run.outcome.dropped.get(stage, []):
            outcome.dropped.setdefault(devices[c], f"dropped at {stage}")
    for u in devices:
        if u not in outcome.survivors and u not in outcome.dropped:
            outcome.dropped[u] = "left out when the cell aborted"
    return outcome


def _encoded(client: CellClient, value: ClientInput) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    update, num_examples = value
    return client.encode(update, num_examples)
