"""Private set intersection (PSI) of ID columns: ECDH-PSI on Curve25519, transport-free.

Two parties with ID sets ``X`` and ``Y`` learn ``X ∩ Y`` and the other's set size, nothing else
(semi-honest model). Each picks a secret scalar (``a``, ``b``) and, with ``H`` the RFC 9380
random-oracle hash to the curve's prime-order subgroup:

1. ``blinded``: A sends ``{a·H(x)}``, B sends ``{b·H(y)}``, each in a fresh random order;
2. ``double_blind``: each multiplies the peer's points by its own secret and sends them back in
   the order received: A gets ``b·a·H(x)`` for each of its own ``x``, B gets ``a·b·H(y)``;
3. ``intersect``: A keeps the ``x`` whose ``ab·H(x)`` is among the ``ab·H(y)`` it computed in step
   2; B does the same. Both sort the matches by that shared value, so both hold the intersection
   in the same order (row ``i`` is the same person on both sides).

Under the decisional Diffie-Hellman assumption ``ab·H(y)`` for ``y`` not in ``X`` looks random to
A, and the shuffle in step 1 hides which of A's rows matched from B. Hashing as ``h(id)·G`` for a
fixed generator ``G`` would leak: ``a·h(x)·G`` and ``a·h(x')·G`` differ by the known factor
``h(x') / h(x)``, so the peer could test guessed IDs against our points without knowing ``a``;
hence a real hash to the curve, whose points have unknown logarithms.

**Curve and scalar multiplication.** Points are Montgomery u-coordinates (32 bytes, little
endian) on Curve25519, ``v^2 = u^3 + A u^2 + u`` over ``p = 2^255 - 19``, ``A = 486662``; group
order ``8 L``. ``k·P`` is X25519 (RFC 7748) from ``cryptography``: it clamps ``k`` to ``8 k'``, so
the result always lies in the prime-order subgroup, and u-coordinates commute:
``X25519(a, X25519(b, u)) = X25519(b, X25519(a, u))``. X25519 holds the GIL, so bulk work runs in
worker processes (one per core).

**Hash to the curve** (RFC 9380, suite ``curve25519_XMD:SHA-512_ELL2_RO_``, our own DST):

* ``expand_message_xmd`` with SHA-512 stretches ``(id, DST)`` to 96 bytes; each 48-byte half,
  read big-endian mod ``p``, is a field element ``u0``, ``u1`` (``hash_to_field``);
* Elligator 2 (``map_to_curve``): ``x1 = -A / (1 + 2 u^2)``; ``x = x1`` if ``g(x1) = x1^3 + A
  x1^2 + x1`` is a square, else ``x2 = 2 u^2 x1`` (then ``g(x2) = 2 u^2 g(x1)`` is one), ``y =
  sqrt(g(x))`` with ``sgn0(y) = 1`` exactly when ``x = x1``. One exponentiation per map: the
  straight-line form of RFC 9380 appendix G.2.1, on fractions ``x = xn / xd``;
* ``R = Q0 + Q1`` (chord: ``lambda = (y1 - y0) / (x1 - x0)``, ``x = lambda^2 - A - x0 - x1``),
  then ``P = 8 R`` by three x-only doublings ``x' = (x^2 - 1)^2 / (4 x (x^2 + A x + 1))``, kept
  projective so one inversion gives ``u(P)``. Its u-coordinate is RFC 9380's ``hash_to_curve``
  output (checked against the RFC's test vectors in the tests).

**What is checked.** The peer's points must be canonical (``u < p``) and on the curve (``g(u)`` a
square, so not on the twist); those we multiply must not be of small order (X25519 refuses them);
every received array must have the expected shape, dtype and row count and no repeated row; a
reply must name the exact message it answers (SHA-256 of its points). Anything else raises
``ValueError``. Malicious parties are out of scope: a peer that answers with other points than
``b·a·H(x)`` can drop IDs from our result, and by putting multiples of our own blinded points in
its set add IDs it does not hold; only zero-knowledge proofs of correct exponentiation
(malicious security) would prevent that.

Worker processes are started with ``spawn`` (safe beside threads), so a script that uses this
module from its top level needs the usual ``if __name__ == "__main__":`` guard.

Scalars are 32 bytes from :mod:`secrets`, fresh per :class:`PsiParty` (reusing one would link a
party's IDs across runs); shuffles use keys from ``os.urandom``.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

import gmpy2
import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from gmpy2 import mpz

from fedcrypt.core.messages import Payload

log = logging.getLogger(__name__)

P = mpz(2**255 - 19)
A = mpz(486662)
POINT_BYTES = 32
SUITE = "curve25519_XMD:SHA-512_ELL2_RO_"
#: Domain separation tag for hashing IDs (RFC 9380 section 3.1: application, version, suite).
DST = b"FEDCRYPT-PSI-V01-CS01-with-" + SUITE.encode()
#: Names the whole protocol in every message: parties must agree on it or they would match nothing.
PROTOCOL = "fedcrypt-psi-v1/ecdh-x25519/" + SUITE
BLINDED, DOUBLE = "blinded", "double"

_SQRT_M1 = gmpy2.powmod(2, (P - 1) // 4, P)  # a square root of -1 (p = 5 mod 8)
_C2 = gmpy2.powmod(2, (P + 3) // 8, P)
_C4 = (P - 5) // 8
_XMD_BLOCK = 128  # SHA-512's input block (RFC 9380's s_in_bytes)
_XMD_ZPAD = hashlib.sha512(bytes(_XMD_BLOCK))  # Z_pad fills exactly one block: hash it once
#: Below this many points a batch is not worth the worker processes.
_PARALLEL_MIN = 2048
_CHUNK_MAX = 32768
_P_LE = np.frombuffer(int(P).to_bytes(POINT_BYTES, "little"), dtype=np.uint8)

_POOL_LOCK = threading.Lock()
_pool: ProcessPoolExecutor | None = None
_pool_size = 0
_T = TypeVar("_T")


# --- RFC 9380: hash to curve25519 -------------------------------------------------------------


def expand_message_xmd(msg: bytes, dst: bytes, length: int) -> bytes:
    """RFC 9380 section 5.3.1 with SHA-512: ``length`` uniform bytes from ``msg`` and ``dst``."""
    ell = -(-length // 64)
    if ell > 255 or length > 65535 or len(dst) > 255:
        raise ValueError("expand_message_xmd: output or DST too long")
    dst_prime = dst + bytes([len(dst)])
    b0_hash = _XMD_ZPAD.copy()
    b0_hash.update(msg + length.to_bytes(2, "big") + b"\x00" + dst_prime)
    b0 = b0_hash.digest()
    blocks = [hashlib.sha512(b0 + b"\x01" + dst_prime).digest()]
    b0_int = int.from_bytes(b0, "big")
    for i in range(2, ell + 1):
        chained = (b0_int ^ int.from_bytes(blocks[-1], "big")).to_bytes(64, "big")
        blocks.append(hashlib.sha512(chained + bytes([i]) + dst_prime).digest())
    return b"".join(blocks)[:length]


def hash_to_field(msg: bytes, dst: bytes, count: int = 2) -> list[mpz]:
    """RFC 9380 section 5.2 for GF(p), ``L = 48``: ``count`` field elements from ``msg``."""
    uniform = expand_message_xmd(msg, dst, 48 * count)
    return [mpz(int.from_bytes(uniform[48 * i : 48 * i + 48], "big")) % P for i in range(count)]


def _elligator2(u: mpz) -> tuple[mpz, mpz, mpz]:
    """Elligator 2 on curve25519 as ``(xn, xd, y)`` with ``x = xn / xd`` (RFC 9380 G.2.1)."""
    tv1 = 2 * u * u % P
    xd = tv1 + 1  # nonzero: 2 u^2 is not a square, -1 is
    x1n = -A
    tv2 = xd * xd % P
    gxd = tv2 * xd % P  # g(x1) = gx1 / gxd
    gx1 = (tv2 - A * A * tv1) * x1n % P  # x1n^3 + A x1n^2 xd + x1n xd^2, as x1n = -A
    tv3 = gxd * gxd % P
    tv2 = tv3 * tv3 % P
    tv3 = tv3 * gxd * gx1 % P  # gx1 gxd^3
    y11 = gmpy2.powmod(tv2 * tv3 % P, _C4, P) * tv3 % P  # gx1 gxd^3 (gx1 gxd^7)^((p-5)/8)
    if y11 * y11 * gxd % P == gx1:
        x, y, square = x1n, y11, True
    elif y11 * y11 * gxd % P == P - gx1:
        x, y, square = x1n, y11 * _SQRT_M1 % P, True
    else:  # g(x2) = 2 u^2 g(x1) is a square; its root is y11 u sqrt(2) (times sqrt(-1) or not)
        x, y, square = x1n * tv1 % P, y11 * u * _C2 % P, False
        if y * y * gxd % P != gx1 * tv1 % P:
            y = y * _SQRT_M1 % P
    if int(y & 1) != square:  # sgn0(y) = 1 exactly for the x1 branch
        y = (P - y) % P
    return x % P, xd, y


def map_to_curve(u: int) -> tuple[int, int]:
    """RFC 9380 ``map_to_curve_elligator2`` for curve25519: the affine point ``(x, y)`` for ``u``."""
    xn, xd, y = _elligator2(mpz(u) % P)
    return int(xn * gmpy2.invert(xd, P) % P), int(y)


def hash_to_curve_u(msg: bytes, dst: bytes = DST) -> int:
    """The u-coordinate of RFC 9380 ``hash_to_curve(msg)`` for ``curve25519_XMD:SHA-512_ELL2_RO_``.

    Raises ``ValueError`` when the result is the identity (probability about ``2^-250``).
    """
    u0, u1 = hash_to_field(msg, dst)
    n0, d0, y0 = _elligator2(u0)
    n1, d1, y1 = _elligator2(u1)
    # R = Q0 + Q1 = X / Z: with diff = n1 d0 - n0 d1 (so x1 - x0 = diff / (d0 d1)), multiplying
    # lambda^2 - A - x0 - x1 by Z = diff^2 d0 d1 gives X = (y1 - y0)^2 (d0 d1)^3 - diff^2 (A d0 d1 + n0 d1 + n1 d0)
    d01 = d0 * d1 % P
    diff = (n1 * d0 - n0 * d1) % P
    if diff:
        dy = y1 - y0
        diff2 = diff * diff % P
        x = (dy * dy % P * (d01 * d01 % P) * d01 - diff2 * (A * d01 + n0 * d1 + n1 * d0)) % P
        z = diff2 * d01 % P
        doublings = 3
    elif y0 == y1:  # Q0 = Q1: R = 2 Q0
        x, z, doublings = n0, d0, 4
    else:  # Q0 = -Q1 (one map's x1 is the other's x2): R is the identity
        x, z, doublings = mpz(1), mpz(0), 0
    for _ in range(doublings):  # x-only doubling; P = 8 R clears the cofactor
        xx, zz, xz = x * x % P, z * z % P, x * z % P
        x, z = (xx - zz) ** 2 % P, 4 * xz * (xx + A * xz + zz) % P
    if not z:
        raise ValueError(f"{msg!r} hashes to the identity point")
    return int(x * gmpy2.invert(z, P) % P)


# --- bulk work: runs in worker processes ------------------------------------------------------


def _key(secret: bytes) -> Callable[[bytes], bytes]:
    exchange = X25519PrivateKey.from_private_bytes(secret).exchange
    return lambda u: exchange(X25519PublicKey.from_public_bytes(u))


def _on_curve(data: bytes) -> int:
    """The index of the first point (of the concatenated 32-byte points) not on the curve, or -1."""
    for index in range(len(data) // POINT_BYTES):
        u = mpz(int.from_bytes(data[POINT_BYTES * index : POINT_BYTES * index + POINT_BYTES], "little"))
        if gmpy2.legendre(u * (u * u + A * u + 1) % P, P) != 1:
            return index
    return -1


def _blind_chunk(secret: bytes, ids: list[bytes], dst: bytes) -> bytes:
    """``secret · H(id)`` for each ID, concatenated."""
    multiply = _key(secret)
    return b"".join(multiply(hash_to_curve_u(i, dst).to_bytes(POINT_BYTES, "little")) for i in ids)


def _check_chunk(data: bytes, start: int) -> None:
    """Raise if a point (of the concatenated points, the first being number ``start``) is off the curve."""
    bad = _on_curve(data)
    if bad >= 0:
        raise ValueError(f"point {start + bad} is not on curve25519 (twist point or garbage)")


def _multiply_chunk(secret: bytes, data: bytes, start: int) -> bytes:
    """``secret · point`` for each received point (concatenated), after checking it is on the curve."""
    _check_chunk(data, start)
    multiply = _key(secret)
    out = []
    for index in range(0, len(data), POINT_BYTES):
        try:
            out.append(multiply(data[index : index + POINT_BYTES]))
        except ValueError:
            raise ValueError(f"point {start + index // POINT_BYTES} has small order") from None
    return b"".join(out)


def _executor(workers: int) -> ProcessPoolExecutor:
    """A process pool of ``workers`` kept for the life of this process (workers start once)."""
    global _pool, _pool_size
    with _POOL_LOCK:
        if _pool is None or _pool_size != workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            # spawn, not fork: safe in a process that already runs threads (gRPC, the pool's own)
            _pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            _pool_size = workers
        return _pool


def _map_chunks(task: Callable[..., _T], jobs: Sequence[tuple[Any, ...]], size: int, workers: int) -> list[_T]:
    """``task(*job)`` for each job, in worker processes when ``size`` (points) is large enough."""
    global _pool
    if workers > 1 and size >= _PARALLEL_MIN:
        pool = _executor(workers)
        try:
            return list(pool.map(task, *zip(*jobs, strict=True)))
        except BrokenProcessPool:
            log.warning("a PSI worker process died; computing in this process")
            with _POOL_LOCK:
                if _pool is pool:
                    _pool = None
    return [task(*job) for job in jobs]


def _spans(count: int, workers: int) -> Iterable[tuple[int, int]]:
    """Chunks of ``range(count)``: about four per worker (so they finish together), bounded."""
    step = max(1, min(_CHUNK_MAX, -(-count // (4 * workers))))
    return ((start, min(start + step, count)) for start in range(0, count, step))


# --- checks on received messages --------------------------------------------------------------


def _points(payload: Payload, step: str, what: str) -> np.ndarray:
    """The ``(n, 32)`` uint8 points of a message of ``step``, with its metadata and layout checked."""
    if not isinstance(payload, Payload):
        raise ValueError(f"{what}: expected a Payload, got {type(payload).__name__}")
    meta = payload.meta
    if meta.get("protocol") != PROTOCOL:
        raise ValueError(f"{what}: protocol {meta.get('protocol')!r}, expected {PROTOCOL!r}")
    if meta.get("step") != step:
        raise ValueError(f"{what}: step {meta.get('step')!r}, expected {step!r}")
    count = meta.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"{what}: count must be a positive integer, got {count!r}")
    if set(payload.arrays) != {"points"}:
        raise ValueError(f"{what}: expected exactly the array 'points', got {sorted(payload.arrays)}")
    blob = payload.arrays["points"]
    dtype, shape = getattr(blob, "dtype", None), tuple(getattr(blob, "shape", ()))
    if dtype != np.uint8 or shape != (count, POINT_BYTES):
        raise ValueError(f"{what}: points must be uint8 of shape ({count}, {POINT_BYTES}), got {dtype} {shape}")
    points = np.ascontiguousarray(np.asarray(blob))
    top = points[:, -1]
    # u >= p: top byte 0x7f, bytes 1..30 all 0xff, first byte >= 0xed (p = 2^255 - 19); or bit 255 set
    high = (top > 0x7F) | ((top == 0x7F) & (points[:, 1:-1] == 0xFF).all(axis=1) & (points[:, 0] >= _P_LE[0]))
    if high.any():
        raise ValueError(f"{what}: point {int(np.argmax(high))} is not a canonical field element (u >= p)")
    rows = points.view(f"V{POINT_BYTES}").ravel()
    order = np.argsort(rows, kind="stable")
    repeated = np.flatnonzero(rows[order[1:]] == rows[order[:-1]])
    if repeated.size:
        first, second = sorted(int(i) for i in order[repeated[0] : repeated[0] + 2])
        raise ValueError(f"{what}: points {first} and {second} are equal (tampered or replayed)")
    return points


def _digest(points: np.ndarray) -> str:
    return hashlib.sha256(points.data).hexdigest()


def _message(step: str, points: np.ndarray, **meta: Any) -> Payload:
    return Payload({"protocol": PROTOCOL, "step": step, "count": len(points), **meta}, {"points": points})


def _to_array(chunks: list[bytes], count: int) -> np.ndarray:
    return np.frombuffer(b"".join(chunks), dtype=np.uint8).reshape(count, POINT_BYTES)


def _encode_ids(ids: Sequence[str]) -> list[bytes]:
    """IDs as UTF-8 bytes; rejects empty lists, non-strings, duplicates and unencodable strings."""
    if isinstance(ids, (str, bytes)):
        raise TypeError("ids must be a sequence of strings, not one string")
    if len(ids) == 0:
        raise ValueError("PSI needs at least one ID")
    encoded = []
    for index, value in enumerate(ids):
        if not isinstance(value, str):
            raise TypeError(f"ID {index} is {type(value).__name__}, not str: {value!r}")
        try:
            encoded.append(value.encode("utf-8"))
        except UnicodeEncodeError:
            raise ValueError(f"ID {index} ({value!r}) is not valid Unicode (lone surrogate)") from None
    if len(set(encoded)) != len(encoded):
        seen: dict[bytes, int] = {}
        for index, data in enumerate(encoded):
            if data in seen:
                raise ValueError(f"duplicate ID {ids[index]!r} (rows {seen[data]} and {index}); IDs must be unique")
            seen[data] = index
    return encoded


def _random_permutation(count: int) -> np.ndarray:
    """A uniformly random permutation: sort by 64-bit keys from ``os.urandom``, redrawn on a tie."""
    while True:
        keys = np.frombuffer(os.urandom(8 * count), dtype=np.uint64)
        order = np.argsort(keys, kind="stable")
        if count < 2 or not (keys[order[1:]] == keys[order[:-1]]).any():
            return order


# --- the protocol -----------------------------------------------------------------------------


class PsiParty:
    """One party of a two-party PSI over its ``ids``; messages are :class:`Payload` objects.

    Order of calls (both parties alike)::

        mine = party.blinded()                 # send to the peer
        reply = party.double_blind(theirs)     # theirs = the peer's blinded(); send reply back
        rows = party.intersect(peer_reply, reply)

    ``rows`` are indices into ``ids``, in the order both parties share. ``workers`` worker processes
    do the curve arithmetic (default: one per available core; 1 = this process only).
    """

    def __init__(self, ids: Sequence[str], *, workers: int | None = None) -> None:
        self._encoded = _encode_ids(ids)
        self.ids = list(ids)
        self._workers = workers if workers is not None else len(os.sched_getaffinity(0))
        if self._workers < 1:
            raise ValueError(f"workers must be at least 1, got {self._workers}")
        self._secret = secrets.token_bytes(POINT_BYTES)
        self._order = _random_permutation(len(self.ids))  # row j of our message is ids[_order[j]]
        self._blinded: Payload | None = None
        self._blinded_digest: str | None = None
        self._answer: str | None = None  # digest of our double_blind reply

    def blinded(self) -> Payload:
        """Our IDs hashed to the curve and multiplied by our secret, in a random order."""
        if self._blinded is None:
            started = time.perf_counter()
            shuffled = [self._encoded[i] for i in self._order]
            jobs = [(self._secret, shuffled[a:b], DST) for a, b in _spans(len(shuffled), self._workers)]
            points = _to_array(_map_chunks(_blind_chunk, jobs, len(shuffled), self._workers), len(shuffled))
            self._blinded, self._blinded_digest = _message(BLINDED, points), _digest(points)
            log.info("PSI: blinded %d IDs in %.2f s", len(points), time.perf_counter() - started)
        return self._blinded

    def double_blind(self, peer: Payload) -> Payload:
        """The peer's blinded points multiplied by our secret, in the order received."""
        started = time.perf_counter()
        points = _points(peer, BLINDED, "peer's blinded IDs")
        data = points.tobytes()
        jobs = [
            (self._secret, data[POINT_BYTES * a : POINT_BYTES * b], a) for a, b in _spans(len(points), self._workers)
        ]
        doubled = _to_array(_map_chunks(_multiply_chunk, jobs, len(points), self._workers), len(points))
        self._answer = _digest(doubled)
        log.info("PSI: double-blinded %d peer points in %.2f s", len(points), time.perf_counter() - started)
        return _message(DOUBLE, doubled, request=_digest(points))

    def intersect(self, own_double: Payload, peer_double: Payload) -> np.ndarray:
        """Indices into ``ids`` of the common IDs, in the order the peer gets too.

        ``own_double`` is the peer's reply to our :meth:`blinded`; ``peer_double`` is our own
        :meth:`double_blind` reply to the peer.
        """
        if self._blinded_digest is None or self._answer is None:
            raise ValueError("intersect needs blinded() and double_blind() first")
        own = _points(own_double, DOUBLE, "peer's reply")
        if own_double.meta.get("request") != self._blinded_digest or len(own) != len(self.ids):
            raise ValueError("peer's reply does not answer our blinded IDs (another message, or another size)")
        theirs = _points(peer_double, DOUBLE, "our reply")
        if _digest(theirs) != self._answer:
            raise ValueError("peer_double is not the reply this party computed in double_blind")
        data = own.tobytes()
        jobs = [(data[POINT_BYTES * a : POINT_BYTES * b], a) for a, b in _spans(len(own), self._workers)]
        _map_chunks(_check_chunk, jobs, len(own), self._workers)
        own_rows, their_rows = own.view(f"V{POINT_BYTES}").ravel(), theirs.view(f"V{POINT_BYTES}").ravel()
        sorted_theirs = np.sort(their_rows)
        at = np.minimum(np.searchsorted(sorted_theirs, own_rows), len(sorted_theirs) - 1)
        matched = np.flatnonzero(sorted_theirs[at] == own_rows)
        # shared order: the matches' common points, compared as big-endian 256-bit integers
        words = own[matched].view(">u8")
        common = matched[np.lexsort(words.T[::-1])]
        log.info("PSI: %d of our %d IDs are common (peer has %d)", len(common), len(own), len(theirs))
        return self._order[common].astype(np.int64)

    def intersection(self, own_double: Payload, peer_double: Payload) -> list[str]:
        """The common IDs themselves, in the shared order (see :meth:`intersect`)."""
        return [self.ids[i] for i in self.intersect(own_double, peer_double)]


def intersect_ids(a: Sequence[str], b: Sequence[str], *, workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Run both parties in this process: ``(idx_a, idx_b)`` with ``a[idx_a[i]] == b[idx_b[i]]``."""
    party_a, party_b = PsiParty(a, workers=workers), PsiParty(b, workers=workers)
    blinded_a, blinded_b = party_a.blinded(), party_b.blinded()
    reply_to_a, reply_to_b = party_b.double_blind(blinded_a), party_a.double_blind(blinded_b)
    return party_a.intersect(reply_to_a, reply_to_b), party_b.intersect(reply_to_b, reply_to_a)
