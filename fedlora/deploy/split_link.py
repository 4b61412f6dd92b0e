"""Split training's device/edge exchange over the split stream: torch tensors in, numpy frames on the wire.

The split maths (``fedlora.split``) talks to its edge through a ``SplitLink``:
``forward(hidden, attention_mask) -> hidden``, ``backward(grad) -> (grad, edge grad norm)`` and
``step(lr, clip_coef)``; in simulation an ``InProcessLink`` calls an ``EdgeHalf`` directly.
In a deployment:

- the device uses :class:`StreamSplitLink`, the same three calls over a
  :class:`fedlora.deploy.stream.StreamLink` (one ``Step`` frame per call, the edge's answer back);
- the edge answers them with :func:`edge_half_handler` (an ``EdgeHalf`` behind the stream's
  ``handler(kind, payload)``), one per device: ``SplitStreamServer(...,
  handler_for=lambda device: edge_half_handler(edge_half_of(device)))``.

What crosses, per call (numpy arrays; bfloat16 has no numpy dtype, so a bfloat16 tensor crosses
as float32 and is cast back to the dtype it left as):

| kind | device -> edge | edge -> device |
| --- | --- | --- |
| ``forward`` | ``hidden`` (batch x seq x hidden), ``attention_mask`` (uint8, batch x seq) | the edge's output activations |
| ``backward`` | the gradient at the edge's output | ``grad`` at the device's cut, ``edge_grad_norm`` (float64) |
| ``step`` | ``lr``, ``clip_coef`` (float64) | nothing |
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedlora.deploy.stream_protocol import Handler, Payload, tensor_bytes

FORWARD, BACKWARD, STEP = "forward", "backward", "step"


def to_wire(t: torch.Tensor) -> np.ndarray:
    """A detached CPU copy of ``t`` as numpy (bfloat16 as float32: numpy has no bfloat16)."""
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).contiguous().numpy()


def from_wire(a: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``a`` as a torch tensor (sharing its memory), cast to ``dtype`` when given."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


class StreamSplitLink:
    """The device's ``SplitLink`` to its edge over one round's stream (``link``, a ``StreamLink``).

    Any ``StreamError`` from a call propagates: the device is a dropout for the round."""

    def __init__(self, link: Any):
        self.link = link
        self.exchanges = self.steps = 0  # forward/backward pairs; optimiser steps
        self.tensor_bytes_up = self.tensor_bytes_down = 0  # tensor payload (frames add a few hundred bytes)

    def _call(self, kind: str, payload: Payload) -> Payload:
        self.tensor_bytes_up += tensor_bytes(payload)
        answer = self.link.call(kind, payload)
        self.tensor_bytes_down += tensor_bytes(answer)
        return answer

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self._call(FORWARD, {"hidden": to_wire(hidden), "attention_mask": to_wire(attention_mask.to(torch.uint8))})
        if not isinstance(out, np.ndarray) or out.shape != tuple(hidden.shape):
            raise ValueError(f"the edge answered forward with {_shape(out)}, expected activations of shape "
                             f"{tuple(hidden.shape)}")
        self.exchanges += 1
        return from_wire(out, hidden.dtype)

    def backward(self, grad: torch.Tensor) -> tuple[torch.Tensor, float]:
        out = self._call(BACKWARD, to_wire(grad))
        if not isinstance(out, dict) or set(out) != {"grad", "edge_grad_norm"} or out["edge_grad_norm"].size != 1:
            raise ValueError(f"the edge answered backward with {_shape(out)}, expected grad and edge_grad_norm")
        return from_wire(out["grad"], grad.dtype), float(out["edge_grad_norm"].reshape(()))

    def step(self, lr: float, clip_coef: float) -> None:
        self._call(STEP, {"lr": np.array(float(lr)), "clip_coef": np.array(float(clip_coef))})
        self.steps += 1


def _shape(payload: object) -> str:
    if isinstance(payload, np.ndarray):
        return f"an array of shape {payload.shape}"
    if isinstance(payload, dict):
        return f"tensors {sorted(payload)}"
    return f"a {type(payload).__name__}"


def _edge_dtype(edge_half: Any) -> torch.dtype | None:
    """The dtype the edge's blocks compute in (its received activations are cast to it)."""
    for block in getattr(edge_half, "blocks", []):
        for p in block.parameters():
            return p.dtype
    return None


def edge_half_handler(edge_half: Any) -> Handler:
    """The stream handler that answers one device's calls with its ``EdgeHalf`` (``forward``,
    ``backward``, ``step``); anything else, or a payload of the wrong form, raises (the device
    then drops for the round)."""
    dtype = _edge_dtype(edge_half)

    def handler(kind: str, payload: Payload) -> Payload:
        if kind == FORWARD:
            if not isinstance(payload, dict) or set(payload) != {"hidden", "attention_mask"}:
                raise ValueError(f"forward needs hidden and attention_mask, got {_shape(payload)}")
            return to_wire(edge_half.forward(from_wire(payload["hidden"], dtype), from_wire(payload["attention_mask"])))
        if kind == BACKWARD:
            if not isinstance(payload, np.ndarray):
                raise ValueError(f"backward needs one gradient array, got {_shape(payload)}")
            grad, norm = edge_half.backward(from_wire(payload, dtype))
            return {"grad": to_wire(grad), "edge_grad_norm": np.array(float(norm))}
        if kind == STEP:
            if not isinstance(payload, dict) or set(payload) != {"lr", "clip_coef"}:
                raise ValueError(f"step needs lr and clip_coef, got {_shape(payload)}")
            edge_half.step(float(payload["lr"].reshape(())), float(payload["clip_coef"].reshape(())))
            return {}
        raise ValueError(f"unknown split call {kind!r} (forward, backward or step)")

    return handler
