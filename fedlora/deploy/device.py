"""What an END device is, and the training settings it can afford (pure: no torch needed).

:func:`read_facts` inspects the machine (``/proc/meminfo``, ``/proc/cpuinfo``, the CPU
architecture, Python and torch versions); :func:`pick_settings` chooses, for the federation's
config, the least degraded settings whose predicted peak memory fits what the device has
available, or raises :class:`DeviceError` saying why it cannot train at all.

The memory model
----------------
Calibrated on ``bench/results/client_memory.json`` (one END client, SmolLM2-135M, LoRA r=8
on q,v, batch 4 x 256 tokens, peak RSS of a fresh process; fedlora's loss is the chunked
answer-only loss and a bf16 base is loaded from a bf16 copy, so the rows that match fedlora
today are ``fp32:2:chunk``, ``fp32:2:chunk+ckpt``, ``bf16c:2:-`` (no chunking: conservative)
and ``bf16c:2:chunk+ckpt``)::

    peak = runtime + base weights + LoRA state + activation(dtype, checkpointing) x tokens

- runtime: Python + torch + transformers + peft + fedlora after import (356 MiB measured);
- base weights: parameters x 4 (float32) or 2 (bfloat16) bytes;
- LoRA state: trainable parameters x 16 bytes (fp32 weight, gradient, two Adam moments);
- activations: per token of the batch (batch x max_seq_len), derived from the measured
  peaks above, scaled to other models by hidden size x layers, and by ``max_seq_len/256``
  once more above 256 tokens (attention grows quadratically; below 256 the linear
  estimate is kept, which over-estimates a little).

A safety margin of 256 MiB (the run-to-run spread of the measured peaks was 50-250 MiB) is
added, and the result must fit the device's ``MemAvailable``. A bf16 base is converted
once from the fp32 cache; that first load peaked at 1.45 GB (README), modelled as runtime +
1.33 x (fp32 + bf16 weights), and must fit too -- unless the device's cache holds the bf16
copy already (``bf16_cached``, :func:`bf16_copy_cached`), when the training peak alone counts.

What the launcher may change per device: base precision, gradient checkpointing, batch
size (with gradient accumulation raised to keep the effective batch), a quantised base
(``model.quantize=int8``, then ``nf4``, on the bf16 base with checkpointing; :mod:`fedlora.quantize`)
before ``max_seq_len`` is cut, where the platform can run it (x86-64 with AVX2 or aarch64,
bitsandbytes installed), and ``max_seq_len``. A quantised base's weights are modelled as 1 byte
(int8) or 0.5 byte + block scales (nf4) per linear-layer parameter, the rest (embedding, norms)
in bf16, plus the overhead of running it quantised (bitsandbytes' dequantisation buffers),
measured against the bf16 base in one harness at 256, 512 and 1,024 tokens per step
(:data:`QUANT_CALIBRATION`) and scaled with the model like the activations; like the bf16 base
it loads from the bf16 copy. For SmolLM2-135M on CPU that overhead is larger than what the
smaller weights save at every measured size (nf4 +86 to +122 MiB over bf16 with checkpointing,
int8 +217 to +331), so the launcher never picks a quantised base for it: it cuts ``max_seq_len``
instead. For a larger model the saving grows with its linear layers and wins (the test uses
SmolLM2-1.7B's shape). Without the bf16 copy cached, a quantised base (made from it) must fit the
one-off conversion peak too, as the bf16 base must.
The LoRA rank is the device's profile's (``topology.profiles.<p>.lora_r``, else ``lora.r``;
``rank=``), set by the federation, never lowered by the launcher: the cloud knows each device's
rank from its profile and pads its update (:mod:`fedlora.aggregate.ranks`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedlora.config import FedLoraConfig, ModelConfig
from fedlora.quantize import unsupported_reason
from fedlora.secure.prg import AES128_CTR, CHACHA20

MIB = 1 << 20
RUNTIME_MIB = 356.0  # maxrss after imports, every row of client_memory.json
SAFETY_MIB = 256.0
CONVERSION_FACTOR = 1.33  # (1.45 GB - runtime) / (fp32 + bf16 weights) for SmolLM2-135M
MIN_SEQ = 64
# Calibration: measured peak MiB of SmolLM2-135M, LoRA r=8 q,v, batch 4 x 256 (1,024 tokens),
# keyed by (base dtype, gradient checkpointing); the row of client_memory.json in the comment.
CALIBRATION_TOKENS = 4 * 256
MEASURED_PEAK_MIB = {
    ("float32", False): 2759.50390625,  # fp32:2:chunk
    ("float32", True): 1621.10546875,  # fp32:2:chunk+ckpt
    ("bfloat16", False): 2200.72265625,  # bf16c:2:- (no chunked loss: over-estimates ~200 MiB)
    ("bfloat16", True): 1155.8671875,  # bf16c:2:chunk+ckpt
}
CALIBRATION_ROWS = {
    ("float32", False): ("fp32", 2, "chunk"),
    ("float32", True): ("fp32", 2, "chunk+ckpt"),
    ("bfloat16", False): ("bf16c", 2, "-"),
    ("bfloat16", True): ("bf16c", 2, "chunk+ckpt"),
}
# Ladder of (dtype, checkpointing) from most to least preferred: checkpointing costs time
# only (+35-45 % per step), bf16 also changes the base's numerics slightly.
PRECISION_LADDER = [("float32", False), ("float32", True), ("bfloat16", True)]
ARCHES_WITH_TORCH = ("x86_64", "amd64", "aarch64", "arm64")
# Last resort, in order: a quantised frozen base (fedlora/quantize.py) on the bf16 base, with checkpointing.
QUANT_LADDER = [("bfloat16", True, "int8"), ("bfloat16", True, "nf4")]
# Quantised bases (bf16 rest), SmolLM2-135M, LoRA r=8 q,v: measured peak MiB in ONE harness beside the bf16 base
# at the same tokens per step and checkpointing (bench/quantized.py, a fresh process per row, the bf16 copy
# cached so no row pays the one-off conversion), keyed by (gradient checkpointing, tokens per step) -> {quantize:
# peak}; "none" is the bf16 base. The file each row is from: QUANT_CALIBRATION_FILES. At every measured size the
# quantised base peaks ABOVE the bf16 one: bitsandbytes dequantises each weight for the forward and backward
# matmuls on CPU, and at 135M parameters (21% of them the tied embedding, kept in bf16) those buffers outweigh
# what the smaller weights save. The launcher models that as a per-mode overhead (quant_overhead_mib).
QUANT_CALIBRATION = {
    (True, 256): {"none": 929.51953125, "int8": 1146.4453125, "nf4": 1044.74609375},
    (True, 512): {"none": 1016.17578125, "int8": 1277.9296875, "nf4": 1138.23828125},
    (True, 1024): {"none": 1208.9296875, "int8": 1540.32421875, "nf4": 1295.26953125},
    (False, 256): {"none": 1173.62109375, "int8": 1349.80078125, "nf4": 1266.52734375},
    (False, 1024): {"none": 1915.17578125, "int8": 2446.01953125, "nf4": 2171.2265625},
}
QUANT_CALIBRATION_FILES = {(True, 256): "quantized_batch1.json", (True, 512): "quantized_ckpt_b2.json",
                           (True, 1024): "quantized_ckpt_b4.json", (False, 256): "quantized_batch1.json",
                           (False, 1024): "quantized_quiet.json"}
# Bytes per linear-layer weight: int8 (+ one fp32 scale per row, ignored); nf4 (+ 8-bit block scales of
# 64 weights and their fp32 second-level scales, ~1/64 byte).
QUANT_BYTES = {"none": None, "int8": 1.0, "nf4": 0.5 + 1 / 64}


class DeviceError(ValueError):
    """The device cannot train the model; the message says what it has and what is needed."""


# -- facts -------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeviceFacts:
    mem_total_mib: float
    mem_available_mib: float
    arch: str
    python: str
    torch: str | None
    aes: bool
    cpu_count: int
    # What a quantised base needs (fedlora/quantize.py): AVX2 on x86-64, the bitsandbytes package.
    avx2: bool = False
    bitsandbytes: bool = False


def parse_meminfo(text: str) -> tuple[float, float]:
    """(MemTotal, MemAvailable) in MiB from ``/proc/meminfo`` text (kB units)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key.strip()] = int(parts[0]) / 1024
    if "MemTotal" not in values:
        raise DeviceError("cannot read the memory size: no MemTotal in /proc/meminfo")
    available = values.get("MemAvailable", values.get("MemFree", 0.0) + values.get("Cached", 0.0))
    return values["MemTotal"], available


def cpu_has_aes(cpuinfo: str) -> bool:
    """Whether ``/proc/cpuinfo`` advertises AES instructions (x86 ``flags``, ARM ``Features``)."""
    for line in cpuinfo.splitlines():
        key, _, rest = line.partition(":")
        if key.strip().lower() in ("flags", "features") and "aes" in rest.split():
            return True
    return False


def read_facts() -> DeviceFacts:
    """Inspect this machine."""
    try:
        total, available = parse_meminfo(Path("/proc/meminfo").read_text())
    except OSError:
        import psutil  # not Linux: psutil if installed

        vm = psutil.virtual_memory()
        total, available = vm.total / MIB, vm.available / MIB
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="ignore")
    except OSError:
        cpuinfo = ""
    try:
        import torch  # seconds to import, and maybe not installed: only its version, only when facts are read

        torch_version: str | None = torch.__version__
    except ImportError:
        torch_version = None
    flags = {f for line in cpuinfo.splitlines() if line.partition(":")[0].strip().lower() in ("flags", "features")
             for f in line.partition(":")[2].split()}
    return DeviceFacts(total, available, platform.machine().lower(), platform.python_version(), torch_version,
                       cpu_has_aes(cpuinfo), usable_cpus(), "avx2" in flags,
                       importlib.util.find_spec("bitsandbytes") is not None)


def usable_cpus() -> int:
    """The cores this process may run on (its CPU affinity: a cpuset, ``taskset``, a container's
    limit), else every core: a device trains with this many torch threads, never more."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity on this OS
        return os.cpu_count() or 1


def mask_prg(facts: DeviceFacts) -> str:
    """The secure-aggregation mask PRG for this CPU: AES-128-CTR with AES instructions, else
    ChaCha20 (software AES is slow and not constant-time)."""
    return AES128_CTR if facts.aes else CHACHA20


# -- the model's size ----------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    name: str
    params: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


SMOLLM2_135M = ModelShape("SmolLM2-135M-Instruct", 134_975_808, 576, 30, 9, 3, 1536)
VOCAB = 49_152  # SmolLM2's tokenizer (also used by the tiny test model)


def _estimate_params(hidden: int, layers: int, heads: int, kv_heads: int, inter: int, vocab: int) -> int:
    kv = hidden * kv_heads // heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter + 2 * hidden
    return vocab * hidden + layers * per_layer + hidden


def model_shape(model: ModelConfig) -> ModelShape:
    """Size of the configured base model (SmolLM2 known; tiny from its config; a local model
    from its ``config.json``)."""
    if model.source == "smollm2":
        return SMOLLM2_135M
    if model.source == "tiny":
        t = model.tiny
        return ModelShape("tiny", _estimate_params(t.hidden_size, t.num_hidden_layers, t.num_attention_heads,
                                                   t.num_key_value_heads, t.intermediate_size, VOCAB),
                          t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
                          t.intermediate_size)
    config_json = Path(model.path).expanduser() / "config.json"
    if not config_json.is_file():
        raise DeviceError(f"cannot size model.path={model.path!r}: no config.json there (model.source={model.source}); "
                          "the device check needs the model's shape to predict its memory")
    c = json.loads(config_json.read_text())
    try:
        h, layers, heads = int(c["hidden_size"]), int(c["num_hidden_layers"]), int(c["num_attention_heads"])
        kv, inter, vocab = int(c.get("num_key_value_heads", heads)), int(c["intermediate_size"]), int(c["vocab_size"])
    except (KeyError, ValueError) as exc:
        raise DeviceError(f"{config_json}: cannot read the model's shape ({exc})") from None
    return ModelShape(c.get("_name_or_path") or config_json.parent.name, _estimate_params(h, layers, heads, kv, inter, vocab),
                      h, layers, heads, kv, inter)


def lora_params(shape: ModelShape, r: int, targets: list[str]) -> int:
    """Trainable LoRA parameters: r x (in + out) per targeted projection per layer."""
    kv = shape.hidden * shape.kv_heads // shape.heads
    dims = {"q_proj": 2 * shape.hidden, "o_proj": 2 * shape.hidden, "k_proj": shape.hidden + kv,
            "v_proj": shape.hidden + kv, "gate_proj": shape.hidden + shape.intermediate,
            "up_proj": shape.hidden + shape.intermediate, "down_proj": shape.hidden + shape.intermediate}
    per_layer = sum(dims.get(t, shape.hidden + shape.intermediate) for t in targets)  # unknown: the larger kind
    return shape.layers * r * per_layer


# -- the memory model ----------------------------------------------------------------------

def _weights_mib(shape: ModelShape, dtype: str, quantize: str = "none") -> float:
    per = 4 if dtype == "float32" else 2
    if quantize == "none":
        return shape.params * per / MIB
    linear = shape.params - VOCAB * shape.hidden - shape.hidden * (2 * shape.layers + 1)  # all but embedding, norms
    return ((shape.params - linear) * per + linear * QUANT_BYTES[quantize]) / MIB


def activation_mib_per_token(dtype: str, checkpointing: bool) -> float:
    """SmolLM2-135M's activation memory per training token, from the measured peaks."""
    base = SMOLLM2_135M
    lora = lora_params(base, 8, ["q_proj", "v_proj"]) * 16 / MIB
    measured = MEASURED_PEAK_MIB[("float32" if dtype == "float32" else "bfloat16", checkpointing)]  # fp16 = bf16 bytes
    return (measured - RUNTIME_MIB - _weights_mib(base, dtype) - lora) / CALIBRATION_TOKENS


def quant_overhead_mib(quantize: str, checkpointing: bool, tokens: float) -> float:
    """What a ``quantize``-d base adds to SmolLM2-135M's training peak beyond its (smaller) weights, against the
    bf16 base at the same tokens and checkpointing: measured (:data:`QUANT_CALIBRATION`), linear in tokens between
    the measured sizes, held at the nearest one outside them."""
    base = SMOLLM2_135M
    saved = _weights_mib(base, "bfloat16") - _weights_mib(base, "bfloat16", quantize)
    points = sorted((t, row[quantize] - row["none"] + saved) for (ckpt, t), row in QUANT_CALIBRATION.items()
                    if ckpt == checkpointing)
    if tokens <= points[0][0]:
        return points[0][1]
    for (t0, v0), (t1, v1) in zip(points, points[1:]):
        if tokens <= t1:
            return v0 + (v1 - v0) * (tokens - t0) / (t1 - t0)
    return points[-1][1]


def predict_peak_mib(shape: ModelShape, *, dtype: str, checkpointing: bool, batch: int, seq: int, r: int,
                     targets: list[str], quantize: str = "none") -> float:
    """Predicted peak resident memory (MiB) of local training, without the safety margin. A quantised base:
    the unquantised prediction with its linear layers' smaller weights and the measured overhead of running
    them quantised (:func:`quant_overhead_mib`, scaled with the model like the activations)."""
    scale = (shape.hidden * shape.layers) / (SMOLLM2_135M.hidden * SMOLLM2_135M.layers)
    tokens = batch * seq * max(1.0, seq / 256)  # attention: once more by seq/256 above 256 tokens
    peak = (RUNTIME_MIB + _weights_mib(shape, dtype) + lora_params(shape, r, targets) * 16 / MIB
            + activation_mib_per_token(dtype, checkpointing) * scale * tokens)
    if quantize == "none":
        return peak
    return (peak - _weights_mib(shape, dtype) + _weights_mib(shape, dtype, quantize)
            + quant_overhead_mib(quantize, checkpointing, tokens) * scale)


def conversion_peak_mib(shape: ModelShape) -> float:
    """Peak of the one-off load that makes the bf16 copy from the fp32 cache."""
    return RUNTIME_MIB + CONVERSION_FACTOR * (_weights_mib(shape, "float32") + _weights_mib(shape, "bfloat16"))


# -- choosing settings ---------------------------------------------------------------------

@dataclass
class Settings:
    """Training settings for this device, and why."""

    model: str
    lora_r: int
    dtype: str
    gradient_checkpointing: bool
    batch_size: int
    grad_accum: int
    max_seq_len: int
    predicted_peak_mib: float
    needed_mib: float  # with the safety margin (and the bf16 conversion if that is larger)
    available_mib: float
    mask_prg: str
    changed: list[str] = field(default_factory=list)  # what differs from the federation's config
    quantize: str = "none"  # model.quantize: a quantised frozen base where nothing else fits
    bf16_cached: bool = False  # the bf16 copy was cached: no one-off conversion peak was counted

    def overrides(self) -> list[str]:
        """Hydra overrides that apply these settings to the federation's config."""
        return [f"model.dtype={self.dtype}", f"train.gradient_checkpointing={str(self.gradient_checkpointing).lower()}",
                f"train.batch_size={self.batch_size}", f"train.grad_accum={self.grad_accum}",
                f"train.max_seq_len={self.max_seq_len}"] + ([f"model.quantize={self.quantize}"] * (self.quantize != "none"))

    def as_dict(self) -> dict:
        return asdict(self) | {"overrides": self.overrides()}


def check_platform(facts: DeviceFacts) -> None:
    if facts.arch not in ARCHES_WITH_TORCH:
        raise DeviceError(f"CPU architecture {facts.arch!r}: PyTorch publishes wheels for x86_64 and aarch64 only "
                          "(on a Raspberry Pi use the 64-bit Raspberry Pi OS)")
    if tuple(int(p) for p in facts.python.split(".")[:2]) < (3, 10):
        raise DeviceError(f"Python {facts.python}: fedlora needs Python >= 3.10")
    if facts.torch is None:
        raise DeviceError("torch is not installed: pip install torch (CPU wheel) before starting the client")


def _ladder(cfg: FedLoraConfig) -> list[tuple[str, bool]]:
    """Precision steps from the config's own setting down (never 'upgrading' what it chose)."""
    own = (cfg.model.dtype, cfg.train.gradient_checkpointing)
    if own not in PRECISION_LADDER:  # e.g. bf16 without checkpointing, or float16
        return [own] + [s for s in PRECISION_LADDER if s[0] == "bfloat16" or s[1]]
    return PRECISION_LADDER[PRECISION_LADDER.index(own):]


def device_rank(cfg: FedLoraConfig, profile: str | None) -> int:
    """The LoRA rank a device of ``profile`` trains: ``topology.profiles.<profile>.lora_r``, else ``lora.r``."""
    own = cfg.topology.profiles.get(profile or "")
    return (own.lora_r if own is not None else 0) or cfg.lora.r


def pick_settings(cfg: FedLoraConfig, facts: DeviceFacts, *, rank: int | None = None,
                  bf16_cached: bool = False) -> Settings:
    """The least degraded settings that fit ``facts``; :class:`DeviceError` when none does.

    Order of degradation: precision/checkpointing ladder first (costs time, not quality),
    then the batch halves (gradient accumulation doubles: same effective batch); then, before
    ``max_seq_len`` halves (down to 64: longer examples are truncated, which costs quality), a
    quantised base at that length (:data:`QUANT_LADDER`: int8 at every batch, then nf4 at every batch --
    nf4 costs more quality than int8, README "Quantised base" -- where the platform can run one).
    ``rank``: the LoRA rank this device trains (its profile's ``lora_r``, :func:`device_rank`); default ``lora.r``.
    ``bf16_cached``: the base's bf16 copy is in the device's model cache already
    (:func:`fedlora.model.dtype_copy_cached`), so a bf16 or quantised base is judged by its training
    peak alone, not also by the one-off load that makes the copy (:func:`conversion_peak_mib`).
    """
    check_platform(facts)
    shape = model_shape(cfg.model)
    r, targets, t = rank or cfg.lora.r, list(cfg.lora.target_modules), cfg.train
    available = facts.mem_available_mib

    def need(dtype, ckpt, batch, seq, quantize="none"):
        peak = predict_peak_mib(shape, dtype=dtype, checkpointing=ckpt, batch=batch, seq=seq, r=r, targets=targets,
                                quantize=quantize)
        first_load = conversion_peak_mib(shape) if dtype == "bfloat16" and not bf16_cached else 0.0
        return peak, max(peak + SAFETY_MIB, first_load)

    seqs = [t.max_seq_len]
    while seqs[-1] // 2 >= MIN_SEQ:
        seqs.append(seqs[-1] // 2)
    batches = [t.batch_size]
    while batches[-1] > 1:
        batches.append(batches[-1] // 2)
    quant_why = unsupported_reason("int8", arch=facts.arch, avx2=facts.avx2, bnb_installed=facts.bitsandbytes)
    rungs = [(d, c, cfg.model.quantize) for d, c in _ladder(cfg)]
    last_resort = [] if quant_why is not None or cfg.model.quantize != "none" else QUANT_LADDER
    for seq in seqs:
        for ladder in [rungs] + [[q] for q in last_resort]:  # a quantised base costs quality: int8 at every batch before nf4
            for batch in batches:
                for dtype, ckpt, quantize in ladder:
                    peak, needed = need(dtype, ckpt, batch, seq, quantize)
                    if needed <= available:
                        accum = t.grad_accum * max(1, t.batch_size // batch)
                        changed = [f"{k}: {a} -> {b}" for k, a, b in [
                            ("model.dtype", cfg.model.dtype, dtype),
                            ("train.gradient_checkpointing", t.gradient_checkpointing, ckpt),
                            ("train.batch_size", t.batch_size, batch), ("train.grad_accum", t.grad_accum, accum),
                            ("train.max_seq_len", t.max_seq_len, seq), ("model.quantize", cfg.model.quantize, quantize)]
                            if a != b]
                        return Settings(shape.name, r, dtype, ckpt, batch, accum, seq, round(peak, 1), round(needed, 1),
                                        round(available, 1), mask_prg(facts), changed, quantize, bf16_cached)
    dtype, ckpt = _ladder(cfg)[-1]
    _, smallest = need(dtype, ckpt, 1, seqs[-1])
    quant = ""
    if last_resort:
        quant = f" With a quantised base (nf4) it needs {need('bfloat16', True, 1, seqs[-1], 'nf4')[1]:.0f} MiB."
    elif quant_why and cfg.model.quantize == "none":
        quant = f" A quantised base (model.quantize=int8|nf4) was not tried: {quant_why}."
    raise DeviceError(
        f"this device cannot train {shape.name} (LoRA r={r} on {','.join(targets)}): it has {available:.0f} MiB "
        f"available ({facts.mem_total_mib:.0f} MiB total), the smallest settings ({dtype}, gradient checkpointing, "
        f"batch 1, max_seq_len {seqs[-1]}) need {smallest:.0f} MiB (predicted peak + {SAFETY_MIB:.0f} MiB margin"
        + ("" if bf16_cached else ", or the one-off load that makes the bf16 copy of the base, whichever is larger")
        + f").{quant} "
        "Free memory (close other programs), use a device with more memory, or a smaller model.")


def bf16_copy_cached(model: ModelConfig) -> bool:
    """Whether this device's model cache holds the base's bf16 copy already (``pick_settings(bf16_cached=)``)."""
    try:
        from fedlora.model import dtype_copy_cached  # imports torch (seconds, maybe absent): only when a device is checked
    except ImportError:  # no torch: check_platform says so
        return False
    return dtype_copy_cached(model, "bfloat16")


def describe(facts: DeviceFacts) -> dict:
    return asdict(facts) | {"mask_prg": mask_prg(facts)}
