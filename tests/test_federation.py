"""The server's round loop without Flower: run directory contract, bad replies, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from fedlora import adapters
from fedlora.config import compose
from fedlora.roles.cloud import ClientReply, FederationError, run_federation, sample_clients
from fedlora.roles.local import InProcessTransport

LINK = "end->cloud"


# Four flat clients, two rounds of half of them (a test's own overrides come after).
FLAT4 = ("topology=flat", "federation.num_clients=4", "federation.rounds=2", "federation.fraction=0.5")


def adapter_tensors(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_run_directory_contract_and_plain_peft_load(tmp_path, short_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = short_run(*FLAT4)
    run_dir = tmp_path / "run"
    summary = run_federation(cfg, run_dir, InProcessTransport(4))

    assert (run_dir / "config.yaml").is_file()
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        for key in ("round", "train_loss", "eval_loss", "participants", "dropped", "bytes", "sim_network_s", "wall_s"):
            assert key in r, key
        assert len(r["participants"]) == 2 and r["dropped"] == []
        assert r["bytes"]["up"][LINK] > 0 and r["bytes"]["down"][LINK] == 2 * summary["adapter_bytes_per_client"]
        assert np.isfinite(r["train_loss"]) and np.isfinite(r["eval_loss"])
    assert sorted(p.name for p in (run_dir / "plots").glob("*.png")) == ["bytes.png", "loss.png", "tree.png"]
    assert list((run_dir / "checkpoints").glob("round-*.npz"))
    s = json.loads((run_dir / "summary.json").read_text())
    for key in ("base_eval_loss", "final_eval_loss", "base_perplexity", "final_perplexity", "total_bytes", "wall_s"):
        assert s[key] is not None, key
    assert s["final_eval_loss"] < s["base_eval_loss"]

    # The exported adapter is a plain PEFT adapter on the base named in its config.
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    tensors = adapter_tensors(run_dir)
    assert tensors and all("lora_" in k for k in tensors)
    loaded = adapters.get_state(model, trainable_only=False)
    for key, value in tensors.items():
        np.testing.assert_array_equal(loaded[key], value)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        adapted = model(ids).logits
        with model.disable_adapter():
            plain = model(ids).logits
    assert not torch.allclose(adapted, plain), "the adapter should change the model's output"


def test_bad_replies_are_dropped_and_the_round_goes_on(tmp_path, short_run):
    cfg = short_run(*FLAT4, "federation.num_clients=6", "federation.fraction=1.0", "federation.rounds=1",
                    "federation.min_clients=1")

    def corrupt(server_round, reply: ClientReply):
        key = next(iter(reply.update)) if isinstance(reply.update, dict) else None
        if reply.client == 0:
            reply.update[key] = np.full_like(reply.update[key], np.nan)
        elif reply.client == 1:
            reply.update[key] = reply.update[key][:1]
        elif reply.client == 2:
            reply.metrics["num_examples"] = -5
        elif reply.client == 3:
            return ClientReply(3, error="client error: out of memory")
        elif reply.client == 4:
            return None  # never answers
        return reply

    run_dir = tmp_path / "run"
    run_federation(cfg, run_dir, InProcessTransport(6, fault=corrupt))
    record = json.loads((run_dir / "rounds.jsonl").read_text().splitlines()[0])
    reasons = {d["client"]: d["reason"] for d in record["dropped"]}
    assert record["participants"] == [5] and record["aggregated"] is True
    assert "NaN" in reasons[0] and "shape" in reasons[1] and "num_examples" in reasons[2]
    assert "out of memory" in reasons[3] and "no reply" in reasons[4]
    assert all(np.isfinite(v).all() for v in adapter_tensors(run_dir).values())


def test_too_few_usable_updates_leave_the_adapter_unchanged(tmp_path, short_run):
    cfg = short_run(*FLAT4, "federation.fraction=1.0", "federation.rounds=1", "federation.min_clients=3")

    def break_most(server_round, reply):
        return reply if reply.client == 0 else ClientReply(reply.client, error="boom")

    run_dir = tmp_path / "run"
    summary = run_federation(cfg, run_dir, InProcessTransport(4, fault=break_most))
    record = json.loads((run_dir / "rounds.jsonl").read_text().splitlines()[0])
    assert record["aggregated"] is False and len(record["dropped"]) == 3
    assert summary["final_eval_loss"] == pytest.approx(summary["base_eval_loss"])


def test_not_enough_clients_connected_is_a_clear_error(tmp_path, short_run):
    cfg = short_run(*FLAT4, "federation.min_clients=4")
    with pytest.raises(FederationError, match="min_clients"):
        run_federation(cfg, tmp_path / "run", InProcessTransport(2))


def test_resume_after_interrupt_equals_uninterrupted_run(tmp_path, short_run):
    """Crash in round 2 of 3 (server optimiser state included), resume, same final adapter."""
    cfg = short_run(*FLAT4, "federation.rounds=3", "strategy=fedadam")
    full = tmp_path / "full"
    run_federation(cfg, full, InProcessTransport(4))

    def crash_in_round_2(server_round, reply):
        if server_round == 2:
            raise KeyboardInterrupt
        return reply

    broken = tmp_path / "broken"
    with pytest.raises(KeyboardInterrupt):
        run_federation(cfg, broken, InProcessTransport(4, fault=crash_in_round_2))
    assert not (broken / "adapter").exists()
    with pytest.raises(FederationError, match="resume"):
        run_federation(cfg, broken, InProcessTransport(4))  # a fresh start must not clobber it
    run_federation(cfg, broken, InProcessTransport(4), resume=True)

    a, b = adapter_tensors(full), adapter_tensors(broken)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    rounds = [json.loads(line)["round"] for line in (broken / "rounds.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3]
    full_losses = [json.loads(line)["eval_loss"] for line in (full / "rounds.jsonl").read_text().splitlines()]
    resumed_losses = [json.loads(line)["eval_loss"] for line in (broken / "rounds.jsonl").read_text().splitlines()]
    assert full_losses == resumed_losses


def test_ffa_lora_sends_only_b_and_keeps_a_frozen(tmp_path, short_run):
    fedavg = tmp_path / "fedavg"
    ffa = tmp_path / "ffa"
    s_avg = run_federation(short_run(*FLAT4, "federation.rounds=1"), fedavg, InProcessTransport(4))
    s_ffa = run_federation(short_run(*FLAT4, "federation.rounds=1", "strategy=ffa_lora"), ffa, InProcessTransport(4))
    a_avg, a_ffa = adapter_tensors(fedavg), adapter_tensors(ffa)
    b_bytes = sum(v.nbytes for k, v in a_ffa.items() if "lora_B" in k)
    assert s_ffa["adapter_bytes_per_client"] == b_bytes  # only B travels
    assert s_avg["adapter_bytes_per_client"] == sum(v.nbytes for v in a_avg.values())
    init = tmp_path / "init"
    run_federation(short_run(*FLAT4, "federation.rounds=1", "strategy=ffa_lora", "train.lr=1e-9"), init, InProcessTransport(4))
    a_init = adapter_tensors(init)
    for key in a_ffa:
        if "lora_A" in key:
            np.testing.assert_array_equal(a_ffa[key], a_init[key])
        else:
            assert np.abs(a_ffa[key]).max() > 0
    # FedAvg (FedIT) does move A away from the shared initialisation.
    assert any(not np.array_equal(a_avg[k], a_init[k]) for k in a_avg if "lora_A" in k)


def test_sampling_is_seeded_and_respects_minimum():
    cfg = compose(["federation.num_clients=10", "federation.fraction=0.1", "federation.min_clients=3"]).federation
    a = sample_clients(list(range(10)), cfg, seed=1, server_round=4)
    assert a == sample_clients(list(range(10)), cfg, seed=1, server_round=4)
    assert len(a) == 3 and len(set(a)) == 3
    assert any(sample_clients(list(range(10)), cfg, seed=1, server_round=r) != a for r in range(5, 10))


def test_cell_request_and_result_round_trip_as_safe_bytes_and_refuse_garbage():
    from fedlora.aggregate.sums import WeightedSum
    from fedlora.roles.neighbourhood import CellRequest, CellResult, CellWireError, ClientStatus
    from fedlora.run_settings import resolve_run

    arrays = {"a.lora_B.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}
    settings = resolve_run(compose(["model=tiny"])).round_settings(3, {"proximal_mu": 1.5, "freeze_a": False})
    req = CellRequest("run-1", 3, "neighbourhood-0-1", [4, 7], arrays, settings, {"a.lora_B.weight": (2, 3)})
    back = CellRequest.from_bytes(req.to_bytes())
    assert back.clients == [4, 7] and back.settings == req.settings and back.expected == req.expected
    np.testing.assert_array_equal(back.arrays["a.lora_B.weight"], arrays["a.lora_B.weight"])
    total = WeightedSum()
    total.add(arrays, 5.0)
    res = CellResult("neighbourhood-0-1", {4: ClientStatus(4, "accepted", None, 1.25, 24, 0.5, 5.0),
                                           7: ClientStatus(7, "dropped", "boom")}, total, {"num_examples": 5.0})
    got = CellResult.from_bytes(res.to_bytes())
    assert got.accepted == [4] and got.clients[7].reason == "boom" and got.plain.weight == 5.0
    np.testing.assert_array_equal(got.plain.total["a.lora_B.weight"], total.total["a.lora_B.weight"])
    data = req.to_bytes()
    for bad in (b"", b"\x80\x03}q\x00.", data[:-3], data + b"x", res.to_bytes()):  # pickle, truncated, wrong kind
        with pytest.raises(CellWireError):
            CellRequest.from_bytes(bad)
    from fedlora import transcript, wire

    forged = [("a", "<f4", (2, 3), b"\0" * 4),  # an array whose shape disagrees with its bytes
              ("c", "os.system", (("command", ("s", "true")),)),  # a type that is not a message
              ("a", "|O", (1,), b"\0" * 8)]  # object arrays are never decoded
    for value in forged:
        with pytest.raises(CellWireError):
            CellRequest.from_bytes(transcript.encode(wire.MAGIC, "cell-request", value))


def test_run_cell_drops_bad_and_late_replies_with_reasons(short_run):
    from fedlora.roles.device import initial_adapter
    from fedlora.roles.neighbourhood import CellRequest, run_cell
    from fedlora.run_settings import resolve_run

    cfg = short_run(*FLAT4, "federation.num_clients=3")
    state = initial_adapter(cfg, freeze_a=False)
    expected = {k: v.shape for k, v in state.items()}

    def corrupt(server_round, reply):
        return ClientReply(reply.client, error="client error: disk full") if reply.client == 0 else reply

    settings = resolve_run(cfg).round_settings(1, {"proximal_mu": 0.0, "freeze_a": False})
    request = CellRequest("r", 1, "cloud", [0, 1, 2], state, settings, expected)
    result = run_cell(request, InProcessTransport(3, fault=corrupt), late=lambda usable: {2: "past the deadline"})
    assert result.accepted == [1] and result.plain.count == 1
    assert result.clients[0].reason == "client error: disk full" and result.clients[2].status == "late"
    assert result.metrics["num_examples"] == result.clients[1].num_examples == result.plain.weight
