"""U-shaped split learning of a Llama-style decoder: the device holds the ends, the edge the middle.

```
device: tokens -> embeddings -> blocks [0, k)  --activations-->  edge: blocks [k, L-m)
device: blocks [L-m, L) -> norm -> head -> loss  <--activations--
        gradients flow back the same path; LoRA tensors on both sides
```

The tokens, the labels and the loss never leave the device; the edge sees (and returns) hidden
activations and the padding mask (one byte per position: it needs it for the causal mask, as
``LlamaModel.forward`` builds it) and computes the position ids and rotary embeddings itself from
the sequence length. The maths is exactly the unsplit model's: the same layers with the same
causal mask and position embeddings, in the same order, so one split step equals one unsplit
step to float rounding (tested). Split learning is NOT secure aggregation: the edge sees every
step's activations, from which something of the data can be inferred.

The device/edge exchange is a :class:`SplitLink`: ``forward(acts, mask) -> acts``,
``backward(grads) -> (grads, edge grad norm)``, ``step(lr, clip)``. :class:`InProcessLink` calls
an :class:`EdgeHalf` in this process (simulation, tests); a deployment puts a stream between the
two processes behind the same three calls. :class:`DeviceHalf` plugs the link into
:func:`fedlora.train.train_local`, whose loop is the same for split and unsplit training.

Which LoRA tensor belongs to whom: :func:`tensor_layer` (the decoder block in its name); tensors
outside the blocks (embeddings, head) are the device's.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers.masking_utils import create_causal_mask

from fedlora.config import ConfigError, ModelConfig, TrainConfig
from fedlora.world.splitplan import ModelShape, SplitCut, edge_keys, tensor_layer

__all__ = ["SplitCut", "SplitLink", "EdgeHalf", "DeviceHalf", "InProcessLink", "LinkTraffic", "check_cut",
           "tensor_layer", "edge_keys", "model_shape"]

def check_cut(cut: SplitCut, num_layers: int, min_k: int = 1) -> None:
    """Raise ConfigError unless ``cut`` keeps at least ``min_k`` blocks (never fewer than 1: right after
    the embedding the activations are nearly the raw tokens) before the edge, none or more after it,
    and at least one block on the edge."""
    min_k = max(1, min_k)
    if cut.k < min_k:
        raise ConfigError(f"train.split.k={cut.k} is below the privacy floor train.split.min_k={min_k}: keep at least "
                          f"{min_k} decoder block(s) on the device before the edge")
    if cut.m < 0:
        raise ConfigError(f"train.split.m={cut.m} must be >= 0 (decoder blocks after the edge, before the head)")
    if cut.k + cut.m >= num_layers:
        raise ConfigError(f"train.split.k={cut.k} + train.split.m={cut.m} leaves no decoder block of the model's "
                          f"{num_layers} for the edge; lower k or m (k + m <= {num_layers - 1})")


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The Llama-style decoder stack (``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``) of a
    (PEFT-wrapped) causal LM; ConfigError for a model that has none."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(inner, "model", None)
    if decoder is None or not all(hasattr(decoder, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        raise ConfigError(f"train.mode=split needs a Llama-style decoder (embed_tokens, layers, norm, rotary_emb); "
                          f"{type(inner).__name__} has none")
    return decoder


def num_layers(model: torch.nn.Module) -> int:
    return len(decoder_of(model).layers)


def model_shape(model: torch.nn.Module, model_cfg: ModelConfig) -> ModelShape:
    """The split planner's view of a LoRA-wrapped Llama-style model (:mod:`fedlora.world.splitplan`)."""
    c = decoder_of(model).config
    per_layer: dict[int, int] = {}
    other = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            layer = tensor_layer(name)
            if layer is None:
                other += p.numel()
            else:
                per_layer[layer] = per_layer.get(layer, 0) + p.numel()
    return ModelShape(num_layers=c.num_hidden_layers, hidden=c.hidden_size, intermediate=c.intermediate_size,
                      vocab=c.vocab_size, heads=c.num_attention_heads, kv_heads=c.num_key_value_heads,
                      tied=bool(getattr(c, "tie_word_embeddings", False)),
                      weight_bytes=2 if model_cfg.dtype in ("bfloat16", "float16") else 4,
                      lora_per_layer=max(per_layer.values(), default=0), lora_other=other)


def _run_blocks(decoder: torch.nn.Module, blocks: Iterable[torch.nn.Module], hidden: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
    """``blocks`` over ``hidden`` exactly as ``LlamaModel.forward`` runs them (no cache): position
    ids 0..T-1, the causal mask from the padding mask, the rotary embeddings of those positions."""
    position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    causal = create_causal_mask(config=decoder.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None,
                                position_ids=position_ids)
    position_embeddings = decoder.rotary_emb(hidden, position_ids=position_ids)
    for block in blocks:
        hidden = block(hidden, attention_mask=causal, position_embeddings=position_embeddings,
                       position_ids=position_ids, cache=None, use_cache=False)
    return hidden


class SplitLink(Protocol):
    """The device's view of its edge for one round: one ``forward`` then one ``backward`` per
    micro-batch, one ``step`` per optimiser step. Tensors cross it detached (as on a wire)."""

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Activations after block k-1 (batch x seq x hidden) and the padding mask (uint8, batch x
        seq) -> the activations after the edge's last block."""

    def backward(self, grad: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The gradient of the loss wrt the activations the edge returned -> (the gradient wrt the
        activations the device sent, the L2 norm of the edge's accumulated LoRA gradients so far
        this optimiser step)."""

    def step(self, lr: float, clip_coef: float) -> None:
        """The edge scales its gradients by ``clip_coef`` (global norm clipping over both sides)
        and takes its optimiser step at learning rate ``lr``."""


class EdgeHalf:
    """The edge's part of one split device's round: blocks [k, L-m) of ``model``, the LoRA tensors
    in them (its own AdamW on them, FedProx's term on them) and the pending micro-batch's graph."""

    def __init__(self, model: torch.nn.Module, cut: SplitCut, cfg: TrainConfig, *, proximal_mu: float = 0.0):
        self.decoder = decoder_of(model)
        total = len(self.decoder.layers)
        self.blocks = [self.decoder.layers[i] for i in cut.edge_layers(total)]
        self.params = [p for n, p in model.named_parameters() if p.requires_grad and cut.on_edge(tensor_layer(n), total)]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.optimizer.zero_grad(set_to_none=True)  # a fresh session: nothing left from an earlier one
        self.proximal_mu, self.grad_accum = proximal_mu, cfg.grad_accum
        self.anchors = [p.detach().clone() for p in self.params] if proximal_mu > 0 else []
        self.seconds = 0.0  # compute time spent here (the edge's share of the device's step time)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        # Always with autograd: a split session trains (and the device's side calls this from inside
        # an autograd Function's forward, where grad mode is off).
        with torch.enable_grad():
            received = hidden.detach().requires_grad_(True)
            out = _run_blocks(self.decoder, self.blocks, received, attention_mask.to(torch.long))
        self._pending = (received, out)
        self.seconds += time.perf_counter() - t0
        return out.detach()

    def backward(self, grad: torch.Tensor) -> tuple[torch.Tensor, float]:
        if self._pending is None:
            raise RuntimeError("backward without a forward on this split session")
        t0 = time.perf_counter()
        received, out = self._pending
        self._pending = None
        out.backward(grad)
        for p, a in zip(self.params, self.anchors):  # d/dw of mu/2 ||w - a||^2 / grad_accum, as the device's loss has
            p.grad = p.grad + self.proximal_mu * (p.detach() - a) / self.grad_accum if p.grad is not None else None
        norms = [p.grad.detach().norm(2) for p in self.params if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack(norms), 2)) if norms else 0.0
        self.seconds += time.perf_counter() - t0
        return received.grad.detach(), norm

    def step(self, lr: float, clip_coef: float) -> None:
        t0 = time.perf_counter()
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(clip_coef)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.seconds += time.perf_counter() - t0


@dataclass
class LinkTraffic:
    """What crossed a split link in one round: payload bytes each way and how many exchanges."""

    exchanges: int = 0  # forward/backward pairs (one per micro-batch)
    steps: int = 0  # optimiser steps (the step message: two floats)
    bytes_up: int = 0  # device -> edge: activations + mask, gradients, step messages
    bytes_down: int = 0  # edge -> device: activations, gradients + grad norm

    def record(self) -> dict:
        return {"exchanges": self.exchanges, "steps": self.steps, "bytes_up": self.bytes_up, "bytes_down": self.bytes_down}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class InProcessLink:
    """A :class:`SplitLink` to an :class:`EdgeHalf` in this process (simulation, tests), copying
    every tensor across as a wire would, and counting the payload bytes."""

    def __init__(self, edge: EdgeHalf):
        self.edge = edge
        self.traffic = LinkTraffic()

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.to(torch.uint8)
        self.traffic.exchanges += 1
        self.traffic.bytes_up += _nbytes(hidden) + _nbytes(mask)
        out = self.edge.forward(hidden.detach().clone(), mask.clone())
        self.traffic.bytes_down += _nbytes(out)
        return out.clone()

    def backward(self, grad: torch.Tensor) -> tuple[torch.Tensor, float]:
        self.traffic.bytes_up += _nbytes(grad)
        back, norm = self.edge.backward(grad.detach().clone())
        self.traffic.bytes_down += _nbytes(back) + 8
        return back.clone(), norm

    def step(self, lr: float, clip_coef: float) -> None:
        self.traffic.steps += 1
        self.traffic.bytes_up += 16
        self.edge.step(lr, clip_coef)


class _Remote(torch.autograd.Function):
    """The edge's blocks as one autograd node on the device: forward and backward go over the link."""

    @staticmethod
    def forward(ctx, hidden, anchor, half, attention_mask):  # anchor (a leaf needing grad) makes backward run always
        del anchor
        ctx.half = half
        return half.link.forward(hidden.detach(), attention_mask)

    @staticmethod
    def backward(ctx, grad):
        back, ctx.half.last_edge_norm = ctx.half.link.backward(grad.contiguous())
        return (back if ctx.needs_input_grad[0] else None), torch.zeros(()), None, None


@dataclass
class DeviceHalf:
    """The device's part of split training, for :func:`fedlora.train.train_local`: which of the
    model's parameters it trains, the U-shaped forward, and the clip and step shared with the edge."""

    model: torch.nn.Module
    cut: SplitCut
    link: SplitLink
    last_edge_norm: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self.decoder = decoder_of(self.model)
        self.total = len(self.decoder.layers)

    def params(self) -> list[torch.nn.Parameter]:
        """The trainable parameters that live on the device (every trainable one outside the edge's blocks)."""
        return [p for n, p in self.model.named_parameters()
                if p.requires_grad and not self.cut.on_edge(tensor_layer(n), self.total)]

    def hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The decoder's last hidden state (after the final norm), computed U-shaped over the link."""
        d, mask = self.decoder, batch["attention_mask"]
        hidden = d.embed_tokens(batch["input_ids"])
        hidden = _run_blocks(d, d.layers[: self.cut.k], hidden, mask)
        anchor = torch.zeros((), requires_grad=torch.is_grad_enabled())
        hidden = _Remote.apply(hidden, anchor, self, mask)
        hidden = _run_blocks(d, d.layers[self.total - self.cut.m:], hidden, mask)
        return d.norm(hidden)

    def clip_and_step(self, params: list[torch.nn.Parameter], max_norm: float, lr: float) -> None:
        """Global-norm clipping over the device's and the edge's gradients (``max_norm`` 0: none),
        then the edge's step; the caller steps the device's optimiser."""
        coef = 1.0
        if max_norm > 0:
            norms = [p.grad.detach().norm(2) for p in params if p.grad is not None]
            norms.append(torch.tensor(float(self.last_edge_norm)))
            total = torch.linalg.vector_norm(torch.stack(norms), 2)
            coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
        self.link.step(lr, coef)
