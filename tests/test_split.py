"""Split learning: the U-shaped split is exact (gradients and one step equal unsplit training), the
privacy floor on k, which tensor belongs to whom."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedlora import adapters
from fedlora.config import ConfigError, LoraConfig, TrainConfig
from fedlora.data import batches, client_examples, tokenize
from fedlora.model import wrap_lora
from fedlora.roles.device import lora_model
from fedlora.split import DeviceHalf, EdgeHalf, InProcessLink, SplitCut, check_cut, edge_keys, tensor_layer
from fedlora.train import answer_loss, train_local

FOUR_LAYERS = ("model.tiny.num_hidden_layers=4", "data.records_per_client=16", "lora.target_modules=[q_proj,v_proj,down_proj]")


@pytest.fixture(scope="module")
def setup(tiny_config):
    cfg = tiny_config(*FOUR_LAYERS)
    model, tok = lora_model(cfg, freeze_a=False)
    train, _ = client_examples(cfg.data, 0, 4, cfg.seed)
    # A start with B != 0, so that every LoRA tensor has a gradient (B = 0 zeroes A's).
    rng = np.random.default_rng(0)
    start = {k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32)
             for k, v in adapters.get_state(model, trainable_only=False).items()}
    return cfg, model, tok, tokenize(train, tok, 96), start


def _split(model, cut, cfg, mu=0.0):
    link = InProcessLink(EdgeHalf(model, cut, cfg, proximal_mu=mu))
    return DeviceHalf(model, cut, link), link


@pytest.mark.parametrize("cut", [SplitCut(1, 1), SplitCut(2, 0), SplitCut(1, 2)])
def test_split_gradients_equal_unsplit(setup, cut):
    cfg, model, tok, data, start = setup
    batch = next(batches(data, 4, tok.pad_token_id, shuffle=False, seed=0))
    params = adapters.lora_parameters(model, trainable_only=True)
    model.train()
    grads = {}
    for way in ("full", "split"):
        adapters.set_state(model, start)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)  # LoRA dropout draws in the same order both ways
        half = None if way == "full" else _split(model, cut, TrainConfig())[0]
        loss_sum, count = answer_loss(model, batch, hidden_of=None if half is None else half.hidden)
        (loss_sum / count).backward()
        grads[way] = {k: p.grad.detach().clone() for k, p in params.items()}
    model.eval()
    assert set(grads["full"]) == set(grads["split"])
    for k, g in grads["full"].items():
        assert float(g.abs().max()) > 0, k
        torch.testing.assert_close(grads["split"][k], g, rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.parametrize("mu", [0.0, 0.05])
def test_one_split_step_equals_one_unsplit_step(setup, mu):
    cfg, model, tok, data, start = setup
    train_cfg = TrainConfig(local_steps=2, batch_size=4, grad_accum=2, lr=0.01, max_grad_norm=0.5)
    cut = SplitCut(1, 1)
    adapters.set_state(model, start)
    full = train_local(model, data, train_cfg, pad_id=tok.pad_token_id, seed=3, proximal_mu=mu)
    want = adapters.get_state(model)
    adapters.set_state(model, start)
    half, link = _split(model, cut, train_cfg, mu)
    split = train_local(model, data, train_cfg, pad_id=tok.pad_token_id, seed=3, proximal_mu=mu, split=half)
    got = adapters.get_state(model)
    assert split.tokens == full.tokens and split.steps == full.steps
    if mu == 0:
        assert split.loss == pytest.approx(full.loss, rel=1e-5)
    moved = 0
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6, err_msg=k)
        moved += int(not np.array_equal(want[k], start[k]))
    assert moved == len(want)  # every tensor, on either side, took its step
    hidden = cfg.model.tiny.hidden_size
    assert link.traffic.exchanges == 4 and link.traffic.steps == 2
    assert link.traffic.bytes_up > 4 * 2 * 4 * hidden  # activations and gradients of 4 micro-batches


def test_the_floor_on_k_and_a_cut_that_leaves_the_edge_nothing_are_refused():
    check_cut(SplitCut(1, 0), 4, 1)
    with pytest.raises(ConfigError, match="privacy floor"):
        check_cut(SplitCut(0, 1), 4, 1)
    with pytest.raises(ConfigError, match="privacy floor"):
        check_cut(SplitCut(1, 1), 4, 2)
    with pytest.raises(ConfigError, match="privacy floor"):
        check_cut(SplitCut(0, 1), 4, 0)  # the floor is never below 1
    with pytest.raises(ConfigError, match="no decoder block"):
        check_cut(SplitCut(2, 2), 4, 1)


def test_tensors_are_the_device_s_or_the_edge_s_by_their_block():
    keys = ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.2.mlp.down_proj.lora_B.weight",
            "base_model.model.model.layers.11.self_attn.v_proj.lora_A.weight",
            "base_model.model.lm_head.lora_A.weight"]
    assert [tensor_layer(k) for k in keys] == [0, 2, 11, None]
    assert edge_keys(keys, SplitCut(1, 1), 12) == [keys[1]]
    assert edge_keys(keys, SplitCut(1, 0), 12) == keys[1:3]
    assert edge_keys(keys, SplitCut(3, 1), 12) == []


def test_split_runs_on_a_smollm2_shaped_llama():
    """SmolLM2-135M's architecture (30 blocks, 9 heads / 3 kv heads, hidden 576, tied embeddings),
    width-scaled down so it builds in a second: the split still equals the unsplit forward."""
    config = LlamaConfig(vocab_size=512, hidden_size=576 // 4, intermediate_size=1536 // 4, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=True, max_position_embeddings=2048, head_dim=16)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    base.requires_grad_(False)
    model = wrap_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, 512, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    half, link = _split(model, SplitCut(3, 2), TrainConfig())
    with torch.no_grad():
        want, _ = answer_loss(model, batch)
        got, _ = answer_loss(model, batch, hidden_of=half.hidden)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    assert link.traffic.bytes_up == 2 * 24 * (576 // 4) * 4 + 2 * 24
