"""Known-answer and property tests of the secure-aggregation primitives.

Published vectors (NIST SP 800-38A, RFC 8439, RFC 7748, RFC 5869, RFC 8032) anchor the
library calls; pinned vectors (computed once with this code) fix our own layouts -- how a
seed becomes a mask, how a key is derived, how a transcript is encoded -- so that any
change that would make two versions disagree on a mask fails here first.
"""

import numpy as np
import pytest

from fedlora import transcript
from fedlora.secure import aead
from fedlora.secure.errors import RejectedMessage, UnknownDevice
from fedlora.secure.keys import (
    PAIR_MASK,
    SHARE_TRANSPORT,
    AgreementKey,
    DeviceRegistry,
    IdentityKey,
    derive_key,
    pair_key,
    verify_signature,
)
from fedlora.secure.prg import AES128_CTR, CHACHA20, SeededStream, keystream, mask_vector

h = bytes.fromhex

# ------------------------------------------------------------------------------------- PRG


def test_aes_ctr_prg_matches_nist_sp800_38a_f51():
    """seed = key || initial counter block, so the NIST CTR-AES128 vector is our keystream."""
    seed = h("2b7e151628aed2a6abf7158809cf4f3c") + h("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
    plaintext = h("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51")
    ciphertext = h("874d6191b620e3261bef6864990db6ce9806f66b7970fdff8617187bb9fffdff")
    stream = keystream(seed, 32, AES128_CTR)
    assert bytes(a ^ b for a, b in zip(stream, plaintext)) == ciphertext


def test_chacha20_prg_matches_rfc8439_a1_vector_1():
    """All-zero key, nonce and counter: RFC 8439 appendix A.1, test vector #1."""
    expected = h("76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
                 "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586")
    assert keystream(bytes(32), 64, CHACHA20) == expected


def test_mask_vector_pinned_known_answers():
    seed = bytes(range(32))
    assert mask_vector(seed, 8, AES128_CTR).tolist() == [
        1961885191, 1845745121, 300813968, 2475857038, 80069266, 42077400, 1652390214, 148830603]
    assert mask_vector(seed, 8, CHACHA20).tolist() == [
        2100034873, 1780073945, 1996733837, 1229642936, 1876440458, 3429555900, 1283312818, 2451892952]


def test_mask_vector_is_little_endian_keystream_and_prefix_stable():
    seed = bytes(range(32))
    for kind in (AES128_CTR, CHACHA20):
        words = mask_vector(seed, 1000, kind)
        assert words.dtype == np.uint32 and words.shape == (1000,)
        assert words.tobytes() == np.frombuffer(keystream(seed, 4000, kind), "<u4").astype("<u4").tobytes()
        # A longer mask starts with the shorter one: every client agrees whatever it asks for.
        assert np.array_equal(mask_vector(seed, 10, kind), words[:10])
    assert not np.array_equal(mask_vector(seed, 100), mask_vector(bytes(31) + b"\x01", 100))
    assert not np.array_equal(mask_vector(seed, 100, AES128_CTR), mask_vector(seed, 100, CHACHA20))


def test_prg_refuses_bad_seed_and_kind():
    with pytest.raises(ValueError, match="32 bytes"):
        mask_vector(bytes(16), 4)
    with pytest.raises(ValueError, match="not one of"):
        mask_vector(bytes(32), 4, "xorshift")


def test_seeded_stream_is_aes_ctr_from_zero_and_continues():
    s = SeededStream(bytes(32))
    assert s(16) == h("66e94bd4ef8a2c3b884cfa59ca342b2e")  # AES-128(0^128, 0^128)
    t = SeededStream(bytes(32))
    assert t(40)[16:] == s(24)
    u = SeededStream(bytes(32)).uniform(10_000)
    assert u.min() >= 0.0 and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.02


# ------------------------------------------------------------------------------------ keys


def test_ed25519_matches_rfc8032_test_1():
    key = IdentityKey.from_seed(h("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"))
    assert key.public_bytes == h("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    signature = key.sign(b"")
    assert signature == h("e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bac"
                          "c61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")
    assert verify_signature(key.public_bytes, b"", signature)
    assert not verify_signature(key.public_bytes, b"x", signature)


ALICE = h("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
BOB = h("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")


def test_x25519_matches_rfc7748_section_6_1():
    a, b = AgreementKey.from_private_bytes(ALICE), AgreementKey.from_private_bytes(BOB)
    assert a.public_bytes == h("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    assert b.public_bytes == h("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    shared = h("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
    assert a.agree(b.public_bytes) == b.agree(a.public_bytes) == shared
    assert AgreementKey.from_private_bytes(a.private_bytes()).public_bytes == a.public_bytes


def test_x25519_refuses_low_order_peer_key():
    with pytest.raises(RejectedMessage, match="unusable"):
        AgreementKey.from_private_bytes(ALICE).agree(bytes(32), "client-x")


def test_hkdf_sha256_matches_rfc5869_case_1():
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    okm = HKDF(hashes.SHA256(), 42, h("000102030405060708090a0b0c"), h("f0f1f2f3f4f5f6f7f8f9")).derive(b"\x0b" * 22)
    assert okm == h("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865")


def test_derive_key_pinned_known_answer_and_symmetry():
    a, b = AgreementKey.from_private_bytes(ALICE), AgreementKey.from_private_bytes(BOB)
    shared = a.agree(b.public_bytes)
    expected = h("6c2a54c4e074c3e40272ea656fa104980edcdab48864b3ee8cea5762e0aaed23")
    assert derive_key(shared, sid=bytes(32), purpose=PAIR_MASK, parties=("client-a", "client-b")) == expected
    assert pair_key(a, b.public_bytes, sid=bytes(32), purpose=PAIR_MASK, me="client-a", peer="client-b") == expected
    assert pair_key(b, a.public_bytes, sid=bytes(32), purpose=PAIR_MASK, me="client-b", peer="client-a") == expected


def test_derive_key_binds_session_purpose_and_parties():
    shared = AgreementKey.from_private_bytes(ALICE).agree(AgreementKey.from_private_bytes(BOB).public_bytes)
    base = derive_key(shared, sid=bytes(32), purpose=PAIR_MASK, parties=("a", "b"))
    assert derive_key(shared, sid=b"\x01" + bytes(31), purpose=PAIR_MASK, parties=("a", "b")) != base
    assert derive_key(shared, sid=bytes(32), purpose=SHARE_TRANSPORT, parties=("a", "b")) != base
    assert derive_key(shared, sid=bytes(32), purpose=PAIR_MASK, parties=("a", "c")) != base
    # Typed, length-prefixed info: moving a character between fields changes the key.
    assert derive_key(shared, sid=bytes(32), purpose=PAIR_MASK, parties=("ab", "")) != \
        derive_key(shared, sid=bytes(32), purpose=PAIR_MASK, parties=("a", "b"))


def test_registry_refuses_unknown_and_re_keyed_devices():
    registry = DeviceRegistry()
    alice, mallory = IdentityKey.from_seed(bytes(32)), IdentityKey.from_seed(b"\x01" * 32)
    registry.enroll("alice", alice.public_bytes)
    registry.enroll("alice", alice.public_bytes)  # same key again: fine
    with pytest.raises(ValueError, match="already enrolled with a different key"):
        registry.enroll("alice", mallory.public_bytes)
    with pytest.raises(UnknownDevice, match="'mallory' is not in the registry"):
        registry.check("mallory", b"m", mallory.sign(b"m"), "test message")
    registry.check("alice", b"m", alice.sign(b"m"), "test message")
    with pytest.raises(RejectedMessage, match="does not verify under the registered key of 'alice'"):
        registry.check("alice", b"m", mallory.sign(b"m"), "test message")
    registry.revoke("alice")
    with pytest.raises(UnknownDevice):
        registry.check("alice", b"m", alice.sign(b"m"), "test message")


# ------------------------------------------------------------------------------ transcript


def test_transcript_pinned_encoding_and_round_trip():
    encoded = transcript.encode("ab", b"\x01", 256, ("x",))
    assert encoded.hex() == "540000000453000000026162420000000101490000000201005400000001530000000178"
    assert transcript.decode(encoded) == ("ab", b"\x01", 256, ("x",))
    assert transcript.encode("ab", "c") != transcript.encode("a", "bc")
    assert transcript.encode(b"a") != transcript.encode("a")


def test_transcript_decoder_is_strict():
    encoded = transcript.encode("ab", 5)
    with pytest.raises(ValueError, match="trailing"):
        transcript.decode(encoded + b"\x00")
    with pytest.raises(ValueError, match="truncated"):
        transcript.decode(encoded[:-1])
    with pytest.raises(ValueError, match="non-minimal"):
        transcript.decode(bytes.fromhex("5400000001" "490000000200" "05"))
    with pytest.raises(TypeError):
        transcript.encode(True)
    with pytest.raises(ValueError):
        transcript.encode(-1)


# ------------------------------------------------------------------------------------ AEAD


def test_aead_round_trip_and_rejections():
    key, ad = bytes(range(32)), transcript.encode("share", b"sid", "a", "b")
    blob = aead.seal(key, b"secret share", ad, SeededStream(bytes(32)))
    assert aead.open_sealed(key, blob, ad, "share") == b"secret share"
    flipped = bytearray(blob)
    flipped[20] ^= 0x01
    with pytest.raises(RejectedMessage, match="share from a: authentication failed"):
        aead.open_sealed(key, bytes(flipped), ad, "share from a")
    with pytest.raises(RejectedMessage, match="authentication failed"):  # redirected to another receiver
        aead.open_sealed(key, blob, transcript.encode("share", b"sid", "a", "c"), "share")
    with pytest.raises(RejectedMessage, match="authentication failed"):
        aead.open_sealed(bytes(32), blob, ad, "share")
    with pytest.raises(RejectedMessage, match="too short"):
        aead.open_sealed(key, blob[:20], ad, "share")
