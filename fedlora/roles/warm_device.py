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

from fedlora import protocol
from fedlora.roles.device import DeviceLocal, model_builds, secure_step, train_round
from fedlora.secure.identities import Identities


class WarmDevice:
    """The requests of one END device (its partition, own settings, own keys), in order."""

    def __init__(self, partition_id: int, *, local: DeviceLocal | None = None, identities: Identities | None = None):
        self.partition_id = partition_id
        self.local = local
        self.identities = identities
        self.secure: tuple[str, bytes] | None = None  # (session key, state) between secure stages
        self.requests = 0

    def stats(self) -> dict[str, int]:
        return {"pid": os.getpid(), "requests": self.requests, "model_builds": model_builds()}

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """One message's work; raises (ValueError, :class:`~fedlora.roles.device.StaleSessionState`, ...)
        for a request this device cannot answer -- the caller turns it into an error reply."""
        settings = protocol.decode_settings(request["settings"])
        if request["kind"] == "train":
            delta, metrics = train_round(settings, request["arrays"], self.partition_id, local=self.local)
            answer = {"arrays": delta, "metrics": metrics}
        elif request["kind"] == "secagg":
            if int(request["round"]) != settings.round:
                raise ValueError(f"secure stage for round {request['round']} carries settings of round {settings.round}")
            reply, kept, metrics = secure_step(str(request["stage"]), bytes(request["payload"]), self.secure, settings,
                                               request["arrays"], self.partition_id, run=request["run"],
                                               identities=self.identities, local=self.local)
            self.secure = kept  # only after the stage succeeded: a refused stage leaves the state as it was
            answer = {"reply": reply, "metrics": metrics}
        else:
            raise ValueError(f"unknown device request kind {request['kind']!r}")
        self.requests += 1
        answer["metrics"] = {k: float(v) for k, v in answer["metrics"].items()}
        return {**answer, "stats": self.stats()}
