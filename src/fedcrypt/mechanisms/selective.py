"""Selective parameter encryption (FedML-HE, Jin et al. 2023): ``ckks`` with ``encrypt_ratio < 1``
or ``encrypt_layers``.

Only the entries under an encryption *mask* travel as CKKS ciphertexts; the rest travel in the
clear, and the server adds both parts. The mask is the same for every client:

* **By layer** (``encrypt_layers``, as NVFlare offers): entries of the tensors whose names match
  the patterns. Known to everyone from the job, no agreement needed.
* **By sensitivity** (``encrypt_ratio``): in the first round the server runs, every client also
  computes a per-parameter privacy-sensitivity map on its data (see
  :meth:`~fedcrypt.models.training.LocalTrainer.sensitivity`), scales it to a maximum of 1 (each
  client has an equal say) and sends it CKKS-encrypted. The server adds the maps without reading
  any, and sends the encrypted global map back; each client decrypts it and takes the top
  ``encrypt_ratio`` fraction of parameters (ties broken by position) as the mask. Clients report
  the mask's digest with their update, and the server rejects a client whose mask differs.
  Later rounds reuse the mask; a client that missed the agreement (joined later, restarted)
  receives the encrypted map with its request. A restarted server agrees a fresh mask.

The server learns the mask (which positions are in the clear) and the aggregate map, as it learns
the aggregate update; it never sees one client's map or one client's encrypted entries. The
contribution's weight entry (the sample count) is always encrypted.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from fedcrypt.core.mechanism import (
    ClientProtector,
    LocalModel,
    Mechanism,
    PayloadRejected,
    RecoveryError,
    RoundContext,
    ServerAggregator,
)
from fedcrypt.core.messages import Payload
from fedcrypt.core.wire import WINDOW
from fedcrypt.crypto.ckks import PublicParams, SecretKey
from fedcrypt.mechanisms.ckks import CkksMechanism

if TYPE_CHECKING:
    from fedcrypt.core.params import ParamSpec  # imports PyTorch, which helper processes do without

log = logging.getLogger(__name__)

SENSITIVITY_STAGE = "sensitivity"
PROTECT_STAGE = "protect"


def layer_mask(spec: ParamSpec, patterns: Sequence[str]) -> np.ndarray:
    """The contribution mask (parameters, then the weight entry) for tensors matching ``patterns``."""
    names = [tensor.name for tensor in spec.tensors]
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            raise ValueError(f"encrypt_layers pattern {pattern!r} matches no tensor; the model has {', '.join(names)}")
    mask = np.zeros(spec.size + 1, dtype=bool)
    offset = 0
    for tensor in spec.tensors:
        if any(fnmatch.fnmatchcase(tensor.name, pattern) for pattern in patterns):
            mask[offset : offset + tensor.numel] = True
        offset += tensor.numel
    mask[-1] = True
    return mask


def selected_count(parameters: int, ratio: float) -> int:
    """How many parameters a sensitivity mask encrypts (at least one)."""
    return min(parameters, max(1, math.ceil(ratio * parameters)))


def sensitivity_mask(scores: np.ndarray, ratio: float) -> np.ndarray:
    """The top ``ratio`` of ``scores`` (ties to the earlier position), plus the weight entry."""
    count = selected_count(scores.shape[0], ratio)
    order = np.argsort(-scores, kind="stable")
    mask = np.zeros(scores.shape[0] + 1, dtype=bool)
    mask[order[:count]] = True
    mask[-1] = True
    return mask


def mask_digest(mask: np.ndarray) -> str:
    return hashlib.sha256(np.packbits(mask).tobytes() + mask.shape[0].to_bytes(8, "little")).hexdigest()[:32]


def normalized(scores: np.ndarray) -> np.ndarray:
    """Scores scaled to a maximum of 1; non-finite entries (buffers) become 1 (always sensitive)."""
    scores = np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(scores)
    peak = float(scores[finite].max(initial=0.0))
    out = np.ones_like(scores)
    out[finite] = np.clip(scores[finite], 0.0, None) / peak if peak > 0 else 0.0
    return out


class SelectiveCkksMechanism(Mechanism):
    """CKKS for the masked entries, plaintext for the rest; see the module docstring."""

    name: ClassVar[str] = "ckks"
    server_can_recover: ClassVar[bool] = False

    def __init__(
        self,
        public: PublicParams,
        secret: SecretKey | None = None,
        *,
        spec: ParamSpec,
        encrypt_ratio: float = 1.0,
        encrypt_layers: Sequence[str] = (),
    ) -> None:
        if not 0 < encrypt_ratio <= 1:
            raise ValueError(f"encrypt_ratio must be in (0, 1], got {encrypt_ratio}")
        if encrypt_layers and encrypt_ratio != 1:
            raise ValueError("set either encrypt_ratio or encrypt_layers, not both")
        self.ckks = CkksMechanism(public, secret)
        self.parameters = spec.size
        self.encrypt_ratio = encrypt_ratio
        #: The mask's bits (clients; the server too for layer masks) and its digest (everyone).
        self.mask: np.ndarray | None = layer_mask(spec, encrypt_layers) if encrypt_layers else None
        self.digest: str | None = mask_digest(self.mask) if self.mask is not None else None
        self.encrypted_count = (
            int(self.mask.sum()) if self.mask is not None else selected_count(spec.size, encrypt_ratio) + 1
        )
        self._encrypted_map: Payload | None = None  # server: the aggregate map, for late clients
        self._holders: set[str] = set()  # server: clients known to hold the mask

    def server_round(self, ctx: RoundContext) -> ServerAggregator:
        self._check_size(ctx)
        return _SelectiveServer(self, ctx)

    def client_round(self, ctx: RoundContext, client: str, local: LocalModel | None = None) -> ClientProtector:
        self._check_size(ctx)
        return _SelectiveClient(self, ctx, local)

    def recover(self, aggregate: Payload, ctx: RoundContext) -> np.ndarray:
        self._check_size(ctx, RecoveryError)
        mask = self.mask
        if mask is None or aggregate.meta.get("mask") != self.digest:
            raise RecoveryError("the aggregate was made under another encryption mask than this party's")
        plain = aggregate.arrays.get("plain")
        if plain is None or plain.dtype != np.float32 or plain.shape != (mask.shape[0] - self.encrypted_count,):
            raise RecoveryError("aggregate has no plaintext part of the mask's size")
        encrypted = self.ckks.recover(aggregate, self._sub(ctx, self.encrypted_count))
        out = np.empty(mask.shape[0], dtype=np.float32)
        out[mask] = encrypted
        out[~mask] = plain
        return out

    def server_view(self, stage: str, payload: Payload, ctx: RoundContext) -> np.ndarray | None:
        """The plaintext part in place, NaN under the mask. Reading it needs the mask's bits,
        which a client instance holds (and a server instance for layer masks); the audit assumes
        the server knows them."""
        plain = payload.arrays.get("plain") if stage == PROTECT_STAGE else None
        if plain is None:
            return None
        if self.mask is None:
            raise ValueError("this instance holds no encryption mask to place the plaintext part")
        view = np.full(self.mask.shape[0], np.nan, dtype=np.float32)
        view[~self.mask] = plain
        return view

    # --- shared by both halves -------------------------------------------------------------

    def _check_size(self, ctx: RoundContext, error: type[Exception] = ValueError) -> None:
        if ctx.vector_size != self.parameters + 1:
            raise error(f"selective encryption was set up for {self.parameters} parameters, the round has "
                        f"{ctx.vector_size - 1}")

    @staticmethod
    def _sub(ctx: RoundContext, size: int) -> RoundContext:
        return replace(ctx, vector_size=size)

    def _adopt_map(self, encrypted_map: Payload, ctx: RoundContext) -> None:
        """Decrypt the global sensitivity map and derive the mask (a client)."""
        try:
            scores = self.ckks.recover(encrypted_map, self._sub(ctx, self.parameters))
        except RecoveryError as exc:
            raise ValueError(f"cannot decrypt the global sensitivity map: {exc}") from None
        self.mask = sensitivity_mask(scores.astype(np.float64), self.encrypt_ratio)
        self.digest = mask_digest(self.mask)


class _SelectiveServer(ServerAggregator):
    def __init__(self, mechanism: SelectiveCkksMechanism, ctx: RoundContext) -> None:
        self._mechanism = mechanism
        self._ctx = ctx
        self._agreeing = mechanism.digest is None
        self._stages = (SENSITIVITY_STAGE, PROTECT_STAGE) if self._agreeing else (PROTECT_STAGE,)
        ckks = mechanism.ckks
        self._map_sum = ckks.empty(mechanism._sub(ctx, mechanism.parameters)) if self._agreeing else None
        self._map_folded = 0
        self._count = mechanism.encrypted_count
        self._digest = mechanism.digest
        self._cipher_sum = ckks.empty(mechanism._sub(ctx, self._count))
        self._plain_sum = np.zeros(ctx.vector_size - self._count, dtype=np.float32)
        self._holders: list[str] = []
        self._mismatched = 0

    @property
    def stages(self) -> tuple[str, ...]:
        return self._stages

    def request(self, stage: str, client: str) -> Payload:
        mechanism = self._mechanism
        if stage == SENSITIVITY_STAGE:
            return Payload(meta={"select": SENSITIVITY_STAGE})
        meta = {"select": "mask", "mask": self._digest}
        if self._agreeing or (client not in mechanism._holders and mechanism._encrypted_map is not None):
            assert mechanism._encrypted_map is not None
            meta["fingerprint"] = mechanism._encrypted_map.meta["fingerprint"]
            return Payload(meta=meta, arrays=dict(mechanism._encrypted_map.arrays))
        return Payload(meta=meta)

    def fold(self, stage: str, client: str, payload: Payload) -> None:
        ckks = self._mechanism.ckks
        if stage == SENSITIVITY_STAGE:
            assert self._map_sum is not None
            sub = self._mechanism._sub(self._ctx, self._mechanism.parameters)
            self._map_sum = ckks.fold_one(self._map_sum, payload, sub)
            self._map_folded += 1
            return
        digest = payload.meta.get("mask")
        if self._digest is None and isinstance(digest, str):
            self._digest = digest  # the first client to answer fixes the round's mask
        if digest != self._digest:
            self._mismatched += 1
            raise PayloadRejected("update made under another encryption mask than the other clients'")
        plain = payload.arrays.get("plain")
        size = self._plain_sum.shape[0]
        if plain is None or plain.dtype != np.float32 or plain.shape != (size,):
            raise PayloadRejected(f"expected a plaintext part of {size} float32 values")
        for start in range(0, size, WINDOW):
            if not np.isfinite(plain[start : start + WINDOW]).all():
                raise PayloadRejected("plaintext part contains NaN/Inf values")
        self._cipher_sum = ckks.fold_one(self._cipher_sum, payload, self._mechanism._sub(self._ctx, self._count))
        for start in range(0, size, WINDOW):
            self._plain_sum[start : start + WINDOW] += plain[start : start + WINDOW]
        self._holders.append(client)

    def close_stage(self, stage: str, survivors: Sequence[str]) -> None:
        mechanism = self._mechanism
        if stage == SENSITIVITY_STAGE and self._map_folded:
            assert self._map_sum is not None
            sub = mechanism._sub(self._ctx, mechanism.parameters)
            mechanism._encrypted_map = mechanism.ckks.to_payload(self._map_sum, sub)
            self._map_sum = None
        elif stage == PROTECT_STAGE:
            if self._agreeing and self._mismatched >= len(self._holders):
                # The first answer fixed the mask and most clients disagreed: agree again next round
                # rather than hold the job to a mask only a minority derived.
                log.warning("selective encryption: clients derived different masks; agreeing again next round")
                return
            if self._agreeing and self._digest is not None:
                log.info("round %d: clients agreed an encryption mask of %d of %d entries (%s)",
                         self._ctx.round, self._count, self._ctx.vector_size, self._digest[:12])
            mechanism.digest = self._digest  # the server learns the digest, never needs the bits
            mechanism._holders.update(self._holders)

    def finish(self) -> Payload:
        if not self._holders:
            raise RecoveryError("no payload was aggregated this round")
        ckks = self._mechanism.ckks
        payload = ckks.to_payload(self._cipher_sum, self._mechanism._sub(self._ctx, self._count))
        payload.meta["mask"] = self._digest
        payload.arrays["plain"] = self._plain_sum
        return payload

    def metrics(self) -> dict[str, float]:
        return {"encrypted_fraction": self._count / self._ctx.vector_size}


class _SelectiveClient(ClientProtector):
    def __init__(self, mechanism: SelectiveCkksMechanism, ctx: RoundContext, local: LocalModel | None) -> None:
        self._mechanism = mechanism
        self._ctx = ctx
        self._local = local
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def respond(self, stage: str, request: Payload, contribution: np.ndarray) -> Payload:
        mechanism = self._mechanism
        if stage == SENSITIVITY_STAGE:
            if self._local is None:
                raise ValueError("selective encryption needs the client's model to compute its sensitivity")
            scores = normalized(self._local.sensitivity())
            self._local = None
            if scores.shape != (mechanism.parameters,):
                raise ValueError(f"sensitivity map has {scores.shape[0]} entries, expected {mechanism.parameters}")
            return mechanism.ckks.protect(scores, mechanism._sub(self._ctx, mechanism.parameters))
        if stage != PROTECT_STAGE:
            raise ValueError(f"selective CKKS has no stage {stage!r}")
        self._local = None
        if request.arrays:
            mechanism._adopt_map(request, self._ctx)
        mask, wanted = mechanism.mask, request.meta.get("mask")
        if mask is None:
            raise ValueError("this client holds no encryption mask and the request carries no map")
        if wanted is not None and wanted != mechanism.digest:
            raise ValueError(f"the server asks for mask {wanted}, this client's is {mechanism.digest}")
        encrypted = mechanism.ckks.protect(contribution[mask], mechanism._sub(self._ctx, mechanism.encrypted_count))
        encrypted.meta["mask"] = mechanism.digest
        encrypted.arrays["plain"] = np.ascontiguousarray(contribution[~mask], dtype=np.float32)
        self._done = True
        return encrypted
