"""A deployed END device that stays warm: one long-lived process answers every message of a run.

Flower starts a fresh ClientApp process per message; on a planned device that process only
forwards the message (``clients/app.py`` -> :mod:`fedlora.deploy.channel`) to the device's
resident process (:mod:`fedlora.deploy.resident`), whose :class:`WarmDevice` does the work:
the base model, tokenizer and LoRA wrapper are built once (:func:`fedlora.roles.device.lora_model`
keeps them for the process), and the secure-aggregation session state stays in this object
between the stages of a round instead of travelling back into Flower's ``context.state``.

A request is a plain dict (decoded and checked by :func:`fedlora.deploy.channel.decode_request`):

- ``kind="train"``: ``settings`` (the round's settings as JSON), ``arrays`` (the global adapter);
  the answer is ``{"arrays": delta, "metrics": ...}``;
- ``kind="secagg"``: also ``stage``, ``round`` and ``payload`` (bytes), ``arrays`` only at the
  first stage, ``run`` (the Flower run id: the session key); the answer is
  ``{"reply": bytes, "metrics": ...}``.

Every answer carries ``stats``: this process's pid, requests served and how many times it built
the model (:func:`fedlora.roles.device.model_builds`), so a test or the device's owner can see it stayed warm.
"""

from __future__ import annotations

import os
from typing import Any

from fedlora import adapters, protocol
from fedlora.roles.device import DeviceLocal, model_builds, secure_step, train_round
from fedlora.secure.identities import Identities


class WarmDevice:
    """The requests of one END device (its partition, own settings, own keys), in order."""

    def __init__(self, partition_id: int, *, local: DeviceLocal | None = None, identities: Identities | None = None,
                 split_trainer=None):
        self.partition_id = partition_id
        self.local = local
        self.identities = identities
        # (order JSON, settings, adapter) -> (own delta, metrics): how it trains split with the edge an order names
        # (a planned device's resident process: fedlora.deploy.split_session.device_trainer)
        self.split_trainer = split_trainer
        self.secure: tuple[str, bytes] | None = None  # (session key, state) between secure stages
        self.requests = 0

    def stats(self) -> dict[str, int]:
        return {"pid": os.getpid(), "requests": self.requests, "model_builds": model_builds()}

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """One message's work; raises (ValueError, :class:`~fedlora.roles.device.StaleSessionState`, ...)
        for a request this device cannot answer -- the caller turns it into an error reply."""
        settings = protocol.decode_settings(request["settings"])
        train = self._split_training(request.get("split", ""), settings, request["arrays"])
        if request["kind"] == "train":
            delta, metrics = train() if train is not None else train_round(settings, request["arrays"],
                                                                          self.partition_id, local=self.local)
            answer = {"arrays": delta, "metrics": metrics}
        elif request["kind"] == "secagg":
            if int(request["round"]) != settings.round:
                raise ValueError(f"secure stage for round {request['round']} carries settings of round {settings.round}")
            record: dict[str, float] = {}

            def split_train():  # the edge learns the split record and the example count (it weighs its part with it)
                delta, metrics = train()
                record.update({k: v for k, v in metrics.items() if k.startswith("split_")})
                return adapters.filled(delta, adapters.shapes(request["arrays"])), metrics

            reply, kept, metrics = secure_step(str(request["stage"]), bytes(request["payload"]), self.secure, settings,
                                               request["arrays"], self.partition_id, run=request["run"],
                                               identities=self.identities, local=self.local,
                                               train=split_train if train is not None else None)
            self.secure = kept  # only after the stage succeeded: a refused stage leaves the state as it was
            answer = {"reply": reply, "metrics": {**metrics, **record}}
        else:
            raise ValueError(f"unknown device request kind {request['kind']!r}")
        self.requests += 1
        answer["metrics"] = {k: float(v) for k, v in answer["metrics"].items()}
        return {**answer, "stats": self.stats()}

    def _split_training(self, order_json: str, settings, arrays):
        """``train()`` for a split order from the edge (fedlora/deploy/split_session.py), None without one."""
        if not order_json:
            return None
        if self.split_trainer is None:
            raise ValueError("the edge asks this device to train split, but it has no plan folder to find its edge in")
        if arrays is None:
            raise ValueError("a split order without the adapter to train from")
        return lambda: self.split_trainer(order_json, settings, arrays)
