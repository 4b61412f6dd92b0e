"""Packed secure uploads (privacy.packing=auto): a ring of b + ceil(log2 n) bits, same sums, fewer bytes."""

import dataclasses
import math

import numpy as np
import pytest

from fedlora.secure import EncodingConfig, RejectedMessage, Stage, UnsafeEncoding, add_masked, decode_sum
from fedlora.secure.encoding import TensorLayout, encode_update, from_ring, levels, ring_bits, to_ring
from fedlora.secure.identities import SimulatedIdentities
from fedlora.secure.messages import MaskedInput, MaskedSum
from fedlora.secure.packing import pack, packed_size, reduce, unpack
from fedlora.secure.rounds import message, read_message
from fedlora.secure.simulation import Enrolment

SHAPES = {"a.lora_B.weight": (37, 29), "b.lora_B.weight": (13, 12)}  # 1,229 values: not a multiple of 8 bits at odd k
GLOBAL = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
LAYOUT = TensorLayout.of(GLOBAL)


def ring_config(k: int) -> EncodingConfig:
    """An encoding whose value coordinates live in Z_2^k (b = min(k, 16) bits, n = 2^(k - b) inputs)."""
    b = min(k, 16)
    config = EncodingConfig(bits=b, sum_clients=2 ** (k - b), max_examples=1)
    assert config.value_bits == k
    return config


def edge_vector(size: int, k: int, seed: int) -> np.ndarray:
    """Ring elements with every edge value of Z_2^k (0, 1, 2^(k-1) - 1, 2^(k-1), 2^k - 1) and random ones."""
    rng = np.random.default_rng(seed)  # test data only
    values = rng.integers(0, 2**k, size=size, dtype=np.uint64).astype(np.uint32)
    edges = [0, 1, 2 ** (k - 1) - 1, 2 ** (k - 1), 2**k - 1]
    values[: len(edges)] = edges
    values[-len(edges):] = edges
    return values


@pytest.mark.parametrize("k", range(2, 33))
def test_pack_unpack_round_trips_at_every_ring_width(k):
    config = ring_config(k)
    vector = np.append(edge_vector(LAYOUT.num_values, k, seed=k), np.uint32(2**32 - 1))  # the count keeps 32 bits
    data = pack(vector, LAYOUT, config)
    assert data.dtype == np.uint8 and data.size == packed_size(LAYOUT, config) == math.ceil(LAYOUT.num_values * k / 8) + 4
    assert np.array_equal(unpack(data, LAYOUT, config), vector)
    # a vector that is right mod 2^k but has high bits set (a uint32 sum) packs to the same bytes
    noisy = vector.copy()
    noisy[:-1] |= np.uint32(0xFFFFFFFF ^ (2**k - 1)) if k < 32 else np.uint32(0)
    assert np.array_equal(pack(noisy, LAYOUT, config), data)
    assert np.array_equal(reduce(noisy, config), vector)


@pytest.mark.parametrize("k", [13, 24])
def test_pack_unpack_across_chunks(k):
    layout = TensorLayout((("w", (65_536 + 11,)),))  # past one packing chunk, odd tail
    config = ring_config(k)
    vector = np.append(edge_vector(layout.num_values, k, seed=3), np.uint32(7))
    assert np.array_equal(unpack(pack(vector, layout, config), layout, config), vector)


def test_signed_values_at_the_ring_edge_decode_exactly():
    for k in (2, 9, 20, 31, 32):
        half = 2 ** (k - 1)
        signed = np.array([0, 1, -1, half - 1, -half], dtype=np.int64)
        assert from_ring(to_ring(signed), k).tolist() == signed.tolist()  # high bits of the uint32 ignored
        assert from_ring(to_ring(signed) & np.uint32(2**k - 1), k).tolist() == signed.tolist()


def test_unpacked_is_the_uint32_vector_of_before():
    off = EncodingConfig(bits=16)
    vector = np.arange(LAYOUT.size, dtype=np.uint32)
    assert pack(vector, LAYOUT, off) is vector and unpack(vector, LAYOUT, off) is vector
    assert packed_size(LAYOUT, off) == 4 * LAYOUT.size and off.value_bits == 32
    assert off.fields() == ("encoding", 16, off.clip.hex(), (), off.max_examples)  # the transcript of before
    assert EncodingConfig(bits=16, sum_clients=10).fields()[-1] == ("ring", 10, 20)


def test_ring_width_and_the_overflow_guard_at_the_ring_edge():
    assert ring_bits(16, 1) == 16 and ring_bits(16, 2) == 17 and ring_bits(16, 10) == 20 and ring_bits(16, 256) == 24
    assert ring_bits(12, 10) == 16 and ring_bits(8, 10) == 12 and ring_bits(16, 65_536) == 32 and ring_bits(30, 9) == 32
    config = EncodingConfig(bits=16, sum_clients=256, max_examples=1)
    assert config.value_bits == 24
    config.check_capacity(256)
    with pytest.raises(UnsafeEncoding, match="sum_clients=256"):
        config.check_capacity(257)
    # the ring itself: 256 * (2^15 - 1) <= 2^23 - 1 < 257 * (2^15 - 1)
    from fedlora.secure.encoding import check_overflow
    check_overflow(256, 16, ring=24)
    with pytest.raises(UnsafeEncoding, match="Z_2\\^24"):
        check_overflow(257, 16, ring=24)
    # 256 inputs all at +L (and all at -L) sum exactly in Z_2^24; the decoder refuses a 257th
    L = levels(16)
    for sign in (1, -1):
        one = np.append(to_ring(np.full(LAYOUT.num_values, sign * L)), np.uint32(1))
        total = np.zeros(LAYOUT.size, np.uint32)
        for _ in range(256):
            total = reduce(total + unpack(pack(one, LAYOUT, config), LAYOUT, config), config)
        assert np.max(total[:-1]) < 2**24
        decoded = decode_sum(total, LAYOUT, config, clients=256)
        assert decoded.examples == 256
        assert np.allclose(decoded.total["a.lora_B.weight"], sign * 256 * L * config.step("a.lora_B.weight"))
    with pytest.raises(UnsafeEncoding):
        decode_sum(total, LAYOUT, config, clients=257)
    with pytest.raises(UnsafeEncoding):
        add_masked([MaskedSum(frozenset({"x"}), 200, total), MaskedSum(frozenset({"y"}), 57, total)], config)
    with pytest.raises(UnsafeEncoding):
        EncodingConfig(bits=16, sum_clients=65_539)  # past what even Z_2^32 holds


# ----------------------------------------------------------------------- the protocol, packed


@pytest.fixture(scope="module")
def fed():
    return Enrolment(SimulatedIdentities(20261201))


def header(fed, unmasker, encoding, cell="n0", n=8, t=5):
    return fed.cell_header(run_id="run-pack", server_round=1, cell=cell, aggregator=f"agg-{cell}", unmasker=unmasker,
                           global_adapter=GLOBAL, threshold=t, max_clients=n, encoding=encoding)


def encoded(ids, encoding, seed):
    rng = np.random.default_rng(seed)  # test data only
    out = {}
    for i, u in enumerate(ids):
        update = {k: (rng.standard_normal(s) * 0.01).astype(np.float32) for k, s in SHAPES.items()}
        out[u] = encode_update(update, 100 + 37 * i, LAYOUT, encoding, SimulatedIdentities(seed).rng("rounding", u))
    return out


@pytest.mark.parametrize("bits", [16, 12, 8])
def test_packed_masked_sum_equals_the_plain_sum_with_dropouts(fed, bits):
    off = EncodingConfig(bits=bits, clip=0.05, max_examples=1000)
    on = dataclasses.replace(off, sum_clients=8)
    ids = [f"client-{i}" for i in range(8)]
    qs = encoded(ids, off, seed=bits)  # the same q_u under both: packing changes only the wire
    drops = {"client-2": Stage.MASKED_INPUT, "client-5": Stage.MASKED_INPUT, "client-6": Stage.UNMASK}
    survivors = [u for u in ids if u not in ("client-2", "client-5")]
    plain = np.zeros(LAYOUT.size, np.uint32)
    for u in survivors:
        plain += qs[u]
    decoded = {}
    for name, enc in (("off", off), ("on", on)):
        unmasker = fed.unmasker(f"cloud-{name}-{bits}", 1)
        out = fed.run_cell(header(fed, unmasker, enc, cell=f"cell-{name}-{bits}"), qs, unmasker, drop_at=drops)
        assert out.ok and list(out.survivors) == survivors
        unmasked = out.unmasked()
        assert np.array_equal(reduce(unmasked.vector.copy(), enc), reduce(plain.copy(), enc))
        decoded[name] = decode_sum(unmasked.vector, LAYOUT, enc, unmasked.clients)
    assert decoded["on"].examples == decoded["off"].examples == sum(100 + 37 * int(u[-1]) for u in survivors)
    for k in SHAPES:
        assert np.array_equal(decoded["on"].total[k], decoded["off"].total[k])  # bit-identical, not just close


def ready_to_mask(fed, enc: EncodingConfig, cell: str, *, n: int, t: int, seed: int):
    """One cell of ``n`` clients through advertising and key sharing: (ids, clients, its aggregator, its
    unmasker, each client's share deliveries, each client's encoded update) -- what masking needs."""
    ids = [f"{cell[0]}-{i}" for i in range(n)]
    unmasker = fed.unmasker(f"cloud-{cell}", 1)
    hdr = header(fed, unmasker, enc, cell=cell, n=n, t=t)
    clients = {u: fed.client(u, hdr) for u in ids}
    from fedlora.secure.aggregator import NeighbourhoodAggregator
    agg = NeighbourhoodAggregator(f"agg-{cell}", fed.enroll(f"agg-{cell}"), fed.registry, hdr)
    for c in clients.values():
        agg.receive_advert(c.advertise(hdr))
    roster = agg.close_advertising()
    for u in roster.members:
        agg.receive_shares(clients[u].share_keys(roster))
    return ids, clients, agg, unmasker, agg.close_sharing(), encoded(ids, enc, seed=seed)


def test_packed_uploads_look_uniform_and_weigh_k_bits_per_value(fed):
    enc = EncodingConfig(bits=8, clip=0.05, max_examples=1000, sum_clients=8)  # k = 11
    ids, clients, agg, _, deliveries, qs = ready_to_mask(fed, enc, "uniform", n=6, t=4, seed=9)
    for u in ids:
        msg = clients[u].masked_input(deliveries[u], qs[u])
        assert msg.vector.dtype == np.uint8 and msg.vector.size == math.ceil(LAYOUT.num_values * 11 / 8) + 4
        wire_bytes = len(message(msg))
        assert wire_bytes - msg.vector.size < 400  # sid, sender, signature, type names, framing
        values = unpack(read_message(message(msg), MaskedInput).vector, LAYOUT, enc)[:-1]
        # the masked values spread over all of Z_2^11 although |q| <= 127 (8-bit values)
        assert values.max() < 2**11 and abs(float(np.mean(values >> 10)) - 0.5) < 0.06
        agg.receive_masked_input(msg)


def test_a_packed_upload_of_the_wrong_length_or_padding_is_refused(fed):
    enc = EncodingConfig(bits=12, clip=0.05, max_examples=1000, sum_clients=5)  # k = 15: 5 padding bits
    ids, clients, agg, unmasker, deliveries, qs = ready_to_mask(fed, enc, "wrong", n=5, t=3, seed=5)
    msgs = {u: clients[u].masked_input(deliveries[u], qs[u]) for u in ids}
    msg = msgs["w-0"]
    assert (LAYOUT.num_values * 15) % 8 != 0  # the test needs padding bits
    short, long_ = msg.vector[:-1], np.append(msg.vector, np.uint8(0))
    padded = msg.vector.copy()
    padded[-5] |= 0x80  # a padding bit set
    unpacked = unpack(msg.vector, LAYOUT, enc)  # the right values, sent as 32-bit words
    for vector, why in ((short, "packed bytes"), (long_, "packed bytes"), (padded, "padding"), (unpacked, "packed bytes")):
        with pytest.raises(RejectedMessage, match=why):
            agg.receive_masked_input(dataclasses.replace(msg, vector=vector))
    for m in msgs.values():  # the refusals changed nothing: every real upload is still taken
        agg.receive_masked_input(m)
    request, masked = agg.close_upload()
    assert masked.clients == 5 and np.max(masked.vector[:-1]) < 2**15
    for u in request.survivors:
        agg.receive_unmask_response(clients[u].unmask(request))
    from fedlora.secure.unmasker import remove_masks
    plain = remove_masks(masked, [unmasker.unmask_cell(agg.close_unmask())])
    expected = np.zeros(LAYOUT.size, np.uint32)
    for q in qs.values():
        expected += q
    assert np.array_equal(reduce(plain.vector, enc), reduce(expected, enc))


def test_a_cell_bigger_than_its_ring_is_refused_by_the_header(fed):
    unmasker = fed.unmasker("cloud-big", 1)
    with pytest.raises(UnsafeEncoding, match="sum_clients=4"):
        header(fed, unmasker, EncodingConfig(bits=16, sum_clients=4), cell="big", n=5, t=3)


def test_tiers_add_packed_cell_sums_and_the_cloud_unmasks_their_total(fed):
    # two cells of 4, their masked sums added at a sub-urban tier in a ring sized for all 8 inputs
    enc = EncodingConfig(bits=8, clip=0.05, max_examples=1000, sum_clients=8)  # k = 11
    unmasker = fed.unmasker("cloud-tiers", 1)
    outs, qs = [], {}
    for cell in ("t0", "t1"):
        ids = [f"{cell}-{i}" for i in range(4)]
        q = encoded(ids, enc, seed=len(cell) + int(cell[-1]))
        qs.update(q)
        out = fed.run_cell(header(fed, unmasker, enc, cell=cell, n=4, t=3), q, unmasker)
        assert out.ok
        outs.append(out)
    total = add_masked([o.masked_sum for o in outs], enc)
    assert total.clients == 8 and np.max(total.vector[:-1]) < 2**11
    from fedlora.secure.unmasker import remove_masks
    plain = remove_masks(total, [o.mask for o in outs])
    expected = np.zeros(LAYOUT.size, np.uint32)
    for q in qs.values():
        expected += q
    assert np.array_equal(from_ring(plain.vector[:-1], 11), from_ring(expected[:-1]))
    assert int(plain.vector[-1]) == int(expected[-1])
    # a ring sized for fewer inputs than the tiers add refuses the sum instead of wrapping
    with pytest.raises(UnsafeEncoding):
        add_masked([o.masked_sum for o in outs], dataclasses.replace(enc, sum_clients=7))


# ----------------------------------------------------------------------- inside federated rounds

# Eight always-available laptops on the small6g tree (4 cells under 2 sub-urban cells), all in one round.
EIGHT_LAPTOPS = ("topology=small6g", "federation.num_clients=8", "federation.fraction=1.0",
                 "topology.profile_mix={rpi4: 0, phone: 0, car: 0, laptop: 1.0}", "topology.profiles.laptop.availability=1.0")


@pytest.mark.slow
@pytest.mark.parametrize("tree", [("federation.rounds=1",), ("federation.rounds=2", "topology.cloud_sync_every=2")],
                         ids=["sums-up-the-tree", "hierfavg-per-cell"])
def test_a_packed_secure_round_gives_the_unpacked_aggregate(tmp_path, short_run, tree):
    from safetensors.numpy import load_file

    from fedlora.roles.cloud import run_federation
    from fedlora.roles.local import InProcessTransport
    from fedlora.runs import report

    for packing in ("off", "auto"):
        run_federation(short_run(*EIGHT_LAPTOPS, *tree, "privacy=secagg", f"privacy.packing={packing}"), tmp_path / packing,
                       InProcessTransport(8))
    off, on = (load_file(str(tmp_path / p / "adapter" / "adapter_model.safetensors")) for p in ("off", "auto"))
    assert off.keys() == on.keys() and all(np.array_equal(off[k], on[k]) for k in off)  # the same decoded sums
    r_off, r_on = report.read_rounds(tmp_path / "off"), report.read_rounds(tmp_path / "auto")
    for a, b in zip(r_off, r_on):
        assert a["participants"] == b["participants"] == list(range(8)) and a["num_examples"] == b["num_examples"]
        assert a["train_loss"] == b["train_loss"] and all(c["ok"] for c in b["secure"]["cells"].values())
    up = lambda r: sum(r["bytes"]["up"].values())  # noqa: E731  the network model's uploads, every link
    assert up(r_on[0]) < up(r_off[0])


def test_privacy_packing_setting():
    from fedlora.config import ConfigError, compose
    from fedlora.run_settings import resolve_run

    assert compose(["privacy=secagg"]).privacy.packing == "off"
    assert compose(["privacy=secagg", "privacy.packing=auto"]).privacy.packing == "auto"
    with pytest.raises(ConfigError, match="privacy.packing"):
        compose(["privacy=secagg", "privacy.packing=32"])
    settings = resolve_run(compose(["privacy=secagg", "privacy.packing=auto"])).secure_settings({"w": (2, 3)})
    assert settings.packing == "auto" and settings.encoding.sum_clients == 0  # the cloud sizes the ring per round
