"""The ``batchcrypt`` mechanism: quantized, packed Paillier (BatchCrypt, Zhang et al. 2020).

Two stages per round:

1. ``stats``: each client reports the min and max of every tensor of its contribution (only
   those statistics). The server rejects absurd reports (NaN/Inf, min > max, magnitudes beyond
   ``max_abs``), takes the global range per tensor and computes the dACIQ clipping threshold
   from it (:func:`fedcrypt.crypto.batching.clip_threshold`). The slot layout is sized for the
   number of clients that passed, so their sum cannot overflow.
2. ``protect``: clients clip, quantize to ``bits`` with stochastic rounding, pack ``K`` values
   per plaintext and encrypt under Damgard-Jurik level 2 of the job's Paillier key (plaintexts
   of ``2 |n|`` bits in ciphertexts of ``3 |n|`` bits: about 4 bytes per value at 16 bits and
   2048-bit keys, 10 clients). The server multiplies ciphertexts with the public key only.
   The encryption randomness is computed in the background while the client waits for the
   server's plan (all cores), so answering ``protect`` is one multiplication per ciphertext.

A key-holding client decrypts the aggregate, unpacks it (reporting any slot whose two sign bits
show overflow) and un-quantizes with the thresholds the aggregate carries. The server learns the
per-tensor min/max of every client and the sum, never a single update.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import ClassVar

import gmpy2
import numpy as np
from gmpy2 import mpz

from fedcrypt.core.mechanism import (
    AggregatePiece,
    ClientProtector,
    LocalModel,
    Mechanism,
    PayloadRejected,
    RecoveryError,
    RoundContext,
    ServerAggregator,
    piece_rows,
    row_ranges,
)
from fedcrypt.core.messages import Payload
from fedcrypt.crypto.batching import OverflowDetected, SlotLayout, clip_threshold, dequantize, quantize
from fedcrypt.crypto.paillier import PaillierError, PrivateKey, PublicKey

STATS_STAGE = "stats"
PROTECT_STAGE = "protect"
#: Damgard-Jurik level: ciphertexts are 1.5x their plaintexts instead of Paillier's 2x.
LEVEL = 2
DEFAULT_MAX_ABS = 1e9


class BatchCryptMechanism(Mechanism):
    """Quantized, batched Paillier. With only a :class:`PublicKey` it can aggregate (the
    server's instance); with the :class:`PrivateKey` it can also protect and recover.

    ``tensor_sizes`` splits the contribution into tensors with a clipping threshold each (the
    trailing weight entry always gets its own); without it the parameters share one threshold.
    ``background_randomness`` computes a round's encryption randomness while the client waits
    for the server's plan; ``max_abs`` is the largest min/max a client may report.
    """

    name: ClassVar[str] = "batchcrypt"
    server_can_recover: ClassVar[bool] = False

    def __init__(
        self,
        public: PublicKey,
        private: PrivateKey | None = None,
        *,
        bits: int = 16,
        tensor_sizes: Sequence[int] | None = None,
        max_abs: float = DEFAULT_MAX_ABS,
        background_randomness: bool = True,
    ) -> None:
        if private is not None and private.public.n != public.n:
            raise PaillierError("the private key does not belong to this public key")
        if not 2 <= bits <= 32:
            raise ValueError(f"batchcrypt bits must be in 2..32, got {bits}")
        self.public = public.at_level(LEVEL)
        self._private = private.at_level(LEVEL) if private is not None else None
        self.bits = bits
        self.max_abs = max_abs
        self._tensor_sizes = tuple(int(size) for size in tensor_sizes) if tensor_sizes else None
        self._obfuscators: list[mpz] = []
        self._pool_lock = threading.Lock()
        self.background_randomness = background_randomness

    def segments(self, vector_size: int) -> np.ndarray:
        """Sizes of the contribution's segments, each with its own clipping threshold."""
        if self._tensor_sizes is None:
            return np.array([vector_size - 1, 1], dtype=np.int64)
        if sum(self._tensor_sizes) + 1 != vector_size:
            raise ValueError(f"tensor sizes add up to {sum(self._tensor_sizes)}, the contribution has {vector_size - 1}")
        return np.array([*self._tensor_sizes, 1], dtype=np.int64)

    def layout(self, clients: int) -> SlotLayout:
        return SlotLayout(self.bits, clients, self.public.plaintext_bits)

    # --- randomness ahead of time -------------------------------------------------------------

    def precompute(self, count: int) -> None:
        """Compute ``count`` encryption obfuscators now (e.g. between rounds), so that encrypting
        later costs one multiplication per ciphertext."""
        fresh = self.public.obfuscators(count)
        with self._pool_lock:
            self._obfuscators.extend(fresh)

    def _take_obfuscators(self, count: int) -> list[mpz]:
        """``count`` unused obfuscators: from the pool first, the rest computed now."""
        with self._pool_lock:
            taken = self._obfuscators[:count]
            del self._obfuscators[:count]
        return taken + self.public.obfuscators(count - len(taken))

    def _return_obfuscators(self, unused: list[mpz]) -> None:
        with self._pool_lock:
            self._obfuscators.extend(unused)

    # --- roles --------------------------------------------------------------------------------

    def server_round(self, ctx: RoundContext) -> ServerAggregator:
        return _Aggregator(self, ctx)

    def client_round(self, ctx: RoundContext, client: str, local: LocalModel | None = None) -> ClientProtector:
        if self._private is None:
            raise ValueError("cannot encrypt: this party holds no Paillier private key")
        return _Protector(self, ctx)

    def recover(self, aggregate: Payload, ctx: RoundContext) -> np.ndarray:
        if self._private is None:
            raise RecoveryError("cannot decrypt: this party holds no Paillier private key")
        try:
            self._check_key(aggregate)
            layout, alphas = self._read_plan(aggregate, ctx.vector_size, max_clients=None)
            first, last = piece_rows(aggregate, layout.plaintexts(ctx.vector_size))
            ciphertexts = self._read_ciphertexts(aggregate, last - first)
            start, stop = first * layout.slots, min(last * layout.slots, ctx.vector_size)
            modulus = self.public.plaintext_modulus
            half = modulus // 2
            signed = [int(m) if m <= half else int(m - modulus) for m in self._private.decrypt(ciphertexts)]
            sums = layout.unpack(signed, stop - start)
        except (PaillierError, OverflowDetected, ValueError) as exc:
            raise RecoveryError(f"batchcrypt aggregate: {exc}") from None
        scales = np.repeat(alphas, self.segments(ctx.vector_size))[start:stop]
        return dequantize(sums, scales, self.bits).astype(np.float32)

    def split(self, aggregate: Payload, ctx: RoundContext, pieces: int) -> list[AggregatePiece]:
        """Pieces of whole ciphertexts: ``K`` values each, with the round's plan."""
        try:
            layout, _ = self._read_plan(aggregate, ctx.vector_size, max_clients=None)
        except ValueError:
            return super().split(aggregate, ctx, pieces)  # the key holder reports what is wrong
        ciphertexts = aggregate.arrays.get("c")
        rows = layout.plaintexts(ctx.vector_size)
        if ciphertexts is None or ciphertexts.shape[0] != rows:
            return super().split(aggregate, ctx, pieces)
        return [
            AggregatePiece(
                first * layout.slots,
                min(last * layout.slots, ctx.vector_size),
                Payload({**aggregate.meta, "rows": [first, last]},
                        {"alpha": aggregate.arrays["alpha"], "c": ciphertexts[first:last]}),
            )
            for first, last in row_ranges(rows, pieces)
        ]

    # --- payload checks -----------------------------------------------------------------------

    def _check_key(self, payload: Payload) -> None:
        if payload.meta.get("fingerprint") != self.public.fingerprint:
            raise PaillierError("ciphertexts under another key (fingerprint mismatch)")

    def _read_plan(self, payload: Payload, vector_size: int, max_clients: int | None) -> tuple[SlotLayout, np.ndarray]:
        """The slot layout and clipping thresholds a request or aggregate announces."""
        bits, clients = payload.meta.get("bits"), payload.meta.get("clients")
        if bits != self.bits:
            raise ValueError(f"the round quantizes to {bits!r} bits, this party is configured for {self.bits}")
        if not isinstance(clients, int) or clients < 1 or (max_clients is not None and clients > max_clients):
            raise ValueError(f"implausible client count {clients!r} in the round's plan")
        alphas = payload.arrays.get("alpha")
        segments = self.segments(vector_size).shape[0]
        if alphas is None or alphas.dtype != np.float64 or alphas.shape != (segments,):
            raise ValueError(f"the round's plan needs {segments} float64 clipping thresholds")
        if not (np.isfinite(alphas).all() and (alphas > 0).all()):
            raise ValueError("clipping thresholds must be finite and positive")
        return self.layout(clients), np.array(alphas)

    def _read_ciphertexts(self, payload: Payload, rows: int) -> list[mpz]:
        array = payload.arrays.get("c")
        expected = (rows, self.public.ciphertext_bytes)
        if array is None or array.shape != expected:
            raise PaillierError(f"expected {expected[0]} ciphertexts of {expected[1]} bytes")
        return self.public.from_array(np.asarray(array))


class _Aggregator(ServerAggregator):
    def __init__(self, mechanism: BatchCryptMechanism, ctx: RoundContext) -> None:
        self._mechanism = mechanism
        self._ctx = ctx
        self._sizes = mechanism.segments(ctx.vector_size)
        self._low = np.full(self._sizes.shape[0], np.inf)
        self._high = np.full(self._sizes.shape[0], -np.inf)
        self._plan: Payload | None = None
        self._layout: SlotLayout | None = None
        self._total: list[mpz] = []
        self.folded = 0

    @property
    def stages(self) -> tuple[str, ...]:
        return (STATS_STAGE, PROTECT_STAGE)

    def request(self, stage: str, client: str) -> Payload:
        if stage == STATS_STAGE:
            return Payload()
        if stage == PROTECT_STAGE and self._plan is not None:
            return self._plan
        raise ValueError(f"batchcrypt has no request for stage {stage!r} now")

    def fold(self, stage: str, client: str, payload: Payload) -> None:
        mechanism = self._mechanism
        if payload.meta.get("fingerprint") != mechanism.public.fingerprint:
            raise PayloadRejected("payload under another key (fingerprint mismatch)")
        if stage == STATS_STAGE:
            self._fold_range(payload)
        elif stage == PROTECT_STAGE and self._layout is not None:
            try:
                ciphertexts = mechanism._read_ciphertexts(payload, self._layout.plaintexts(self._ctx.vector_size))
            except PaillierError as exc:
                raise PayloadRejected(str(exc)) from None
            modulus = mechanism.public.modulus
            self._total = [gmpy2.f_mod(total * c, modulus) for total, c in zip(self._total, ciphertexts)]
            self.folded += 1
        else:
            raise PayloadRejected(f"unexpected stage {stage!r}")

    def _fold_range(self, payload: Payload) -> None:
        ranges = payload.arrays.get("range")
        shape = (self._sizes.shape[0], 2)
        if ranges is None or ranges.dtype != np.float64 or ranges.shape != shape:
            raise PayloadRejected(f"statistics must be a float64 array of shape {shape} (min, max per tensor)")
        low, high = ranges[:, 0], ranges[:, 1]
        if not np.isfinite(ranges).all():
            raise PayloadRejected("reported min/max contains NaN/Inf")
        if (low > high).any():
            raise PayloadRejected("reported min exceeds max")
        peak = float(np.abs(ranges).max())
        if peak > self._mechanism.max_abs:
            raise PayloadRejected(
                f"reported magnitude {peak:.3g} is absurd (limit {self._mechanism.max_abs:.3g}); "
                "it would wreck every client's quantization"
            )
        np.minimum(self._low, low, out=self._low)
        np.maximum(self._high, high, out=self._high)

    def close_stage(self, stage: str, survivors: Sequence[str]) -> None:
        if stage != STATS_STAGE or not survivors:
            return
        mechanism = self._mechanism
        clients = len(survivors)
        alphas = np.array(
            [
                clip_threshold(float(low), float(high), int(size) * clients, mechanism.bits)
                for low, high, size in zip(self._low, self._high, self._sizes)
            ],
            dtype=np.float64,
        )
        self._layout = mechanism.layout(clients)
        self._total = [mpz(1)] * self._layout.plaintexts(self._ctx.vector_size)  # 1 encrypts 0
        self._plan = Payload(
            meta={"fingerprint": mechanism.public.fingerprint, "bits": mechanism.bits, "clients": clients},
            arrays={"alpha": alphas},
        )

    def finish(self) -> Payload:
        if self._plan is None or self.folded == 0:
            raise RecoveryError("no payload was aggregated this round")
        return Payload(
            meta=dict(self._plan.meta),
            arrays={"alpha": self._plan.arrays["alpha"], "c": self._mechanism.public.to_array(self._total)},
        )

    def metrics(self) -> dict[str, float]:
        if self._layout is None:
            return {}
        return {
            "batchcrypt_slots": float(self._layout.slots),
            "batchcrypt_bytes_per_value": self._mechanism.public.ciphertext_bytes / self._layout.slots,
        }


class _Protector(ClientProtector):
    def __init__(self, mechanism: BatchCryptMechanism, ctx: RoundContext) -> None:
        self._mechanism = mechanism
        self._ctx = ctx
        self._done = False
        self._randomness: threading.Thread | None = None
        self._ready: list[mpz] = []

    def _start_randomness(self, count: int) -> None:
        """Compute this round's encryption randomness while the client waits for the plan."""

        def compute() -> None:
            self._ready = self._mechanism._take_obfuscators(count)

        self._randomness = threading.Thread(target=compute, name="batchcrypt-randomness", daemon=True)
        self._randomness.start()

    def _randomness_for(self, count: int) -> list[mpz]:
        if self._randomness is not None:
            self._randomness.join()
            self._randomness = None
        ready, self._ready = self._ready, []
        if len(ready) > count:
            self._mechanism._return_obfuscators(ready[count:])
        return ready[:count] + self._mechanism._take_obfuscators(max(count - len(ready), 0))

    @property
    def done(self) -> bool:
        return self._done

    def respond(self, stage: str, request: Payload, contribution: np.ndarray) -> Payload:
        mechanism = self._mechanism
        sizes = mechanism.segments(contribution.shape[0])
        if stage == STATS_STAGE:
            if not np.isfinite(contribution).all():
                raise ValueError("the contribution contains NaN/Inf")
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            ranges = np.stack(
                [np.minimum.reduceat(contribution, starts), np.maximum.reduceat(contribution, starts)], axis=1
            ).astype(np.float64)
            if mechanism.background_randomness:  # fewer clients pack more per plaintext: an upper bound
                most = mechanism.layout(max(len(self._ctx.participants), 1)).plaintexts(contribution.shape[0])
                self._start_randomness(most)
            return Payload(meta={"fingerprint": mechanism.public.fingerprint}, arrays={"range": ranges})
        if stage != PROTECT_STAGE:
            raise ValueError(f"mechanism 'batchcrypt' has no stage {stage!r}")
        mechanism._check_key(request)
        layout, alphas = mechanism._read_plan(request, contribution.shape[0], max_clients=len(self._ctx.participants))
        quantized = quantize(contribution, np.repeat(alphas, sizes), mechanism.bits)
        modulus = mechanism.public.plaintext_modulus
        plaintexts = [value % modulus for value in layout.pack(quantized)]
        ciphertexts = mechanism.public.encrypt(plaintexts, self._randomness_for(len(plaintexts)))
        self._done = True
        return Payload(
            meta={"fingerprint": mechanism.public.fingerprint}, arrays={"c": mechanism.public.to_array(ciphertexts)}
        )
