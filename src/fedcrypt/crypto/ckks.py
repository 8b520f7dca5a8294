"""CKKS homomorphic encryption for summing float vectors, on Microsoft SEAL (through TenSEAL).

The only homomorphic operation federated averaging needs is addition, so fedcrypt uses CKKS in
its cheapest form:

* **Parameters.** A single level of small (30-bit) RNS primes: no multiplications, no
  rescaling, no relinearization or Galois keys. (SEAL reserves the last prime of the chain as
  its key-switching prime; ciphertexts never carry it.) Every preset meets 128-bit security by
  the Homomorphic Encryption Security Standard (log q <= 109 for N = 4096, <= 218 for 8192,
  counting all primes); SEAL checks this when the context is built.
* **Seeded symmetric encryption.** Clients hold the secret key ``s`` and encrypt symmetrically:
  a ciphertext is ``(c0, a)`` with ``c0 = -a*s + e + m`` (NTT form) and ``a`` uniformly random.
  ``a`` is derived from a public 32-byte seed (SHAKE-256), so only ``c0`` and the seed travel:
  half the bytes. SEAL encrypts ``m`` with its own random ``a'``; we then swap in the seeded
  ``a`` by ``c0 += (a' - a) * s``, which keeps ``c0 + a*s = m + e`` with SEAL's error ``e``.
* **Aggregation without the key.** Ciphertext addition is coefficient-wise addition modulo each
  prime, which the server does with NumPy: it regenerates ``a`` from each seed and holds no
  key at all (:class:`PublicParams` is moduli, degree, scale and the key fingerprint).
* **Decryption** (by a secret-key holder): ``c0 + c1*s`` through SEAL, then CKKS decoding.

SEAL objects only serialize through file paths in TenSEAL's bindings, so ciphertexts pass
through a private temporary directory (0700, in memory under ``/dev/shm`` where available).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import struct
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import zstandard

SEED_BYTES = 32
_SEAL_MAGIC = 0xA15E
_SEAL_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compression, reserved, size
_CT_MEMBERS = struct.Struct("<4QBQQQdQ")  # parms_id, is_ntt_form, size, degree, moduli count, scale, correction
_DYN_SIZE = struct.Struct("<Q")
_COMPRESSION_NONE, _COMPRESSION_ZSTD = 0, 2


class CkksError(ValueError):
    """Wrong key, wrong parameters, malformed key file or ciphertext."""


@dataclass(frozen=True)
class Preset:
    """CKKS parameters: ring degree, RNS prime sizes (bits) and the encoding scale (bits)."""

    name: str
    poly_modulus_degree: int
    prime_bits: tuple[int, ...]
    scale_bits: int
    description: str

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def data_bits(self) -> int:
        """Bits of the ciphertext modulus (all primes but SEAL's key-switching one)."""
        return sum(self.prime_bits[:-1])

    @property
    def bound(self) -> float:
        """Largest magnitude a slot of the *sum* may reach and still decrypt correctly (2 bits of margin)."""
        return 2.0 ** (self.data_bits - self.scale_bits - 2)


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            "fast",
            4096,
            (30, 30, 30),
            40,
            "N=4096, ciphertext modulus 60 bits, scale 2^40: sums up to 2^18 in magnitude, 16 B per value",
        ),
        Preset(
            "wide",
            8192,
            (30, 30, 30, 30),
            40,
            "N=8192, ciphertext modulus 90 bits, scale 2^40: sums up to 2^48 in magnitude, 24 B per value",
        ),
    )
}


@dataclass(frozen=True)
class PublicParams:
    """What the server holds: enough to add ciphertexts, nothing to decrypt them."""

    preset: Preset
    moduli: tuple[int, ...]
    fingerprint: str

    @property
    def shape(self) -> tuple[int, int]:
        """One ciphertext polynomial: (number of primes, degree)."""
        return len(self.moduli), self.preset.poly_modulus_degree

    def blocks(self, values: int) -> int:
        """Ciphertexts needed for ``values`` floats."""
        return -(-values // self.preset.slots)

    def to_json(self) -> str:
        return json.dumps(
            {"kind": "fedcrypt-ckks-public", "preset": asdict(self.preset), "moduli": list(self.moduli),
             "fingerprint": self.fingerprint},
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> PublicParams:
        try:
            raw = json.loads(text)
            if raw.get("kind") != "fedcrypt-ckks-public":
                raise ValueError("not a fedcrypt CKKS public parameter file")
            preset = raw["preset"]
            preset = Preset(
                str(preset["name"]), int(preset["poly_modulus_degree"]), tuple(int(b) for b in preset["prime_bits"]),
                int(preset["scale_bits"]), str(preset["description"]),
            )
            moduli = tuple(int(q) for q in raw["moduli"])
            fingerprint = str(raw["fingerprint"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CkksError(f"unreadable CKKS public parameters: {exc}") from None
        if PRESETS.get(preset.name) != preset:
            raise CkksError(f"CKKS public parameters name an unknown or altered preset {preset.name!r}")
        if len(moduli) != len(preset.prime_bits) - 1 or not all(1 < q < 2**30 for q in moduli):
            raise CkksError("CKKS public parameters: moduli do not match the preset")
        return cls(preset, moduli, fingerprint)


def expand_a(seed: bytes, block: int, moduli: np.ndarray, degree: int) -> np.ndarray:
    """The uniformly random polynomial ``a`` of ciphertext ``block``, from the message seed.

    SHAKE-256(seed | block) gives 32-bit words, masked to 30 bits; words >= q are rejected, so
    each coefficient is uniform modulo its prime. Both sides compute the same ``a`` (a longer
    SHAKE output only extends a shorter one).
    """
    words_needed = moduli.shape[0] * degree * 9 // 8 + 64
    while True:
        stream = hashlib.shake_256(seed + block.to_bytes(8, "little")).digest(4 * words_needed)
        words = np.frombuffer(stream, dtype=np.uint32) & np.uint32((1 << 30) - 1)
        out = np.empty((moduli.shape[0], degree), dtype=np.uint64)
        taken = 0
        for row, modulus in enumerate(moduli):
            positions = np.flatnonzero(words[taken:] < modulus)
            if positions.shape[0] < degree:
                break
            out[row] = words[taken:][positions[:degree]]
            taken += int(positions[degree - 1]) + 1
        else:
            return out
        words_needed *= 2  # vanishingly rare: too many rejections in this stream


class _Scratch:
    """A private directory for SEAL's path-only serialization (removed with the object)."""

    def __init__(self) -> None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.directory = tempfile.mkdtemp(prefix="fedcrypt-ckks-", dir=base)
        self._local = threading.local()

    def path(self) -> str:
        if not hasattr(self._local, "path"):
            self._local.path = os.path.join(self.directory, f"obj-{threading.get_ident()}")
        return self._local.path

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def __del__(self) -> None:
        self.close()


def _seal_payload(blob: bytes) -> bytes:
    """The members of a saved SEAL object, decompressed."""
    if len(blob) < _SEAL_HEADER.size:
        raise CkksError("SEAL object too short")
    magic, header_size, _, _, compression, _, size = _SEAL_HEADER.unpack_from(blob)
    if magic != _SEAL_MAGIC or header_size != _SEAL_HEADER.size or size != len(blob):
        raise CkksError("not a SEAL object")
    body = blob[_SEAL_HEADER.size :]
    if compression == _COMPRESSION_ZSTD:
        return zstandard.ZstdDecompressor().decompress(body, max_output_size=1 << 30)
    if compression == _COMPRESSION_NONE:
        return body
    raise CkksError(f"unsupported SEAL compression {compression}")


def _seal_header(version: tuple[int, int], members: int) -> bytes:
    """The header of an uncompressed SEAL object with ``members`` bytes after it."""
    return _SEAL_HEADER.pack(_SEAL_MAGIC, _SEAL_HEADER.size, *version, _COMPRESSION_NONE, 0, _SEAL_HEADER.size + members)


class SecretKey:
    """The key authority's and the clients' side: encrypts and decrypts. Never give it to the server."""

    def __init__(self, preset: Preset, seal_secret_key_file: Path | None = None) -> None:
        import tenseal.sealapi as seal  # imported lazily: only HE jobs need it

        self._seal = seal
        self.preset = preset
        parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
        parms.set_poly_modulus_degree(preset.poly_modulus_degree)
        parms.set_coeff_modulus(seal.CoeffModulus.Create(preset.poly_modulus_degree, list(preset.prime_bits)))
        self._context = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
        if not self._context.parameters_set():
            raise CkksError(f"preset {preset.name!r} rejected by SEAL: {self._context.parameters_error_message()}")
        primes = [m.value() for m in parms.coeff_modulus()]
        self._moduli = np.array(primes[:-1], dtype=np.uint64)  # the last is SEAL's key-switching prime
        self._scratch = _Scratch()
        if seal_secret_key_file is None:
            self._key = seal.KeyGenerator(self._context).secret_key()
        else:
            self._key = seal.SecretKey()
            try:
                self._key.load(self._context, str(seal_secret_key_file))
            except (RuntimeError, ValueError) as exc:
                raise CkksError(f"{seal_secret_key_file}: not a CKKS secret key for preset {preset.name!r}: {exc}") from None
        self._encryptor = seal.Encryptor(self._context, self._key)
        self._decryptor = seal.Decryptor(self._context, self._key)
        self._encoder = seal.CKKSEncoder(self._context)
        self._parms_id = self._context.first_parms_id()
        self._s = self._secret_ntt()
        self.public = PublicParams(preset, tuple(int(q) for q in self._moduli), self._fingerprint())

    # --- keys ------------------------------------------------------------------------------

    def _secret_ntt(self) -> np.ndarray:
        """The secret key polynomial in NTT form, one row per prime (for the seed swap)."""
        self._key.data().save(self._scratch.path())
        blob = Path(self._scratch.path()).read_bytes()
        os.unlink(self._scratch.path())
        members = _seal_payload(blob)
        self._seal_version = (blob[3], blob[4])  # SEAL refuses objects claiming another version
        degree = self.preset.poly_modulus_degree
        rows = len(self.preset.prime_bits)  # the key is stored modulo every prime of the chain
        data = np.frombuffer(members[-8 * rows * degree :], dtype=np.uint64).reshape(rows, degree)
        return data[: len(self._moduli)].copy()

    def _fingerprint(self) -> str:
        digest = hashlib.sha256(b"fedcrypt-ckks-v1")
        digest.update(json.dumps(asdict(self.preset), sort_keys=True).encode())
        digest.update(self._moduli.tobytes())
        digest.update(self._s.tobytes())
        return digest.hexdigest()[:32]

    def save(self, path: Path) -> None:
        """Write the SEAL secret key to ``path`` with mode 0600 (created fresh, never widened)."""
        self._key.save(self._scratch.path())
        data = Path(self._scratch.path()).read_bytes()
        os.unlink(self._scratch.path())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)

    # --- encryption ------------------------------------------------------------------------

    def encrypt(self, values: np.ndarray, seed: bytes | None = None) -> tuple[np.ndarray, bytes]:
        """Encrypt a flat float vector; returns ``c0`` as uint32 (blocks, primes, degree) and the seed."""
        seal = self._seal
        seed = secrets.token_bytes(SEED_BYTES) if seed is None else seed
        slots, (k, n) = self.preset.slots, self.public.shape
        blocks = self.public.blocks(values.shape[0])
        out = np.empty((blocks, k, n), dtype=np.uint32)
        plain, cipher = seal.Plaintext(), seal.Ciphertext(self._context)
        scale = 2.0**self.preset.scale_bits
        q = self._moduli[:, None]
        path = self._scratch.path()
        for block in range(blocks):
            chunk = np.asarray(values[block * slots : (block + 1) * slots], dtype=np.float64)
            self._encoder.encode(chunk.tolist(), scale, plain)
            self._encryptor.encrypt_symmetric(plain, cipher)
            cipher.save(path)
            c0, a_seal = self._read_ciphertext(Path(path).read_bytes())
            a = expand_a(seed, block, self._moduli, n)
            swap = (a_seal + (q - a)) % q
            swap *= self._s
            swap %= q
            c0 += swap
            c0 %= q
            out[block] = c0
        os.unlink(path)
        return out, seed

    def decrypt(self, c0: np.ndarray, c1: np.ndarray, values: int) -> np.ndarray:
        """Decrypt ciphertexts given as both polynomials (uint32/uint64, (blocks, primes, degree))."""
        seal = self._seal
        k, n = self.public.shape
        if c0.shape != c1.shape or c0.ndim != 3 or c0.shape[1:] != (k, n):
            raise CkksError(f"ciphertexts have shape {c0.shape}/{c1.shape}, expected (blocks, {k}, {n})")
        if c0.shape[0] != self.public.blocks(values):
            raise CkksError(f"{c0.shape[0]} ciphertexts cannot hold {values} values")
        slots = self.preset.slots
        out = np.empty(values, dtype=np.float64)
        cipher, plain = seal.Ciphertext(self._context), seal.Plaintext()
        path = self._scratch.path()
        prefix = _CT_MEMBERS.pack(*self._parms_id, 1, 2, n, k, 2.0**self.preset.scale_bits, 1)
        dyn_header = _seal_header(self._seal_version, _DYN_SIZE.size + 8 * 2 * k * n)
        for block in range(c0.shape[0]):
            data = np.concatenate([c0[block].astype(np.uint64).ravel(), c1[block].astype(np.uint64).ravel()])
            members = prefix + dyn_header + _DYN_SIZE.pack(2 * k * n) + data.tobytes()
            Path(path).write_bytes(_seal_header(self._seal_version, len(members)) + members)
            cipher.load(self._context, path)
            self._decryptor.decrypt(cipher, plain)
            decoded = np.asarray(self._encoder.decode_double(plain))
            start = block * slots
            out[start : start + slots] = decoded[: min(slots, values - start)]
        os.unlink(path)
        return out

    def _read_ciphertext(self, blob: bytes) -> tuple[np.ndarray, np.ndarray]:
        members = _seal_payload(blob)
        k, n = self.public.shape
        data = np.frombuffer(members[-8 * 2 * k * n :], dtype=np.uint64).reshape(2, k, n)
        return data[0].copy(), data[1]
