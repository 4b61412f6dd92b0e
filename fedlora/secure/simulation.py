"""In-process stand-ins for what a deployment sets up once: enrolled identities and headers.

In a deployment every device makes its Ed25519 identity on first start and the cloud
enrols the public half. In a simulation (and in the tests and benchmarks) all devices live
in one process: :class:`Enrolment` takes every key and every secret from one
:class:`~fedlora.secure.identities.SimulatedIdentities` (derived from its seed: AES-CTR
streams per device, round and purpose -- still a cryptographic generator), enrols identities
on demand, issues signed cell headers, and runs a cell session with fresh role objects.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedlora.secure.aggregator import NeighbourhoodAggregator
from fedlora.secure.client import CellClient
from fedlora.secure.encoding import EncodingConfig, TensorLayout, adapter_digest
from fedlora.secure.identities import SimulatedIdentities
from fedlora.secure.keys import DeviceRegistry, IdentityKey
from fedlora.secure.messages import CellHeader, SignedHeader, Stage
from fedlora.secure.prg import AES128_CTR, Randomness
from fedlora.secure.session import CellOutcome, ClientInput, run_cell_session
from fedlora.secure.unmasker import Unmasker


class Enrolment:
    """The cloud's registry of the devices of an in-process federation, keys from ``identities``."""

    def __init__(self, identities: SimulatedIdentities, *, cloud_id: str = "cloud"):
        self.identities = identities
        self.cloud_id = cloud_id
        self.registry = DeviceRegistry()
        self.enroll(cloud_id)

    def rng(self, *purpose: object) -> Randomness:
        """A secret random source for ``purpose`` (reproducible from the identities' seed)."""
        return self.identities.rng(*purpose)

    def enroll(self, device_id: str) -> IdentityKey:
        """The identity of ``device_id``, enrolled in the registry on first use."""
        identity = self.identities.own(device_id)
        if device_id not in self.registry:
            self.registry.enroll(device_id, identity.public_bytes)
        return identity

    def unmasker(self, device_id: str, server_round: int) -> Unmasker:
        """A fresh unmasker (one X25519 key) for one round."""
        return Unmasker(device_id, self.registry, cloud_id=self.cloud_id, rng=self.rng("unmasker", device_id, server_round))

    def cell_header(self, *, run_id: str, server_round: int, cell: str, aggregator: str, unmasker: Unmasker,
                    global_adapter: Mapping[str, np.ndarray], threshold: int, max_clients: int,
                    encoding: EncodingConfig | None = None, complete_graph_up_to: int = 100,
                    graph_degree: int | None = None, prg: str = AES128_CTR) -> SignedHeader:
        """The cloud's signed header for one cell and round (aggregator enrolled on the way)."""
        self.enroll(aggregator)
        header = CellHeader(
            run_id=run_id, server_round=server_round, cell=cell, aggregator=aggregator, unmasker=unmasker.device_id,
            unmasker_key=unmasker.public_key, global_adapter_digest=adapter_digest(global_adapter),
            layout=TensorLayout.of(global_adapter), encoding=encoding or EncodingConfig(), threshold=threshold,
            max_clients=max_clients, graph_seed=self.rng("graph-seed", run_id, server_round, cell)(32),
            complete_graph_up_to=complete_graph_up_to, graph_degree=graph_degree, prg=prg)
        return SignedHeader.sign(header, self.enroll(self.cloud_id), self.cloud_id)

    def client(self, device_id: str, signed_header: SignedHeader) -> CellClient:
        """A fresh client role for ``device_id`` in the header's cell and round."""
        h = signed_header.header
        return CellClient(device_id, self.enroll(device_id), self.registry, cloud_id=self.cloud_id,
                          rng=self.rng("client", device_id, h.run_id, h.server_round, h.cell))

    def run_cell(self, signed_header: SignedHeader, inputs: Mapping[str, ClientInput], unmasker: Unmasker, *,
                 drop_at: Mapping[str, Stage] | None = None) -> CellOutcome:
        """One whole session of the header's cell with the clients of ``inputs``."""
        h = signed_header.header
        clients = {u: self.client(u, signed_header) for u in inputs}
        aggregator = NeighbourhoodAggregator(h.aggregator, self.enroll(h.aggregator), self.registry, signed_header,
                                             cloud_id=self.cloud_id)
        return run_cell_session(signed_header, clients, inputs, aggregator, unmasker, drop_at=drop_at)
