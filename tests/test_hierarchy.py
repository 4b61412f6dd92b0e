"""The round loop over the 6G cell tree: same result as flat, bytes per link, HierFAVG, stragglers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedlora.roles.cloud import run_federation
from fedlora.roles.local import InProcessTransport

# Eight clients, two rounds of half of them, no secure aggregation (a test adds its topology).
EIGHT = ("federation.num_clients=8", "federation.rounds=2", "federation.fraction=0.5", "privacy=none")


def rounds_of(run_dir):
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


def adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_tree_with_k1_equals_flat_fedavg_and_backhaul_carries_one_sum_per_cell(tmp_path, short_run):
    flat, tree = tmp_path / "flat", tmp_path / "tree"
    s_flat = run_federation(short_run(*EIGHT, "topology=flat"), flat, InProcessTransport(8))
    run_federation(short_run(*EIGHT, "topology=small6g"), tree, InProcessTransport(8))
    a, b = adapter(flat), adapter(tree)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-6, rtol=1e-5)
    size = s_flat["adapter_bytes_per_client"]
    for rf, rt in zip(rounds_of(flat), rounds_of(tree)):
        assert rf["participants"] == rt["participants"]
        n = len(rt["participants"])
        assert rf["bytes"]["up"] == {"end->cloud": n * size}
        assert rt["bytes"]["up"]["end->neighbourhood"] == n * size
        cells = {cell for cell in rt["cell_of"].values()}
        suburbs = {cell.rsplit("-", 1)[0].replace("neighbourhood", "suburban") for cell in cells}
        assert rt["bytes"]["up"]["neighbourhood->suburban"] == len(cells) * size
        assert rt["bytes"]["up"]["suburban->cloud"] == len(suburbs) * size  # not one per client
        assert rt["sim_network_s"] > 0 and rf["sim_network_s"] > 0


def test_hierfavg_syncs_every_k_rounds_and_resumes_exactly(tmp_path, short_run):
    cfg = short_run(*EIGHT, "topology=small6g", "topology.cloud_sync_every=2", "federation.rounds=3",
                    "topology.mobility.handover_prob=0.5")
    full = tmp_path / "full"
    run_federation(cfg, full, InProcessTransport(8))
    assert [r["cloud_sync"] for r in rounds_of(full)] == [False, True, True]  # the last round always syncs
    assert rounds_of(full)[0]["bytes"]["up"]["suburban->cloud"] == 0  # no backhaul between syncs

    def crash_in_round_3(server_round, reply):
        if server_round == 3:
            raise KeyboardInterrupt
        return reply

    broken = tmp_path / "broken"
    with pytest.raises(KeyboardInterrupt):
        run_federation(cfg, broken, InProcessTransport(8, fault=crash_in_round_3))
    run_federation(cfg, broken, InProcessTransport(8), resume=True)
    a, b = adapter(full), adapter(broken)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert [r["cell_of"] for r in rounds_of(full)] == [r["cell_of"] for r in rounds_of(broken)]


def test_mobility_counts_each_update_once_in_the_cell_it_uploads_from(tmp_path, short_run):
    cfg = short_run(*EIGHT, "topology=small6g", "topology.mobility.handover_prob=1.0", "federation.rounds=3",
                    "federation.fraction=1.0")
    run_dir = tmp_path / "run"
    run_federation(cfg, run_dir, InProcessTransport(8))
    records = rounds_of(run_dir)
    per_client = 12 - max(1, round(12 * cfg.data.eval_fraction))  # wearable: train examples per client
    for r in records:
        assert sorted(int(c) for c in r["cell_of"]) == r["participants"]
        assert r["num_examples"] == per_client * len(r["participants"])
    moved = [c for c in records[1]["cell_of"]
             if c in records[0]["cell_of"] and records[1]["cell_of"][c] != records[0]["cell_of"][c]]
    assert moved, "with handover_prob=1 clients change cells between rounds"


def test_clients_past_the_deadline_are_stragglers(tmp_path, short_run):
    cfg = short_run(*EIGHT, "topology=small6g", "topology.deadline_s=0.000001", "federation.rounds=1")
    run_dir = tmp_path / "run"
    summary = run_federation(cfg, run_dir, InProcessTransport(8))
    (record,) = rounds_of(run_dir)
    assert record["participants"] == [] and record["aggregated"] is False
    assert record["dropped"] and all("deadline" in d["reason"] or "unavailable" in d["reason"] for d in record["dropped"])
    assert summary["final_eval_loss"] == pytest.approx(summary["base_eval_loss"])
