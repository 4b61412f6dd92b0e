"""The neighbourhood aggregator's side of one cell session, as a state machine.

    ADVERTISE --close_advertising--> SHARE_KEYS --close_sharing--> MASKED_INPUT
              --close_upload--> UNMASK --close_unmask--> DONE          (any close: ABORTED)

It routes messages, checks every one (sender enrolled and in the right set, session id,
signature, shape, no duplicates) and adds the masked inputs. What it holds is safe to hold:
public keys, shares sealed to other clients, the running sum of masked inputs (each input
is added and dropped at once, never kept), and unmask responses sealed to the unmasker. It
has no key that opens a share or a response, so it cannot remove any mask.

A rejected message raises :class:`RejectedMessage` and changes nothing. A stage that ends
with fewer than t clients raises :class:`CellAborted`; the aggregator then releases
nothing (no roster, no deliveries, no masked sum) and refuses further calls.
"""

from __future__ import annotations

from enum import Enum

import numpy as np

from fedlora.secure.errors import CellAborted, ProtocolStateError, RejectedMessage
from fedlora.secure.graph import NeighbourGraph
from fedlora.secure.keys import DeviceRegistry, IdentityKey
from fedlora.secure.messages import (
    AdvertiseKeys,
    DeliveredShare,
    MaskedInput,
    MaskedSum,
    Roster,
    ShareDelivery,
    ShareKeys,
    SignedHeader,
    Stage,
    UnmaskBundle,
    UnmaskRequest,
    UnmaskResponse,
    compute_session_id,
)
from fedlora.secure.packing import reduce, unpack


class AggregatorState(str, Enum):
    ADVERTISE = "advertise"
    SHARE_KEYS = "share-keys"
    MASKED_INPUT = "masked-input"
    UNMASK = "unmask"
    DONE = "done"
    ABORTED = "aborted"


class NeighbourhoodAggregator:
    """One neighbourhood cell's aggregator for one round (one object per cell per round)."""

    def __init__(self, device_id: str, identity: IdentityKey, registry: DeviceRegistry, signed_header: SignedHeader,
                 *, cloud_id: str = "cloud"):
        header = signed_header.verify(registry, cloud_id)
        if header.aggregator != device_id:
            raise RejectedMessage(f"header of cell {header.cell!r} names aggregator {header.aggregator!r}, not {device_id!r}")
        self.device_id = device_id
        self.state = AggregatorState.ADVERTISE
        self.abort_reason: str | None = None
        self._identity = identity
        self._registry = registry
        self._signed_header = signed_header
        self._header = header
        self._digest = header.digest()
        self._adverts: dict[str, AdvertiseKeys] = {}
        self._roster: Roster | None = None
        self._graph: NeighbourGraph | None = None
        self._sid = b""
        self._share_msgs: dict[str, ShareKeys] = {}
        self._shared: tuple[str, ...] = ()
        self._sum: np.ndarray | None = None
        self._uploaded: set[str] = set()
        self._request: UnmaskRequest | None = None
        self._responses: dict[str, UnmaskResponse] = {}

    @property
    def cell(self) -> str:
        return self._header.cell

    @property
    def sid(self) -> bytes:
        return self._sid

    # ------------------------------------------------------------------ 2. advertise keys

    def receive_advert(self, msg: AdvertiseKeys) -> None:
        """Accept one client's signed keys (an enrolled device, for this header, once)."""
        self._expect(AggregatorState.ADVERTISE, f"key advertisement of {msg.sender!r}")
        if msg.sender in self._adverts:
            raise RejectedMessage(f"cell {self.cell!r}: second key advertisement from {msg.sender!r}")
        if len(self._adverts) >= self._header.max_clients:
            raise RejectedMessage(f"cell {self.cell!r} is full ({self._header.max_clients} clients); "
                                  f"advertisement of {msg.sender!r} refused")
        msg.verify(self._registry, self._digest)
        self._adverts[msg.sender] = msg

    def close_advertising(self) -> Roster:
        """Fix the roster (U1) and the session id; the roster goes to every client on it."""
        self._expect(AggregatorState.ADVERTISE, "close_advertising")
        n, t = len(self._adverts), self._header.threshold
        if n < t:
            self._abort(Stage.ADVERTISE, f"{n} clients advertised keys, t={t} needed")
        roster = Roster(self._digest, tuple(self._adverts[c] for c in sorted(self._adverts)))
        graph = self._header.neighbour_graph(roster.members)
        try:
            graph.check_threshold(t)
        except ValueError as exc:
            self._abort(Stage.ADVERTISE, str(exc))
        self._roster, self._graph = roster, graph
        self._sid = compute_session_id(self._header, roster)
        self.state = AggregatorState.SHARE_KEYS
        return roster

    # ------------------------------------------------------------------ 3. share keys

    def receive_shares(self, msg: ShareKeys) -> None:
        """Accept one client's sealed shares: one per neighbour, for this session, signed."""
        self._expect(AggregatorState.SHARE_KEYS, f"shares of {msg.sender!r}")
        who = f"cell {self.cell!r}: shares of {msg.sender!r}"
        if msg.sender not in self._graph.positions:
            raise RejectedMessage(f"{who}: sender is not in the roster")
        if msg.sender in self._share_msgs:
            raise RejectedMessage(f"{who}: sent twice")
        if msg.sid != self._sid:
            raise RejectedMessage(f"{who}: for another session (sid differs)")
        receivers = [s.receiver for s in msg.shares]
        expected = sorted(self._graph.neighbours(msg.sender))
        if sorted(receivers) != expected:
            raise RejectedMessage(f"{who}: addressed to {sorted(receivers)}, must be exactly its neighbours {expected}")
        self._registry.check(msg.sender, ShareKeys.signed_bytes(msg.sid, msg.sender, msg.shares), msg.signature, who)
        self._share_msgs[msg.sender] = msg

    def close_sharing(self) -> dict[str, ShareDelivery]:
        """Fix U2 (who shared) and hand each member of U2 the shares addressed to it."""
        self._expect(AggregatorState.SHARE_KEYS, "close_sharing")
        shared = tuple(sorted(self._share_msgs))
        if len(shared) < self._header.threshold:
            self._abort(Stage.SHARE_KEYS, f"{len(shared)} clients shared keys, t={self._header.threshold} needed")
        inbox: dict[str, list[DeliveredShare]] = {c: [] for c in shared}
        for sender in shared:
            for share in self._share_msgs[sender].shares:
                if share.receiver in inbox:  # neighbours outside U2 dropped; their shares go nowhere
                    inbox[share.receiver].append(DeliveredShare(sender, share.ciphertext))
        self._shared = shared
        self._share_msgs = {}
        self._sum = np.zeros(self._header.layout.size, dtype=np.uint32)
        self.state = AggregatorState.MASKED_INPUT
        return {c: ShareDelivery(self._sid, c, tuple(items)) for c, items in inbox.items()}

    # ------------------------------------------------------------------ 4. masked input

    def receive_masked_input(self, msg: MaskedInput) -> None:
        """Verify one masked input (sender in U2, this session, signed, right shape -- the
        header's packed length when packed -- once) and add it to the running sum (in the
        header's ring); the input itself is not kept."""
        self._expect(AggregatorState.MASKED_INPUT, f"masked input of {msg.sender!r}")
        who = f"cell {self.cell!r}: masked input of {msg.sender!r}"
        if msg.sid != self._sid:
            raise RejectedMessage(f"{who}: for another session (sid differs): replayed from another round or cell")
        if msg.sender not in self._shared:
            raise RejectedMessage(f"{who}: sender did not share keys in this session")
        if msg.sender in self._uploaded:
            raise RejectedMessage(f"{who}: second upload (replay?)")
        header = self._header
        try:
            vector = unpack(msg.vector, header.layout, header.encoding)
        except ValueError as exc:
            raise RejectedMessage(f"{who}: {exc}") from None
        self._registry.check(msg.sender, MaskedInput.signed_bytes(msg.sid, msg.sender, msg.vector), msg.signature, who)
        reduce(np.add(self._sum, vector, out=self._sum), header.encoding)
        self._uploaded.add(msg.sender)

    def close_upload(self) -> tuple[UnmaskRequest, MaskedSum]:
        """Fix U3 (who uploaded): the signed unmask request for the survivors, and the cell's
        masked sum for the tiers above (uniformly random to them; only the unmasker's
        :class:`~fedlora.secure.messages.CellMask` turns it into a plain sum)."""
        self._expect(AggregatorState.MASKED_INPUT, "close_upload")
        survivors = tuple(sorted(self._uploaded))
        if len(survivors) < self._header.threshold:
            self._abort(Stage.MASKED_INPUT, f"{len(survivors)} clients uploaded, t={self._header.threshold} needed")
        dropped = tuple(c for c in self._shared if c not in self._uploaded)
        signature = self._identity.sign(UnmaskRequest.signed_bytes(self._sid, survivors, dropped))
        self._request = UnmaskRequest(self._sid, survivors, dropped, self.device_id, signature)
        masked = MaskedSum(frozenset({self.cell}), len(survivors), self._sum)
        self._sum = None  # handed up; nothing per cell stays here
        self.state = AggregatorState.UNMASK
        return self._request, masked

    # ------------------------------------------------------------------ 5. unmask

    def receive_unmask_response(self, msg: UnmaskResponse) -> None:
        """Accept one survivor's sealed response (it cannot be opened here)."""
        self._expect(AggregatorState.UNMASK, f"unmask response of {msg.sender!r}")
        who = f"cell {self.cell!r}: unmask response of {msg.sender!r}"
        if msg.sid != self._sid:
            raise RejectedMessage(f"{who}: for another session (sid differs)")
        if msg.sender not in self._request.survivors:
            raise RejectedMessage(f"{who}: sender is not a survivor")
        if msg.sender in self._responses:
            raise RejectedMessage(f"{who}: sent twice")
        self._responses[msg.sender] = msg

    def close_unmask(self) -> UnmaskBundle:
        """Everything the unmasker needs for this cell (if at least t survivors responded)."""
        self._expect(AggregatorState.UNMASK, "close_unmask")
        if len(self._responses) < self._header.threshold:
            self._abort(Stage.UNMASK, f"{len(self._responses)} survivors answered the unmask request, "
                                      f"t={self._header.threshold} needed")
        self.state = AggregatorState.DONE
        return UnmaskBundle(self._signed_header, self._roster, self._shared, self._request,
                            tuple(self._responses[c] for c in sorted(self._responses)))

    # ------------------------------------------------------------------ helpers

    def _expect(self, state: AggregatorState, what: str) -> None:
        if self.state != state:
            if self.state == AggregatorState.ABORTED:
                raise ProtocolStateError(f"cell {self.cell!r} aborted ({self.abort_reason}); {what} refused")
            raise ProtocolStateError(f"cell {self.cell!r}: {what} arrived in stage {self.state.value}, "
                                     f"belongs to stage {state.value}")

    def _abort(self, stage: Stage, reason: str) -> None:
        self.state = AggregatorState.ABORTED
        self.abort_reason = reason
        self._sum = None
        self._responses = {}
        raise CellAborted(self.cell, stage.value, reason)
