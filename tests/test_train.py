"""The local training loop: loss on answers, schedules, FedProx, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from fedlora import adapters
from fedlora.config import TrainConfig
from fedlora.data import batches, client_examples, tokenize
from fedlora.roles.device import initial_adapter, lora_model
from fedlora.train import answer_loss, evaluate, lr_factor, num_steps, train_local


@pytest.fixture(scope="module")
def setup(tiny_config):
    cfg = tiny_config("data.records_per_client=16")
    model, tok = lora_model(cfg, freeze_a=False)
    train, _ = client_examples(cfg.data, 0, 4, cfg.seed)
    return cfg, model, tok, tokenize(train, tok, 128)


def test_answer_loss_equals_transformers_causal_lm_loss(setup):
    cfg, model, tok, data = setup
    adapters.set_state(model, initial_adapter(cfg, freeze_a=False))
    batch = next(batches(data, 4, tok.pad_token_id, shuffle=False, seed=0))
    with torch.no_grad():
        reference = model(**batch).loss
        loss_sum, count = answer_loss(model, batch)
    assert count == int((batch["labels"][:, 1:] != -100).sum())
    assert float(loss_sum / count) == pytest.approx(float(reference), rel=1e-5)


def test_training_lowers_the_loss_and_is_deterministic(setup):
    cfg, model, tok, data = setup
    init = initial_adapter(cfg, freeze_a=False)
    train_cfg = TrainConfig(local_steps=6, batch_size=4, lr=0.01)
    adapters.set_state(model, init)
    before, _ = evaluate(model, data, 8, pad_id=tok.pad_token_id)
    r1 = train_local(model, data, train_cfg, pad_id=tok.pad_token_id, seed=3)
    after, _ = evaluate(model, data, 8, pad_id=tok.pad_token_id)
    s1 = adapters.get_state(model)
    assert after < before and r1.steps == 6 and r1.tokens > 0 and math.isfinite(r1.loss)
    adapters.set_state(model, init)
    train_local(model, data, train_cfg, pad_id=tok.pad_token_id, seed=3)
    s2 = adapters.get_state(model)
    for k in s1:
        assert (s1[k] == s2[k]).all(), k


def test_fedprox_keeps_the_update_closer_to_the_global_adapter(setup):
    cfg, model, tok, data = setup
    init = initial_adapter(cfg, freeze_a=False)
    train_cfg = TrainConfig(local_steps=4, batch_size=4, lr=0.01)

    def drift(mu):
        adapters.set_state(model, init)
        start = adapters.get_state(model)
        train_local(model, data, train_cfg, pad_id=tok.pad_token_id, seed=5, proximal_mu=mu)
        end = adapters.get_state(model)
        return sum(float(((end[k] - start[k]) ** 2).sum()) for k in end)

    assert drift(1000.0) < drift(0.0)


def test_steps_and_schedules():
    assert num_steps(TrainConfig(local_steps=7), 100) == 7
    assert num_steps(TrainConfig(local_steps=0, epochs=2.0, batch_size=4, grad_accum=2), 20) == 6
    assert lr_factor("constant", 5, 10, 0) == 1.0
    assert lr_factor("linear", 0, 10, 0) == 1.0 and lr_factor("linear", 5, 10, 0) == pytest.approx(0.5)
    assert lr_factor("cosine", 5, 10, 0) == pytest.approx(0.5)
    assert lr_factor("cosine", 0, 10, 2) == pytest.approx(0.5)  # warm-up from lr/2


def test_gradient_checkpointing_gives_the_same_update(setup):
    cfg, model, tok, data = setup
    init = initial_adapter(cfg, freeze_a=False)
    states = []
    for checkpointing in (False, True):
        adapters.set_state(model, init)
        train_local(model, data, TrainConfig(local_steps=2, batch_size=4, lr=0.01, gradient_checkpointing=checkpointing),
                    pad_id=tok.pad_token_id, seed=9)
        states.append(adapters.get_state(model))
    for k in states[0]:
        assert torch.allclose(torch.from_numpy(states[0][k]), torch.from_numpy(states[1][k]), atol=1e-6), k
