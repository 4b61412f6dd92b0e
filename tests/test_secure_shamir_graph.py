"""Shamir secret sharing over GF(2^521 - 1) and the cell neighbour graphs."""

import itertools

import pytest

from fedlora import transcript
from fedlora.secure import shamir
from fedlora.secure.graph import COMPLETE, HARARY, cell_graph, complete_graph, harary_graph, secagg_plus_parameters
from fedlora.secure.prg import SeededStream

# ---------------------------------------------------------------------------------- Shamir

# f(x) = 1234 + 166 x + 94 x^2 (the textbook example): the same integers over any field this big.
TEXTBOOK = [shamir.Share(1, 1494), shamir.Share(2, 1942), shamir.Share(3, 2578), shamir.Share(4, 3402),
            shamir.Share(5, 4414), shamir.Share(6, 5614)]


def test_field_is_the_mersenne_prime_2_521_minus_1():
    assert shamir.PRIME == 2**521 - 1
    assert pow(3, shamir.PRIME - 1, shamir.PRIME) == 1  # Fermat check (the prime is well known)


def test_textbook_known_answer():
    assert [shamir.evaluate([1234, 166, 94], s.x) for s in TEXTBOOK] == [s.y for s in TEXTBOOK]
    for subset in itertools.combinations(TEXTBOOK, 3):
        assert shamir.combine(subset, 3) == 1234
    assert shamir.combine(TEXTBOOK, 3) == 1234  # extra shares are checked, then agree


def test_split_pinned_known_answer():
    shares = shamir.split(1234, 3, [1, 2, 3, 4, 5], SeededStream(bytes(32)))
    assert [s.x for s in shares] == [1, 2, 3, 4, 5]
    digest = transcript.digest(tuple((s.x, s.y) for s in shares)).hex()
    assert digest == "964f9cc4fb50566a85bfe404f066f258e4a86e894eece7a152ace851c867bc5f"
    assert shamir.combine(shares[2:], 3) == 1234


def test_any_t_of_n_rebuild_a_32_byte_secret_and_fewer_do_not():
    secret = b"\x00\x07" + bytes(range(30))  # leading zero byte survives the round trip
    shares = shamir.split_bytes(secret, 4, list(range(1, 8)), SeededStream(b"\x01" * 32))
    for subset in itertools.combinations(shares, 4):
        assert shamir.combine_bytes(subset, 4, 32) == secret
    # With t-1 shares, every secret is equally consistent: interpolating them as if t-1
    # were enough gives an unrelated value, not the secret.
    assert shamir.combine_bytes(shares[:3], 3, 66) != secret.rjust(66, b"\x00")


def test_combine_errors_name_the_problem():
    with pytest.raises(shamir.TooFewShares, match="2 shares given, 3 needed"):
        shamir.combine(TEXTBOOK[:2], 3)
    with pytest.raises(shamir.DuplicateShare, match="x=2 was given twice"):
        shamir.combine([TEXTBOOK[0], TEXTBOOK[1], TEXTBOOK[1]], 3)
    with pytest.raises(shamir.DuplicateShare, match="two different shares claim holder x=2"):
        shamir.combine([TEXTBOOK[0], TEXTBOOK[1], shamir.Share(2, 7), TEXTBOOK[2]], 3)
    corrupted = TEXTBOOK[:5] + [shamir.Share(6, 5615)]
    with pytest.raises(shamir.InconsistentShares, match="x=6 does not lie on the polynomial"):
        shamir.combine(corrupted, 3)
    with pytest.raises(shamir.ShamirError, match="not a point of the field"):
        shamir.combine([shamir.Share(0, 1)] + TEXTBOOK[:2], 3)


def test_split_refuses_bad_parameters():
    with pytest.raises(ValueError, match="threshold=4 must be between 1 and the number of holders"):
        shamir.split(1, 4, [1, 2, 3])
    with pytest.raises(ValueError, match="x=2 appears twice"):
        shamir.split(1, 2, [1, 2, 2])
    with pytest.raises(ValueError, match="x=0 is the secret"):
        shamir.split(1, 2, [0, 1])
    with pytest.raises(ValueError, match="at most 65 bytes"):
        shamir.split_bytes(bytes(66), 2, [1, 2])


# ----------------------------------------------------------------------------------- graph


def test_complete_graph_and_holders():
    g = complete_graph(["c", "a", "b"])
    assert g.kind == COMPLETE and g.members == ("a", "b", "c") and g.degree == 2
    assert g.neighbours("a") == {"b", "c"}
    assert g.holders("b") == ("a", "b", "c")
    assert [g.share_x(m) for m in g.members] == [1, 2, 3]


def test_harary_graph_is_k_regular_symmetric_and_seeded():
    members = [f"client-{i:03d}" for i in range(60)]
    for k in (10, 11):
        g = harary_graph(members, k, b"\x00" * 32)
        assert g.kind == HARARY
        assert all(len(g.neighbours(m)) == k for m in members)
        assert all(m not in g.neighbours(m) for m in members)
        assert all(m in g.neighbours(v) for m in members for v in g.neighbours(m))
        again = harary_graph(list(reversed(members)), k, b"\x00" * 32)
        assert all(again.neighbours(m) == g.neighbours(m) for m in members)  # deterministic
        other = harary_graph(members, k, b"\x01" * 32)
        assert any(other.neighbours(m) != g.neighbours(m) for m in members)  # the seed matters
    with pytest.raises(ValueError, match="odd degree needs an even number"):
        harary_graph(members[:59], 11, bytes(32))


def test_cell_graph_switches_to_harary_above_threshold():
    members = [f"c{i}" for i in range(30)]
    assert cell_graph(members, bytes(32), complete_up_to=30).kind == COMPLETE
    g = cell_graph(members, bytes(32), complete_up_to=20, degree=8)
    assert g.kind == HARARY and g.degree == 8


def test_secagg_plus_parameters_design_point():
    assert secagg_plus_parameters(1000) == (52, 37)
    assert secagg_plus_parameters(10) == (9, 6)
    k, t = secagg_plus_parameters(5000)
    assert k % 2 == 0 and 2 * t > k + 1 and k < 100


def test_threshold_check_names_the_rule():
    g = complete_graph([f"c{i}" for i in range(10)])
    g.check_threshold(6)
    with pytest.raises(ValueError, match="more than half of the 10 holders"):
        g.check_threshold(5)
    with pytest.raises(ValueError, match="exceeds the 10 holders"):
        g.check_threshold(11)
    with pytest.raises(ValueError, match="must be >= 2"):
        complete_graph(["a", "b"]).check_threshold(1)
