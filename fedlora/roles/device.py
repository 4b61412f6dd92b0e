"""What an END device does in one round, independent of how messages reach it.

The Flower ClientApp (``clients/app.py``) and the in-process transport used by tests both
call :func:`train_round`. A process serving many virtual clients loads the frozen base
model once and reuses it: only the LoRA tensors are reset to the global adapter per call.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedlora import adapters
from fedlora.adapters import AdapterState
from fedlora.aggregate import ranks
from fedlora.aggregate.dp import clip_update
from fedlora.config import FedLoraConfig
from fedlora.data import client_examples, tokenize
from fedlora.model import load_base_model, wrap_lora
from fedlora.roles.personal import (
    ADAPTER,
    LORA_B,
    NONE,
    PERSONAL,
    PERSONAL_DIR,
    PersonalStore,
    add_personal_adapter,
    both_active,
    kept_part,
)
from fedlora.round_settings import RoundSettings, apply_device_settings
from fedlora.secure.identities import Identities, SimulatedIdentities
from fedlora.secure.rounds import CLOUD_ID, STAGES, client_step, device_id
from fedlora.seeds import round_seed
from fedlora.train import train_local

if TYPE_CHECKING:  # annotations only
    from fedlora.split import DeviceHalf

_peft: dict[str, Any] = {}  # the one LoRA-wrapped model of this process, with its key
_inits: dict[str, AdapterState] = {}  # the seeded initialisation of every adapter this process built, by key
_tokenized: dict[tuple, list[dict]] = {}


def lora_model(cfg: FedLoraConfig | RoundSettings, *, freeze_a: bool, personal: bool = False,
               lora_alpha: float | None = None):
    """The process-wide PEFT model for this config (or a round's settings: both carry the model,
    LoRA and seed), built once; returns (model, tokenizer). ``personal``: with a second, local
    adapter (FedDPA, :func:`fedlora.roles.personal.add_personal_adapter`), inactive until asked for.
    ``lora_alpha``: a device's own, when it trains a lower rank than the global adapter's
    (:func:`fedlora.model.wrap_lora`).

    The model is shared by every client (and, in-process, the server) of this process, so
    its LoRA tensors hold whatever was loaded last: start from :func:`initial_adapter` or
    a received global adapter, never from the model's current values.
    """
    base_key = _model_key(cfg, freeze_a)
    key = base_key + ("/personal" if personal else "") + ("" if lora_alpha is None else f"/alpha={lora_alpha!r}")
    if _peft.get("key") != key:
        if "model" in _peft:
            # The base is cached and shared: strip the old LoRA layers before re-wrapping.
            _peft.pop("model").unload()
        base, tokenizer = load_base_model(cfg.model)
        model = wrap_lora(base, cfg.lora, freeze_a=freeze_a, init_seed=cfg.seed, lora_alpha=lora_alpha)
        _peft.update(key=key, model=model, tokenizer=tokenizer, init=adapters.get_state(model, trainable_only=False),
                     builds=_peft.get("builds", 0) + 1)
        # the shared adapter's initialisation does not depend on a personal adapter beside it
        _inits.setdefault(base_key if lora_alpha is None else key, _peft["init"])
        if personal:
            _peft["personal_init"] = add_personal_adapter(model, round_seed(cfg.seed, "personal-init"))
    return _peft["model"], _peft["tokenizer"]


def model_builds() -> int:
    """How many times this process loaded the base model and wrapped it with LoRA (a warm device: once)."""
    return int(_peft.get("builds", 0))


def _model_key(cfg: FedLoraConfig | RoundSettings, freeze_a: bool) -> str:
    return json.dumps([dataclasses.asdict(cfg.model), dataclasses.asdict(cfg.lora), freeze_a, cfg.seed], sort_keys=True)


def initial_adapter(cfg: FedLoraConfig | RoundSettings, *, freeze_a: bool, personal: bool = False) -> AdapterState:
    """The seeded LoRA initialisation (A random, B zero): identical in every process."""
    key = _model_key(cfg, freeze_a)
    if key not in _inits:
        lora_model(cfg, freeze_a=freeze_a, personal=personal)
    return {k: v.copy() for k, v in _inits[key].items()}


def initial_personal(cfg: FedLoraConfig | RoundSettings) -> AdapterState:
    """A FedDPA device's local adapter before its first round (seeded like the shared one's, another seed)."""
    lora_model(cfg, freeze_a=False, personal=True)
    return {k: v.copy() for k, v in _peft["personal_init"].items()}


def local_training_set(settings: RoundSettings, partition_id: int, tokenizer, num_partitions: int) -> list[dict]:
    """This client's tokenized training examples: partition ``partition_id`` of the round's
    data split ``num_partitions`` ways."""
    key = (json.dumps(dataclasses.asdict(settings.data), sort_keys=True), partition_id, num_partitions, settings.seed,
           settings.train.max_seq_len)
    if key not in _tokenized:
        train, _ = client_examples(settings.data, partition_id, num_partitions, settings.seed)
        _tokenized[key] = tokenize(train, tokenizer, settings.train.max_seq_len)
    return _tokenized[key]


@dataclasses.dataclass(frozen=True)
class DeviceLocal:
    """A deployed device's own settings, as its node config gives them: ``settings`` (``key=value``
    of :data:`fedlora.round_settings.LOCAL_KEYS`) and its own data file (all of it is this device's;
    empty: the federation's partition, for demos); ``state_dir``: its own folder for what it keeps across
    rounds (a personal strategy's state, in ``state_dir/personal``; empty: where the round's settings say)."""

    settings: str = ""
    data_file: str = ""
    state_dir: str = ""

    def apply(self, settings: RoundSettings) -> RoundSettings:
        """The round's settings with this device's own (:func:`fedlora.round_settings.apply_device_settings`)."""
        settings = apply_device_settings(settings, self.settings, self.data_file)
        if self.state_dir and settings.personal != NONE:
            settings = dataclasses.replace(settings, personal_dir=str(Path(self.state_dir) / PERSONAL_DIR))
        return settings


def train_round(settings: RoundSettings, global_state: AdapterState, partition_id: int, *,
                local: DeviceLocal | None = None, split: Callable[[Any], DeviceHalf] | None = None,
                ) -> tuple[AdapterState, dict[str, float]]:
    """Train on this device's private data from the global adapter; return (delta, metrics).

    ``local``: a deployed device's own settings and data file (:class:`DeviceLocal`).
    ``split(model)``: train U-shaped with an edge (:mod:`fedlora.roles.split`); the delta then
    covers the tensors the device's side trained and, in-process, the edge's.

    The delta covers the trainable LoRA tensors it shares only (B alone under FFA-LoRA, A alone under
    FedSA-LoRA). Metrics carry the example count (the aggregation weight), the mean training loss and timings.
    Under a personal strategy the device's own part is read from and written back to its store
    (:class:`~fedlora.roles.personal.PersonalStore`) and never returned.
    """
    settings = local.apply(settings) if local is not None else settings
    personal = settings.personal == ADAPTER
    rank = settings.lora_ranks.get(str(partition_id), settings.lora.r)
    if rank != settings.lora.r:  # this device trains the first `rank` components (fedlora/aggregate/ranks.py)
        full_init = initial_adapter(settings, freeze_a=settings.freeze_a)
        shapes = adapters.shapes(global_state)
        own = dataclasses.replace(settings, lora=dataclasses.replace(settings.lora, r=rank))
        model, tokenizer = lora_model(own, freeze_a=settings.freeze_a, personal=personal,
                                      lora_alpha=ranks.device_alpha(settings.lora.alpha, rank, settings.lora.r))
        init, global_state = ranks.slice_state(full_init, rank), ranks.slice_state(global_state, rank)
    else:
        model, tokenizer = lora_model(settings, freeze_a=settings.freeze_a, personal=personal)
        init, shapes = _peft["init"], None
    if torch.get_num_threads() != settings.threads:
        torch.set_num_threads(settings.threads)
    # Tensors the server does not send (A under FFA-LoRA) stay at the shared initialisation.
    adapters.set_state(model, init)
    adapters.set_state(model, global_state)
    store = PersonalStore(settings.personal_dir) if settings.personal != NONE else None
    kept = store.load(partition_id, before_round=settings.round) if store is not None else None
    if settings.personal == LORA_B and kept is not None:
        adapters.set_state(model, kept)
    start = adapters.get_state(model, trainable_only=True)
    own_file = local is not None and bool(local.data_file)  # all of the device's own file is its data
    if own_file:
        tokenized = local_training_set(settings, 0, tokenizer, 1)
    else:
        tokenized = local_training_set(settings, partition_id, tokenizer, settings.num_partitions)
    result = train_local(
        model,
        tokenized,
        settings.train,
        pad_id=tokenizer.pad_token_id,
        seed=round_seed(settings.seed, settings.round, partition_id),
        proximal_mu=settings.proximal_mu,
        split=None if split is None else split(model),
    )
    sent, keep = kept_part(settings.personal, adapters.get_state(model, trainable_only=True))
    delta = adapters.subtract(sent, start)
    if shapes is not None:  # zero-padded to the global adapter's rank: the same shapes as every update
        delta = ranks.pad_state(delta, shapes)
    seconds = result.seconds
    if settings.personal == ADAPTER:
        keep, personal_seconds = train_personal(model, tokenizer, tokenized, settings, partition_id, kept)
        seconds += personal_seconds
    if store is not None:
        store.save(partition_id, settings.round, keep)
    metrics = {
        "num_examples": result.examples,
        "train_loss": result.loss,
        "train_steps": result.steps,
        "train_tokens": result.tokens,
        "train_seconds": seconds,
    }
    return delta, metrics


def train_personal(model, tokenizer, tokenized: list[dict], settings: RoundSettings, partition_id: int,
                   kept: AdapterState | None) -> tuple[AdapterState, float]:
    """FedDPA's local step: train the device's personal adapter (from ``kept``, else its initial state) with the
    just-trained shared adapter active and frozen; -> (the personal adapter's new state, seconds)."""
    adapters.set_state(model, kept if kept is not None else _peft["personal_init"], adapter_name=PERSONAL)
    with both_active(model, train_personal=True):
        result = train_local(model, tokenized, settings.train, pad_id=tokenizer.pad_token_id,
                             seed=round_seed(settings.seed, settings.round, partition_id, PERSONAL))
    return adapters.get_state(model, trainable_only=False, adapter_name=PERSONAL), result.seconds


class StaleSessionState(ValueError):
    """A later secure-aggregation stage found no session state on the device, or one kept
    for another run or round: it is refused, never reused."""


def secure_session(run: object, settings: RoundSettings) -> str:
    """The key a device keeps its secure-aggregation state under: the run and the round.

    A device is in one cell per round; the cell itself is bound by the protocol (a state for
    another header or session id is refused by :class:`~fedlora.secure.client.CellClient`).
    """
    return f"{run}/round-{settings.round}"


def secure_step(stage: str, payload: bytes, stored: tuple[str, bytes] | None, settings: RoundSettings,
                global_state: AdapterState | None, partition_id: int, *, run: object = "local",
                identities: Identities | None = None, local: DeviceLocal | None = None,
                train: Callable[[], tuple[AdapterState, dict[str, float]]] | None = None,
                ) -> tuple[bytes, tuple[str, bytes], dict[str, float]]:
    """One secure-aggregation stage on this device: (reply, (session key, state) to keep on
    the device, clear metrics).

    The first stage trains (:func:`train_round`) and advertises keys, starting a fresh state
    whatever ``stored`` holds; later stages need the state the previous stage returned for
    the same ``run`` and round (``stored``; a Flower ClientApp keeps it in ``context.state``),
    and raise :class:`StaleSessionState` for a missing or mismatched one.
    ``identities``: this device's key, the cloud's public key and secret randomness; default
    derived from the run seed (SIMULATION ONLY); a deployed device passes its node folder's
    (:class:`~fedlora.secure.identities.PlannedIdentities`).
    ``train()``: how the first stage trains, -> (delta, metrics); default :func:`train_round` (a split
    device's session with its edge: :class:`fedlora.roles.split.SecureSplitDevices`).
    """
    session = secure_session(run, settings)
    state = None
    if stage != STAGES[0]:
        if stored is None:
            raise StaleSessionState(f"stage {stage!r} of session {session}, but this device holds no "
                                    "secure-aggregation state (it did not join this round)")
        if stored[0] != session:
            raise StaleSessionState(f"stage {stage!r} of session {session}, but the state this device holds is "
                                    f"for session {stored[0]}; refusing to reuse it")
        state = stored[1]
    server_round, me = settings.round, device_id(partition_id)
    ids = identities or SimulatedIdentities(settings.seed)
    cloud_key = ids.public(CLOUD_ID)
    if cloud_key is None:
        raise ValueError("this device's registry has no key for the cloud")
    reply, state, metrics = client_step(stage, payload, state, identity=ids.own(me), cloud_key=cloud_key,
                                        rng=ids.rng("device", me, server_round, stage),
                                        train=lambda: private_update(*(train() if train is not None else
                                                                       train_round(settings, global_state, partition_id,
                                                                                   local=local)),
                                                                     settings),
                                        arrays=global_state)
    return reply, (session, state), metrics


def private_update(delta: AdapterState, metrics: dict[str, float], settings: RoundSettings
                   ) -> tuple[AdapterState, dict[str, float]]:
    """What a device hands to secure aggregation: under ``privacy=secagg_dp`` its update clipped to
    L2 norm ``privacy.clip_norm`` and weighted like every other client's (count = n_max), and its
    training loss withheld (0), so one client's influence on the released sum is bounded by the
    clip (DP-FedAvg). Under any secure mode with ``strategy.norm_bound`` set (``settings.norm_bound``), an
    honest device clips its update to that L2 norm itself (no tier sees it to do so; the unmasker can check the
    cell's sum against it, fedlora/secure/bounds.py). Otherwise unchanged."""
    if settings.norm_bound > 0 and settings.privacy != "none":
        delta = clip_update(delta, settings.norm_bound)[0]
    if settings.privacy != "secagg_dp":
        return delta, metrics
    clipped, norm = clip_update(delta, settings.clip_norm)
    return clipped, {**metrics, "num_examples": settings.max_examples, "train_loss": 0.0, "update_norm": norm}
