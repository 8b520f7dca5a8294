"""The ``ckks`` mechanism: clients encrypt their contributions, the server adds ciphertexts it
cannot read, and a client decrypts the sum (see :mod:`fedcrypt.crypto.ckks` for the scheme).

Payloads carry the key fingerprint; the server refuses ciphertexts under another key, with the
wrong number of ciphertexts, or with coefficients outside their primes (corruption), before
touching the sum. A client refuses to encrypt a contribution that could overflow the preset's
range once summed, rather than let it decrypt to garbage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from fedcrypt.core.mechanism import OneShotMechanism, PayloadRejected, RecoveryError, RoundContext
from fedcrypt.core.messages import Payload
from fedcrypt.crypto.ckks import SEED_BYTES, CkksError, PublicParams, SecretKey, expand_a
from fedcrypt.crypto.keyfiles import read_key_file, write_key_pair

PUBLIC_FILE = "ckks.public.json"
SECRET_FILE = "ckks.secret"
_BLOCKS_PER_WINDOW = 16


@dataclass
class _Sum:
    """Both ciphertext polynomials of every block, summed modulo each prime (uint32: primes < 2^30)."""

    c0: np.ndarray
    c1: np.ndarray


class CkksMechanism(OneShotMechanism[_Sum]):
    """CKKS encryption of every value (FedML-HE with ``encrypt_ratio = 1``).

    Built with only :class:`PublicParams` it can aggregate and nothing else (the server's
    instance); with a :class:`SecretKey` it can also protect and recover (a client's).
    """

    name: ClassVar[str] = "ckks"
    server_can_recover: ClassVar[bool] = False

    def __init__(self, public: PublicParams, secret: SecretKey | None = None) -> None:
        if secret is not None and secret.public != public:
            raise CkksError("the secret key does not belong to these public parameters")
        self.public = public
        self._secret = secret
        self._moduli = np.array(public.moduli, dtype=np.uint64)
        self._moduli32 = self._moduli.astype(np.uint32)

    # --- client ----------------------------------------------------------------------------

    def protect(self, contribution: np.ndarray, ctx: RoundContext) -> Payload:
        secret = self._require_secret("encrypt")
        peak = float(np.max(np.abs(contribution))) if contribution.size else 0.0
        worst = peak * max(len(ctx.participants), 1)
        if not np.isfinite(peak) or worst >= self.public.preset.bound:
            raise ValueError(
                f"contribution values up to {peak:.3g} could sum to {worst:.3g} over {len(ctx.participants)} "
                f"clients, beyond preset {self.public.preset.name!r}'s range of {self.public.preset.bound:.3g}; "
                "use a wider preset or weighting = \"uniform\""
            )
        c0, seed = secret.encrypt(contribution)
        return Payload(
            meta={"fingerprint": self.public.fingerprint},
            arrays={"c0": c0.reshape(-1), "seed": np.frombuffer(seed, dtype=np.uint8)},
        )

    def recover(self, aggregate: Payload, ctx: RoundContext) -> np.ndarray:
        secret = self._require_secret("decrypt", RecoveryError)
        if aggregate.meta.get("fingerprint") != self.public.fingerprint:
            raise RecoveryError("the aggregate was encrypted under another key (fingerprint mismatch)")
        blocks = self.public.blocks(ctx.vector_size)
        shape = (blocks, *self.public.shape)
        polys = []
        for name in ("c0", "c1"):
            poly = aggregate.arrays.get(name)
            if poly is None or poly.dtype != np.uint32 or poly.shape != (int(np.prod(shape)),):
                raise RecoveryError(f"aggregate has no {name} of {blocks} ciphertexts")
            polys.append(np.asarray(poly).reshape(shape))
        if not all((poly < self._moduli[:, None]).all() for poly in polys):
            raise RecoveryError("aggregate coefficients out of range: corrupted ciphertext")
        summed = secret.decrypt(polys[0], polys[1], ctx.vector_size)
        if not np.isfinite(summed).all() or np.abs(summed).max(initial=0.0) >= 2 * self.public.preset.bound:
            raise RecoveryError("decrypted sum is out of range: wrong key or corrupted aggregate")
        return summed.astype(np.float32)

    def _require_secret(self, action: str, error: type[Exception] = ValueError) -> SecretKey:
        if self._secret is None:
            raise error(f"cannot {action}: this party holds no CKKS secret key")
        return self._secret

    # --- server ----------------------------------------------------------------------------

    def empty(self, ctx: RoundContext) -> _Sum:
        shape = (self.public.blocks(ctx.vector_size), *self.public.shape)
        return _Sum(np.zeros(shape, dtype=np.uint32), np.zeros(shape, dtype=np.uint32))

    def fold_one(self, accumulator: _Sum, payload: Payload, ctx: RoundContext) -> _Sum:
        if payload.meta.get("fingerprint") != self.public.fingerprint:
            raise PayloadRejected("ciphertext under another key or parameters (fingerprint mismatch)")
        c0, seed = payload.arrays.get("c0"), payload.arrays.get("seed")
        blocks, (primes, degree) = accumulator.c0.shape[0], self.public.shape
        block_size = primes * degree
        if c0 is None or c0.dtype != np.uint32 or c0.shape != (blocks * block_size,):
            raise PayloadRejected(f"expected c0 as {blocks} ciphertexts of {block_size} uint32 coefficients")
        if seed is None or seed.dtype != np.uint8 or seed.shape != (SEED_BYTES,):
            raise PayloadRejected(f"expected a {SEED_BYTES}-byte seed")
        seed_bytes = np.asarray(seed).tobytes()
        step = _BLOCKS_PER_WINDOW * block_size
        # Two passes in windows of whole ciphertexts: validate all, then add (a rejected payload
        # leaves the sum untouched, and c0 may still be in a spooled file).
        for start in range(0, blocks * block_size, step):
            window = c0[start : start + step].reshape(-1, primes, degree)
            if not (window < self._moduli[:, None]).all():
                raise PayloadRejected("ciphertext coefficients out of range: corrupted ciphertext")
        q = self._moduli32[:, None]
        for start in range(0, blocks, _BLOCKS_PER_WINDOW):
            window = c0[start * block_size : (start + _BLOCKS_PER_WINDOW) * block_size].reshape(-1, primes, degree)
            _add_mod(accumulator.c0[start : start + window.shape[0]], window, q)
            for block in range(start, start + window.shape[0]):
                _add_mod(accumulator.c1[block], expand_a(seed_bytes, block, self._moduli, degree, np.uint32), q)
        return accumulator

    def to_payload(self, accumulator: _Sum, ctx: RoundContext) -> Payload:
        return Payload(
            meta={"fingerprint": self.public.fingerprint},
            arrays={"c0": accumulator.c0.reshape(-1), "c1": accumulator.c1.reshape(-1)},
        )


def _add_mod(total: np.ndarray, term: np.ndarray, q: np.ndarray) -> None:
    """``total = (total + term) mod q`` in place, for uint32 operands already below q < 2^30."""
    total += term
    np.subtract(total, q, out=total, where=total >= q)


def load_public(key_dir: Path) -> PublicParams:
    """The server's material: public parameters and the key fingerprint."""
    return PublicParams.from_json(read_key_file(key_dir / PUBLIC_FILE, "ckks", CkksError))


def load_secret(key_dir: Path) -> SecretKey:
    """A client's material: the secret key, checked against the public parameters."""
    public = load_public(key_dir)
    path = key_dir / SECRET_FILE
    if not path.is_file():
        raise CkksError(f"no CKKS secret key at {path}: clients need the key authority's secret file")
    secret = SecretKey(public.preset, path)
    if secret.public != public:
        raise CkksError(f"{path} does not match {key_dir / PUBLIC_FILE} (fingerprints differ)")
    return secret


def write_keys(key_dir: Path, secret: SecretKey) -> None:
    """Write the public parameters (0644) and the secret key (0600) for a key authority."""
    write_key_pair(key_dir, (PUBLIC_FILE, secret.public.to_json()), (SECRET_FILE, secret.to_bytes()), CkksError)
