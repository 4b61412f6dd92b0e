"""A cell's split devices: each trains U-shaped with its neighbourhood edge (docs/split_learning.md).

The cloud's network model picks who trains split this round and at which cut
(:func:`fedlora.world.splitplan.plan_round`); the cell request carries ``split`` (client -> (k, m)).
The neighbourhood's round (:func:`fedlora.roles.neighbourhood.run_cells`) hands each split client
to a :data:`SplitTrainer`, which returns two things: the device's reply, whose update is the delta
of the tensors in the device's own blocks (embeddings, blocks < k and >= L-m, head) -- an END update
like any other -- and the edge's delta of its blocks for that device. The cell adds the edge's part
with the device's example count (:meth:`fedlora.aggregate.sums.WeightedSum.add_tensors`), so every
tensor's mean is over whoever trained it and a split device's update weighs exactly what it would
have weighed had it trained the whole model.

:func:`split_round` is the in-process trainer (simulation, the :class:`~fedlora.roles.local.LocalCellRunner`):
the device's half and the edge's half run in this process over an :class:`~fedlora.split.InProcessLink`,
with the same code a deployment runs on each side of its stream.

:class:`SecureSplitDevices` is the same under secure aggregation: a split device's update (its own
tensors, zeros for its edge's) enters the cell's masked sum like any device's; the edge keeps its
delta of its blocks and the device's example count, and adds that delta, in plain, into the cell's masked
sum (:func:`fedlora.roles.neighbourhood.run_cells`; docs/split_learning.md).
"""

from __future__ import annotations

from typing import Any

from fedlora import adapters
from fedlora.adapters import AdapterState
from fedlora.roles.device import secure_step, train_round
from fedlora.roles.neighbourhood import SplitTrainer
from fedlora.round_settings import RoundSettings
from fedlora.split import DeviceHalf, EdgeHalf, InProcessLink, SplitCut, check_cut, edge_keys, num_layers

SPLIT_NOTE = ("split learning is not secure aggregation: the edge sees every step's activations of its split "
              "devices (and their padding masks), from which something of their data can be inferred")


def split_round(settings: RoundSettings, global_state: AdapterState, partition_id: int, cut: SplitCut
                ) -> tuple[AdapterState, dict[str, Any], AdapterState]:
    """One split device's round with its edge in this process: (the device's update: the delta of the
    tensors on its side, metrics with the cut and the link's traffic, the edge's delta of its blocks).

    ``train_seconds`` is the device's own compute; ``edge_seconds`` the edge's."""
    session: dict[str, Any] = {}

    def device_half(model) -> DeviceHalf:
        check_cut(cut, num_layers(model), settings.train.split.min_k)
        link = InProcessLink(EdgeHalf(model, cut, settings.train, proximal_mu=settings.proximal_mu))
        session.update(model=model, link=link)
        return DeviceHalf(model, cut, link)

    delta, metrics = train_round(settings, global_state, partition_id, split=device_half)
    link: InProcessLink = session["link"]
    on_edge = set(edge_keys(delta, cut, num_layers(session["model"])))
    edge = {k: v for k, v in delta.items() if k in on_edge}
    device = {k: v for k, v in delta.items() if k not in on_edge}
    metrics = {**metrics, "train_seconds": max(0.0, metrics["train_seconds"] - link.edge.seconds),
               "edge_seconds": link.edge.seconds, "split_k": cut.k, "split_m": cut.m,
               **{f"split_{k}": v for k, v in link.traffic.record().items()}}
    return device, metrics, edge


class SecureSplitDevices:
    """Secure aggregation, simulation: one round's split devices, each run in this process with its edge.

    Called for every stage of a split client's secure session (:func:`fedlora.roles.device.secure_step`,
    the device's own code); the first stage trains split (``trainer``, default :func:`split_round`) and
    encodes the device's own tensors, with zeros for the edge's blocks and the device's loss and count, as
    the device's masked input. The edge's delta of its blocks and the example count stay here (``edge``)
    for the edge to add into the masked sum once it knows the device is in it."""

    def __init__(self, trainer: SplitTrainer = split_round):
        self.trainer = trainer
        self.state: dict[int, tuple[str, bytes]] = {}  # client -> its device's secure-session state
        self.edge: dict[int, tuple[AdapterState, float]] = {}  # client -> (edge's delta, examples)

    def step(self, stage: str, payload: bytes, settings: RoundSettings, arrays: AdapterState, client: int,
             cut: SplitCut, expected: dict[str, tuple[int, ...]]) -> tuple[bytes, dict[str, Any]]:
        """One stage of ``client``'s session: (its reply, clear metrics: training time and the split record)."""
        clear: dict[str, Any] = {}

        def train() -> tuple[AdapterState, dict[str, Any]]:
            device, metrics, edge = self.trainer(settings, arrays, client, cut)
            self.edge[client] = (edge, float(metrics["num_examples"]))
            clear.update({k: v for k, v in metrics.items() if k.startswith("split_") or k == "edge_seconds"})
            return adapters.filled(device, expected), metrics

        reply, self.state[client], metrics = secure_step(stage, payload, self.state.get(client), settings, arrays,
                                                         client, train=train)
        return reply, {**metrics, **clear}
