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
import logging
import os
import secrets
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import numpy as np
import zstandard

from fedcrypt.crypto.keyfiles import write_secret

SEED_BYTES = 32
_SEAL_MAGIC = 0xA15E
_SEAL_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compression, reserved, size
_CT_MEMBERS = struct.Struct("<4QBQQQdQ")  # parms_id, is_ntt_form, size, degree, moduli count, scale, correction
_DYN_SIZE = struct.Struct("<Q")
_COMPRESSION_NONE, _COMPRESSION_ZSTD = 0, 2


log = logging.getLogger(__name__)

#: Vectors of fewer ciphertexts than this are not worth a worker process.
_PARALLEL_MIN_BLOCKS = 32
#: This process's share of the ciphertexts relative to one worker's.
_LOCAL_SHARE_WEIGHT = 1.15


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


def expand_a(seed: bytes, block: int, moduli: np.ndarray, degree: int, dtype: type = np.uint64) -> np.ndarray:
    """The uniformly random polynomial ``a`` of ciphertext ``block``, from the message seed.

    SHAKE-256(seed | block) gives 32-bit words, masked to 30 bits; words >= q are rejected, so
    each coefficient is uniform modulo its prime. Both sides compute the same ``a`` (a longer
    SHAKE output only extends a shorter one).
    """
    words_needed = moduli.shape[0] * degree * 9 // 8 + 64
    while True:
        stream = hashlib.shake_256(seed + block.to_bytes(8, "little")).digest(4 * words_needed)
        words = np.frombuffer(stream, dtype=np.uint32) & np.uint32((1 << 30) - 1)
        out = np.empty((moduli.shape[0], degree), dtype=dtype)
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

    def __init__(
        self,
        preset: Preset,
        seal_secret_key_file: Path | None = None,
        *,
        key_bytes: bytes | None = None,
        processes: int | None = None,
    ) -> None:
        """A fresh key, or the key in ``seal_secret_key_file`` / ``key_bytes`` (SEAL's format).

        ``processes`` (default: the CPUs this process may use) is how many processes share the
        work on large vectors: this one and ``processes - 1`` workers started on first need.
        """
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
        self._processes = max(1, processes if processes is not None else len(os.sched_getaffinity(0)))
        self._workers: list[_Worker] | None = None
        if key_bytes is not None:
            fd = os.open(self._scratch.path(), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(key_bytes)
            seal_secret_key_file = Path(self._scratch.path())
        if seal_secret_key_file is None:
            self._key = seal.KeyGenerator(self._context).secret_key()
        else:
            self._key = seal.SecretKey()
            try:
                self._key.load(self._context, str(seal_secret_key_file))
            except (RuntimeError, ValueError) as exc:
                raise CkksError(f"{seal_secret_key_file}: not a CKKS secret key for preset {preset.name!r}: {exc}") from None
            finally:
                if key_bytes is not None:
                    os.unlink(seal_secret_key_file)
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

    def to_bytes(self) -> bytes:
        """The SEAL secret key (for :meth:`save` and the worker processes; never for the server)."""
        self._key.save(self._scratch.path())
        data = Path(self._scratch.path()).read_bytes()
        os.unlink(self._scratch.path())
        return data

    def save(self, path: Path) -> None:
        """Write the SEAL secret key to ``path`` with mode 0600 (created fresh, never widened)."""
        write_secret(path, self.to_bytes())

    # --- encryption ------------------------------------------------------------------------

    def encrypt(self, values: np.ndarray, seed: bytes | None = None) -> tuple[np.ndarray, bytes]:
        """Encrypt a flat float vector; returns ``c0`` as uint32 (blocks, primes, degree) and the seed.

        Large vectors are split by ciphertext over this process and its worker processes.
        """
        seed = secrets.token_bytes(SEED_BYTES) if seed is None else seed
        blocks = self.public.blocks(values.shape[0])
        out = np.empty((blocks, *self.public.shape), dtype=np.uint32)
        slots = self.preset.slots

        def local(first: int, count: int) -> None:
            self.encrypt_blocks(values[first * slots : (first + count) * slots], seed, first, out[first : first + count])

        self._split(blocks, local, lambda pool, first, count: pool.encrypt(
            values[first * slots : (first + count) * slots], seed, first, out[first : first + count]))
        return out, seed

    def decrypt(self, c0: np.ndarray, c1: np.ndarray, values: int) -> np.ndarray:
        """Decrypt ciphertexts given as both polynomials (uint32/uint64, (blocks, primes, degree))."""
        k, n = self.public.shape
        if c0.shape != c1.shape or c0.ndim != 3 or c0.shape[1:] != (k, n):
            raise CkksError(f"ciphertexts have shape {c0.shape}/{c1.shape}, expected (blocks, {k}, {n})")
        if c0.shape[0] != self.public.blocks(values):
            raise CkksError(f"{c0.shape[0]} ciphertexts cannot hold {values} values")
        slots = self.preset.slots
        out = np.empty(values, dtype=np.float64)

        def local(first: int, count: int) -> None:
            self.decrypt_blocks(c0[first : first + count], c1[first : first + count], out[first * slots : (first + count) * slots])

        self._split(c0.shape[0], local, lambda pool, first, count: pool.decrypt(
            c0[first : first + count], c1[first : first + count], out[first * slots : (first + count) * slots]))
        return out

    def _split(self, blocks: int, local: Callable[[int, int], None], remote: Callable[..., Callable[[], None]]) -> None:
        """Run ``blocks`` ciphertexts' work over the worker pool and this process, in contiguous
        shares; a share whose worker fails is redone here (and the pool is restarted next time)."""
        pool = self._worker_pool(blocks) or []
        # Workers get slightly smaller shares: theirs arrive through a pipe first.
        per_worker = int(blocks / (len(pool) + _LOCAL_SHARE_WEIGHT)) if pool else 0
        mine = blocks - per_worker * len(pool)
        pending: list[tuple[int, int, Callable[[], None] | None]] = []
        for worker, first in zip(pool, range(mine, blocks, per_worker or 1)):
            count = per_worker
            try:
                pending.append((first, count, remote(worker, first, count)))
            except _WorkerFailed as exc:
                log.warning("%s; encrypting in this process instead", exc)
                pending.append((first, count, None))
        local(0, mine)
        for first, count, finish in pending:
            try:
                if finish is None:
                    raise _WorkerFailed("a CKKS worker process was unavailable")
                finish()
            except _WorkerFailed as exc:
                log.warning("%s; redoing its share in this process", exc)
                self.close()
                local(first, count)

    def _worker_pool(self, blocks: int) -> list[_Worker] | None:
        """Worker processes for this key, started on first need (none for small jobs or one core)."""
        if self._processes <= 1 or blocks < _PARALLEL_MIN_BLOCKS:
            return None
        if self._workers is None:
            self._workers = [_Worker(self) for _ in range(self._processes - 1)]
        return self._workers

    def encrypt_blocks(self, values: np.ndarray, seed: bytes, first: int, out: np.ndarray) -> None:
        """Encrypt ``values`` into ciphertexts ``first, first + 1, ...`` of a message, in this process."""
        seal = self._seal
        slots, (_, n) = self.preset.slots, self.public.shape
        plain, cipher = seal.Plaintext(), seal.Ciphertext(self._context)
        scale = 2.0**self.preset.scale_bits
        q = self._moduli[:, None]
        path = self._scratch.path()
        for index in range(out.shape[0]):
            chunk = np.asarray(values[index * slots : (index + 1) * slots], dtype=np.float64)
            self._encoder.encode(chunk.tolist(), scale, plain)
            self._encryptor.encrypt_symmetric(plain, cipher)
            cipher.save(path)
            c0, a_seal = self._read_ciphertext(Path(path).read_bytes())
            a = expand_a(seed, first + index, self._moduli, n)
            swap = (a_seal + (q - a)) % q
            swap *= self._s
            swap %= q
            c0 += swap
            c0 %= q
            out[index] = c0
        if out.shape[0]:
            os.unlink(path)

    def decrypt_blocks(self, c0: np.ndarray, c1: np.ndarray, out: np.ndarray) -> None:
        """Decrypt ciphertexts into ``out`` (their slots, the last one possibly partial), in this process."""
        seal = self._seal
        k, n = self.public.shape
        slots = self.preset.slots
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
            out[start : start + slots] = decoded[: min(slots, out.shape[0] - start)]
        if c0.shape[0]:
            os.unlink(path)

    def close(self) -> None:
        """Stop the worker processes (they also stop when this process exits)."""
        for worker in self._workers or ():
            worker.close()
        self._workers = None

    def __del__(self) -> None:
        if getattr(self, "_workers", None):
            self.close()

    def _read_ciphertext(self, blob: bytes) -> tuple[np.ndarray, np.ndarray]:
        members = _seal_payload(blob)
        k, n = self.public.shape
        data = np.frombuffer(members[-8 * 2 * k * n :], dtype=np.uint64).reshape(2, k, n)
        return data[0].copy(), data[1]


# --- worker processes ------------------------------------------------------------------------
# SEAL's Python bindings hold the GIL, so a client uses every core through worker processes,
# each holding the same secret key (sent over its stdin pipe, never written to disk or argv).
# Frames: a request header (op, first ciphertext, ciphertexts, values, seed, payload bytes) and
# payload; a reply status byte, payload length and payload.

REQUEST = struct.Struct("<cQQQ32sQ")
REPLY = struct.Struct("<cQ")
_HELLO = struct.Struct("<QQ")  # preset name length, key length


class _WorkerFailed(Exception):
    """A worker process died or answered nonsense; its share is redone in the main process."""


def read_exact(stream: IO[bytes], size: int) -> bytes:
    data = stream.read(size)
    if data is None or len(data) != size:
        raise EOFError(f"expected {size} bytes, got {0 if data is None else len(data)}")
    return data


class _Worker:
    """One worker process holding ``secret``'s key (see :mod:`fedcrypt.crypto._ckks_worker`)."""

    def __init__(self, secret: SecretKey) -> None:
        self._secret = secret
        self._process = subprocess.Popen(
            [sys.executable, "-m", "fedcrypt.crypto._ckks_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        name, key = secret.preset.name.encode(), secret.to_bytes()
        try:
            self._write(_HELLO.pack(len(name), len(key)) + name + key)
            fingerprint = self._reply().decode()
        except _WorkerFailed:
            self.close()
            raise
        if fingerprint != secret.public.fingerprint:
            self.close()
            raise _WorkerFailed("a CKKS worker process loaded another key")

    def encrypt(self, values: np.ndarray, seed: bytes, first: int, out: np.ndarray) -> Callable[[], None]:
        payload = np.ascontiguousarray(values, dtype=np.float64)
        header = REQUEST.pack(b"E", first, out.shape[0], payload.shape[0], seed, payload.nbytes)
        return self._request(out, header, payload)

    def decrypt(self, c0: np.ndarray, c1: np.ndarray, out: np.ndarray) -> Callable[[], None]:
        polys = [np.ascontiguousarray(poly, dtype=np.uint32) for poly in (c0, c1)]
        size = sum(poly.nbytes for poly in polys)
        header = REQUEST.pack(b"D", 0, c0.shape[0], out.shape[0], bytes(SEED_BYTES), size)
        return self._request(out, header, *polys)

    def _request(self, out: np.ndarray, *parts: bytes | np.ndarray) -> Callable[[], None]:
        """Send the request from a thread (pipe writes release the GIL, so the transfer overlaps
        the main process's own share); the returned call waits for the reply into ``out``."""
        failures: list[_WorkerFailed] = []

        def send() -> None:
            try:
                self._write(*parts)
            except _WorkerFailed as exc:
                failures.append(exc)

        sender = threading.Thread(target=send, name="ckks-worker-send", daemon=True)
        sender.start()

        def finish() -> None:
            sender.join()
            if failures:
                raise failures[0]
            out[...] = np.frombuffer(self._reply(out.nbytes), dtype=out.dtype).reshape(out.shape)

        return finish

    def _write(self, *parts: bytes | np.ndarray) -> None:
        stdin = self._process.stdin
        try:
            assert stdin is not None
            for part in parts:
                stdin.write(memoryview(part).cast("B"))
            stdin.flush()
        except (OSError, ValueError) as exc:
            raise _WorkerFailed(f"a CKKS worker process is gone ({exc})") from None

    def _reply(self, expected: int | None = None) -> bytes:
        stdout = self._process.stdout
        try:
            assert stdout is not None
            status, size = REPLY.unpack(read_exact(stdout, REPLY.size))
            data = read_exact(stdout, size)
        except (OSError, EOFError, struct.error) as exc:
            raise _WorkerFailed(f"a CKKS worker process failed ({exc})") from None
        if status != b"K":
            raise _WorkerFailed(f"a CKKS worker process refused: {data.decode(errors='replace')}")
        if expected is not None and size != expected:
            raise _WorkerFailed(f"a CKKS worker process answered {size} bytes, expected {expected}")
        return data

    def close(self) -> None:
        if self._process.poll() is None:
            for stream in (self._process.stdin, self._process.stdout):
                if stream is not None:
                    stream.close()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
