"""FATE-style hetero logistic regression: the guest holds the labels, hosts hold other features.

**Roles.** The *guest* holds the labels ``y`` in {0, 1} and some features of every row; one or more
*hosts* hold other features of the same rows (aligned by PSI beforehand); the *arbiter* holds the
Paillier key pair. Each party keeps its own weights: ``wx = X_g w_g + b + sum_h X_h w_h``, where
the intercept ``b`` is the guest's.

**Math** (Hardy et al. 2017, FATE's HeteroLR). With ``y' = 2y - 1``, the logistic loss is
expanded to second order around ``wx = 0``::

    loss = log(1 + e^(-y' wx)) ~ log 2 - y' wx / 2 + wx^2 / 8
    d    = dloss/dwx           ~ wx / 4 - y' / 2          (the residual)
    g_p  = X_p^T d / B + l2 w_p                          (party p's gradient, batch of B rows)

``d`` is linear in each party's ``wx_p``, so it can be formed under additive encryption. The
parties exchange ``d' = 4 d = wx - 2 y'`` and divide by 4 afterwards.

**One batch** (``[[v]]``: Paillier under the arbiter's key; every message a
:class:`~fedcrypt.core.messages.Payload` with the key fingerprint, epoch and batch number):

1. guest -> hosts, ``batch``: the batch's row numbers (the rows are the PSI intersection, known to all).
2. host -> guest, ``forward``: ``[[wx_h]]`` per row, and ``[[sum wx_h^2 + 4 B l2 |w_h|^2]]``
   when the loss is computed.
3. guest -> hosts, ``residual``: ``[[d']] = sum_h [[wx_h]] + Enc(wx_g - 2 y')`` with a *fresh*
   encryption: were the hosts' ciphertext randomness kept, a host could divide its own
   ``[[wx_h]]`` out and read ``wx_g - 2 y'``, that is the labels.
4. each party -> arbiter, ``masked``: ``[[P_p + r_p]]``. ``G_p = X_p^T d'`` is computed under
   encryption (ciphertext times plaintext: one multi-exponentiation per feature,
   :func:`_linear_combinations`), its values are packed into slots of a few plaintexts ``P_p``
   (:class:`_Slots`: the arbiter then decrypts one ciphertext per ~25 values, not one per value),
   and each gets a pad ``r_p`` uniform in ``Z_n`` from :mod:`secrets`, added as a fresh encryption
   of ``r_p`` (which re-randomizes it). The guest's request also carries its masked loss
   ``[[Lambda + r]]`` (below).
5. arbiter -> that party, ``decrypted``: ``P_p + r_p mod n``. The party removes ``r_p``, unpacks
   ``G_p`` and steps ``w_p -= lr_t (G_p / (4 B) + l2 w_p)``, ``lr_t = lr / (1 + decay * epoch)``
   (FATE's decay); the intercept is not penalized.

Before the first batch the arbiter sends its ``public_key`` and the guest a ``setup`` (row-list
digest, sizes, hyper-parameters) that each host checks against its own rows and features. As step
methods (a transport calls the same ones): ``Arbiter.public_key``; ``Guest.setup`` ->
``Host.setup``; then per batch ``Guest.batch`` -> ``Host.forward`` -> ``Guest.residual`` ->
``Host.masked_gradient`` -> ``Arbiter.decrypt`` -> ``Host.update`` (and the guest's own request
-> ``Arbiter.decrypt`` -> ``Guest.update``). Scoring: ``Host.predict_share`` ->
``Guest.masked_scores`` -> ``Arbiter.decrypt`` -> ``Guest.scores``. Every received payload is
checked (type, key fingerprint, epoch and batch, sender, array dtypes and shapes, ciphertexts
units modulo ``n^2``) before it is used, and refused with a :class:`ProtocolError` naming why.

**Loss** (monitoring only): ``Lambda = sum_i (wx_i^2 - 4 y'_i wx_i) = sum (wx_g^2 - 4 y' wx_g)
+ sum (2 wx_g - 4 y') [[wx_h]] + [[sum wx_h^2]]``, all linear in ciphertexts for one host, and
``loss = log 2 + Lambda / (8 B) + l2 / 2 |w|^2``. With two or more hosts the cross terms
``wx_h wx_h'`` would need a product of two ciphertexts, so, as in FATE, no loss is computed then
(``losses`` is None) unless the guest holds the key.

**Fixed point.** Scores and residuals are encrypted at scale ``2^VALUE_BITS`` (python-paillier's
``2^32``); features are standardized with each party's own training statistics and rounded to
``2^-FEATURE_BITS`` to serve as exponents, so gradients are exact at scale ``2^GRADIENT_BITS``
up to the rounding of ``wx`` (``2^-33`` per row). The exponents' length sets the cost of every
ciphertext-times-feature product; ``2^-13`` on a standardized feature is far below the noise of
mini-batch gradients, so 12 bits (exponents of ~16 bits) it is. Every party stops with an
``OverflowError`` if one of its scores ``|wx_p|`` passes ``MAX_SCORE`` (training diverged): that
bound sizes the gradient slots, so a slot never carries into the next (each also has a guard bit).

**What each party learns** (honest-but-curious parties, no collusion):

* *Arbiter*: the key, and ``P_p + r_p mod n`` for uniform ``r_p``: a one-time pad in ``Z_n``, so
  nothing of any gradient or loss; every ciphertext it receives was freshly re-randomized by the
  sender, so its randomness carries nothing either. It learns the shape of the job: parties,
  feature counts, rows, batches, epochs.
* *Host*: ``[[d']]`` (semantically secure) and its own gradient, i.e. ``X_h^T d`` for each batch:
  ``n_h`` linear combinations of the batch's residuals. With ``B <= n_h`` it could solve for
  ``d`` and so read the labels (``sign(d) = -y'`` while ``|wx| < 2``), which is why a host refuses
  batches of no more rows than it has features, and batches are cut so none is smaller than
  ``batch_size`` (a short last batch would leak most). Not the loss, not other parties' weights.
* *Guest*: ``[[wx_h]]`` (semantically secure) and its own gradient, which reveals ``X_g^T wx_h``
  (``n_g`` combinations of the host scores; the intercept's gradient, their sum) per batch, so it
  too refuses batches of no more rows than it has weights; and the batch's loss: one more number,
  ``sum_i (2 wx_g - 4 y')_i wx_h,i + sum wx_h^2 + 4 B l2 |w_h|^2``. At prediction: each row's
  total host score ``sum_h wx_h`` (it needs the sum for the probability; with one host that *is*
  the host's score), not each host's share of it (the arbiter sees the sum masked).
* *Nobody* sees another party's features, labels, weights or gradients in the clear.

**``arbiter="guest"``** (the guest holds the key, no third party) saves the arbiter, but the guest
decrypts ``[[wx_h]]``: it learns every host's score ``x_h,i . w_h`` of every training row in every
epoch. Between two sightings of row ``i`` the host's weights moved by ``-sum lr_t (X_h,b^T d'_b /
(4B) + l2 w_h)``: a combination of the rows of past batches with coefficients the guest knows (its
residuals), so the change of the score gives inner products ``x_h,i . x_h,k``; over epochs the
guest accumulates the hosts' Gram matrix, i.e. their features up to a rotation. It also computes
its own gradient and the loss in the clear. Hosts' gradients stay masked (the arbiter role, now at
the guest, sees pads). Use it only when the hosts accept that.

**Not covered**: collusion (arbiter + host decrypts ``[[d']]``: the labels; arbiter + guest
decrypts ``[[wx_h]]``: the case above), and malicious parties: the arbiter decrypts whatever a
party masks (it refuses replays and changed row counts, but a host could submit ``[[d'_i]]`` in
place of its gradient), and integrity of the results (a party can send wrong values).

Batch order comes from ``random_state`` (numpy, not secret: the rows are public); masks and
key material come from :mod:`secrets`. Bulk encryption randomness is precomputed at setup on all
cores (:meth:`PublicKey.obfuscators`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

import gmpy2
import numpy as np
from gmpy2 import mpz

from fedcrypt.core.messages import Payload
from fedcrypt.core.wire import Blob
from fedcrypt.crypto.paillier import FixedPoint, PaillierError, PrivateKey, PublicKey, generate_keypair
from fedcrypt.vertical.data import PartyData, VerticalDataError

log = logging.getLogger(__name__)

VALUE_BITS = 32
FEATURE_BITS = 12
GRADIENT_BITS = VALUE_BITS + FEATURE_BITS
GUEST = "guest"
#: Standardized features beyond this are refused (garbage in; exponents stay short).
MAX_FEATURE = 2.0**20
#: A score ``|x_p w_p|`` beyond this stops training (it diverged); it bounds the packed gradients.
MAX_SCORE = 2.0**20


class ProtocolError(ValueError):
    """A received payload is malformed, out of order, replayed or under another key."""


def batch_plan(samples: int, batch_size: int, epochs: int, random_state: int | None) -> list[list[np.ndarray]]:
    """Each epoch's batches: a fresh permutation cut into ``max(1, samples // batch_size)`` near-equal
    parts, so no batch is smaller than ``batch_size`` (unless all rows are): small batches leak most."""
    rng = np.random.default_rng(random_state)
    parts = max(1, samples // batch_size)
    return [np.array_split(rng.permutation(samples), parts) for _ in range(epochs)]


def _ids_digest(ids: Sequence[str]) -> str:
    """Names a row order without listing it: parties compare digests to check they are aligned."""
    digest = hashlib.sha256()
    for row_id in ids:
        digest.update(row_id.encode() + b"\x00")
    return digest.hexdigest()[:32]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _linear_combinations(ciphertexts: Sequence[mpz], exponents: np.ndarray, public: PublicKey) -> list[mpz]:
    """``[[sum_i e_ij m_i]] = prod_i c_i^(e_ij) mod n^2`` for every column ``j`` of the signed int64
    matrix ``exponents`` (one row per ciphertext ``c_i`` of ``m_i``).

    Pippenger's bucket method per column: for each window of ``w`` exponent bits, from the top, the
    product so far is raised to ``2^w``, each base joins the bucket of its digit, and
    ``prod_v B_v^v`` costs ``2^(w+1)`` multiplications by running products. About
    ``(rows + 2^(w+1)) bits / w`` multiplications per column, against ``1.5 rows bits`` for one
    exponentiation per value. Negative exponents use the inverse ciphertext, computed once per row.
    """
    modulus = public.modulus
    rows, columns = exponents.shape
    if rows != len(ciphertexts):
        raise ValueError(f"{rows} exponent rows for {len(ciphertexts)} ciphertexts")
    negative = exponents < 0
    inverse = {i: gmpy2.invert(ciphertexts[i], modulus) for i in np.flatnonzero(negative.any(axis=1)).tolist()}
    magnitude = np.abs(exponents)
    bits = int(magnitude.max()).bit_length() if magnitude.size else 0
    if bits == 0:
        return [mpz(1)] * columns  # [[0]]
    window = min(range(1, 9), key=lambda w: -(-bits // w) * (rows + (2 << w)))
    digit_mask = (1 << window) - 1
    out = []
    for j in range(columns):
        bases = [inverse[i] if neg else c for i, (c, neg) in enumerate(zip(ciphertexts, negative[:, j].tolist()))]
        column = magnitude[:, j]
        acc = mpz(1)
        for shift in range(window * ((bits - 1) // window), -1, -window):
            if acc != 1:
                acc = gmpy2.powmod(acc, 1 << window, modulus)
            buckets: list[Any] = [None] * (1 << window)
            for base, digit in zip(bases, ((column >> shift) & digit_mask).tolist()):
                if digit:
                    held = buckets[digit]
                    buckets[digit] = base if held is None else held * base % modulus
            running = total = None
            for bucket in reversed(buckets[1:]):
                if bucket is not None:
                    running = bucket if running is None else running * bucket % modulus
                if running is not None:
                    total = running if total is None else total * running % modulus
            if total is not None:
                acc = acc * total % modulus
        out.append(acc)
    return out


class _Slots:
    """Packs a party's gradient ciphertexts ``[[G_j]]`` into few plaintexts before masking, so the
    arbiter decrypts one ciphertext per ``per`` values: decryption (two exponentiations with
    ``|n|/2``-bit exponents) is the costliest step, packing costs ``s`` squarings per value.

    Slot ``j`` holds ``G_j + 2^(s-2)``, and ``|G_j| <= rows * max|e| * |d'| < 2^(s-2)`` since every
    party keeps ``|wx_p| <= MAX_SCORE``: slots never carry into each other, and each slot's top bit
    is a guard checked when unpacking. The masked sum stays below ``n``, so the pad hides it whole.
    """

    def __init__(self, public: PublicKey, rows: int, max_exponent: int, parties: int) -> None:
        residual = parties * (int(MAX_SCORE) + 3) << VALUE_BITS  # |d'| in fixed point, rounding included
        bound = rows * max(max_exponent, 1) * residual
        self.bits = bound.bit_length() + 2
        self.per = (public.bits - 1) // self.bits
        if self.per < 1:
            raise ValueError(f"{self.bits}-bit gradient slots do not fit a {public.bits}-bit key")
        self._public = public

    def count(self, values: int) -> int:
        """Plaintexts that ``values`` values take."""
        return -(-values // self.per)

    def pack(self, ciphertexts: Sequence[mpz]) -> list[mpz]:
        """``[[sum_j (G_j + 2^(s-2)) 2^(s j)]]`` per run of ``per`` values, by Horner's rule."""
        public, modulus, shift = self._public, self._public.modulus, 1 << self.bits
        out = []
        for start in range(0, len(ciphertexts), self.per):
            group = ciphertexts[start : start + self.per]
            acc = group[-1]
            for ciphertext in reversed(group[:-1]):
                acc = gmpy2.powmod(acc, shift, modulus) * ciphertext % modulus
            offsets = sum(1 << (self.bits * j + self.bits - 2) for j in range(len(group)))
            out.append(public.add(acc, public.n * offsets + 1))  # + offsets, in the clear
        return out

    def unpack(self, encodings: Sequence[int], values: int) -> np.ndarray:
        """The ``values`` gradients (floats) from unmasked packed plaintexts."""
        mask, offset = (1 << self.bits) - 1, 1 << (self.bits - 2)
        out = []
        for start, packed in zip(range(0, values, self.per), encodings):
            slots = min(self.per, values - start)
            if packed >> (self.bits * slots):
                raise ProtocolError("packed gradients beyond their slots: corrupted")
            for j in range(slots):
                slot = (packed >> (self.bits * j)) & mask
                if slot >> (self.bits - 1):
                    raise ProtocolError("a packed gradient is out of its slot: corrupted")
                out.append(slot - offset)
        return np.array(out, dtype=np.float64) / 2.0**GRADIENT_BITS


def _expect(payload: Payload, kind: str, fingerprint: str, **fields: object) -> dict[str, Any]:
    """Check a payload's type, key fingerprint and sequence fields; returns its metadata."""
    if not isinstance(payload, Payload) or not isinstance(payload.meta, dict):
        raise ProtocolError(f"expected a {kind!r} Payload, got {type(payload).__name__}")
    meta = payload.meta
    if meta.get("type") != kind:
        raise ProtocolError(f"expected a {kind!r} payload, got type {meta.get('type')!r}")
    if meta.get("fingerprint") != fingerprint:
        raise ProtocolError(f"{kind!r} payload is under another Paillier key "
                            f"(fingerprint {meta.get('fingerprint')!r}, expected {fingerprint!r})")
    for name, value in fields.items():
        if meta.get(name) != value or type(meta.get(name)) is not type(value):
            raise ProtocolError(f"{kind!r} payload has {name} = {meta.get(name)!r}, expected {value!r} "
                                "(out of order, replayed or misrouted)")
    return meta


def _read_public_key(payload: Payload) -> PublicKey:
    if not isinstance(payload, Payload) or payload.meta.get("type") != "public_key":
        raise ProtocolError("expected the arbiter's 'public_key' payload")
    try:
        return PublicKey.from_json(str(payload.meta.get("key")))
    except PaillierError as exc:
        raise ProtocolError(f"bad public key payload: {exc}") from None


class _Paillier:
    """One party's view of the arbiter's key: encodings, a pool of precomputed randomness, masks."""

    def __init__(self, public: PublicKey) -> None:
        self.public = public
        self.fingerprint = public.fingerprint
        self.values = FixedPoint(public, VALUE_BITS)
        self.gradients = FixedPoint(public, GRADIENT_BITS)
        self._pool: list[mpz] = []

    def reserve(self, count: int) -> None:
        """Have ``count`` obfuscators ready, computing the shortfall in one batch on all cores."""
        missing = count - len(self._pool)
        if missing > 0:
            self._pool.extend(self.public.obfuscators(missing))

    def encrypt(self, encodings: Sequence[int]) -> list[mpz]:
        """Fresh encryptions (one multiplication each with pooled randomness)."""
        self.reserve(len(encodings))
        obfuscators = self._pool[-len(encodings) :] if encodings else []
        del self._pool[len(self._pool) - len(encodings) :]
        return self.public.encrypt(encodings, obfuscators)

    def mask(self, ciphertexts: Sequence[mpz]) -> tuple[list[mpz], list[int]]:
        """``[[m + r]]`` for ``r`` uniform in ``Z_n`` per value, re-randomized by the fresh encryption
        of ``r``: the decrypting arbiter sees a one-time pad, and no randomness of other parties."""
        n = int(self.public.n)
        masks = [secrets.randbelow(n) for _ in ciphertexts]
        pads = self.encrypt(masks)
        return [self.public.add(c, pad) for c, pad in zip(ciphertexts, pads)], masks

    def unmask(self, payload: Payload, masks: Sequence[int]) -> list[int]:
        """The decrypted ``m + r`` values of ``payload`` minus their masks: encodings of ``m``."""
        n = int(self.public.n)
        width = (self.public.bits + 7) // 8
        array = np.asarray(payload.arrays.get("values", np.empty(0)))
        if array.dtype != np.uint8 or array.shape != (len(masks), width):
            raise ProtocolError(f"decrypted values must be uint8 {(len(masks), width)}, "
                                f"got {array.dtype} {array.shape}")
        data = array.tobytes()
        out = []
        for row, r in enumerate(masks):
            value = int.from_bytes(data[row * width : (row + 1) * width], "little")
            if value >= n:
                raise ProtocolError("a decrypted value is not below n: corrupted")
            out.append((value - r) % n)
        return out

    def read(self, payload: Payload, name: str, rows: int) -> list[mpz]:
        """Parse and validate ``rows`` ciphertexts from ``payload.arrays[name]``."""
        array = payload.arrays.get(name)
        if array is None:
            raise ProtocolError(f"{payload.meta.get('type')!r} payload lacks its {name!r} ciphertexts")
        array = np.asarray(array)
        width = self.public.ciphertext_bytes
        if array.dtype != np.uint8 or array.shape != (rows, width):
            raise ProtocolError(f"{name!r} must be {rows} ciphertexts of {width} bytes (uint8 {(rows, width)}), "
                                f"got {array.dtype} {array.shape}")
        try:
            return self.public.from_array(array)
        except PaillierError as exc:
            raise ProtocolError(f"{name!r}: {exc}") from None


class _Features:
    """A party's standardized fixed-point features, scaled by statistics of its own training rows."""

    def __init__(self, data: PartyData, standardize: bool) -> None:
        train = data.features
        self.names = data.feature_names
        self.mean = train.mean(axis=0) if standardize else np.zeros(train.shape[1])
        scale = train.std(axis=0) if standardize else np.ones(train.shape[1])
        self.scale = np.where(scale > 0, scale, 1.0)  # a constant column becomes zeros

    def state(self) -> dict[str, Any]:
        return {"features": list(self.names), "mean": self.mean.tolist(), "scale": self.scale.tolist()}

    def __call__(self, data: PartyData) -> tuple[np.ndarray, np.ndarray]:
        """``(x, e)``: the features rounded to ``2^-FEATURE_BITS`` and the same as int64 exponents."""
        if data.feature_names != self.names:
            raise VerticalDataError(f"feature columns {list(data.feature_names)} differ from the training "
                                    f"columns {list(self.names)}")
        z = (data.features - self.mean) / self.scale
        if not np.isfinite(z).all() or (z.size and np.abs(z).max() > MAX_FEATURE):
            raise VerticalDataError(f"features must be finite and within +-{MAX_FEATURE:g} after scaling")
        exponents = np.rint(z * 2.0**FEATURE_BITS).astype(np.int64)
        return exponents / 2.0**FEATURE_BITS, exponents


class Arbiter:
    """Holds the Paillier key pair and decrypts what parties masked; sees no value in the clear."""

    def __init__(self, key_bits: int = 2048) -> None:
        self.public, self._private = generate_keypair(key_bits)
        self._decrypted: set[tuple[str, int, int]] = set()
        self._rows: dict[str, int] = {}
        self._reader = _Paillier(self.public)

    @property
    def private_key(self) -> PrivateKey:
        """For a guest that is its own arbiter (``arbiter="guest"``) only."""
        return self._private

    def public_key(self) -> Payload:
        """The key for guest and hosts (``n``, the DJN base ``h`` and the fingerprint)."""
        return Payload(meta={"type": "public_key", "key": self.public.to_json()})

    def decrypt(self, masked: Payload) -> Payload:
        """Decrypt a party's masked values and return them to it as plaintexts in ``Z_n``.

        Gradient requests are answered once per (party, epoch, batch), each party always with the
        same row count, so a party cannot ask twice or widen its request mid-training."""
        meta = _expect(masked, "masked", self.public.fingerprint)
        party, purpose = meta.get("party"), meta.get("purpose")
        if not isinstance(party, str) or purpose not in ("gradient", "scores"):
            raise ProtocolError("masked payload needs a party name and a purpose ('gradient' or 'scores')")
        shape: tuple[int, ...] = getattr(masked.arrays.get("values"), "shape", ())
        rows = shape[0] if len(shape) == 2 else 0
        if rows < 1:
            raise ProtocolError(f"masked payload from {party} has no (uint8 2-D) 'values'")
        echoed = ("party", "purpose", "epoch", "batch", "request")
        reply: dict[str, Any] = {key: meta[key] for key in echoed if key in meta}
        if purpose == "gradient":
            epoch, batch = meta.get("epoch"), meta.get("batch")
            if not isinstance(epoch, int) or not isinstance(batch, int):
                raise ProtocolError("a gradient request needs integer epoch and batch")
            if (party, epoch, batch) in self._decrypted:
                raise ProtocolError(f"{party} already had its gradient of epoch {epoch}, batch {batch} decrypted")
            if self._rows.setdefault(party, rows) != rows:
                raise ProtocolError(f"{party} asks to decrypt {rows} values, {self._rows[party]} before")
            self._decrypted.add((party, epoch, batch))
        plaintexts = self._private.decrypt(self._reader.read(masked, "values", rows))
        width = (self.public.bits + 7) // 8
        data = b"".join(int(m).to_bytes(width, "little") for m in plaintexts)
        values = np.frombuffer(data, dtype=np.uint8).reshape(rows, width)
        return Payload(meta={"type": "decrypted", "fingerprint": self.public.fingerprint, **reply},
                       arrays={"values": values})


class Host:
    """A party with features only: its weights never leave it; it sees ``[[d']]`` and its gradient."""

    def __init__(self, data: PartyData, public_key: Payload, name: str, *, standardize: bool = True) -> None:
        if data.labels is not None:
            raise VerticalDataError(f"{name} carries labels: only the guest may hold them")
        if name == GUEST:
            raise ValueError(f"a host cannot be named {GUEST!r}")
        self.name = name
        self._crypto = _Paillier(_read_public_key(public_key))
        self._features = _Features(data, standardize)
        self._x, self._exponents = self._features(data)
        self._ids = _ids_digest(data.ids)
        self.weights = np.zeros(self._x.shape[1])
        self._job: dict[str, Any] = {}
        self._next = (0, 0)
        self._batch: tuple[int, int, np.ndarray] | None = None
        self._masks: list[int] | None = None

    def setup(self, setup: Payload) -> None:
        """Accept the guest's job (rows, schedule, hyper-parameters) and precompute the randomness."""
        meta = _expect(setup, "setup", self._crypto.fingerprint)
        if meta.get("ids") != self._ids:
            raise ProtocolError(f"{self.name}'s rows are not the guest's rows: align both to the same IDs")
        fields = ("samples", "epochs", "batches", "min_batch", "hosts", "loss", "lr", "l2", "decay")
        job: dict[str, Any] = {key: meta.get(key) for key in fields}
        counts = ("samples", "epochs", "batches", "min_batch", "hosts")
        if (not all(isinstance(job[k], int) and job[k] >= 1 for k in counts)
                or not isinstance(job["loss"], bool)
                or not all(isinstance(job[k], (int, float)) and math.isfinite(job[k]) and job[k] >= 0
                           for k in ("lr", "l2", "decay"))):
            raise ProtocolError(f"malformed setup: {job}")
        if job["samples"] != len(self._x):
            raise ProtocolError(f"setup is for {job['samples']} rows, {self.name} has {len(self._x)}")
        features = self._x.shape[1]
        if job["min_batch"] <= features:
            raise ProtocolError(f"{self.name} refuses batches of {job['min_batch']} rows: with {features} features "
                                f"its gradient would reveal the batch's residuals (and so the labels); "
                                f"use batches of more than {features} rows")
        self._job = job
        self._next = (0, 0)
        largest = -(-job["samples"] // job["batches"])
        self._slots = _Slots(self._crypto.public, largest, int(np.abs(self._exponents).max()), job["hosts"] + 1)
        steps = job["epochs"] * job["batches"]
        self._crypto.reserve(job["epochs"] * job["samples"] + steps * (self._slots.count(features) + job["loss"]))

    def forward(self, batch: Payload) -> Payload:
        """``[[wx_h]]`` for the batch's rows (and the loss term ``[[sum wx_h^2 + 4 B l2 |w_h|^2]]``)."""
        if not self._job:
            raise ProtocolError(f"{self.name} has no job: call setup first")
        epoch, index = self._next
        _expect(batch, "batch", self._crypto.fingerprint, epoch=epoch, batch=index)
        rows = np.asarray(batch.arrays.get("rows", np.empty(0)))
        samples = self._job["samples"]
        if (rows.dtype != np.int64 or rows.ndim != 1 or not len(rows) or rows.min() < 0 or rows.max() >= samples
                or len(np.unique(rows)) != len(rows)):
            raise ProtocolError(f"batch rows must be distinct int64 row numbers below {samples}")
        if len(rows) < self._job["min_batch"]:
            raise ProtocolError(f"batch of {len(rows)} rows, below the agreed minimum of {self._job['min_batch']}")
        self._next = (epoch, index + 1) if index + 1 < self._job["batches"] else (epoch + 1, 0)
        self._batch = (epoch, index, rows)
        wx = self._x[rows] @ self.weights
        _check_scores(wx, self.name)
        crypto = self._crypto
        arrays: dict[str, Blob] = {"wx": crypto.public.to_array(crypto.encrypt(crypto.values.encode(wx)))}
        if self._job["loss"]:
            square = float(wx @ wx) + 4 * len(rows) * self._job["l2"] * float(self.weights @ self.weights)
            square_ct = self._crypto.encrypt(self._crypto.gradients.encode(np.array([square])))
            arrays["square"] = self._crypto.public.to_array(square_ct)
        meta = {"type": "forward", "fingerprint": self._crypto.fingerprint, "party": self.name,
                "epoch": epoch, "batch": index}
        return Payload(meta=meta, arrays=arrays)

    def masked_gradient(self, residual: Payload) -> Payload:
        """``[[X_h^T d' + r]]``: this host's gradient (times ``4B``) under a fresh one-time pad."""
        if self._batch is None or self._masks is not None:
            raise ProtocolError(f"{self.name} expects a batch before a residual")
        epoch, index, rows = self._batch
        _expect(residual, "residual", self._crypto.fingerprint, epoch=epoch, batch=index)
        d = self._crypto.read(residual, "d", len(rows))
        gradient = _linear_combinations(d, self._exponents[rows], self._crypto.public)
        masked, self._masks = self._crypto.mask(self._slots.pack(gradient))
        meta = {"type": "masked", "fingerprint": self._crypto.fingerprint, "party": self.name,
                "purpose": "gradient", "epoch": epoch, "batch": index}
        return Payload(meta=meta, arrays={"values": self._crypto.public.to_array(masked)})

    def update(self, decrypted: Payload) -> None:
        """Unmask the arbiter's answer and take the gradient step."""
        if self._batch is None or self._masks is None:
            raise ProtocolError(f"{self.name} has no gradient waiting for decryption")
        epoch, index, rows = self._batch
        _expect(decrypted, "decrypted", self._crypto.fingerprint, party=self.name, purpose="gradient",
                epoch=epoch, batch=index)
        total = self._slots.unpack(self._crypto.unmask(decrypted, self._masks), len(self.weights))
        gradient = total / (4 * len(rows)) + self._job["l2"] * self.weights
        self.weights = self.weights - self._job["lr"] / (1 + self._job["decay"] * epoch) * gradient
        self._batch, self._masks = None, None

    def model(self) -> dict[str, Any]:
        """This host's part of the model (its scaling and weights): it stays with the host."""
        return {"role": "host", **self._features.state(), "weights": self.weights.tolist()}

    def predict_share(self, data: PartyData) -> Payload:
        """``[[wx_h]]`` for rows to score (aligned with the guest's): only the guest gets the score."""
        x, _ = self._features(data)
        wx = x @ self.weights
        meta = {"type": "share", "fingerprint": self._crypto.fingerprint, "party": self.name,
                "ids": _ids_digest(data.ids)}
        return Payload(meta=meta, arrays={"wx": self._crypto.public.to_array(
            self._crypto.encrypt(self._crypto.values.encode(wx)))})


class Guest:
    """The label holder: schedules batches, forms the encrypted residual, holds the intercept."""

    def __init__(
        self,
        data: PartyData,
        public_key: Payload,
        hosts: Sequence[str],
        *,
        lr: float,
        epochs: int,
        batch_size: int,
        l2: float,
        decay: float,
        random_state: int | None,
        standardize: bool = True,
        private_key: PrivateKey | None = None,
    ) -> None:
        if data.labels is None:
            raise VerticalDataError("the guest's data has no labels (load it with label_column=...)")
        if not np.isin(data.labels, (0.0, 1.0)).all():
            raise VerticalDataError(f"labels must be 0 or 1, got values {sorted(set(data.labels.tolist()))[:5]}")
        if not hosts or len(set(hosts)) != len(hosts) or GUEST in hosts:
            raise ValueError(f"hosts need distinct names other than {GUEST!r}, got {list(hosts)}")
        self._crypto = _Paillier(_read_public_key(public_key))
        if private_key is not None and private_key.public != self._crypto.public:
            raise PaillierError("the guest's private key does not belong to the arbiter's public key")
        self._private = private_key
        self.hosts = tuple(hosts)
        self._features = _Features(data, standardize)
        x, exponents = self._features(data)
        self._x = np.hstack([x, np.ones((len(x), 1))])  # the intercept is a column of ones
        self._exponents = np.hstack([exponents, np.full((len(x), 1), 1 << FEATURE_BITS, dtype=np.int64)])
        self._y = 2.0 * data.labels - 1.0
        self._ids = _ids_digest(data.ids)
        self._weights = np.zeros(self._x.shape[1])
        self._lr, self._l2, self._decay, self._epochs = float(lr), float(l2), float(decay), int(epochs)
        self._plan = batch_plan(len(x), batch_size, epochs, random_state)
        self._min_batch = smallest = min(len(rows) for rows in self._plan[0])  # the same every epoch
        if smallest <= self._x.shape[1]:
            raise VerticalDataError(f"batches of {smallest} rows are too small: with {self._x.shape[1]} weights "
                                    "(intercept included) the guest's gradient would reveal the hosts' scores; "
                                    f"use batches of more than {self._x.shape[1]} rows")
        self._with_loss = private_key is not None or len(hosts) == 1
        largest = -(-len(x) // self.batches_per_epoch)
        self._slots = _Slots(self._crypto.public, largest, int(np.abs(self._exponents).max()), len(hosts) + 1)
        self._losses: list[float] = []
        self._epoch_loss = 0.0
        self._batch: tuple[int, int, np.ndarray] | None = None
        self._pending: dict[str, Any] | None = None
        self._requests: dict[int, tuple[list[int], np.ndarray]] = {}

    @property
    def epochs(self) -> int:
        return self._epochs

    @property
    def batches_per_epoch(self) -> int:
        return len(self._plan[0])

    @property
    def weights(self) -> np.ndarray:
        """Weights of the guest's (standardized) features."""
        return self._weights[:-1].copy()

    @property
    def intercept(self) -> float:
        return float(self._weights[-1])

    @property
    def losses(self) -> list[float] | None:
        """Each finished epoch's Taylor loss (mean over rows, with the l2 penalty); None when not computed."""
        return list(self._losses) if self._with_loss else None

    def model(self) -> dict[str, Any]:
        """The guest's part of the model (its scaling, weights and the intercept)."""
        return {"role": "guest", **self._features.state(), "weights": self.weights.tolist(),
                "intercept": self.intercept}

    def setup(self) -> Payload:
        """The job for the hosts: rows (by digest), schedule sizes and hyper-parameters."""
        meta = {"type": "setup", "fingerprint": self._crypto.fingerprint, "ids": self._ids,
                "samples": len(self._x), "epochs": self._epochs, "batches": self.batches_per_epoch,
                "min_batch": self._min_batch, "hosts": len(self.hosts), "loss": self._with_loss,
                "lr": self._lr, "l2": self._l2, "decay": self._decay}
        masks = 0 if self._private is not None else self._slots.count(self._x.shape[1]) + self._with_loss
        self._crypto.reserve(self._epochs * (len(self._x) + self.batches_per_epoch * masks))
        return Payload(meta=meta)

    def batch(self, epoch: int, index: int) -> Payload:
        """Announce batch ``index`` of ``epoch`` (the step's first message)."""
        if self._batch is not None:
            raise ProtocolError("the previous batch is not finished")
        if not (0 <= epoch < self._epochs and 0 <= index < self.batches_per_epoch):
            raise ValueError(f"no batch {index} of epoch {epoch}")
        rows = self._plan[epoch][index]
        self._batch = (epoch, index, rows)
        meta = {"type": "batch", "fingerprint": self._crypto.fingerprint, "epoch": epoch, "batch": index}
        return Payload(meta=meta, arrays={"rows": rows.astype(np.int64)})

    def residual(self, forwards: Sequence[Payload]) -> tuple[Payload, Payload | None]:
        """From every host's ``forward``: ``[[d']]`` for the hosts, and this guest's masked gradient
        and loss for the arbiter (None when the guest holds the key: it has already stepped)."""
        if self._batch is None or self._pending is not None:
            raise ProtocolError("the guest expects a batch before forwards")
        epoch, index, rows = self._batch
        wx_h, squares = self._read_forwards(forwards, epoch, index, len(rows))
        wx_g = self._x[rows] @ self._weights
        _check_scores(wx_g, GUEST)
        y = self._y[rows]
        crypto, public = self._crypto, self._crypto.public
        if self._private is not None:  # the key holder reads the hosts' scores: what arbiter="guest" costs
            scores = [self._decrypt(c) for c in wx_h]
            wx = wx_g + sum(scores)
            d = crypto.encrypt(crypto.values.encode(wx - 2 * y))
            self._step_in_clear(wx, scores, squares, rows, epoch)
            return self._residual_payload(d, epoch, index), None
        summed = [gmpy2.mpz(1)] * len(rows)
        for ciphertexts in wx_h:
            summed = [public.add(a, b) for a, b in zip(summed, ciphertexts)]
        own = crypto.encrypt(crypto.values.encode(wx_g - 2 * y))  # fresh: hosts cannot strip it
        d = [public.add(a, b) for a, b in zip(summed, own)]
        request = self._slots.pack(_linear_combinations(d, self._exponents[rows], public))
        if self._with_loss:  # Lambda = sum (wx_g^2 - 4 y' wx_g) + sum (2 wx_g - 4 y') [[wx_h]] + [[sum wx_h^2]]
            coefficients = np.rint((2 * wx_g - 4 * y) * 2.0**FEATURE_BITS).astype(np.int64)[:, None]
            cross = _linear_combinations(summed, coefficients, public)[0]
            plain = crypto.gradients.encode(np.array([float(wx_g @ wx_g - 4 * y @ wx_g)]))[0]
            loss = public.add(public.add(cross, squares[0]), public.n * plain + 1)
            request.append(loss)
        masked, masks = crypto.mask(request)
        self._pending = {"masks": masks}
        meta = {"type": "masked", "fingerprint": crypto.fingerprint, "party": GUEST, "purpose": "gradient",
                "epoch": epoch, "batch": index}
        return (self._residual_payload(d, epoch, index),
                Payload(meta=meta, arrays={"values": public.to_array(masked)}))

    def update(self, decrypted: Payload) -> None:
        """Unmask the arbiter's answer (gradient, then loss) and take the gradient step."""
        if self._batch is None or self._pending is None:
            raise ProtocolError("the guest has no gradient waiting for decryption")
        epoch, index, rows = self._batch
        _expect(decrypted, "decrypted", self._crypto.fingerprint, party=GUEST, purpose="gradient",
                epoch=epoch, batch=index)
        encodings = self._crypto.unmask(decrypted, self._pending["masks"])
        features, packed = self._x.shape[1], self._slots.count(self._x.shape[1])
        if self._with_loss:
            loss = float(self._crypto.gradients.decode(encodings[packed:])[0])
            self._add_loss(math.log(2) + loss / (8 * len(rows)), len(rows))
        self._step(self._slots.unpack(encodings[:packed], features) / (4 * len(rows)), epoch)

    def masked_scores(self, data: PartyData, shares: Sequence[Payload]) -> Payload:
        """``[[sum_h wx_h + r]]`` per row to score, for the arbiter; :meth:`scores` finishes."""
        x, _ = self._features(data)
        public = self._crypto.public
        summed = [gmpy2.mpz(1)] * len(x)
        for ciphertexts in self._read_shares(shares, data):
            summed = [public.add(a, b) for a, b in zip(summed, ciphertexts)]
        masked, masks = self._crypto.mask(summed)
        request = secrets.randbits(62)
        self._requests[request] = (masks, x @ self._weights[:-1] + self._weights[-1])
        meta = {"type": "masked", "fingerprint": self._crypto.fingerprint, "party": GUEST, "purpose": "scores",
                "request": request}
        return Payload(meta=meta, arrays={"values": public.to_array(masked)})

    def scores(self, decrypted: Payload) -> np.ndarray:
        """The probability of label 1 for each row of the matching :meth:`masked_scores` request."""
        meta = _expect(decrypted, "decrypted", self._crypto.fingerprint, party=GUEST, purpose="scores")
        if meta.get("request") not in self._requests:
            raise ProtocolError("decrypted scores answer no pending request of the guest")
        masks, wx_g = self._requests.pop(meta["request"])
        return _sigmoid(wx_g + self._crypto.values.decode(self._crypto.unmask(decrypted, masks)))

    # --- internals ---------------------------------------------------------------------------

    def _read_forwards(self, forwards: Sequence[Payload], epoch: int, index: int,
                       rows: int) -> tuple[list[list[mpz]], list[mpz]]:
        by_host: dict[str, Payload] = {}
        for forward in forwards:
            meta = _expect(forward, "forward", self._crypto.fingerprint, epoch=epoch, batch=index)
            party = meta.get("party")
            if party not in self.hosts or party in by_host:
                raise ProtocolError(f"forward from unknown or repeated host {party!r} (hosts: {list(self.hosts)})")
            by_host[party] = forward
        if len(by_host) != len(self.hosts):
            raise ProtocolError(f"forwards missing from {sorted(set(self.hosts) - set(by_host))}")
        wx_h = [self._crypto.read(by_host[h], "wx", rows) for h in self.hosts]
        squares = [self._crypto.read(by_host[h], "square", 1)[0] for h in self.hosts] if self._with_loss else []
        return wx_h, squares

    def _read_shares(self, shares: Sequence[Payload], data: PartyData) -> list[list[mpz]]:
        by_host: dict[str, list[mpz]] = {}
        digest = _ids_digest(data.ids)
        for share in shares:
            meta = _expect(share, "share", self._crypto.fingerprint)
            party = meta.get("party")
            if party not in self.hosts or party in by_host:
                raise ProtocolError(f"score share from unknown or repeated host {party!r}")
            if meta.get("ids") != digest:
                raise ProtocolError(f"{party}'s rows to score are not the guest's: align both to the same IDs")
            by_host[party] = self._crypto.read(share, "wx", len(data))
        if len(by_host) != len(self.hosts):
            raise ProtocolError(f"score shares missing from {sorted(set(self.hosts) - set(by_host))}")
        return list(by_host.values())

    def _residual_payload(self, d: list[mpz], epoch: int, index: int) -> Payload:
        meta = {"type": "residual", "fingerprint": self._crypto.fingerprint, "epoch": epoch, "batch": index}
        return Payload(meta=meta, arrays={"d": self._crypto.public.to_array(d)})

    def _decrypt(self, ciphertexts: list[mpz]) -> np.ndarray:
        assert self._private is not None
        return self._crypto.values.decode(self._private.decrypt(ciphertexts))

    def _step_in_clear(self, wx: np.ndarray, scores: list[np.ndarray], squares: list[mpz], rows: np.ndarray,
                       epoch: int) -> None:
        """The key holder's loss and step, from the decrypted scores; the hosts' penalties
        ``l2 |w_h|^2 / 2`` come from their loss terms minus the squared scores."""
        assert self._private is not None
        y = self._y[rows]
        penalties = self._crypto.gradients.decode(self._private.decrypt(squares)) - [s @ s for s in scores]
        loss = float(np.mean(math.log(2) - 0.5 * y * wx + 0.125 * wx * wx) + penalties.sum() / (8 * len(rows)))
        self._add_loss(loss, len(rows))
        self._step(self._x[rows].T @ (wx - 2 * y) / (4 * len(rows)), epoch)

    def _step(self, gradient: np.ndarray, epoch: int) -> None:
        penalty = self._l2 * self._weights
        penalty[-1] = 0.0  # no penalty on the intercept
        self._weights = self._weights - self._lr / (1 + self._decay * epoch) * (gradient + penalty)
        self._batch, self._pending = None, None

    def _add_loss(self, batch_loss: float, rows: int) -> None:
        """Accumulate the batch's loss (plus the guest's own penalty); close the epoch after its last batch."""
        assert self._batch is not None
        epoch, index, _ = self._batch
        self._epoch_loss += rows * (batch_loss + 0.5 * self._l2 * float(self._weights[:-1] @ self._weights[:-1]))
        if index == self.batches_per_epoch - 1:
            self._losses.append(self._epoch_loss / len(self._x))
            log.info("epoch %d/%d: Taylor loss %.5f", epoch + 1, self._epochs, self._losses[-1])
            self._epoch_loss = 0.0


class HostRole(Protocol):
    """What the drivers need of a host: a :class:`Host`, or a proxy reaching one over a transport."""

    def setup(self, setup: Payload) -> None: ...
    def forward(self, batch: Payload) -> Payload: ...
    def masked_gradient(self, residual: Payload) -> Payload: ...
    def update(self, decrypted: Payload) -> None: ...


class ArbiterRole(Protocol):
    def decrypt(self, masked: Payload) -> Payload: ...


def train(guest: Guest, hosts: Sequence[HostRole], arbiter: ArbiterRole,
          progress: Callable[[int, int], None] | None = None) -> None:
    """Run the training protocol: every batch's five messages, one party after another.

    ``progress(epoch, batch)`` is called after each batch."""
    setup = guest.setup()
    for host in hosts:
        host.setup(setup)
    for epoch in range(guest.epochs):
        for index in range(guest.batches_per_epoch):
            batch = guest.batch(epoch, index)
            residual, own = guest.residual([host.forward(batch) for host in hosts])
            for host in hosts:
                host.update(arbiter.decrypt(host.masked_gradient(residual)))
            if own is not None:
                guest.update(arbiter.decrypt(own))
            if progress is not None:
                progress(epoch, index)


def probabilities(guest: Guest, data: PartyData, shares: Sequence[Payload], arbiter: ArbiterRole) -> np.ndarray:
    """P(label 1) of the rows ``data`` from the hosts' encrypted score shares (``Host.predict_share``)."""
    return guest.scores(arbiter.decrypt(guest.masked_scores(data, shares)))


class HeteroLR:
    """Hetero logistic regression with every role in this process (scikit-learn style).

    ``fit(guest, hosts)`` takes each party's rows aligned to the same IDs (PSI, then
    :func:`~fedcrypt.vertical.data.align`); ``predict_proba`` and ``predict`` take rows to score,
    aligned the same way. ``arbiter="guest"`` makes the guest the key holder (see the module's
    notes on what it then learns). ``random_state`` fixes the batch order; weights start at zero.
    After ``fit``: the roles ``guest_``, ``hosts_`` and ``arbiter_`` (each party's weights live in
    its role) and ``loss_history_``, each epoch's Taylor loss (None with several hosts).
    """

    def __init__(
        self,
        lr: float = 0.1,
        epochs: int = 10,
        batch_size: int = 64,
        l2: float = 0.0,
        decay: float = 0.5,
        key_bits: int = 2048,
        arbiter: Literal["separate", "guest"] = "separate",
        random_state: int | None = None,
        standardize: bool = True,
    ) -> None:
        if not all(math.isfinite(v) for v in (lr, l2, decay)) or not (lr > 0 and l2 >= 0 and decay >= 0):
            raise ValueError(f"need lr > 0, l2 >= 0 and decay >= 0 (finite), got {lr}, {l2}, {decay}")
        if epochs < 1 or batch_size < 1:
            raise ValueError(f"need epochs >= 1 and batch_size >= 1, got {epochs}, {batch_size}")
        if arbiter not in ("separate", "guest"):
            raise ValueError(f"arbiter must be 'separate' or 'guest', got {arbiter!r}")
        self.lr, self.epochs, self.batch_size, self.l2, self.decay = lr, epochs, batch_size, l2, decay
        self.key_bits, self.arbiter, self.random_state, self.standardize = key_bits, arbiter, random_state, standardize

    def fit(self, guest: PartyData, hosts: Sequence[PartyData]) -> HeteroLR:
        """Train: every batch runs the five messages of the module's protocol, in process."""
        _check_aligned(guest, hosts)
        log.info("hetero LR: %d rows, guest %d features, hosts %s features, %d-bit key, arbiter %s",
                 len(guest), len(guest.feature_names), [len(h.feature_names) for h in hosts], self.key_bits,
                 self.arbiter)
        self.arbiter_ = Arbiter(self.key_bits)
        key = self.arbiter_.public_key()
        names = [f"host-{i}" for i in range(len(hosts))]
        self.hosts_ = [Host(data, key, name, standardize=self.standardize) for data, name in zip(hosts, names)]
        self.guest_ = Guest(guest, key, names, lr=self.lr, epochs=self.epochs, batch_size=self.batch_size,
                            l2=self.l2, decay=self.decay, random_state=self.random_state,
                            standardize=self.standardize,
                            private_key=self.arbiter_.private_key if self.arbiter == "guest" else None)
        train(self.guest_, self.hosts_, self.arbiter_)
        self.loss_history_ = self.guest_.losses
        return self

    def predict_proba(self, guest: PartyData, hosts: Sequence[PartyData]) -> np.ndarray:
        """``(rows, 2)``: probabilities of labels 0 and 1; only the guest's role sees the scores."""
        if not hasattr(self, "guest_"):
            raise ValueError("HeteroLR is not fitted: call fit first")
        _check_aligned(guest, hosts, labels=False)
        if len(hosts) != len(self.hosts_):
            raise VerticalDataError(f"fitted with {len(self.hosts_)} hosts, got {len(hosts)}")
        shares = [role.predict_share(data) for role, data in zip(self.hosts_, hosts)]
        p = probabilities(self.guest_, guest, shares, self.arbiter_)
        return np.column_stack([1.0 - p, p])

    def predict(self, guest: PartyData, hosts: Sequence[PartyData]) -> np.ndarray:
        """Labels 0 or 1 (probability of 1 at least one half)."""
        return (self.predict_proba(guest, hosts)[:, 1] >= 0.5).astype(np.int64)


def _check_scores(wx: np.ndarray, party: str) -> None:
    if wx.size and np.abs(wx).max() > MAX_SCORE:
        raise OverflowError(f"{party}: training diverged (a score x.w of {np.abs(wx).max():.3g} is beyond "
                            f"{MAX_SCORE:g}); lower lr")


def _check_aligned(guest: PartyData, hosts: Sequence[PartyData], labels: bool = True) -> None:
    """Every party must hold the same IDs in the same order (and hosts no labels)."""
    if not hosts:
        raise VerticalDataError("hetero LR needs at least one host")
    if labels and guest.labels is None:
        raise VerticalDataError("the guest's data has no labels (load it with label_column=...)")
    for i, host in enumerate(hosts):
        if host.ids != guest.ids:
            first = next((r for r, (a, b) in enumerate(zip(guest.ids, host.ids)) if a != b), min(len(guest), len(host)))
            raise VerticalDataError(f"host {i} is not aligned with the guest ({len(host)} vs {len(guest)} rows, "
                                    f"first difference at row {first}): align both to the PSI intersection")
