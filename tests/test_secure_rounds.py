"""privacy=secagg inside real federated rounds (in-process transport, tiny model)."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedlora import wire
from fedlora.config import ConfigError, compose
from fedlora.roles.cloud import run_federation
from fedlora.roles.local import InProcessTransport
from fedlora.roles.neighbourhood import ClientReply
from fedlora.run_settings import resolve_run
from fedlora.runs import report
from fedlora.secure.encoding import levels
from fedlora.secure.identities import SimulatedIdentities

# Eight always-available laptops on the small6g tree, all of them in one round.
EIGHT_LAPTOPS = ("topology=small6g", "federation.num_clients=8", "federation.rounds=1", "federation.fraction=1.0",
                 "topology.profile_mix={rpi4: 0, phone: 0, car: 0, laptop: 1.0}", "topology.profiles.laptop.availability=1.0")


def rounds_of(run_dir):
    return report.read_rounds(run_dir)


def adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def plain_and_secure(tmp_path_factory, short_run):
    base = tmp_path_factory.mktemp("runs")
    run_federation(short_run(*EIGHT_LAPTOPS, "privacy=none"), base / "plain", InProcessTransport(8))
    run_federation(short_run(*EIGHT_LAPTOPS, "privacy=secagg", "privacy.clip=1.0"), base / "secure", InProcessTransport(8))
    return base / "plain", base / "secure"


def test_secure_round_matches_plain_within_the_quantisation_bound(plain_and_secure):
    plain, secure = plain_and_secure
    rp, rs = rounds_of(plain)[0], rounds_of(secure)[0]
    assert rp["participants"] == rs["participants"] == list(range(8)) and rs["aggregated"]
    assert all(c["ok"] for c in rs["secure"]["cells"].values()) and rs["secure"]["clients_in_sum"] == 8
    assert rs["num_examples"] == rp["num_examples"]  # the count coordinate decodes exactly
    # One round of FedAvg: final = init + mean. Each client's value is rounded by < 1 step
    # (clip / L) in the weighted domain w_u = n_u / n_max, so |sum error| < clients * step * n_max
    # and the mean is off by < clients * step * n_max / sum(n_u) -- nothing is clipped at clip=1.0.
    step = 1.0 / levels(16)
    bound = 8 * step * 12 / rp["num_examples"]
    assert rs["secure"]["decode_error_bound"] == pytest.approx(bound)
    a, b = adapter(plain), adapter(secure)
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert 0 < worst <= bound + 1e-6  # + float32 rounding of the stored adapters
    # the loss travels as a masked coordinate with clip 100: its weighted mean is off by < 8 * 100/L * 12 / n
    assert abs(rs["train_loss"] - rp["train_loss"]) <= 8 * (100.0 / levels(16)) * 12 / rp["num_examples"]


def stage_dropper(drops):
    """stage_fault dropping client c's reply at stage s for every (c, s) in drops."""
    def fault(server_round, stage, reply):
        return None if (reply.client, stage) in drops else reply
    return fault


@pytest.mark.parametrize("stage", ["advertise", "share-keys", "masked-input", "unmask"])
def test_a_dropout_at_any_stage_leaves_the_exact_sum_of_the_survivors(tmp_path, short_run, stage):
    cfg = short_run(*EIGHT_LAPTOPS, "topology.suburban_cells=1", "topology.neighbourhoods_per_suburban=1",
                    "privacy.threshold=0.5")  # one cell of 8: t = 5
    run_federation(cfg, tmp_path / "drop", InProcessTransport(8, stage_fault=stage_dropper({(3, stage)})))
    rec = rounds_of(tmp_path / "drop")[0]
    cell = rec["secure"]["cells"]["neighbourhood-0-0"]
    assert cell["ok"] and rec["aggregated"]
    if stage in ("advertise", "share-keys", "masked-input"):
        assert 3 not in rec["participants"] and len(rec["participants"]) == 7
        assert any(d["client"] == 3 for d in rec["dropped"])
    else:  # it uploaded: its update is in the sum, the others' shares unmask it
        assert rec["participants"] == list(range(8))
    assert cell["dropped"] == {stage: [3]}


def test_survivors_sum_equals_the_plain_sum_of_the_same_clients(tmp_path, short_run):
    cfg = short_run(*EIGHT_LAPTOPS, "topology.suburban_cells=1", "topology.neighbourhoods_per_suburban=1",
                    "privacy.threshold=0.5", "privacy.clip=1.0")
    run_federation(cfg, tmp_path / "s", InProcessTransport(8, stage_fault=stage_dropper({(2, "masked-input"), (5, "unmask")})))

    def drop_2(server_round, reply):
        return None if reply.client == 2 else reply

    run_federation(short_run(*EIGHT_LAPTOPS, "privacy=none", "topology.suburban_cells=1",
                             "topology.neighbourhoods_per_suburban=1"),
                   tmp_path / "p", InProcessTransport(8, fault=drop_2))
    rs, rp = rounds_of(tmp_path / "s")[0], rounds_of(tmp_path / "p")[0]
    assert rs["participants"] == rp["participants"] == [0, 1, 3, 4, 5, 6, 7]
    assert rs["num_examples"] == rp["num_examples"]
    a, b = adapter(tmp_path / "p"), adapter(tmp_path / "s")
    assert max(float(np.max(np.abs(a[k] - b[k]))) for k in a) <= rs["secure"]["decode_error_bound"] + 1e-6


def test_a_cell_below_t_aborts_and_the_other_cells_count(tmp_path, short_run):
    # cell neighbourhood-1-1 holds clients 3 and 7 (n = 2, t = 2): losing one aborts it
    run_federation(short_run(*EIGHT_LAPTOPS), tmp_path / "r",
                   InProcessTransport(8, stage_fault=stage_dropper({(7, "share-keys")})))
    rec = rounds_of(tmp_path / "r")[0]
    cells = rec["secure"]["cells"]
    assert cells["neighbourhood-1-1"]["ok"] is False and "t=2" in cells["neighbourhood-1-1"]["reason"]
    assert [c for c, v in cells.items() if v["ok"]] == ["neighbourhood-0-0", "neighbourhood-0-1", "neighbourhood-1-0"]
    assert rec["participants"] == [0, 1, 2, 4, 5, 6] and rec["aggregated"]
    assert {d["client"] for d in rec["dropped"]} == {3, 7}


def test_a_tampered_masked_input_is_rejected_and_the_round_goes_on(tmp_path, short_run):
    from fedlora.secure.messages import MaskedInput
    from fedlora.secure.rounds import message, read_message

    def tamper(server_round, stage, reply):
        if stage == "masked-input" and reply.client == 4 and reply.error is None:
            msg = read_message(reply.update, MaskedInput)
            vector = msg.vector.copy()
            vector[0] ^= 1  # one bit flipped, signature kept
            reply = ClientReply(reply.client, message(MaskedInput(msg.sid, msg.sender, vector, msg.signature)),
                                reply.metrics, bytes_up=reply.bytes_up)
        return reply

    cfg = short_run(*EIGHT_LAPTOPS, "topology.suburban_cells=1", "topology.neighbourhoods_per_suburban=1",
                    "privacy.threshold=0.5")
    run_federation(cfg, tmp_path / "r", InProcessTransport(8, stage_fault=tamper))
    rec = rounds_of(tmp_path / "r")[0]
    reasons = {d["client"]: d["reason"] for d in rec["dropped"]}
    assert "signature" in reasons[4] and 4 not in rec["participants"] and rec["aggregated"]


def test_an_unregistered_device_is_refused(tmp_path, short_run):
    from fedlora.secure.messages import AdvertiseKeys
    from fedlora.secure.rounds import Join, client_step, message, read_message

    # Client 6 signs with a key the cloud never enrolled (an impostor device).
    def impostor(server_round, stage, reply):
        if stage == "advertise" and reply.client == 6 and reply.error is None:
            advert = read_message(reply.update, AdvertiseKeys)
            rogue = SimulatedIdentities(999).own("rogue")
            sig = rogue.sign(AdvertiseKeys.signed_bytes(advert.header_digest, "rogue-device", advert.share_key, advert.mask_key))
            reply = ClientReply(6, message(AdvertiseKeys(advert.header_digest, "rogue-device", advert.share_key,
                                                         advert.mask_key, sig)), reply.metrics)
        return reply

    cfg = short_run(*EIGHT_LAPTOPS, "topology.suburban_cells=1", "topology.neighbourhoods_per_suburban=1",
                    "privacy.threshold=0.5")
    run_federation(cfg, tmp_path / "r", InProcessTransport(8, stage_fault=impostor))
    rec = rounds_of(tmp_path / "r")[0]
    reasons = {d["client"]: d["reason"] for d in rec["dropped"]}
    assert 6 not in rec["participants"] and "rogue-device" in reasons[6] and rec["aggregated"]

    # and the aggregator refuses a registered-looking advert from a device not in the registry
    from fedlora.secure.aggregator import NeighbourhoodAggregator
    from fedlora.secure.encoding import EncodingConfig
    from fedlora.secure.errors import UnknownDevice
    from fedlora.secure.rounds import SecureRound, SecureSettings, aggregator_id, secure_layout

    state = {"w": np.zeros((2, 2), np.float32)}
    sr = SecureRound(identities=SimulatedIdentities(1), run_id="r", server_round=1, clients=[0, 1], cells_above={"n": "cloud"},
                     settings=SecureSettings(EncodingConfig(), 0.6, "cloud", "aes128-ctr", 100),
                     layout=secure_layout({"w": (2, 2)}))
    cell = sr.cell("n", [0, 1], state)
    registry = cell.registry.verify(sr.cloud_key)
    agg = NeighbourhoodAggregator(aggregator_id("n"), SimulatedIdentities(1).own(aggregator_id("n")), registry, cell.header)
    outsider = Join(cell.header, cell.registry, "device-77")  # never enrolled
    data, _, _ = client_step("advertise", message(outsider), None, identity=SimulatedIdentities(1).own("device-77"),
                             cloud_key=sr.cloud_key, rng=SimulatedIdentities(1).rng("x"),
                             train=lambda: (state, {"train_loss": 1.0, "num_examples": 3}), arrays=state)
    with pytest.raises(UnknownDevice):
        agg.receive_advert(read_message(data, AdvertiseKeys))


class RecordingTransport(InProcessTransport):
    """The in-process transport, keeping every usable secure-stage reply (``payloads``) and the last
    round's settings and start adapter (``settings``, ``arrays``: to recompute a client's plain update)."""

    def __init__(self, num_clients: int):
        super().__init__(num_clients)
        self.payloads, self.settings, self.arrays = [], None, None

    def exchange(self, server_round, stage, payloads, arrays, settings, on_reply):
        replies = super().exchange(server_round, stage, payloads, arrays, settings, on_reply)
        self.payloads.extend(r.update for r in replies if r.error is None)
        self.settings, self.arrays = settings, arrays if arrays is not None else self.arrays
        return replies


def test_what_the_aggregator_hands_upward_holds_no_individual_value(tmp_path, short_run):
    """Capture every CellResult run_cell hands upward and every message the aggregator holds;
    no client's plain update, example count or loss appears in any of it."""
    import fedlora.roles.cloud as federation
    from fedlora.roles.device import train_round

    captured = []
    real_run = federation.LocalCellRunner.run

    def spy_run(self, requests, **kw):
        results = real_run(self, requests, **kw)
        captured.extend(r.to_bytes() for r in results)
        return results

    federation.LocalCellRunner.run = spy_run
    try:
        transport = RecordingTransport(8)
        run_federation(short_run(*EIGHT_LAPTOPS), tmp_path / "r", transport)
    finally:
        federation.LocalCellRunner.run = real_run
    blob = b"".join(captured + transport.payloads)
    for c in range(8):  # recompute each client's plain update (training is deterministic)
        delta, metrics = train_round(transport.settings, transport.arrays, c)
        for v in delta.values():
            nonzero = v[np.abs(v) > 1e-6]
            assert nonzero.size and nonzero.tobytes()[:64] not in blob
        assert np.float32(metrics["train_loss"]).tobytes() not in blob
        assert float(metrics["train_loss"]).hex().encode() not in blob
    for data in captured:
        result = wire.loads(data, "cell-result")
        for st in result.clients.values():
            assert st.train_loss is None and st.num_examples is None
        assert result.plain is None and result.metrics == {}


def crash_in_round(n):
    """stage_fault that interrupts the run (as Ctrl-C would) at the first stage of round n."""
    def fault(server_round, stage, reply):
        if server_round == n:
            raise KeyboardInterrupt
        return reply
    return fault


def test_resume_with_secagg_equals_the_uninterrupted_run(tmp_path, short_run):
    cfg = short_run(*EIGHT_LAPTOPS, "federation.rounds=2", "federation.fraction=0.5")
    run_federation(cfg, tmp_path / "full", InProcessTransport(8))
    with pytest.raises(KeyboardInterrupt):
        run_federation(cfg, tmp_path / "broken", InProcessTransport(8, stage_fault=crash_in_round(2)))
    run_federation(cfg, tmp_path / "broken", InProcessTransport(8), resume=True)
    a, b = adapter(tmp_path / "full"), adapter(tmp_path / "broken")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert [r["secure"] for r in rounds_of(tmp_path / "full")] == [r["secure"] for r in rounds_of(tmp_path / "broken")]


def test_privacy_config_defaults_and_errors():
    assert compose([]).privacy.mode == "auto"
    assert compose(["privacy=secagg_dp"]).privacy.mode == "secagg_dp"
    with pytest.raises(ConfigError, match="privacy.delta"):
        compose(["privacy=secagg_dp", "privacy.delta=1.5"])
    with pytest.raises(ConfigError, match="privacy.clip_norm"):
        compose(["privacy=secagg_dp", "privacy.clip_norm=0"])
    with pytest.raises(ConfigError, match="privacy.bits=24"):
        resolve_run(compose(["privacy=secagg", "privacy.bits=24", "federation.num_clients=300"]))
    with pytest.raises(ConfigError, match="privacy.unmasker"):
        compose(["privacy.unmasker=edge"])
