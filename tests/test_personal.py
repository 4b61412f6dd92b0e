"""Personal strategies: FedSA-LoRA (A shared, B kept) and FedDPA (a shared and a local adapter).

What a device keeps survives rounds and a resume, is never in its reply, and (deployed) lives in its
own folder; the audit of what it sends shows only the shared part. FedDPA's output is the base plus
both adapters' contributions.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from test_secure_client_app import MemoryGrid, server_identity  # noqa: F401 (an autouse fixture)

from fedlora import adapters
from fedlora.roles.cloud import run_federation
from fedlora.roles.device import initial_personal, lora_model
from fedlora.roles.local import InProcessTransport
from fedlora.roles.personal import PERSONAL, PersonalStore, both_active
from fedlora.runs import report
from server.transport import FlowerTransport

FLAT4 = ("topology=flat", "federation.num_clients=4", "federation.fraction=0.5")


def adapter_tensors(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def watching(seen: dict):
    """A transport fault hook that records the tensor names of every reply and changes nothing."""

    def fault(server_round, reply):
        seen.setdefault(server_round, {})[reply.client] = sorted(reply.update)
        return reply

    return fault


def test_the_store_keeps_each_rounds_version_and_the_one_before(tmp_path):
    store = PersonalStore(tmp_path / "personal")
    one, two, again = ({"x.lora_B.weight": np.full((2, 2), v, np.float32)} for v in (1, 2, 3))
    assert store.load(3, before_round=1) is None
    store.save(3, 1, one)
    store.save(3, 2, two)
    assert store.load(3)["x.lora_B.weight"][0, 0] == 2
    assert store.load(3, before_round=2)["x.lora_B.weight"][0, 0] == 1  # a re-run of round 2 starts from round 1's
    store.save(3, 2, again)  # the re-run replaces its own round's version only
    assert store.load(3, before_round=2)["x.lora_B.weight"][0, 0] == 1
    assert store.load(3, before_round=3)["x.lora_B.weight"][0, 0] == 3
    assert store.clients() == [3] and not list((tmp_path / "personal").glob(".*tmp"))


def test_fedsa_sends_only_a_keeps_b_across_rounds_and_a_resume(tmp_path, short_run):
    """Only A in every reply; each device's B in the run's store, carried over rounds; a run interrupted in
    round 2 and resumed ends with the same global A and the same personal B of every client."""
    cfg = short_run(*FLAT4, "federation.rounds=3", "strategy=fedsa_lora")
    seen: dict = {}
    full = tmp_path / "full"
    summary = run_federation(cfg, full, InProcessTransport(4, fault=watching(seen)))
    global_a = adapter_tensors(full)
    a_keys = sorted(k for k in global_a if "lora_A" in k)
    assert seen and all(keys == a_keys for replies in seen.values() for keys in replies.values())
    assert summary["adapter_bytes_per_client"] == sum(global_a[k].nbytes for k in a_keys)
    store = PersonalStore(full / "personal")
    trained = sorted({c for replies in seen.values() for c in replies})
    assert store.clients() == trained
    kept = {c: store.load(c) for c in trained}
    for state in kept.values():
        assert state and all("lora_B" in k for k in state) and all(np.abs(v).max() > 0 for v in state.values())
    assert not np.array_equal(*(next(iter(kept[c].values())) for c in trained[:2]))  # each its own B
    assert all(np.abs(v).max() == 0 for k, v in global_a.items() if "lora_B" in k)  # the cloud never saw a B

    def crash_in_round_2(server_round, reply):
        if server_round == 2:
            raise KeyboardInterrupt
        return reply

    broken = tmp_path / "broken"
    with pytest.raises(KeyboardInterrupt):
        run_federation(cfg, broken, InProcessTransport(4, fault=crash_in_round_2))
    run_federation(cfg, broken, InProcessTransport(4), resume=True)
    for key, value in adapter_tensors(broken).items():
        np.testing.assert_array_equal(value, global_a[key])
    resumed = PersonalStore(broken / "personal")
    for c in trained:
        for key, value in resumed.load(c).items():
            np.testing.assert_array_equal(value, kept[c][key])
    personal = json.loads((broken / "summary.json").read_text())["personal"]
    assert personal["kind"] == "lora_b" and set(personal["clients"]) == {str(c) for c in trained}
    assert personal["mean"]["personal"] < personal["mean"]["global"]

    # Each client's personal adapter (global A + its own B) is exported as a plain PEFT adapter.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    exported = broken / "personal" / f"client-{trained[0]}"
    config = json.loads((exported / "adapter_config.json").read_text())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]), str(exported))
    loaded = adapters.get_state(model, trainable_only=False)
    assert loaded.keys() == global_a.keys()
    for key, value in loaded.items():
        np.testing.assert_array_equal(value, kept[trained[0]][key] if "lora_B" in key else global_a[key])


def test_feddpa_shares_fedavgs_update_and_keeps_a_local_adapter(tmp_path, short_run):
    """The shared adapter's training is FedAvg's (same global adapter, same replies); the local adapter stays in
    the store and exports as a plain PEFT adapter that, with the global one, gives the personal model's loss."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    fedavg, dpa = tmp_path / "fedavg", tmp_path / "feddpa"
    seen: dict = {}
    run_federation(short_run(*FLAT4, "federation.rounds=2"), fedavg, InProcessTransport(4))
    summary = run_federation(short_run(*FLAT4, "federation.rounds=2", "strategy=feddpa"), dpa,
                             InProcessTransport(4, fault=watching(seen)))
    a, b = adapter_tensors(fedavg), adapter_tensors(dpa)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert all(keys == sorted(a) for replies in seen.values() for keys in replies.values())  # never the local adapter
    client = next(iter(summary["personal"]["clients"]))
    exported = dpa / "personal" / f"client-{client}"
    config = json.loads((exported / "adapter_config.json").read_text())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]),
                                      str(dpa / "adapter"), adapter_name="global")
    model.load_adapter(str(exported), adapter_name="personal")
    model.base_model.set_adapter(["global", "personal"])
    from fedlora.roles.personal_eval import client_held_out
    from fedlora.train import evaluate

    cfg = short_run(*FLAT4, "federation.rounds=2", "strategy=feddpa")
    _, tokenizer = lora_model(cfg, freeze_a=False, personal=True)
    loss, _ = evaluate(model, client_held_out(cfg, int(client), tokenizer), cfg.train.eval_batch_size,
                       pad_id=tokenizer.pad_token_id)
    assert loss == pytest.approx(summary["personal"]["clients"][client]["personal"], rel=1e-5)


def test_feddpa_output_is_the_base_plus_both_adapters(short_run):
    cfg = short_run("strategy=feddpa")
    model, _ = lora_model(cfg, freeze_a=False, personal=True)
    rng = np.random.default_rng(0)
    shared = {k: rng.normal(0, 0.2, v.shape).astype(np.float32)
              for k, v in adapters.get_state(model, trainable_only=False).items()}
    own = {k: rng.normal(0, 0.2, v.shape).astype(np.float32) for k, v in initial_personal(cfg).items()}
    adapters.set_state(model, shared)
    adapters.set_state(model, own, adapter_name=PERSONAL)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, layer.in_features)
    scale = layer.scaling["default"]
    key = next(k for k in shared if ".layers.0.self_attn.q_proj.lora_A" in k)
    b_key = key.replace("lora_A", "lora_B")

    def contribution(state):
        return scale * x @ torch.from_numpy(state[key]).T @ torch.from_numpy(state[b_key]).T

    with torch.no_grad():
        base = layer.get_base_layer()(x)
        alone = layer(x)
        with both_active(model):
            both = layer(x)
            ids = torch.tensor([[1, 2, 3, 4, 5]])
            logits_both = model(ids).logits
        logits_shared = model(ids).logits
        with model.disable_adapter():
            logits_base = model(ids).logits
    torch.testing.assert_close(alone, base + contribution(shared))
    torch.testing.assert_close(both, base + contribution(shared) + contribution(own))
    assert not torch.allclose(logits_both, logits_shared) and not torch.allclose(logits_shared, logits_base)
    assert model.base_model.active_adapters == ["default"]  # both_active leaves the shared adapter alone active


@pytest.mark.parametrize("strategy", ["fedsa_lora", "feddpa"])
def test_personal_strategies_under_secagg_equal_plain_up_to_the_fixed_point_step(tmp_path, short_run, strategy):
    """The shared part is what is masked and summed (FedSA: A, a linear mean): the secure run's global adapter is the
    plain one's within the decode bound, and every device keeps the same personal part either way."""
    tree = ("topology=small6g", "topology.suburban_cells=1", "topology.neighbourhoods_per_suburban=1",
            "topology.mobility.model=none", "federation.num_clients=4", "federation.fraction=1.0", "federation.rounds=1",
            f"strategy={strategy}")
    plain, secure = tmp_path / "plain", tmp_path / "secure"
    run_federation(short_run(*tree, "privacy=none"), plain, InProcessTransport(4))
    run_federation(short_run(*tree, "privacy=secagg"), secure, InProcessTransport(4))
    (record,) = report.read_rounds(secure)
    assert record["secure"]["cells"] and all(c["ok"] for c in record["secure"]["cells"].values())
    a, b = adapter_tensors(plain), adapter_tensors(secure)
    for key in a:
        assert np.abs(a[key] - b[key]).max() <= record["secure"]["decode_error_bound"] + 1e-7, key
    kept = PersonalStore(plain / "personal")
    assert kept.clients() == PersonalStore(secure / "personal").clients() == record["participants"]
    for c in kept.clients():
        for key, value in kept.load(c).items():
            np.testing.assert_array_equal(value, PersonalStore(secure / "personal").load(c)[key])


def test_a_deployed_device_keeps_its_part_in_its_own_folder_and_sends_only_the_shared_part(tmp_path, short_run):
    """Over Flower messages (the real ClientApp, as a SuperNode runs it): each device's B stays in its node's
    state-dir, never in the run directory; its audit copies hold arrays of A only."""
    grid = MemoryGrid(4)
    for node in grid.contexts:
        from flwr.common.serde import context_from_proto, context_to_proto

        context = context_from_proto(grid.contexts[node])
        context.node_config.update({"state-dir": str(tmp_path / f"node-{node}" / "state"),
                                    "audit-dir": str(tmp_path / f"node-{node}" / "sent")})
        grid.contexts[node] = context_to_proto(context)
    cfg = short_run(*FLAT4, "federation.rounds=2", "federation.fraction=1.0", "strategy=fedsa_lora")
    run_dir = tmp_path / "run"
    run_federation(cfg, run_dir, FlowerTransport(grid, expected_clients=4, timeout_s=60))
    assert not (run_dir / "personal").exists() or not list((run_dir / "personal").glob("client-*.safetensors"))
    a_keys = sorted(k for k in adapter_tensors(run_dir) if "lora_A" in k)
    trained = [c for r in report.read_rounds(run_dir) for c in r["participants"]]
    for node in grid.contexts:
        kept = PersonalStore(tmp_path / f"node-{node}" / "state" / "personal").load(node - 100)
        assert kept and all("lora_B" in k for k in kept)
        sent = [json.loads(p.read_text()) for p in sorted((tmp_path / f"node-{node}" / "sent").glob("*-train.json"))]
        assert len(sent) == trained.count(node - 100)  # one reply per round it trained in (a device may be off)
        for doc in sent:
            arrays = [rec["items"] for rec in doc["records"].values() if rec["kind"] == "arrays"]
            assert [sorted(items) for items in arrays] == [a_keys]
