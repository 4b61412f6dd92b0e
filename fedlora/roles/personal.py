"""What a device keeps for itself under a personal strategy, and where it keeps it.

Two kinds (``RoundSettings.personal``, set by the strategy):

- ``lora_b`` (FedSA-LoRA, arXiv 2410.01463): the device trains A and B of the federation's adapter,
  sends the change of A only and keeps its own B. Its personal model is the global A with its B.
- ``adapter`` (FedDPA, arXiv 2403.19211): the device trains the federation's adapter as under FedAvg
  (and sends its change), then a second, local PEFT adapter named :data:`PERSONAL` with the updated
  global one active but frozen. The local adapter never leaves the device; at inference both are
  active, so the output is the base plus both adapters' contributions.

What a device keeps lives in a :class:`PersonalStore`: one safetensors file per client, written
atomically (temporary file, then rename), tagged with the round it was trained in. The store keeps
that and the previous version, so a round that is re-run after a resume (the cloud resumes from the
last finished round) starts from the state the device had before that round, and a resumed run
equals an uninterrupted one. In simulation the store is the run directory's ``personal/``; a
deployed device keeps it in its own folder's ``state/personal/`` and never sends it.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from fedlora import adapters
from fedlora.adapters import AdapterState
from fedlora.model import lora_flags_kept

NONE, LORA_B, ADAPTER = "none", "lora_b", "adapter"
# The PEFT name of a FedDPA device's local adapter (the federation's is PEFT's "default").
PERSONAL = "personal"
# The run directory's folder of the simulated devices' stores (and, after the run, their exported adapters).
PERSONAL_DIR = "personal"


class PersonalStore:
    """One folder of per-client personal states, each tagged with the round it was trained in."""

    def __init__(self, folder: str | Path):
        if not str(folder):
            raise ValueError("a personal strategy needs a folder to keep each device's own state in (personal_dir)")
        self.folder = Path(folder)

    def path(self, client: int, previous: bool = False) -> Path:
        return self.folder / f"client-{client}{'.prev' if previous else ''}.safetensors"

    def _read(self, path: Path) -> tuple[int, AdapterState] | None:
        if not path.is_file():
            return None
        with safe_open(str(path), framework="numpy") as fh:
            server_round = int((fh.metadata() or {}).get("round", "0"))
        return server_round, load_file(str(path))

    def load(self, client: int, before_round: int | None = None) -> AdapterState | None:
        """The client's latest state trained before round ``before_round`` (any round when None); None if none."""
        best = None
        for previous in (False, True):
            found = self._read(self.path(client, previous))
            if found is not None and (before_round is None or found[0] < before_round):
                if best is None or found[0] > best[0]:
                    best = found
        return best[1] if best is not None else None

    def save(self, client: int, server_round: int, state: AdapterState) -> None:
        """Keep ``state`` as the client's state of ``server_round``; the version of an earlier round stays as the
        previous one (a re-run of the same round replaces only its own version)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        current = self._read(self.path(client))
        if current is not None and current[0] < server_round:
            os.replace(self.path(client), self.path(client, previous=True))
        fd, tmp = tempfile.mkstemp(prefix=f".client-{client}.", suffix=".tmp", dir=self.folder)
        os.close(fd)
        try:
            save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}, tmp,
                      metadata={"round": str(server_round)})
            os.replace(tmp, self.path(client))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def clients(self) -> list[int]:
        """Clients with a kept state, in id order."""
        ids = {p.name.split(".")[0].removeprefix("client-") for p in self.folder.glob("client-*.safetensors")}
        return sorted(int(c) for c in ids if c.isdigit())


def kept_part(kind: str, trained: AdapterState) -> tuple[AdapterState, AdapterState]:
    """(what the device sends, what it keeps) of its trained shared-adapter tensors: under ``lora_b`` B stays."""
    if kind != LORA_B:
        return trained, {}
    return ({k: v for k, v in trained.items() if not adapters.is_lora_b(k)},
            {k: v for k, v in trained.items() if adapters.is_lora_b(k)})


def add_personal_adapter(model, init_seed: int) -> AdapterState:
    """Add the local adapter :data:`PERSONAL` (the shared adapter's LoRA settings, seeded init, float32, frozen
    and inactive) to the PEFT ``model``; -> its initial state."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(init_seed)
        model.add_adapter(PERSONAL, copy.deepcopy(model.peft_config["default"]))
    # new modules (the adapter's dropout) start in training mode: give them the model's mode, or an eval-mode
    # model would drop out through the personal adapter
    model.train(model.training)
    for param in adapters.lora_parameters(model, trainable_only=False, adapter_name=PERSONAL).values():
        param.requires_grad_(False)
        if param.dtype != torch.float32:
            param.data = param.data.float()
    return adapters.get_state(model, trainable_only=False, adapter_name=PERSONAL)


@contextmanager
def both_active(model, *, train_personal: bool = False) -> Iterator[None]:
    """The shared and the personal adapter both active (their contributions add up); with ``train_personal``
    only the personal one trainable. Afterwards the shared adapter alone is active and every flag as before."""
    with lora_flags_kept(model):
        model.base_model.set_adapter(["default", PERSONAL])
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.requires_grad_(train_personal and f".{PERSONAL}." in name)
        try:
            yield
        finally:
            model.base_model.set_adapter("default")
