"""A quantised frozen base (model.quantize=int8|nf4, bitsandbytes on CPU): PEFT's LoRA wraps it, it
trains, and its update is the same fp32 adapter as an unquantised device's, so they federate together."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedlora import adapters
from fedlora.aggregate.strategies import make_strategy
from fedlora.aggregate.sums import WeightedSum
from fedlora.config import ConfigError
from fedlora.data import client_examples, tokenize
from fedlora.model import ModelError, load_base_model, wrap_lora
from fedlora.quantize import quantize_base, unsupported_reason
from fedlora.run_settings import resolve_run
from fedlora.train import evaluate, train_local

LAYER = {"int8": "Linear8bitLt", "nf4": "Linear4bit"}
STRATEGY = {"proximal_mu": 0.0, "freeze_a": False}


@pytest.mark.parametrize("how", ["int8", "nf4"])
def test_a_quantised_base_trains_under_fp32_lora(tiny_config, how):
    cfg = tiny_config(f"model.quantize={how}", "train.lr=0.02", "train.local_steps=6", "train.max_seq_len=64")
    base, tok = load_base_model(cfg.model)
    inner = dict(base.named_modules())
    assert type(inner["model.layers.0.self_attn.q_proj"]).__name__ == LAYER[how]
    assert type(inner["model.layers.1.mlp.down_proj"]).__name__ == LAYER[how]
    assert type(base.get_output_embeddings()).__name__ == "Linear"  # the tied head stays float
    model = wrap_lora(base, cfg.lora, init_seed=cfg.seed)
    lora_q = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert type(lora_q).__module__ == "peft.tuners.lora.bnb"  # PEFT's bitsandbytes LoRA layer
    trainable = adapters.get_state(model)
    assert trainable and all(v.dtype == np.float32 for v in trainable.values())
    train, _ = client_examples(cfg.data, 0, cfg.federation.num_clients, cfg.seed)
    examples = tokenize(train[:8], tok, cfg.train.max_seq_len)
    before, _ = evaluate(model, examples, 8, pad_id=tok.pad_token_id)
    result = train_local(model, examples, cfg.train, pad_id=tok.pad_token_id, seed=1)
    after, _ = evaluate(model, examples, 8, pad_id=tok.pad_token_id)
    assert np.isfinite(result.loss) and after < before - 0.05, (before, after)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)  # the base stays frozen


@pytest.mark.parametrize("how", ["int8", "nf4"])
def test_a_quantised_devices_update_federates_with_unquantised_ones(tiny_config, how):
    from fedlora.roles.device import initial_adapter, train_round

    cfg = tiny_config("train.local_steps=2", "train.max_seq_len=64", "data.records_per_client=12")
    plain = resolve_run(cfg).round_settings(1, STRATEGY)
    quantised = dataclasses.replace(plain, model=dataclasses.replace(plain.model, quantize=how))
    start = initial_adapter(plain, freeze_a=False)
    expected = adapters.shapes(start)
    d_plain, m_plain = train_round(plain, start, 0)
    d_quant, m_quant = train_round(quantised, start, 1)
    assert adapters.shapes(d_quant) == adapters.shapes(d_plain) == expected
    assert {v.dtype for v in d_quant.values()} == {np.dtype(np.float32)}
    assert adapters.check_update(d_quant, expected) is None and adapters.check_update(d_plain, expected) is None
    assert any(np.abs(v).max() > 0 for v in d_quant.values())
    total = WeightedSum()
    total.add(d_plain, m_plain["num_examples"])
    total.add(d_quant, m_quant["num_examples"])
    new = make_strategy(cfg.strategy).apply(start, total.mean())
    w0, w1 = m_plain["num_examples"], m_quant["num_examples"]
    for key in expected:
        want = start[key] + (w0 * d_plain[key].astype(np.float64) + w1 * d_quant[key]) / (w0 + w1)
        np.testing.assert_allclose(new[key], want, rtol=1e-5, atol=1e-7)


def test_a_platform_that_cannot_quantise_is_told_why(tiny_config, monkeypatch):
    assert unsupported_reason("none", arch="riscv64") is None
    assert "x86-64 and aarch64" in unsupported_reason("int8", arch="riscv64")
    assert "AVX2" in unsupported_reason("nf4", arch="x86_64", avx2=False)
    assert "pip install 'fedlora[quant]'" in unsupported_reason("int8", arch="aarch64", bnb_installed=False)
    assert unsupported_reason("int8", arch="aarch64", bnb_installed=True) is None
    with pytest.raises(ConfigError, match="model.quantize='int4' is not one of: none, int8, nf4"):
        tiny_config("model.quantize=int4")
    import fedlora.quantize

    monkeypatch.setattr(fedlora.quantize.platform, "machine", lambda: "riscv64")
    with pytest.raises(ModelError, match="riscv64"):
        load_base_model(tiny_config("model.quantize=int8", "model.tiny.hidden_size=32").model)
    base = object()
    assert quantize_base(base, "none") is base  # nothing to do, nothing checked


def test_the_launcher_says_why_it_cannot_plan_a_quantised_base():
    """Where nothing fits, the launcher's error says whether a quantised base was tried and why not (its
    calibration on the measured peaks: tests/test_deploy_device.py)."""
    from fedlora.config import compose
    from fedlora.deploy.device import DeviceError, DeviceFacts, pick_settings

    cfg = compose([])

    def device(avail, arch="aarch64", avx2=False, bnb=True):
        return DeviceFacts(avail + 250, avail, arch, "3.11.2", "2.13.0", False, 4, avx2, bnb)

    with pytest.raises(DeviceError, match="lacks AVX2"):
        pick_settings(cfg, device(800, arch="x86_64", avx2=False))
    with pytest.raises(DeviceError, match=r"fedlora\[quant\]"):
        pick_settings(cfg, device(800, bnb=False))
    with pytest.raises(DeviceError, match=r"With a quantised base \(nf4\) it needs"):
        pick_settings(cfg, device(800))
    assert pick_settings(cfg, device(1640)).quantize == "none"  # SmolLM2: bf16 + checkpointing needs less
    low, full = pick_settings(cfg, device(3480), rank=2), pick_settings(cfg, device(3480))
    assert (low.lora_r, full.lora_r) == (2, 8) and low.predicted_peak_mib < full.predicted_peak_mib
    assert "model.quantize=int8" in dataclasses.replace(full, quantize="int8").overrides()
    assert not any(o.startswith("model.quantize") for o in full.overrides())  # unchanged default device settings
