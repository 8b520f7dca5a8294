"""ECDH-PSI: exact intersections in a shared order, RFC 9380 hashing, and refused bad input."""

from __future__ import annotations

import secrets
import string

import gmpy2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcrypt.core.messages import Payload, StageRes, from_bytes, to_bytes
from fedcrypt.vertical import psi
from fedcrypt.vertical.psi import PsiParty, intersect_ids

P, A = int(psi.P), int(psi.A)

# RFC 9380 appendix J.4.1, curve25519_XMD:SHA-512_ELL2_RO_: msg, P.x, u[0], u[1], Q0.x, Q0.y, Q1.x, Q1.y
RO_DST = b"QUUX-V01-CS02-with-curve25519_XMD:SHA-512_ELL2_RO_"
RO_VECTORS = [
    (
        "",
        "2de3780abb67e861289f5749d16d3e217ffa722192d16bbd9d1bfb9d112b98c0",
        "005fe8a7b8fef0a16c105e6cadf5a6740b3365e18692a9c05bfbb4d97f645a6a",
        "1347edbec6a2b5d8c02e058819819bee177077c9d10a4ce165aab0fd0252261a",
        "36b4df0c864c64707cbf6cf36e9ee2c09a6cb93b28313c169be29561bb904f98",
        "6cd59d664fb58c66c892883cd0eb792e52055284dac3907dd756b45d15c3983d",
        "3fa114783a505c0b2b2fbeef0102853c0b494e7757f2a089d0daae7ed9a0db2b",
        "76c0fe7fec932aaafb8eefb42d9cbb32eb931158f469ff3050af15cfdbbeff94",
    ),
    (
        "abc",
        "2b4419f1f2d48f5872de692b0aca72cc7b0a60915dd70bde432e826b6abc526d",
        "49bed021c7a3748f09fa8cdfcac044089f7829d3531066ac9e74e0994e05bc7d",
        "5c36525b663e63389d886105cee7ed712325d5a97e60e140aba7e2ce5ae851b6",
        "16b3d86e056b7970fa00165f6f48d90b619ad618791661b7b5e1ec78be10eac1",
        "4ab256422d84c5120b278cbdfc4e1facc5baadffeccecf8ee9bf3946106d50ca",
        "7ec29ddbf34539c40adfa98fcb39ec36368f47f30e8f888cc7e86f4d46e0c264",
        "10d1abc1cae2d34c06e247f2141ba897657fb39f1080d54f09ce0af128067c74",
    ),
    (
        "abcdef0123456789",
        "68ca1ea5a6acf4e9956daa101709b1eee6c1bb0df1de3b90d4602382a104c036",
        "6412b7485ba26d3d1b6c290a8e1435b2959f03721874939b21782df17323d160",
        "24c7b46c1c6d9a21d32f5707be1380ab82db1054fde82865d5c9e3d968f287b2",
        "71de3dadfe268872326c35ac512164850860567aea0e7325e6b91a98f86533ad",
        "26a08b6e9a18084c56f2147bf515414b9b63f1522e1b6c5649f7d4b0324296ec",
        "5704069021f61e41779e2ba6b932268316d6d2a6f064f997a22fef16d1eaeaca",
        "50483c7540f64fb4497619c050f2c7fe55454ec0f0e79870bb44302e34232210",
    ),
    (
        "q128_" + "q" * 128,
        "096e9c8bae6c06b554c1ee69383bb0e82267e064236b3a30608d4ed20b73ac5a",
        "5e123990f11bbb5586613ffabdb58d47f64bb5f2fa115f8ea8df0188e0c9e1b5",
        "5e8553eb00438a0bb1e7faa59dec6d8087f9c8011e5fb8ed9df31cb6c0d4ac19",
        "7a94d45a198fb5daa381f45f2619ab279744efdd8bd8ed587fc5b65d6cea1df0",
        "67d44f85d376e64bb7d713585230cdbfafc8e2676f7568e0b6ee59361116a6e1",
        "30506fb7a32136694abd61b6113770270debe593027a968a01f271e146e60c18",
        "7eeee0e706b40c6b5174e551426a67f975ad5a977ee2f01e8e20a6d612458c3b",
    ),
    (
        "a512_" + "a" * 512,
        "1bc61845a138e912f047b5e70ba9606ba2a447a4dade024c8ef3dd42b7bbc5fe",
        "20f481e85da7a3bf60ac0fb11ed1d0558fc6f941b3ac5469aa8b56ec883d6d7d",
        "017d57fd257e9a78913999a23b52ca988157a81b09c5442501d07fed20869465",
        "02d606e2699b918ee36f2818f2bc5013e437e673c9f9b9cdc15fd0c5ee913970",
        "29e9dc92297231ef211245db9e31767996c5625dfbf92e1c8107ef887365de1e",
        "38920e9b988d1ab7449c0fa9a6058192c0c797bb3d42ac345724341a1aa98745",
        "24dcc1be7c4d591d307e89049fd2ed30aae8911245a9d8554bf6032e5aa40d3d",
    ),
]
# RFC 9380 J.4.2, curve25519_XMD:SHA-512_ELL2_NU_: msg, u[0], Q.x, Q.y (one field element, one map)
NU_DST = b"QUUX-V01-CS02-with-curve25519_XMD:SHA-512_ELL2_NU_"
NU_VECTORS = [
    (
        "",
        "608d892b641f0328523802a6603427c26e55e6f27e71a91a478148d45b5093cd",
        "51125222da5e763d97f3c10fcc92ea6860b9ccbbd2eb1285728f566721c1e65b",
        "343d2204f812d3dfc5304a5808c6c0d81a903a5d228b342442aa3c9ba5520a3d",
    ),
    (
        "abc",
        "46f5b22494bfeaa7f232cc8d054be68561af50230234d7d1d63d1d9abeca8da5",
        "7d56d1e08cb0ccb92baf069c18c49bb5a0dcd927eff8dcf75ca921ef7f3e6eeb",
        "404d9a7dc25c9c05c44ab9a94590e7c3fe2dcec74533a0b24b188a5d5dacf429",
    ),
    (
        "abcdef0123456789",
        "235fe40c443766ce7e18111c33862d66c3b33267efa50d50f9e8e5d252a40aaa",
        "3fbe66b9c9883d79e8407150e7c2a1c8680bee496c62fabe4619a72b3cabe90f",
        "08ec476147c9a0a3ff312d303dbbd076abb7551e5fce82b48ab14b433f8d0a7b",
    ),
    (
        "q128_" + "q" * 128,
        "001e92a544463bda9bd04ddbe3d6eed248f82de32f522669efc5ddce95f46f5b",
        "227e0bb89de700385d19ec40e857db6e6a3e634b1c32962f370d26f84ff19683",
        "5f86ff3851d262727326a32c1bf7655a03665830fa7f1b8b1e5a09d85bc66e4a",
    ),
    (
        "a512_" + "a" * 512,
        "1a68a1af9f663592291af987203393f707305c7bac9c8d63d6a729bdc553dc19",
        "3bcd651ee54d5f7b6013898aab251ee8ecc0688166fce6e9548d38472f6bd196",
        "1bb36ad9197299f111b4ef21271c41f4b7ecf5543db8bb5931307ebdb2eaa465",
    ),
]
#: A point of order 8 on curve25519 (on the curve, so only X25519's zero check catches it).
ORDER_8 = 325606250916557431795983626356110631294008115727848805560023387167927233504


def _run(a: list[str], b: list[str]) -> tuple[list[str], list[str]]:
    idx_a, idx_b = intersect_ids(a, b, workers=1)
    return [a[i] for i in idx_a], [b[i] for i in idx_b]


def _exchange(a: PsiParty, b: PsiParty) -> tuple[Payload, Payload, Payload, Payload]:
    """(a's blinded, b's blinded, b's reply to a, a's reply to b)."""
    blinded_a, blinded_b = a.blinded(), b.blinded()
    return blinded_a, blinded_b, b.double_blind(blinded_a), a.double_blind(blinded_b)


def _message(step: str, points: np.ndarray, **meta: object) -> Payload:
    return Payload({"protocol": psi.PROTOCOL, "step": step, "count": len(points), **meta}, {"points": points})


def _le(u: int) -> np.ndarray:
    return np.frombuffer(u.to_bytes(32, "little"), dtype=np.uint8)


# --- hashing to the curve ----------------------------------------------------------------------


@pytest.mark.parametrize("vector", RO_VECTORS, ids=lambda v: v[0][:8] or "empty")
def test_hash_to_curve_matches_rfc9380_random_oracle_vectors(vector: tuple[str, ...]) -> None:
    msg, px, u0, u1, q0x, q0y, q1x, q1y = (vector[0].encode(), *(int(h, 16) for h in vector[1:]))
    assert psi.hash_to_field(msg, RO_DST) == [u0, u1]
    assert psi.map_to_curve(u0) == (q0x, q0y)
    assert psi.map_to_curve(u1) == (q1x, q1y)
    assert psi.hash_to_curve_u(msg, RO_DST) == px


@pytest.mark.parametrize("vector", NU_VECTORS, ids=lambda v: v[0][:8] or "empty")
def test_hash_to_field_and_map_match_rfc9380_nonuniform_vectors(vector: tuple[str, ...]) -> None:
    msg, u0, qx, qy = (vector[0].encode(), *(int(h, 16) for h in vector[1:]))
    assert psi.hash_to_field(msg, NU_DST, count=1) == [u0]
    assert psi.map_to_curve(u0) == (qx, qy)


def _sqrt(a: int) -> int:
    """A square root mod p (p = 5 mod 8, Atkin), for building exceptional inputs."""
    root = pow(a, (P + 3) // 8, P)
    root = root if root * root % P == a else root * pow(2, (P - 1) // 4, P) % P
    assert root * root % P == a
    return root


def _affine_double(x: int, y: int) -> tuple[int, int]:
    slope = (3 * x * x + 2 * A * x + 1) * pow(2 * y, -1, P) % P
    x2 = (slope * slope - A - 2 * x) % P
    return x2, (slope * (x - x2) - y) % P


def test_hash_to_curve_exceptional_sums(monkeypatch: pytest.MonkeyPatch) -> None:
    # Q0 = Q1: R = 2 Q0, P = 16 Q0 (checked with affine doublings, not the x-only ones)
    monkeypatch.setattr(psi, "hash_to_field", lambda msg, dst: [psi.mpz(5), psi.mpz(5)])
    point = psi.map_to_curve(5)
    for _ in range(4):
        point = _affine_double(*point)
    assert psi.hash_to_curve_u(b"same") == point[0]
    # Q0 = -Q1: one map's x1 equals the other's x2, so R is the identity
    for u1 in range(2, 200):
        x2, _ = psi.map_to_curve(u1)
        u0_squared = (-A * pow(x2, -1, P) - 1) * pow(2, -1, P) % P
        if x2 != -A * pow(1 + 2 * u1 * u1, -1, P) % P and gmpy2.legendre(u0_squared, P) == 1:
            break
    else:
        pytest.fail("no u1 below 200 gives an opposite pair")
    u0 = _sqrt(u0_squared)
    assert psi.map_to_curve(u0) == (x2, (-psi.map_to_curve(u1)[1]) % P)
    monkeypatch.setattr(psi, "hash_to_field", lambda msg, dst: [psi.mpz(u0), psi.mpz(u1)])
    with pytest.raises(ValueError, match="identity"):
        psi.hash_to_curve_u(b"opposite")


# --- the protocol: exact intersections ---------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ([f"id-{i}" for i in range(300)], [f"id-{i}" for i in range(150, 400)]),  # partial overlap
        ([f"a{i}" for i in range(50)], [f"b{i}" for i in range(70)]),  # disjoint
        ([f"x{i}" for i in range(80)], [f"x{i}" for i in range(80)][::-1]),  # identical
        (["only"], ["only"]),
        (["only"], ["other"]),
        (["", " ", "0", "00"], ["00", "", "O"]),  # empty string and look-alikes are distinct IDs
    ],
)
def test_intersection_is_exact_and_in_the_same_order_on_both_sides(a: list[str], b: list[str]) -> None:
    common_a, common_b = _run(a, b)
    assert common_a == common_b
    assert set(common_a) == set(a) & set(b)
    assert len(common_a) == len(set(a) & set(b))


def test_unicode_ids_compare_as_exact_strings() -> None:
    nfc, nfd = "caf\u00e9", "cafe\u0301"  # the same word, two normal forms: two IDs
    a = [nfc, "\u7530\u4e2d", "\U0001f600", "ß", "ΑΒΓ", "line\nbreak", "tab\t"]
    b = [nfd, "\u7530\u4e2d", "\U0001f600", "ss", "ΑΒΓ", "line\nbreak", "x"]
    common_a, common_b = _run(a, b)
    assert common_a == common_b
    assert set(common_a) == {"\u7530\u4e2d", "\U0001f600", "ΑΒΓ", "line\nbreak"}


def test_worker_processes_and_wire_encoding_give_the_same_exact_answer() -> None:
    rng = secrets.SystemRandom()
    universe = [f"customer-{rng.getrandbits(48):012x}" for _ in range(5000)]
    a, b = rng.sample(universe, 2600), rng.sample(universe, 2400)
    party_a, party_b = PsiParty(a, workers=2), PsiParty(b, workers=2)

    def wire(payload: Payload) -> Payload:
        message = from_bytes(to_bytes(StageRes(1, "psi", payload), job="job", sender="peer")).message
        assert isinstance(message, StageRes)
        return message.payload

    blinded_a, blinded_b = wire(party_a.blinded()), wire(party_b.blinded())
    reply_to_a, reply_to_b = party_b.double_blind(blinded_a), party_a.double_blind(blinded_b)
    rows_a = party_a.intersect(wire(reply_to_a), reply_to_b)
    rows_b = party_b.intersect(wire(reply_to_b), reply_to_a)
    assert rows_a.dtype == np.int64 and rows_b.dtype == np.int64
    assert [a[i] for i in rows_a] == [b[i] for i in rows_b] == party_a.intersection(wire(reply_to_a), reply_to_b)
    assert set(party_b.intersection(reply_to_b, reply_to_a)) == set(a) & set(b)
    assert blinded_a.arrays["points"].shape == (2600, 32)


@given(
    st.lists(st.text(alphabet=string.ascii_letters + "éü中😀", max_size=6), max_size=25, unique=True),
    st.lists(st.text(alphabet=string.ascii_letters + "éü中😀", max_size=6), max_size=25, unique=True),
    st.lists(st.text(alphabet=string.ascii_letters, min_size=7, max_size=9), min_size=1, max_size=10, unique=True),
)
@settings(max_examples=30, deadline=None)
def test_intersection_property(only_a: list[str], only_b: list[str], shared: list[str]) -> None:
    a = list(dict.fromkeys(only_a + shared))
    b = list(dict.fromkeys(shared + only_b))
    common_a, common_b = _run(a, b)
    assert common_a == common_b
    assert set(common_a) == set(a) & set(b)


def test_blinded_rows_are_shuffled_and_stable() -> None:
    ids = [f"row-{i}" for i in range(200)]
    party = PsiParty(ids, workers=1)
    blinded = party.blinded()
    assert party.blinded() is blinded  # one message, one order
    in_order = psi._blind_chunk(party._secret, [i.encode() for i in ids], psi.DST)
    rows = [bytes(row) for row in np.asarray(blinded.arrays["points"])]
    expected = [in_order[32 * i : 32 * i + 32] for i in range(len(ids))]
    assert sorted(rows) == sorted(expected)
    assert rows != expected  # a fixed order would show the peer where our matches sit


# --- refused input ------------------------------------------------------------------------------


def test_bad_id_lists_are_refused() -> None:
    with pytest.raises(ValueError, match="duplicate ID 'bob' \\(rows 1 and 3\\)"):
        PsiParty(["alice", "bob", "carol", "bob"])
    with pytest.raises(ValueError, match="at least one ID"):
        PsiParty([])
    with pytest.raises(TypeError, match="ID 1 is int"):
        PsiParty(["a", 7])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="not one string"):
        PsiParty("abc")
    with pytest.raises(ValueError, match="lone surrogate"):
        PsiParty(["ok", "\udc80"])
    with pytest.raises(ValueError, match="workers"):
        PsiParty(["a"], workers=0)
    with pytest.raises(ValueError, match="blinded\\(\\) and double_blind\\(\\) first"):
        party = PsiParty(["a"], workers=1)
        party.intersect(party.blinded(), party.blinded())


def test_malformed_blinded_messages_are_refused() -> None:
    party = PsiParty([f"id{i}" for i in range(4)], workers=1)
    good = PsiParty([f"p{i}" for i in range(4)], workers=1).blinded()
    points = np.asarray(good.arrays["points"])
    twist = next(u for u in range(2, 100) if gmpy2.legendre(u * (u * u + A * u + 1) % P, P) == -1)

    def with_row(row: int, value: np.ndarray) -> Payload:
        changed = points.copy()
        changed[row] = value
        return _message(psi.BLINDED, changed)

    cases = [
        (Payload({**good.meta, "protocol": "other"}, good.arrays), "protocol"),
        (Payload({**good.meta, "step": psi.DOUBLE}, good.arrays), "step"),
        (Payload({**good.meta, "count": 5}, good.arrays), "shape \\(5, 32\\)"),
        (Payload({**good.meta, "count": True}, good.arrays), "positive integer"),
        (Payload({**good.meta, "count": 0}, {"points": points[:0]}), "positive integer"),
        (Payload(good.meta, {"points": points, "extra": points}), "exactly the array"),
        (Payload(good.meta, {}), "exactly the array"),
        (Payload(good.meta, {"points": points.astype(np.int16)}), "uint8"),
        (Payload(good.meta, {"points": points[:, :31]}), "shape"),
        (Payload(good.meta, {"points": points.ravel()}), "shape"),
        (Payload(good.meta, {"points": points.tolist()}), "uint8"),  # type: ignore[dict-item]
        ("not a payload", "expected a Payload"),
        (with_row(2, _le(P)), "point 2 is not a canonical"),
        (with_row(1, _le(P + 5)), "point 1 is not a canonical"),
        (with_row(0, _le(9 + 2**255)), "point 0 is not a canonical"),  # bit 255 set
        (with_row(3, points[1]), "points 1 and 3 are equal"),
        (with_row(2, _le(twist)), "point 2 is not on curve25519"),
        (with_row(1, _le(0)), "point 1 is not on curve25519"),
        (with_row(3, _le(ORDER_8)), "point 3 has small order"),
        (with_row(0, _le(1)), "point 0 has small order"),
    ]
    for message, reason in cases:
        with pytest.raises(ValueError, match=reason):
            party.double_blind(message)  # type: ignore[arg-type]


def test_tampered_or_mismatched_replies_are_refused() -> None:
    a, b = PsiParty([f"id{i}" for i in range(6)], workers=1), PsiParty([f"id{i}" for i in range(3, 9)], workers=1)
    _, _, reply_to_a, reply_to_b = _exchange(a, b)
    assert list(a.intersection(reply_to_a, reply_to_b)) == list(b.intersection(reply_to_b, reply_to_a))
    points = np.asarray(reply_to_a.arrays["points"])

    def altered(changed: np.ndarray, **meta: object) -> Payload:
        return Payload({**reply_to_a.meta, **meta}, {"points": changed})

    twist = next(u for u in range(2, 100) if gmpy2.legendre(u * (u * u + A * u + 1) % P, P) == -1)
    off_curve = points.copy()
    off_curve[4] = _le(twist)
    repeated = points.copy()
    repeated[5] = repeated[0]
    other_session = PsiParty([f"id{i}" for i in range(6)], workers=1)
    c = PsiParty([f"id{i}" for i in range(3, 9)], workers=1)
    _, _, reply_to_other, _ = _exchange(other_session, c)
    cases = [
        (altered(off_curve), reply_to_b, "point 4 is not on curve25519"),
        (altered(repeated), reply_to_b, "points 0 and 5 are equal"),
        (altered(points, request="0" * 64), reply_to_b, "does not answer our blinded IDs"),
        (reply_to_other, reply_to_b, "does not answer our blinded IDs"),
        (altered(points[:5], count=5), reply_to_b, "does not answer our blinded IDs"),
        (reply_to_b, reply_to_a, "does not answer our blinded IDs"),  # arguments swapped
        (reply_to_a, reply_to_a, "not the reply this party computed"),
        (reply_to_a, a.blinded(), "step 'blinded', expected 'double'"),
    ]
    for own, theirs, reason in cases:
        with pytest.raises(ValueError, match=reason):
            a.intersect(own, theirs)
    # refused messages leave the party usable
    assert set(a.intersection(reply_to_a, reply_to_b)) == {"id3", "id4", "id5"}
