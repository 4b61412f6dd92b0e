"""A quantised frozen base on the device (``model.quantize``): LLM.int8 or 4-bit NF4 via bitsandbytes.

Only the frozen base's linear layers are quantised; PEFT wraps them with its bitsandbytes LoRA
layers (``peft.tuners.lora.bnb``), whose adapter tensors stay float32 like every other fedlora
adapter. So what a device trains and sends -- the adapter's keys, shapes, dtype and meaning -- is
the same whether its base is quantised or not, and quantised and unquantised devices federate
together. The output head (tied to the input embedding in SmolLM2 and the tiny model) and the
embedding stay in ``model.dtype``: the quantisers here handle linear layers only.

Why bitsandbytes rather than torchao's int8 weight-only (the other base PEFT's LoRA supports):
measured on SmolLM2-135M (README "Quantised base"), bitsandbytes gives both 8-bit and 4-bit with
the same code path, and torchao has no 4-bit route PEFT supports. The platform must have
bitsandbytes' CPU kernels: x86-64 with AVX2 or aarch64 (:func:`unsupported_reason`).
"""

from __future__ import annotations

import importlib.util
import platform
from pathlib import Path
from typing import Any

from fedlora.config import QUANTIZE_MODES

BNB_ARCHES = ("x86_64", "amd64", "aarch64", "arm64")
INSTALL_HINT = "pip install 'fedlora[quant]' (bitsandbytes 0.50.2, CPU kernels for x86-64 AVX2 and aarch64)"


class QuantizeError(ValueError):
    """The base cannot be quantised as asked here; the message says why and what to do."""


def unsupported_reason(how: str, *, arch: str | None = None, avx2: bool | None = None,
                       bnb_installed: bool | None = None) -> str | None:
    """Why this platform cannot run a ``how`` base (None when it can, or when ``how`` is none).

    Defaults read this machine (architecture, AVX2 in ``/proc/cpuinfo``, whether bitsandbytes is
    installed); the arguments judge another machine's facts (the device launcher's)."""
    if how == "none":
        return None
    if how not in QUANTIZE_MODES:
        return f"model.quantize={how!r} is not one of: {', '.join(QUANTIZE_MODES)}"
    arch = (arch or platform.machine()).lower()
    if arch not in BNB_ARCHES:
        return f"model.quantize={how} needs bitsandbytes' CPU kernels, which exist for x86-64 and aarch64, not {arch!r}"
    if arch in ("x86_64", "amd64") and not (avx2 if avx2 is not None else "avx2" in _cpu_flags()):
        return f"model.quantize={how}: this x86-64 CPU lacks AVX2, which bitsandbytes' CPU kernels need"
    installed = bnb_installed if bnb_installed is not None else importlib.util.find_spec("bitsandbytes") is not None
    if not installed:
        return f"model.quantize={how} needs bitsandbytes, which is not installed: {INSTALL_HINT}"
    return None


def quantize_base(model: Any, how: str) -> Any:
    """Replace ``model``'s linear layers (all but the output head) by frozen bitsandbytes layers, in place.

    ``how``: ``int8`` (LLM.int8: int8 weights, outlier features above 6.0 in float) or ``nf4``
    (4-bit NormalFloat, blocks of 64, computing in the weights' float dtype); ``none`` returns the
    model untouched. The original float weights are released layer by layer. Raises
    :class:`QuantizeError` with the reason where this platform cannot (:func:`unsupported_reason`).
    Marks the model ``is_loaded_in_8bit`` / ``is_loaded_in_4bit`` so PEFT's LoRA dispatches its
    bitsandbytes layers.
    """
    if how == "none":
        return model
    why = unsupported_reason(how)
    if why is not None:
        raise QuantizeError(why)
    # bitsandbytes only for a quantised base: it is an optional extra, and importing it costs time;
    # torch here too, so the device launcher reads unsupported_reason without it
    import bitsandbytes as bnb
    from torch import nn

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child is not head:
                setattr(parent, name, _quantized_linear(bnb, nn, child, how))
    model.requires_grad_(False)
    if how == "int8":
        model.is_loaded_in_8bit = True
    else:
        model.is_loaded_in_4bit = True
    return model


def _quantized_linear(bnb, nn, layer: Any, how: str) -> Any:
    weight = layer.weight.detach()
    bias = layer.bias is not None
    if how == "int8":
        q = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=bias, has_fp16_weights=False,
                                threshold=6.0)
        q.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=bias, compute_dtype=weight.dtype,
                              quant_type="nf4")
        q.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4")
        # bitsandbytes 0.50.2 on a CPU with AVX512-BF16 repacks a 4-bit weight for inference the first
        # time the layer runs in eval mode without grad (fedlora evaluates before it trains), and from
        # then on computes it with a kernel that has no backward: every LoRA gradient behind the layer
        # is silently lost. The base is shared by evaluation and training, so it never repacks.
        q.support_avx512bf16_for_cpu = False
    if bias:
        q.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    return q.to("cpu")  # bitsandbytes quantises the weight when it moves to its device


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="ignore")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return set(rest.split())
    return set()
