"""The local training and evaluation loops an END client (or the server) runs."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.utils.checkpoint

from fedlora.config import TrainConfig
from fedlora.data import batches
from fedlora.schedule import lr_factor

if TYPE_CHECKING:  # only for annotations: fedlora.split imports this module's config, not the reverse
    from fedlora.split import DeviceHalf


@dataclass
class TrainResult:
    loss: float  # mean training loss over the round's optimiser steps
    steps: int
    examples: int  # local training examples (the client's aggregation weight)
    tokens: int  # answer tokens trained on
    seconds: float  # pure training time


def num_steps(cfg: TrainConfig, num_examples: int) -> int:
    """Optimiser steps one local round takes."""
    if cfg.local_steps > 0:
        return cfg.local_steps
    per_epoch = math.ceil(num_examples / (cfg.batch_size * cfg.grad_accum))
    return max(1, math.ceil(per_epoch * cfg.epochs))


LOSS_CHUNK = 256  # answer positions whose vocabulary logits exist at once


def answer_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], *,
                hidden_of: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None) -> tuple[torch.Tensor, int]:
    """(sum of cross-entropy over answer tokens, number of answer tokens) for a batch.

    Same value as the causal-LM loss transformers computes (mean = sum / count), with less
    memory: the vocabulary projection runs only at answer positions (prompt tokens' loss is
    masked anyway), LOSS_CHUNK positions at a time, each chunk recomputed in the backward
    pass, so the (tokens x 49k vocabulary) logits are never all alive at once. Falls back to
    the model's own loss for architectures without a separate decoder and output head.
    ``hidden_of(batch)``: the decoder's last hidden state computed another way (split learning's
    U-shaped forward, :meth:`fedlora.split.DeviceHalf.hidden`).
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = getattr(inner, "model", None), inner.get_output_embeddings()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    count = int(mask.sum())
    if decoder is None or head is None:
        return model(**batch).loss * count, count
    if hidden_of is not None:
        hidden = hidden_of(batch)
    else:
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    answer_hidden, answer_labels = hidden[:, :-1][mask], labels[mask]

    def chunk_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(head(h).float(), y, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for h, y in zip(answer_hidden.split(LOSS_CHUNK), answer_labels.split(LOSS_CHUNK)):
        if torch.is_grad_enabled():
            total = total + torch.utils.checkpoint.checkpoint(chunk_loss, h, y, use_reentrant=False)
        else:
            total = total + chunk_loss(h, y)
    return total, count


def _micro_batches(tokenized: list[dict], cfg: TrainConfig, pad_id: int, seed: int):
    """Endless stream of shuffled micro-batches, reshuffled every pass."""
    epoch = 0
    while True:
        yield from batches(tokenized, cfg.batch_size, pad_id, shuffle=True, seed=seed * 1000 + epoch)
        epoch += 1


def train_local(
    model: torch.nn.Module,
    tokenized: list[dict],
    cfg: TrainConfig,
    *,
    pad_id: int,
    seed: int,
    proximal_mu: float = 0.0,
    split: DeviceHalf | None = None,
) -> TrainResult:
    """Train the model's trainable (LoRA) parameters in place with AdamW.

    A fresh optimiser each round (clients are stateless between rounds). With
    ``proximal_mu > 0`` adds FedProx's ``mu/2 * ||w - w_start||^2`` on trainable tensors.
    ``split``: train U-shaped with an edge (:class:`fedlora.split.DeviceHalf`): this loop trains the
    device's tensors, the edge its own over the split link, clipped by the norm over both.
    """
    if not tokenized:
        raise ValueError("no training examples")
    start = time.perf_counter()
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad] if split is None else split.params()
    anchors = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = num_steps(cfg, len(tokenized))
    stream = _micro_batches(tokenized, cfg, pad_id, seed)
    _set_checkpointing(model, cfg.gradient_checkpointing)
    model.train()
    losses, tokens = [], 0
    for step in range(total):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(cfg.lr_schedule, step, total, cfg.warmup_steps)
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(cfg.grad_accum):
            batch = next(stream)
            loss_sum, count = answer_loss(model, batch, hidden_of=None if split is None else split.hidden)
            loss = loss_sum / max(1, count) / cfg.grad_accum
            if proximal_mu > 0:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))
                loss = loss + proximal_mu / 2 * prox / cfg.grad_accum
            loss.backward()
            step_loss += float(loss.detach())
            tokens += count
        if split is not None:
            split.clip_and_step(params, cfg.max_grad_norm, optimizer.param_groups[0]["lr"])
        elif cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        losses.append(step_loss)
    model.eval()
    return TrainResult(
        loss=float(sum(losses) / len(losses)),
        steps=total,
        examples=len(tokenized),
        tokens=tokens,
        seconds=time.perf_counter() - start,
    )


def _set_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    """Turn activation checkpointing on or off (the model is shared across clients)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(inner, "supports_gradient_checkpointing", False):
        return
    if enabled:
        # Non-reentrant checkpointing needs no gradient on the (frozen) inputs.
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif inner.is_activation_checkpointing:
        inner.activation_checkpointing_disable()


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokenized: list[dict], batch_size: int, *, pad_id: int) -> tuple[float, int]:
    """Token-weighted mean loss over answer tokens, and the number of those tokens."""
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for batch in batches(tokenized, batch_size, pad_id, shuffle=False, seed=0):
        loss_sum, count = answer_loss(model, batch)
        total_loss += float(loss_sum)
        total_tokens += count
    if total_tokens == 0:
        raise ValueError("no answer tokens to evaluate")
    return total_loss / total_tokens, total_tokens
