"""Each client's own held-out loss under a personal strategy: the global adapter, the client's personal
model (global + what it kept), and -- with ``strategy.local_baseline`` -- the same device training alone.

SIMULATION ONLY: the cloud reads the simulated devices' stores in the run directory (a deployed
device keeps its store in its own folder, which the cloud never sees). At the end of a run
:func:`personal_report` also exports each client's personal adapter as a plain PEFT adapter
(``personal/client-<id>/``): under FedSA-LoRA the global A with the client's B (one adapter, used
alone); under FedDPA the client's local adapter (used together with the run's ``adapter/``).
"""

from __future__ import annotations

import math
from pathlib import Path

from fedlora import adapters
from fedlora.adapters import AdapterState
from fedlora.config import FedLoraConfig
from fedlora.data import client_examples, tokenize
from fedlora.model import resolve_model_dir
from fedlora.roles.device import initial_adapter
from fedlora.roles.personal import ADAPTER, LORA_B, PERSONAL, PersonalStore, both_active
from fedlora.seeds import round_seed
from fedlora.train import evaluate, train_local


def client_held_out(cfg: FedLoraConfig, client: int, tokenizer) -> list[dict]:
    """Client ``client``'s own held-out examples, tokenized (the part of its data it never trains on)."""
    held = client_examples(cfg.data, client, cfg.federation.num_clients, cfg.seed)[1]
    return tokenize(held, tokenizer, cfg.train.max_seq_len)


def personal_loss(model, tokenizer, examples: list[dict], batch_size: int, kind: str, global_state: AdapterState,
                  kept: AdapterState) -> float:
    """Held-out loss of a client's personal model: the global adapter with its own B (``lora_b``), or the
    global adapter and its local adapter both active (``adapter``)."""
    adapters.set_state(model, global_state)
    if kind == LORA_B:
        adapters.set_state(model, kept)
        return evaluate(model, examples, batch_size, pad_id=tokenizer.pad_token_id)[0]
    adapters.set_state(model, kept, adapter_name=PERSONAL)
    with both_active(model):
        return evaluate(model, examples, batch_size, pad_id=tokenizer.pad_token_id)[0]


def local_only(cfg: FedLoraConfig, model, tokenizer, client: int) -> AdapterState:
    """The shared adapter trained by client ``client`` alone: from the seeded initialisation, one local round
    per federation round (a fresh optimiser each, the round's training seed), on its own data only."""
    adapters.set_state(model, initial_adapter(cfg, freeze_a=False, personal=PERSONAL in model.peft_config))
    train = tokenize(client_examples(cfg.data, client, cfg.federation.num_clients, cfg.seed)[0], tokenizer,
                     cfg.train.max_seq_len)
    for server_round in range(1, cfg.federation.rounds + 1):
        train_local(model, train, cfg.train, pad_id=tokenizer.pad_token_id, seed=round_seed(cfg.seed, server_round, client))
    return adapters.get_state(model, trainable_only=False)


def personal_report(cfg: FedLoraConfig, model, tokenizer, global_state: AdapterState, kind: str, folder: Path) -> dict:
    """Per client with a kept state: held-out loss on its own data of the global adapter, its personal model and
    (``strategy.local_baseline``) local-only training, the means over those clients; exports each personal adapter."""
    store, batch = PersonalStore(folder), cfg.train.eval_batch_size
    rows: dict[str, dict] = {}
    kept_by_client = {c: store.load(c) for c in store.clients()}
    for client, kept in kept_by_client.items():
        examples = client_held_out(cfg, client, tokenizer)
        if kept is None or not examples:
            continue
        adapters.set_state(model, global_state)
        row = {"examples": len(examples),
               "global": evaluate(model, examples, batch, pad_id=tokenizer.pad_token_id)[0],
               "personal": personal_loss(model, tokenizer, examples, batch, kind, global_state, kept)}
        if cfg.strategy.local_baseline:
            adapters.set_state(model, local_only(cfg, model, tokenizer, client))
            row["local_only"] = evaluate(model, examples, batch, pad_id=tokenizer.pad_token_id)[0]
        rows[str(client)] = row
    base_ref = resolve_model_dir(cfg.model)
    for client, kept in kept_by_client.items():
        if kept is not None:
            exported = {**global_state, **kept} if kind == LORA_B else kept
            adapters.export_peft(model, exported, folder / f"client-{client}", base_ref)
    keys = [k for k in ("global", "personal", "local_only") if rows and all(k in r for r in rows.values())]
    mean = {k: math.fsum(r[k] for r in rows.values()) / len(rows) for k in keys}
    return {"kind": kind, "use_with_global": kind == ADAPTER, "clients": rows, "mean": mean}
