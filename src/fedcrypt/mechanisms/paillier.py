"""The ``paillier`` mechanism: every value Paillier-encrypted on its own, as FATE does.

Clients encode each value of their contribution in fixed point (:class:`FixedPoint`) and encrypt
it under the job's public key; the server multiplies ciphertexts (adding the plaintexts) with the
public key only; a client decrypts the sum. One ciphertext per value makes this the honest
baseline (512 bytes per value with a 2048-bit key) and the right choice for small models; large
models want ``batchcrypt`` or ``ckks``.

Payloads carry the key fingerprint; the server refuses ciphertexts under another key, of the wrong
count or width, and ciphertexts that are not units modulo ``n^2`` (zero, >= n^2, corrupted),
before touching the sum. A client refuses to encrypt a contribution whose sum could leave the
encoding's range; a sum that overflows anyway is reported at decryption, never wrapped.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import gmpy2
import numpy as np
from gmpy2 import mpz

from fedcrypt.core.mechanism import (
    AggregatePiece,
    OneShotMechanism,
    PayloadRejected,
    RecoveryError,
    RoundContext,
    piece_rows,
    row_ranges,
)
from fedcrypt.core.messages import Payload
from fedcrypt.crypto.keyfiles import read_key_file, write_key_pair
from fedcrypt.crypto.paillier import FixedPoint, PaillierError, PrivateKey, PublicKey

PUBLIC_FILE = "paillier.public.json"
SECRET_FILE = "paillier.secret.json"


class PaillierMechanism(OneShotMechanism[list[mpz]]):
    """Per-value Paillier. With only a :class:`PublicKey` it can aggregate (the server's
    instance); with the :class:`PrivateKey` it can also protect and recover (a client's)."""

    name: ClassVar[str] = "paillier"
    server_can_recover: ClassVar[bool] = False

    def __init__(self, public: PublicKey, private: PrivateKey | None = None, frac_bits: int = 32) -> None:
        if private is not None and private.public != public:
            raise PaillierError("the private key does not belong to this public key")
        self.public = public
        self._private = private
        self.encoding = FixedPoint(public, frac_bits)

    # --- client ----------------------------------------------------------------------------

    def protect(self, contribution: np.ndarray, ctx: RoundContext) -> Payload:
        if self._private is None:
            raise ValueError("cannot encrypt: this party holds no Paillier private key")
        peak = float(np.max(np.abs(contribution))) if contribution.size else 0.0
        worst = peak * max(len(ctx.participants), 1)
        if not np.isfinite(peak) or worst > self.encoding.max_value:
            raise ValueError(f"contribution values up to {peak:.3g} could sum beyond the encoding's range")
        encoded = self.encoding.encode(contribution)
        ciphertexts = self.public.encrypt(encoded, self.public.obfuscators(len(encoded)))  # on all cores
        return Payload(meta={"fingerprint": self.public.fingerprint}, arrays={"c": self.public.to_array(ciphertexts)})

    def recover(self, aggregate: Payload, ctx: RoundContext) -> np.ndarray:
        if self._private is None:
            raise RecoveryError("cannot decrypt: this party holds no Paillier private key")
        try:
            first, last = piece_rows(aggregate, ctx.vector_size)
            ciphertexts = self._parse(aggregate, last - first)
            return self.encoding.decode(self._private.decrypt(ciphertexts)).astype(np.float32)
        except (PaillierError, ValueError) as exc:
            raise RecoveryError(str(exc)) from None

    def split(self, aggregate: Payload, ctx: RoundContext, pieces: int) -> list[AggregatePiece]:
        ciphertexts = aggregate.arrays.get("c")
        if ciphertexts is None or ciphertexts.shape[0] != ctx.vector_size:
            return super().split(aggregate, ctx, pieces)  # the key holder reports what is wrong
        return [
            AggregatePiece(first, last, Payload({**aggregate.meta, "rows": [first, last]}, {"c": ciphertexts[first:last]}))
            for first, last in row_ranges(ctx.vector_size, pieces)
        ]

    # --- server ----------------------------------------------------------------------------

    def empty(self, ctx: RoundContext) -> list[mpz]:
        return [mpz(1)] * ctx.vector_size  # 1 is an encryption of 0, the identity of the product

    def fold_one(self, accumulator: list[mpz], payload: Payload, ctx: RoundContext) -> list[mpz]:
        try:
            ciphertexts = self._parse(payload, ctx.vector_size)  # validates every ciphertext before any addition
        except PaillierError as exc:
            raise PayloadRejected(str(exc)) from None
        modulus = self.public.modulus
        return [gmpy2.f_mod(total * c, modulus) for total, c in zip(accumulator, ciphertexts)]

    def to_payload(self, accumulator: list[mpz], ctx: RoundContext) -> Payload:
        return Payload(meta={"fingerprint": self.public.fingerprint}, arrays={"c": self.public.to_array(accumulator)})

    def _parse(self, payload: Payload, count: int) -> list[mpz]:
        if payload.meta.get("fingerprint") != self.public.fingerprint:
            raise PaillierError("ciphertexts under another key (fingerprint mismatch)")
        array = payload.arrays.get("c")
        width = self.public.ciphertext_bytes
        if array is None or array.shape != (count, width):
            raise PaillierError(f"expected {count} ciphertexts of {width} bytes")
        return self.public.from_array(np.asarray(array))


def load_public(key_dir: Path) -> PublicKey:
    """The server's material: the public key."""
    return PublicKey.from_json(read_key_file(key_dir / PUBLIC_FILE, "paillier", PaillierError))


def load_secret(key_dir: Path) -> PrivateKey:
    """A client's material: the private key, checked against the public key."""
    public = load_public(key_dir)
    path = key_dir / SECRET_FILE
    if not path.is_file():
        raise PaillierError(f"no Paillier private key at {path}: clients need the key authority's secret file")
    private = PrivateKey.from_json(read_key_file(path, "paillier", PaillierError))
    if private.public != public:
        raise PaillierError(f"{path} does not match {key_dir / PUBLIC_FILE} (different n)")
    return private


def write_keys(key_dir: Path, private: PrivateKey) -> None:
    """Write the public key (0644) and the private key (0600, created fresh) for a key authority."""
    write_key_pair(
        key_dir, (PUBLIC_FILE, private.public.to_json()), (SECRET_FILE, private.to_json().encode()), PaillierError
    )
