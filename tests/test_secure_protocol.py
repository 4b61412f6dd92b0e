"""The per-cell protocol end to end, and every property SECURE_AGGREGATION.md asks the tests to show.

Cells are small (5..12 clients, ~4k coordinates) so the whole file runs in seconds; one
test runs a 40-client cell on a Harary graph. Every random choice comes from seeded
cryptographic streams, so the statistical tests are deterministic.
"""

import dataclasses
import math

import numpy as np
import pytest

from fedlora.secure import (
    CellAborted,
    EncodingConfig,
    NeighbourhoodAggregator,
    ProtocolStateError,
    RejectedMessage,
    ShareRequestRefused,
    Stage,
    UnknownDevice,
    add_masked,
    decode_sum,
    remove_masks,
)
from fedlora.secure.client import ClientState
from fedlora.secure.encoding import encode_update
from fedlora.secure.identities import SimulatedIdentities
from fedlora.secure.keys import IdentityKey
from fedlora.secure.messages import AdvertiseKeys, MaskedInput, Roster, SignedHeader, UnmaskRequest, UnmaskResponse
from fedlora.secure.prg import SeededStream
from fedlora.secure.simulation import Enrolment

SHAPES = {"l0.lora_B.weight": (48, 40), "l1.lora_B.weight": (40, 50)}
GLOBAL = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
ENC = EncodingConfig(bits=16, clip=0.05, max_examples=1000)
SIZE = sum(math.prod(s) for s in SHAPES.values()) + 1


@pytest.fixture(scope="module")
def fed():
    return Enrolment(SimulatedIdentities(20240601))


def members(n, cell="n0"):
    return [f"{cell}-client-{i:02d}" for i in range(n)]


def header(fed, unmasker, cell="n0", n=10, t=6, server_round=1, **kw):
    return fed.cell_header(run_id="run-1", server_round=server_round, cell=cell, aggregator=f"agg-{cell}",
                           unmasker=unmasker, global_adapter=GLOBAL, threshold=t, max_clients=n, encoding=ENC, **kw)


def raw_updates(ids, seed, scale=0.01, counts=None):
    rng = np.random.default_rng(seed)  # test data only
    return {u: ({k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in SHAPES.items()},
                counts[i] if counts else ENC.max_examples) for i, u in enumerate(ids)}


def encoded(ids, seed):
    """q_u for each client, encoded here so the test knows the exact plain vectors."""
    out = {}
    for u, (update, n) in raw_updates(ids, seed, counts=[100 + 37 * i for i in range(len(ids))]).items():
        stream = SimulatedIdentities(seed).rng("rounding", u)
        out[u] = encode_update(update, n, _layout(), ENC, stream)
    return out


def _layout():
    from fedlora.secure.encoding import TensorLayout
    return TensorLayout.of(GLOBAL)


def plain_sum(qs, who):
    total = np.zeros(SIZE, np.uint32)
    for u in who:
        total += qs[u]
    return total


class Cell:
    """One cell's roles stepped by hand, so a test can intercept or forge messages."""

    def __init__(self, fed, hdr, ids):
        self.fed, self.hdr = fed, hdr
        self.clients = {u: fed.client(u, hdr) for u in ids}
        agg_id = hdr.header.aggregator
        self.agg = NeighbourhoodAggregator(agg_id, fed.enroll(agg_id), fed.registry, hdr)

    def to_upload(self, skip_shares=()):
        for client in self.clients.values():
            self.agg.receive_advert(client.advertise(self.hdr))
        self.roster = self.agg.close_advertising()
        for u in self.roster.members:
            if u not in skip_shares:
                self.agg.receive_shares(self.clients[u].share_keys(self.roster))
        self.deliveries = self.agg.close_sharing()
        return self

    def masked(self, u, q):
        return self.clients[u].masked_input(self.deliveries[u], q)

    def finish(self, unmasker):
        request, masked = self.agg.close_upload()
        for u in request.survivors:
            self.agg.receive_unmask_response(self.clients[u].unmask(request))
        mask = unmasker.unmask_cell(self.agg.close_unmask())
        return remove_masks(masked, [mask])


# ----------------------------------------------------------------------- masks cancel exactly


@pytest.mark.parametrize("prg", ["aes128-ctr", "chacha20"])
def test_masks_cancel_bit_exactly_in_one_cell(fed, prg):
    unmasker = fed.unmasker("cloud", 1)
    hdr, ids = header(fed, unmasker, prg=prg), members(10)
    qs = encoded(ids, seed=1)
    out = fed.run_cell(hdr, qs, unmasker)
    assert out.ok and out.survivors == tuple(ids) and out.dropped == {}
    assert not np.array_equal(out.masked_sum.vector, plain_sum(qs, ids))  # masked on the way
    plain = out.unmasked()
    assert plain.clients == 10 and np.array_equal(plain.vector, plain_sum(qs, ids))


def test_masks_cancel_through_every_tier(fed):
    """Three neighbourhoods (with dropouts) -> two sub-urban sums -> cloud: bit-exact."""
    unmasker = fed.unmasker("cloud", 1)
    plan = {"nA": (8, 5, {Stage.MASKED_INPUT: 1, Stage.UNMASK: 1}), "nB": (6, 4, {Stage.UNMASK: 2}),
            "nC": (5, 3, {Stage.MASKED_INPUT: 1})}
    outcomes, qs_all = {}, {}
    for seed, (cell, (n, t, drops)) in enumerate(plan.items()):
        ids = members(n, cell)
        qs = encoded(ids, seed=10 + seed)
        drop_at, k = {}, 0
        for stage, count in drops.items():
            for u in ids[k:k + count]:
                drop_at[u] = stage
            k += count
        outcomes[cell] = fed.run_cell(header(fed, unmasker, cell, n, t), qs, unmasker, drop_at=drop_at)
        assert outcomes[cell].ok, outcomes[cell].aborted
        qs_all.update({u: qs[u] for u in outcomes[cell].survivors})
    suburban_0 = add_masked([outcomes["nA"].masked_sum, outcomes["nB"].masked_sum], ENC)
    suburban_1 = add_masked([outcomes["nC"].masked_sum], ENC)
    cloud = add_masked([suburban_0, suburban_1], ENC)
    assert cloud.cells == {"nA", "nB", "nC"} and cloud.clients == len(qs_all) == 7 + 6 + 4
    plain = remove_masks(cloud, [o.mask for o in outcomes.values()])
    assert np.array_equal(plain.vector, plain_sum(qs_all, qs_all))
    # Two cells summed at a sub-urban tier, unmasked there (the optional sub-urban unmasker).
    sub_plain = remove_masks(suburban_0, [outcomes["nA"].mask, outcomes["nB"].mask])
    expected = plain_sum(qs_all, outcomes["nA"].survivors + outcomes["nB"].survivors)
    assert np.array_equal(sub_plain.vector, expected)
    with pytest.raises(ValueError, match=r"cells \['nC'\] are in the masked sum but have no mask"):
        remove_masks(cloud, [outcomes["nA"].mask, outcomes["nB"].mask])
    with pytest.raises(ValueError, match=r"cells \['nA'\] appear in two masked sums"):
        add_masked([suburban_0, outcomes["nA"].masked_sum], ENC)


def test_decoded_average_within_one_quantisation_step(fed):
    """Clients encode their own float updates (n_max examples each) through the protocol."""
    unmasker = fed.unmasker("cloud", 1)
    ids = members(12)
    updates = raw_updates(ids, seed=3)
    out = fed.run_cell(header(fed, unmasker, n=12, t=7), updates, unmasker, drop_at={ids[0]: Stage.MASKED_INPUT})
    decoded = decode_sum(out.unmasked().vector, _layout(), ENC, out.unmasked().clients)
    assert decoded.clients == 11 and decoded.examples == 11 * ENC.max_examples
    for name in SHAPES:
        exact = np.mean([updates[u][0][name].astype(np.float64) for u in out.survivors], axis=0)
        err = float(np.max(np.abs(decoded.mean()[name] - exact)))
        assert 0 < err < ENC.step(name), f"{name}: max error {err:.3g}, one step is {ENC.step(name):.3g}"


# ------------------------------------------------------------------------------- dropouts


@pytest.mark.parametrize("stage", [Stage.MASKED_INPUT, Stage.UNMASK], ids=["before-upload", "after-upload"])
@pytest.mark.parametrize("d", [1, 2, 4])
def test_dropouts_recovered_exactly(fed, stage, d):
    unmasker = fed.unmasker("cloud", 1)
    ids = members(10)
    qs = encoded(ids, seed=20 + d)
    dropped = ids[1::2][:d]
    out = fed.run_cell(header(fed, unmasker), qs, unmasker, drop_at={u: stage for u in dropped})
    assert out.ok, out.aborted
    # After upload the dropped clients' inputs are in the sum (their self masks are rebuilt
    # from shares); before upload they are not (their pair masks are rebuilt instead).
    expected = ids if stage == Stage.UNMASK else [u for u in ids if u not in dropped]
    assert out.survivors == tuple(expected)
    assert np.array_equal(out.unmasked().vector, plain_sum(qs, expected))


def test_dropouts_at_every_stage_together_up_to_n_minus_t(fed):
    unmasker = fed.unmasker("cloud", 1)
    ids = members(10)
    qs = encoded(ids, seed=30)
    drop_at = {ids[0]: Stage.ADVERTISE, ids[3]: Stage.SHARE_KEYS, ids[5]: Stage.MASKED_INPUT, ids[9]: Stage.UNMASK}
    out = fed.run_cell(header(fed, unmasker), qs, unmasker, drop_at=drop_at)
    assert out.ok, out.aborted
    expected = [u for u in ids if u not in (ids[0], ids[3], ids[5])]
    assert out.survivors == tuple(expected)
    assert np.array_equal(out.unmasked().vector, plain_sum(qs, expected))


@pytest.mark.parametrize("stage", list(Stage), ids=[s.value for s in Stage])
def test_below_t_the_cell_aborts_cleanly_and_releases_nothing(fed, stage):
    unmasker = fed.unmasker("cloud", 1)
    ids = members(10)
    out = fed.run_cell(header(fed, unmasker), encoded(ids, seed=40), unmasker,
                       drop_at={u: stage for u in ids[:5]})  # n - t + 1 = 5
    assert not out.ok and out.mask is None
    assert out.aborted.stage == stage.value and "t=6 needed" in out.aborted.reason
    if stage != Stage.UNMASK:
        assert out.masked_sum is None  # nothing left the neighbourhood
    with pytest.raises(ValueError, match="aborted, it has no sum"):
        out.unmasked()


def test_an_aborted_cell_leaves_other_cells_untouched(fed):
    unmasker = fed.unmasker("cloud", 1)
    ids_a, ids_b = members(8, "nA"), members(8, "nB")
    qs_b = encoded(ids_b, seed=51)
    bad = fed.run_cell(header(fed, unmasker, "nA", 8, 5), encoded(ids_a, seed=50), unmasker,
                       drop_at={u: Stage.UNMASK for u in ids_a[:4]})
    good = fed.run_cell(header(fed, unmasker, "nB", 8, 5), qs_b, unmasker)
    assert not bad.ok and bad.aborted.cell == "nA" and good.ok
    assert "4 survivors answered the unmask request, t=5 needed" in str(bad.aborted)
    # A tier that already added the aborted cell cannot have it taken out afterwards ...
    with pytest.raises(ValueError, match=r"cells \['nA'\] are in the masked sum but have no mask"):
        remove_masks(add_masked([bad.masked_sum, good.masked_sum], ENC), [good.mask])
    # ... so it adds again without it, and the other cell's sum is exact.
    plain = remove_masks(add_masked([good.masked_sum], ENC), [good.mask])
    assert np.array_equal(plain.vector, plain_sum(qs_b, ids_b))


def test_aborted_aggregator_refuses_to_go_on(fed):
    unmasker = fed.unmasker("cloud", 1)
    hdr, ids = header(fed, unmasker), members(10)
    cell = Cell(fed, hdr, ids)
    for u in ids[:5]:
        cell.agg.receive_advert(cell.clients[u].advertise(hdr))
    with pytest.raises(CellAborted, match="5 clients advertised keys, t=6 needed"):
        cell.agg.close_advertising()
    with pytest.raises(ProtocolStateError, match="aborted"):
        cell.agg.receive_advert(cell.clients[ids[6]].advertise(hdr))


# ------------------------------------------------------------------ intermediate tiers see noise

CHI2_LIMIT = 255 * (1 - 2 / (9 * 255) + 4.753 * math.sqrt(2 / (9 * 255))) ** 3  # chi2(255), p = 1e-6
KS_LIMIT = math.sqrt(math.log(2 / 1e-6) / 2)  # sqrt(n) * D, p = 1e-6
BIT_Z_LIMIT = 5.5  # worst of 32 bit positions, two-sided normal, p ~ 1e-6 overall


def uniformity(vectors):
    """(chi-square of the byte histogram, sqrt(n) * KS distance, worst per-bit z) of uint32 data."""
    v = np.concatenate([np.asarray(x, np.uint32) for x in vectors])
    counts = np.bincount(np.frombuffer(v.astype("<u4").tobytes(), np.uint8), minlength=256)
    expected = counts.sum() / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    u = np.sort(v.astype(np.float64) / 2**32)
    n = u.size
    ks = max(np.max(np.arange(1, n + 1) / n - u), np.max(u - np.arange(n) / n)) * math.sqrt(n)
    ones = ((v[:, None] >> np.arange(32, dtype=np.uint32)) & 1).sum(axis=0)
    bit_z = float(np.max(np.abs(ones - n / 2) / math.sqrt(n / 4)))
    return chi2, ks, bit_z


def looks_uniform(vectors):
    chi2, ks, bit_z = uniformity(vectors)
    return chi2 < CHI2_LIMIT and ks < KS_LIMIT and bit_z < BIT_Z_LIMIT


def test_what_intermediate_tiers_hold_is_indistinguishable_from_uniform(fed):
    unmasker = fed.unmasker("cloud", 1)
    ids_a, ids_b = members(10, "nA"), members(6, "nB")
    qs = {**encoded(ids_a, seed=60), **encoded(ids_b, seed=61)}
    cell = Cell(fed, header(fed, unmasker, "nA"), ids_a).to_upload()
    uploads = [cell.masked(u, qs[u]) for u in ids_a]  # what the neighbourhood aggregator sees
    for msg in uploads:
        cell.agg.receive_masked_input(msg)
    _, masked_a = cell.agg.close_upload()
    other = fed.run_cell(header(fed, unmasker, "nB", 6, 4), {u: qs[u] for u in ids_b}, unmasker)
    suburban = add_masked([masked_a, other.masked_sum], ENC)  # what a sub-urban cell sees
    assert looks_uniform([m.vector for m in uploads]), uniformity([m.vector for m in uploads])
    assert looks_uniform([masked_a.vector]), uniformity([masked_a.vector])
    assert looks_uniform([suburban.vector]), uniformity([suburban.vector])
    # The same statistics see through unmasked data at once: the tests have power.
    assert not looks_uniform([qs[u] for u in ids_a])
    assert not looks_uniform([plain_sum(qs, ids_a)])


# ------------------------------------------------------------- tampering, impersonation, replay


def test_bit_flipped_upload_is_rejected_and_leaves_no_trace(fed):
    unmasker = fed.unmasker("cloud", 1)
    ids = members(8)
    qs = encoded(ids, seed=70)
    cell = Cell(fed, header(fed, unmasker, n=8, t=5), ids).to_upload()
    msg = cell.masked(ids[0], qs[ids[0]])
    flipped = msg.vector.copy()
    flipped[123] ^= np.uint32(1 << 7)
    with pytest.raises(RejectedMessage, match="signature does not verify"):
        cell.agg.receive_masked_input(dataclasses.replace(msg, vector=flipped))
    bad_sig = bytes([msg.signature[0] ^ 1]) + msg.signature[1:]
    with pytest.raises(RejectedMessage, match="signature does not verify"):
        cell.agg.receive_masked_input(dataclasses.replace(msg, signature=bad_sig))
    with pytest.raises(RejectedMessage, match="uint32 vector of length"):
        cell.agg.receive_masked_input(dataclasses.replace(msg, vector=msg.vector[:-1]))
    cell.agg.receive_masked_input(msg)
    with pytest.raises(RejectedMessage, match="second upload"):
        cell.agg.receive_masked_input(msg)
    for u in ids[1:]:
        cell.agg.receive_masked_input(cell.masked(u, qs[u]))
    assert np.array_equal(cell.finish(unmasker).vector, plain_sum(qs, ids))


def test_upload_re_signed_by_someone_else_is_rejected(fed):
    unmasker = fed.unmasker("cloud", 1)
    ids = members(8)
    qs = encoded(ids, seed=71)
    cell = Cell(fed, header(fed, unmasker, n=8, t=5), ids).to_upload()
    msg = cell.masked(ids[0], qs[ids[0]])
    for signer in (fed.enroll(ids[1]), fed.enroll("agg-n0"), IdentityKey.from_seed(b"\x05" * 32)):
        forged = dataclasses.replace(msg, signature=signer.sign(MaskedInput.signed_bytes(msg.sid, msg.sender, msg.vector)))
        with pytest.raises(RejectedMessage, match=f"does not verify under the registered key of '{ids[0]}'"):
            cell.agg.receive_masked_input(forged)


def test_upload_replayed_from_an_earlier_round_is_rejected(fed):
    unmasker_1, unmasker_2 = fed.unmasker("cloud", 1), fed.unmasker("cloud", 2)
    ids = members(8)
    qs = encoded(ids, seed=72)
    round_1 = Cell(fed, header(fed, unmasker_1, n=8, t=5, server_round=1), ids).to_upload()
    old = round_1.masked(ids[0], qs[ids[0]])
    round_2 = Cell(fed, header(fed, unmasker_2, n=8, t=5, server_round=2), ids).to_upload()
    with pytest.raises(RejectedMessage, match="for another session .*replayed from another round or cell"):
        round_2.agg.receive_masked_input(old)
    with pytest.raises(RejectedMessage, match="signature does not verify"):  # sid field rewritten
        round_2.agg.receive_masked_input(dataclasses.replace(old, sid=round_2.agg.sid))


def test_upload_replayed_into_another_cell_is_rejected(fed):
    unmasker = fed.unmasker("cloud", 1)
    ids_a, ids_b = members(8, "nA"), members(8, "nB")
    qs = encoded(ids_a, seed=73)
    cell_a = Cell(fed, header(fed, unmasker, "nA", 8, 5), ids_a).to_upload()
    cell_b = Cell(fed, header(fed, unmasker, "nB", 8, 5), ids_b).to_upload()
    msg = cell_a.masked(ids_a[0], qs[ids_a[0]])
    with pytest.raises(RejectedMessage, match="for another session"):
        cell_b.agg.receive_masked_input(msg)
    with pytest.raises(RejectedMessage, match="did not share keys in this session"):
        cell_b.agg.receive_masked_input(dataclasses.replace(msg, sid=cell_b.agg.sid))


def test_forged_and_replayed_key_messages_are_rejected(fed):
    unmasker = fed.unmasker("cloud", 1)
    ids = members(8)
    hdr_1 = header(fed, unmasker, n=8, t=5)
    hdr_2 = header(fed, unmasker, n=8, t=5, server_round=2)
    cell = Cell(fed, hdr_2, ids)
    old_advert = fed.client(ids[0], hdr_1).advertise(hdr_1)
    with pytest.raises(RejectedMessage, match="for another cell/round"):
        cell.agg.receive_advert(old_advert)
    advert = cell.clients[ids[0]].advertise(hdr_2)
    with pytest.raises(RejectedMessage, match="signature does not verify"):
        cell.agg.receive_advert(dataclasses.replace(advert, mask_key=bytes(31) + b"\x09"))
    cell.agg.receive_advert(advert)
    with pytest.raises(RejectedMessage, match="second key advertisement"):
        cell.agg.receive_advert(advert)
    for u in ids[1:]:
        cell.agg.receive_advert(cell.clients[u].advertise(hdr_2))
    roster = cell.agg.close_advertising()
    shares = cell.clients[ids[1]].share_keys(roster)
    swapped = (dataclasses.replace(shares.shares[0], ciphertext=b"x" * 40),) + shares.shares[1:]
    with pytest.raises(RejectedMessage, match="signature does not verify"):
        cell.agg.receive_shares(dataclasses.replace(shares, shares=swapped))
    with pytest.raises(RejectedMessage, match="for another session"):
        cell.agg.receive_shares(dataclasses.replace(shares, sid=bytes(32)))
    with pytest.raises(RejectedMessage, match="must be exactly its neighbours"):
        cell.agg.receive_shares(dataclasses.replace(shares, shares=shares.shares[1:]))


def test_tampered_share_is_rejected_by_its_receiver(fed):
    unmasker = fed.unmasker("cloud", 1)
    ids = members(6)
    cell = Cell(fed, header(fed, unmasker, n=6, t=4), ids).to_upload()
    delivery = cell.deliveries[ids[0]]
    item = delivery.shares[0]
    blob = bytearray(item.ciphertext)
    blob[-1] ^= 1
    tampered = dataclasses.replace(delivery, shares=(dataclasses.replace(item, ciphertext=bytes(blob)),)
                                   + delivery.shares[1:])
    q = encoded(ids, seed=74)[ids[0]]
    with pytest.raises(RejectedMessage, match=f"share from '{item.sender}': authentication failed"):
        cell.clients[ids[0]].masked_input(tampered, q)
    # A share redirected to another receiver does not open either (AD binds the receiver).
    redirected = dataclasses.replace(cell.deliveries[ids[1]], shares=(item,))
    with pytest.raises(RejectedMessage, match="authentication failed|not my neighbour"):
        cell.clients[ids[1]].masked_input(redirected, q)
    assert cell.clients[ids[0]].state == ClientState.SHARED  # rejection changed nothing
    cell.clients[ids[0]].masked_input(delivery, q)


# ------------------------------------------------------------------- the client's share ledger


def _request(fed, cell, survivors, dropped):
    agg_id = cell.hdr.header.aggregator
    sid = cell.agg.sid
    survivors, dropped = tuple(sorted(survivors)), tuple(sorted(dropped))
    signature = fed.enroll(agg_id).sign(UnmaskRequest.signed_bytes(sid, survivors, dropped))
    return UnmaskRequest(sid, survivors, dropped, agg_id, signature)


def _uploaded_cell(fed, ids, seed):
    unmasker = fed.unmasker("cloud", 1)
    qs = encoded(ids, seed=seed)
    cell = Cell(fed, header(fed, unmasker, n=len(ids), t=len(ids) // 2 + 1), ids).to_upload()
    for u in ids:
        cell.agg.receive_masked_input(cell.masked(u, qs[u]))
    return cell


def test_a_request_for_both_shares_of_one_client_is_refused(fed):
    ids = members(8)
    cell = _uploaded_cell(fed, ids, seed=80)
    me, victim = cell.clients[ids[0]], ids[3]
    with pytest.raises(ShareRequestRefused, match=f"names \\['{victim}'\\] both as survivors and as dropped"):
        me.unmask(_request(fed, cell, ids, [victim]))
    assert me.state == ClientState.ABORTED
    with pytest.raises(ProtocolStateError):
        me.unmask(_request(fed, cell, ids, []))


def test_the_ledger_refuses_the_other_share_in_a_later_request(fed):
    ids = members(8)
    cell = _uploaded_cell(fed, ids, seed=81)
    me, victim = cell.clients[ids[0]], ids[3]
    first = _request(fed, cell, ids, [])
    response = me.unmask(first)
    assert me.unmask(first).sender == response.sender  # asking the same again is fine
    others = [u for u in ids if u != victim]
    with pytest.raises(ShareRequestRefused, match=f"other secret of \\['{victim}'\\].*already revealed"):
        me.unmask(_request(fed, cell, others, [victim]))


def test_the_ledger_refuses_a_self_mask_share_after_a_mask_key_share(fed):
    ids = members(8)
    cell = _uploaded_cell(fed, ids, seed=83)
    me, victim = cell.clients[ids[0]], ids[3]
    me.unmask(_request(fed, cell, [u for u in ids if u != victim], [victim]))  # victim "dropped"
    with pytest.raises(ShareRequestRefused, match=f"other secret of \\['{victim}'\\]"):
        me.unmask(_request(fed, cell, ids, []))  # now victim "survived"


def test_unsafe_unmask_requests_are_refused(fed):
    ids = members(8)
    cell = _uploaded_cell(fed, ids, seed=82)
    with pytest.raises(ShareRequestRefused, match="does not list me as a survivor"):
        cell.clients[ids[0]].unmask(_request(fed, cell, ids[1:], [ids[0]]))
    with pytest.raises(ShareRequestRefused, match="4 survivors, fewer than t=5"):
        cell.clients[ids[1]].unmask(_request(fed, cell, ids[1:5], ids[5:]))
    forged = dataclasses.replace(_request(fed, cell, ids, []), signer=ids[3])
    with pytest.raises(RejectedMessage, match="not the cell aggregator"):
        cell.clients[ids[2]].unmask(forged)
    impostor = fed.enroll(ids[3]).sign(UnmaskRequest.signed_bytes(cell.agg.sid, tuple(ids), ()))
    with pytest.raises(RejectedMessage, match="signature does not verify"):
        cell.clients[ids[2]].unmask(dataclasses.replace(forged, signer=cell.hdr.header.aggregator, signature=impostor))
    assert cell.clients[ids[2]].state == ClientState.UPLOADED


# -------------------------------------------------------------------------------- unmasker


def test_unmasker_skips_a_corrupted_response_and_refuses_a_second_unmasking(fed):
    unmasker = fed.unmasker("cloud", 1)
    ids = members(8)
    qs = encoded(ids, seed=90)
    cell = Cell(fed, header(fed, unmasker, n=8, t=5), ids).to_upload()
    for u in ids:
        cell.agg.receive_masked_input(cell.masked(u, qs[u]))
    request, masked = cell.agg.close_upload()
    for u in request.survivors:
        response = cell.clients[u].unmask(request)
        if u == ids[2]:
            blob = bytearray(response.ciphertext)
            blob[30] ^= 4
            response = UnmaskResponse(response.sid, response.sender, bytes(blob))
        cell.agg.receive_unmask_response(response)
    bundle = cell.agg.close_unmask()
    mask = unmasker.unmask_cell(bundle)
    assert np.array_equal(remove_masks(masked, [mask]).vector, plain_sum(qs, ids))
    with pytest.raises(CellAborted, match="already unmasked once"):
        unmasker.unmask_cell(bundle)
    with pytest.raises(CellAborted, match="another round key"):
        fed.unmasker("cloud", 99).unmask_cell(bundle)


def test_a_lying_shareholder_aborts_the_cell_instead_of_corrupting_it(fed):
    """A survivor reveals a wrong share of someone's self-mask seed: with more than t shares
    the inconsistency is detected and the cell aborts, naming whose secret failed."""
    unmasker = fed.unmasker("cloud", 1)
    ids = members(8)
    qs = encoded(ids, seed=91)
    cell = Cell(fed, header(fed, unmasker, n=8, t=5), ids).to_upload()
    for u in ids:
        cell.agg.receive_masked_input(cell.masked(u, qs[u]))
    liar, victim = cell.clients[ids[1]], ids[4]
    b_share, s_share = liar._held[victim]
    liar._held[victim] = (dataclasses.replace(b_share, y=(b_share.y + 1)), s_share)
    request, _ = cell.agg.close_upload()
    for u in request.survivors:
        cell.agg.receive_unmask_response(cell.clients[u].unmask(request))
    with pytest.raises(CellAborted, match=f"self-mask secret of '{victim}' are unusable: .*does not lie on the polynomial"):
        unmasker.unmask_cell(cell.agg.close_unmask())


def _cell_with_a_liar(fed, seed, corrupt):
    """8 clients, t=5: ids[7] drops before upload, ids[5] and ids[6] stay silent at unmask,
    so exactly t=5 shares of each secret arrive; ids[1] corrupts its share of one secret."""
    unmasker = fed.unmasker("cloud", 1)
    ids = members(8)
    qs = encoded(ids, seed=seed)
    cell = Cell(fed, header(fed, unmasker, n=8, t=5), ids).to_upload()
    for u in ids[:7]:
        cell.agg.receive_masked_input(cell.masked(u, qs[u]))
    liar = cell.clients[ids[1]]
    corrupt(liar._held, ids)
    request, masked = cell.agg.close_upload()
    for u in ids[:5]:
        cell.agg.receive_unmask_response(cell.clients[u].unmask(request))
    return unmasker, cell.agg.close_unmask(), masked


def test_a_wrong_mask_key_share_is_caught_by_the_advertised_key(fed):
    def corrupt(held, ids):
        b_share, s_share = held[ids[7]]
        held[ids[7]] = (b_share, dataclasses.replace(s_share, y=s_share.y ^ 1))

    unmasker, bundle, _ = _cell_with_a_liar(fed, 93, corrupt)
    with pytest.raises(CellAborted, match=f"rebuilt mask key of '{members(8)[7]}' does not match the key it advertised"):
        unmasker.unmask_cell(bundle)


def test_a_wrong_self_mask_share_at_exactly_t_is_caught_by_the_count_check(fed):
    """t shares always interpolate to *some* seed; the wrong mask then leaves the count
    coordinate random, and decoding refuses instead of releasing a corrupted sum."""
    def corrupt(held, ids):
        b_share, s_share = held[ids[3]]
        held[ids[3]] = (dataclasses.replace(b_share, y=b_share.y ^ 1), s_share)

    unmasker, bundle, masked = _cell_with_a_liar(fed, 94, corrupt)
    plain = remove_masks(masked, [unmasker.unmask_cell(bundle)])
    with pytest.raises(ValueError, match="masks did not cancel"):
        decode_sum(plain.vector, _layout(), ENC, plain.clients)


def test_unmasker_rechecks_the_bundle(fed):
    unmasker = fed.unmasker("cloud", 1)
    ids = members(8)
    qs = encoded(ids, seed=92)
    cell = Cell(fed, header(fed, unmasker, n=8, t=5), ids).to_upload()
    for u in ids[:-1]:
        cell.agg.receive_masked_input(cell.masked(u, qs[u]))
    request, _ = cell.agg.close_upload()
    for u in request.survivors:
        cell.agg.receive_unmask_response(cell.clients[u].unmask(request))
    bundle = cell.agg.close_unmask()
    # The aggregator claims the last client never shared keys (so its pair masks stay in).
    lying = dataclasses.replace(bundle, shared=bundle.shared[:-1])
    with pytest.raises(CellAborted, match="dropped clients are not exactly"):
        unmasker.unmask_cell(lying)
    forged_roster = dataclasses.replace(bundle, roster=Roster(bundle.roster.header_digest, bundle.roster.adverts[1:]))
    with pytest.raises(CellAborted, match="not the cell aggregator's request for this session"):
        unmasker.unmask_cell(forged_roster)


# ---------------------------------------------------------------------------------- registry


def test_a_device_not_in_the_registry_cannot_join(fed):
    unmasker = fed.unmasker("cloud", 1)
    ids = members(8)
    hdr = header(fed, unmasker, n=9, t=5)
    from fedlora.secure.client import CellClient
    stranger = CellClient("stranger", IdentityKey.from_seed(b"\x07" * 32), fed.registry, rng=SeededStream(b"\x07" * 32))
    cell = Cell(fed, hdr, ids)
    advert = stranger.advertise(hdr)
    with pytest.raises(UnknownDevice, match="'stranger' is not in the registry"):
        cell.agg.receive_advert(advert)
    for u in ids:
        cell.agg.receive_advert(cell.clients[u].advertise(hdr))
    roster = cell.agg.close_advertising()
    assert "stranger" not in roster.members
    # An aggregator that slips the stranger into the roster is caught by every client.
    forged = Roster(roster.header_digest, tuple(sorted(roster.adverts + (advert,), key=lambda a: a.sender)))
    with pytest.raises(UnknownDevice, match="'stranger' is not in the registry"):
        cell.clients[ids[0]].share_keys(forged)


def test_only_the_cloud_issues_headers(fed):
    unmasker = fed.unmasker("cloud", 1)
    hdr = header(fed, unmasker)
    by_aggregator = SignedHeader.sign(hdr.header, fed.enroll("agg-n0"), "agg-n0")
    with pytest.raises(RejectedMessage, match="only 'cloud' issues headers"):
        fed.client(members(1)[0], hdr).advertise(by_aggregator)
    forged = SignedHeader(dataclasses.replace(hdr.header, threshold=7), "cloud", hdr.signature)
    with pytest.raises(RejectedMessage, match="signature does not verify"):
        fed.client(members(1)[0], hdr).advertise(forged)
    with pytest.raises(RejectedMessage, match="global adapter received differs"):
        fed.client(members(1)[0], hdr).advertise(hdr, {k: v + 1 for k, v in GLOBAL.items()})


def test_header_refuses_unsafe_parameters(fed):
    from fedlora.secure import UnsafeEncoding
    unmasker = fed.unmasker("cloud", 1)
    with pytest.raises(ValueError, match="more than half of max_clients=10"):
        header(fed, unmasker, t=5)
    with pytest.raises(UnsafeEncoding, match="70000 summands"):
        header(fed, unmasker, n=70_000, t=50, complete_graph_up_to=100)


# ------------------------------------------------------------------- counts, state, randomness


def test_example_counts_travel_only_as_sums(fed):
    unmasker = fed.unmasker("cloud", 1)
    ids = members(8)
    counts = [3, 500, 17, 1000, 250, 8, 999, 42]
    updates = raw_updates(ids, seed=100, counts=counts)
    cell = Cell(fed, header(fed, unmasker, n=8, t=5), ids).to_upload()
    assert {f.name for f in dataclasses.fields(MaskedInput)} == {"sid", "sender", "vector", "signature"}
    for u in ids:
        msg = cell.masked(u, cell.clients[u].encode(*updates[u]))
        assert int(msg.vector[-1]) != updates[u][1]  # the count slot is masked like the rest
        cell.agg.receive_masked_input(msg)
    plain = cell.finish(unmasker)
    decoded = decode_sum(plain.vector, _layout(), ENC, plain.clients)
    assert decoded.examples == sum(counts) and decoded.clients == 8
    assert {f.name for f in dataclasses.fields(decoded)} == {"total", "examples", "clients", "config"}


def _arrays_held(obj, seen=None):
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return [obj]
    if isinstance(obj, dict):
        return [a for v in obj.values() for a in _arrays_held(v, seen)]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [a for v in obj for a in _arrays_held(v, seen)]
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("fedlora"):
        return _arrays_held(vars(obj), seen)
    return []


def test_the_aggregator_keeps_only_the_running_sum(fed):
    unmasker = fed.unmasker("cloud", 1)
    ids = members(8)
    qs = encoded(ids, seed=110)
    cell = Cell(fed, header(fed, unmasker, n=8, t=5), ids).to_upload()
    for u in ids:
        cell.agg.receive_masked_input(cell.masked(u, qs[u]))
        held = _arrays_held(cell.agg)
        assert len(held) == 1 and held[0] is cell.agg._sum
    cell.agg.close_upload()
    assert _arrays_held(cell.agg) == []


def test_stages_must_come_in_order(fed):
    unmasker = fed.unmasker("cloud", 1)
    ids = members(6)
    cell = Cell(fed, header(fed, unmasker, n=6, t=4), ids)
    client = cell.clients[ids[0]]
    with pytest.raises(ProtocolStateError, match="masked_input called in state new, needs state shared"):
        client.masked_input(None, None)
    cell.to_upload()
    with pytest.raises(ProtocolStateError, match="arrived in stage masked-input, belongs to stage advertise"):
        cell.agg.receive_advert(AdvertiseKeys(b"", ids[0], b"", b"", b""))


def test_no_numpy_random_anywhere_in_a_session(fed, monkeypatch):
    """Masks, keys, shares and rounding all come from cryptographic streams."""
    unmasker = fed.unmasker("cloud", 1)
    ids = members(6)
    updates = raw_updates(ids, seed=120)  # test data made before numpy.random is disabled

    def forbidden(*args, **kwargs):
        raise AssertionError("numpy.random used inside secure aggregation")

    for name in ("default_rng", "random", "rand", "randint", "integers", "RandomState", "Generator", "seed"):
        if hasattr(np.random, name):
            monkeypatch.setattr(np.random, name, forbidden)
    out = fed.run_cell(header(fed, unmasker, n=6, t=4), updates, unmasker, drop_at={ids[0]: Stage.MASKED_INPUT})
    assert out.ok and out.unmasked().clients == 5


# -------------------------------------------------------------------------- Harary (SecAgg+)


def test_harary_cell_of_40_clients_recovers_dropouts_exactly(fed):
    unmasker = fed.unmasker("cloud", 1)
    ids = members(40, "big")
    qs = encoded(ids, seed=130)
    hdr = header(fed, unmasker, "big", n=40, t=7, complete_graph_up_to=20, graph_degree=10)
    drop_at = {ids[3]: Stage.MASKED_INPUT, ids[17]: Stage.MASKED_INPUT, ids[30]: Stage.UNMASK}
    out = fed.run_cell(hdr, qs, unmasker, drop_at=drop_at)
    assert out.ok, out.aborted
    expected = [u for u in ids if u not in (ids[3], ids[17])]
    assert np.array_equal(out.unmasked().vector, plain_sum(qs, expected))


def test_harary_cell_aborts_when_one_clients_holders_fall_below_t(fed):
    """Enough survivors overall, but one client's 11 holders lose 5: its seed cannot be rebuilt."""
    unmasker = fed.unmasker("cloud", 1)
    ids = members(40, "big")
    hdr = header(fed, unmasker, "big", n=40, t=7, complete_graph_up_to=20, graph_degree=10)
    graph = hdr.header.neighbour_graph(tuple(sorted(ids)))
    victim = ids[0]
    assert len(graph.holders(victim)) == 11
    near = sorted(graph.neighbours(victim))[:5]
    out = fed.run_cell(hdr, encoded(ids, seed=131), unmasker, drop_at={u: Stage.UNMASK for u in near})
    assert not out.ok and out.mask is None
    assert f"only 6 shares of the self-mask secret of '{victim}' arrived, t=7 needed" in out.aborted.reason
