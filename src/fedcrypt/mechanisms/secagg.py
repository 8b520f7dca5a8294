"""The ``secagg`` mechanism: SecAgg+ (Bell et al. 2020), or classic SecAgg (Bonawitz et al. 2017)
with a complete graph. The server learns the sum of the survivors' vectors and nothing else, and
finishes the round when clients drop out, as long as enough of each one's neighbours remain.

Four stages per round, over the ordinary message layer:

1. ``advertise``: each client sends two fresh X25519 public keys, ``c`` (to encrypt shares) and
   ``s`` (to agree pairwise masks). The server rejects malformed, low-order and duplicated keys
   and links the clients into a ``k``-regular ring graph (a Harary graph over a random order;
   ``k = n - 1`` is classic SecAgg).
2. ``share``: each client draws a self-mask seed ``b`` and Shamir-shares ``b`` and its ``s``
   secret key among its neighbours with threshold ``t``; each pair of shares is encrypted with
   AES-GCM under a key agreed from ``c`` keys (so the server, routing them, cannot read them) and
   bound to job, round, sender and recipient. The client also commits to ``b`` (SHA-256).
3. ``mask``: the client decodes its vector to fixed point in ``Z_2^64`` and adds ``PRG(b)`` and,
   for every neighbour ``j`` still in the round, ``+-PRG(s_ij)`` with ``s_ij`` agreed from ``s``
   keys (``+`` if its name sorts first). The PRG is AES-256-CTR. The server adds these vectors.
4. ``unmask``: each client reveals, for its neighbours, the share of ``b`` of those that sent a
   masked vector and the share of the ``s`` key of those that dropped after sharing, never both
   for one client. The server reconstructs them (checking extra shares for consistency, ``b``
   against its commitment and the ``s`` key against its public key) and removes the self masks
   and the dropped clients' pairwise masks. A secret with fewer than ``t`` shares fails the
   round with a clear message; a wrong sum is never returned.

Clients send ``[w * delta, w]`` (Flower's weighting); the trust model is an honest-but-curious
server (it follows the protocol); a server that lies about who dropped is outside it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

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
from fedcrypt.core.wire import add_windowed
from fedcrypt.crypto import agreement, ring, shamir
from fedcrypt.crypto.agreement import KEY_BYTES, private_bytes as _private_bytes, public_bytes as _public_bytes
from fedcrypt.crypto.agreement import usable_public_key as _usable_public_key

log = logging.getLogger(__name__)

ADVERTISE, SHARE, MASK, UNMASK = "advertise", "share", "mask", "unmask"
STAGES = (ADVERTISE, SHARE, MASK, UNMASK)
_NONCE_BYTES = 12
SEALED_BYTES = _NONCE_BYTES + 2 * shamir.SHARE_BYTES + 16  # nonce, two shares, GCM tag


def _agree(private: X25519PrivateKey, public: bytes, purpose: bytes) -> bytes:
    """A 32-byte key from X25519 agreement, separated by purpose."""
    return agreement.agree(private, public, b"fedcrypt-secagg/" + purpose)


def _commitment(seed: bytes, ctx: RoundContext, client: str) -> bytes:
    return hashlib.sha256(b"fedcrypt-secagg-b|" + f"{ctx.job}|{ctx.round}|{client}|".encode() + seed).digest()


def _associated(ctx: RoundContext, sender: str, recipient: str) -> bytes:
    return f"fedcrypt-secagg-share|{ctx.job}|{ctx.round}|{sender}|{recipient}".encode()


def _sign(client: str, neighbour: str) -> int:
    return 1 if client < neighbour else -1


class SecAggMechanism(Mechanism):
    """SecAgg+ over ``neighbors`` neighbours per client (default ``~3 log2 n``; ``n - 1`` or more
    gives classic SecAgg) with reconstruction threshold ``floor(threshold * k) + 1`` shares."""

    name: ClassVar[str] = "secagg"
    server_can_recover: ClassVar[bool] = True

    def __init__(self, neighbors: int | None = None, threshold: float = 0.5) -> None:
        if neighbors is not None and neighbors < 2:
            raise ValueError(f"secagg needs at least 2 neighbours per client, got {neighbors}")
        if not 0.5 <= threshold < 1:
            raise ValueError(f"secagg threshold must be a fraction in [0.5, 1), got {threshold}")
        self.neighbors = neighbors
        self.threshold = threshold

    def degree(self, clients: int) -> int:
        """``k``: neighbours per client among ``clients`` (even, so the ring graph is regular)."""
        wanted = self.neighbors if self.neighbors is not None else 3 * math.ceil(math.log2(max(clients, 2)))
        if wanted >= clients - 1:
            return clients - 1
        return wanted + wanted % 2

    def shares_needed(self, degree: int) -> int:
        """``t``: shares that reconstruct a secret; a strict majority of neighbours by default."""
        return min(degree, max(2, math.floor(self.threshold * degree) + 1))

    def server_round(self, ctx: RoundContext) -> ServerAggregator:
        return _Aggregator(self, ctx)

    def client_round(self, ctx: RoundContext, client: str, local: LocalModel | None = None) -> ClientProtector:
        return _Protector(ctx, client)

    def recover(self, aggregate: Payload, ctx: RoundContext) -> np.ndarray:
        total = aggregate.arrays.get("sum")
        if total is None or total.dtype != np.int64 or total.shape != (ctx.vector_size,):
            raise RecoveryError("secagg aggregate has no int64 sum of the expected size")
        return ring.decode(total)

    def server_view(self, stage: str, payload: Payload, ctx: RoundContext) -> np.ndarray | None:
        """The masked vector, read as fixed point: every value is there, each hidden by pad words."""
        masked = payload.arrays.get("y") if stage == MASK else None
        return None if masked is None else ring.decode(masked)


# --- server -----------------------------------------------------------------------------------


class _Aggregator(ServerAggregator):
    def __init__(self, mechanism: SecAggMechanism, ctx: RoundContext) -> None:
        self._mechanism = mechanism
        self._ctx = ctx
        self._point = {name: index + 1 for index, name in enumerate(ctx.participants)}
        self._c_keys: dict[str, bytes] = {}
        self._s_keys: dict[str, bytes] = {}
        self._graph: dict[str, list[str]] = {}
        self._threshold = 0
        self._sealed: dict[str, dict[str, bytes]] = {}  # recipient -> sender -> sealed shares
        self._commitments: dict[str, bytes] = {}
        self._shared: set[str] = set()  # U2: sent their shares
        self._masked: set[str] = set()  # U3: sent a masked vector
        self._sum = np.zeros(ctx.vector_size, dtype=np.uint64)
        self._b_shares: dict[str, dict[int, int]] = {}  # client -> share point -> share of its seed
        self._s_shares: dict[str, dict[int, int]] = {}  # client -> share point -> share of its mask key
        self._unmasked = False
        self._dropped_after_sharing = 0

    @property
    def stages(self) -> tuple[str, ...]:
        return STAGES

    # requests ---------------------------------------------------------------------------------

    def request(self, stage: str, client: str) -> Payload:
        if stage == ADVERTISE:
            return Payload()
        neighbours = self._graph.get(client)
        if neighbours is None:
            raise ValueError(f"client {client!r} is not in this round's graph")
        if stage == SHARE:
            return Payload(
                {"neighbors": neighbours, "threshold": self._threshold},
                {
                    "c_pk": _key_rows([self._c_keys[j] for j in neighbours]),
                    "s_pk": _key_rows([self._s_keys[j] for j in neighbours]),
                },
            )
        if stage == MASK:
            senders = [j for j in neighbours if j in self._shared]
            sealed = b"".join(self._sealed.get(client, {})[j] for j in senders)
            return Payload({"senders": senders}, {"shares": np.frombuffer(sealed, np.uint8).reshape(-1, SEALED_BYTES)})
        if stage == UNMASK:
            return Payload({
                "survivors": [j for j in neighbours if j in self._masked],
                "dropped": [j for j in neighbours if j in self._shared and j not in self._masked],
            })
        raise ValueError(f"secagg has no stage {stage!r}")

    # replies ----------------------------------------------------------------------------------

    def fold(self, stage: str, client: str, payload: Payload) -> None:
        try:
            if stage == ADVERTISE:
                self._fold_keys(client, payload)
            elif stage == SHARE:
                self._fold_shares(client, payload)
            elif stage == MASK:
                self._fold_masked(client, payload)
            elif stage == UNMASK:
                self._fold_revealed(client, payload)
            else:
                raise ValueError(f"unexpected stage {stage!r}")
        except ValueError as exc:
            raise PayloadRejected(str(exc)) from None

    def _fold_keys(self, client: str, payload: Payload) -> None:
        c_key = payload.rows("c_pk", (1, KEY_BYTES)).tobytes()
        s_key = payload.rows("s_pk", (1, KEY_BYTES)).tobytes()
        if c_key == s_key or not (_usable_public_key(c_key) and _usable_public_key(s_key)):
            raise ValueError("advertised keys are equal or not usable X25519 public keys")
        known = set(self._c_keys.values()) | set(self._s_keys.values())
        if c_key in known or s_key in known:
            raise ValueError("duplicated public key (another client advertised it)")
        self._c_keys[client], self._s_keys[client] = c_key, s_key

    def _fold_shares(self, client: str, payload: Payload) -> None:
        neighbours = self._graph.get(client)
        if neighbours is None:
            raise ValueError("not in this round's graph")
        if payload.names("recipients") != neighbours:
            raise ValueError("shares are not addressed to this client's neighbours")
        sealed = payload.rows("shares", (len(neighbours), SEALED_BYTES))
        commitment = payload.rows("commit", (1, 32)).tobytes()
        for recipient, row in zip(neighbours, sealed):
            self._sealed.setdefault(recipient, {})[client] = row.tobytes()
        self._commitments[client] = commitment
        self._shared.add(client)

    def _fold_masked(self, client: str, payload: Payload) -> None:
        add_windowed(self._sum, payload.vector("y", self._ctx.vector_size, np.uint64))  # wraps: mod 2^64
        self._masked.add(client)
        unverified = payload.meta.get("unverified")
        if unverified:
            log.warning("secagg round %d: %s could not verify the shares of %s", self._ctx.round, client, unverified)

    def _fold_revealed(self, client: str, payload: Payload) -> None:
        expected = self.request(UNMASK, client).meta
        survivors = payload.names("survivors")
        dropped = payload.names("dropped")
        if not set(survivors) <= set(expected["survivors"]) or not set(dropped) <= set(expected["dropped"]):
            raise ValueError("revealed shares for clients that were not asked for")
        b_rows = payload.rows("b", (len(survivors), shamir.SHARE_BYTES))
        s_rows = payload.rows("s", (len(dropped), shamir.SHARE_BYTES))
        point = self._point[client]
        values = [(j, shamir.from_bytes(row.tobytes())) for j, row in zip(survivors, b_rows)]
        s_values = [(j, shamir.from_bytes(row.tobytes())) for j, row in zip(dropped, s_rows)]
        for j, value in values:
            self._b_shares.setdefault(j, {})[point] = value
        for j, value in s_values:
            self._s_shares.setdefault(j, {})[point] = value

    # stage ends -------------------------------------------------------------------------------

    def close_stage(self, stage: str, survivors: Sequence[str]) -> None:
        if stage == ADVERTISE:
            self._link(list(survivors))
        elif stage in (SHARE, MASK):
            remaining = len(self._shared if stage == SHARE else self._masked)
            if remaining < self._threshold:
                raise RecoveryError(
                    f"secagg: only {remaining} clients left after {stage!r}, the threshold is {self._threshold}"
                )
        elif stage == UNMASK:
            self._unmask()

    def _link(self, clients: list[str]) -> None:
        """The k-regular ring graph (Harary graph) over a random order of ``clients``."""
        if len(clients) < 3:
            raise RecoveryError(f"secagg needs at least 3 clients, {len(clients)} advertised keys")
        order = list(clients)
        secrets.SystemRandom().shuffle(order)
        degree = self._mechanism.degree(len(order))
        self._threshold = self._mechanism.shares_needed(degree)
        half = degree // 2
        position = {name: index for index, name in enumerate(order)}
        for name in order:
            if degree == len(order) - 1:
                linked = [j for j in order if j != name]
            else:
                index = position[name]
                linked = [order[(index + step) % len(order)] for step in range(-half, half + 1) if step]
            self._graph[name] = sorted(linked, key=self._point.__getitem__)

    def _unmask(self) -> None:
        """Remove the survivors' self masks and the dropped clients' pairwise masks."""
        removals: list[tuple[bytes, int]] = []  # (seed, +1 to subtract its mask, -1 to add it)
        for j in sorted(self._masked):
            seed = self._reconstruct(j, self._b_shares, "self-mask seed")
            if _commitment(seed, self._ctx, j) != self._commitments[j]:
                raise RecoveryError(f"secagg: reconstructed self-mask seed of {j} does not match its commitment")
            removals.append((seed, 1))
        dropped = sorted(self._shared - self._masked)
        for j in dropped:
            key_bytes = self._reconstruct(j, self._s_shares, "mask key")
            private = X25519PrivateKey.from_private_bytes(key_bytes)
            if _public_bytes(private) != self._s_keys[j]:
                raise RecoveryError(f"secagg: reconstructed mask key of {j} does not match its public key")
            removals += [
                (_agree(private, self._s_keys[i], b"mask"), _sign(i, j)) for i in self._graph[j] if i in self._masked
            ]
        stream = ring.Keystream(self._ctx.vector_size)  # every secret checked before the sum changes
        for seed, sign in removals:
            (np.subtract if sign > 0 else np.add)(self._sum, stream.words(seed), out=self._sum)
        self._dropped_after_sharing = len(dropped)
        self._unmasked = True

    def _reconstruct(self, client: str, collected: dict[str, dict[int, int]], what: str) -> bytes:
        points = collected.get(client, {})
        if len(points) < self._threshold:
            raise RecoveryError(
                f"secagg: only {len(points)} shares of the {what} of {client}, {self._threshold} needed; "
                "too many clients dropped, the round fails"
            )
        try:
            return shamir.combine(points, self._threshold)
        except shamir.ShamirError as exc:
            raise RecoveryError(f"secagg: {what} of {client}: {exc}") from None

    def contributors(self) -> int | None:
        return len(self._masked) if self._unmasked else None

    def finish(self) -> Payload:
        if not self._unmasked or not self._masked:
            raise RecoveryError("secagg: the round did not reach the unmask stage")
        return Payload(arrays={"sum": self._sum.view(np.int64)})

    def metrics(self) -> dict[str, float]:
        degree = len(next(iter(self._graph.values()))) if self._graph else 0
        return {
            "secagg_neighbors": float(degree),
            "secagg_threshold": float(self._threshold),
            "secagg_dropped_after_sharing": float(self._dropped_after_sharing),
        }


# --- client -----------------------------------------------------------------------------------


class _Protector(ClientProtector):
    def __init__(self, ctx: RoundContext, client: str) -> None:
        self._ctx = ctx
        self._client = client
        self._point = {name: index + 1 for index, name in enumerate(ctx.participants)}
        self._c_key = X25519PrivateKey.generate()
        self._s_key = X25519PrivateKey.generate()
        self._seed = secrets.token_bytes(32)
        self._neighbours: list[str] = []
        self._s_public: dict[str, bytes] = {}
        self._c_public: dict[str, bytes] = {}
        self._held: dict[str, tuple[int, int]] = {}  # sender -> (share of b, share of s key)
        self._senders: list[str] = []
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def respond(self, stage: str, request: Payload, contribution: np.ndarray) -> Payload:
        if stage == ADVERTISE:
            return Payload(arrays={
                "c_pk": np.frombuffer(_public_bytes(self._c_key), np.uint8).reshape(1, -1),
                "s_pk": np.frombuffer(_public_bytes(self._s_key), np.uint8).reshape(1, -1),
            })
        if stage == SHARE:
            return self._share(request)
        if stage == MASK:
            return self._mask(request, contribution)
        if stage == UNMASK:
            return self._reveal(request)
        raise ValueError(f"mechanism 'secagg' has no stage {stage!r}")

    def _share(self, request: Payload) -> Payload:
        neighbours = request.names("neighbors")
        threshold = request.meta.get("threshold")
        if (
            self._client in neighbours
            or not set(neighbours) <= set(self._point)
            or not isinstance(threshold, int)
            or not 2 <= threshold <= len(neighbours)
            or threshold <= len(neighbours) // 2
        ):
            raise ValueError("implausible neighbour list or threshold from the server")
        c_keys = request.rows("c_pk", (len(neighbours), KEY_BYTES))
        s_keys = request.rows("s_pk", (len(neighbours), KEY_BYTES))
        self._neighbours = neighbours
        self._c_public = {j: row.tobytes() for j, row in zip(neighbours, c_keys)}
        self._s_public = {j: row.tobytes() for j, row in zip(neighbours, s_keys)}
        points = [self._point[j] for j in neighbours]
        b_shares = shamir.split(self._seed, threshold, points)
        s_shares = shamir.split(_private_bytes(self._s_key), threshold, points)
        sealed = bytearray()
        for j, point in zip(neighbours, points):
            key = _agree(self._c_key, self._c_public[j], b"share")
            nonce = secrets.token_bytes(_NONCE_BYTES)
            plaintext = shamir.to_bytes(b_shares[point]) + shamir.to_bytes(s_shares[point])
            sealed += nonce + AESGCM(key).encrypt(nonce, plaintext, _associated(self._ctx, self._client, j))
        return Payload(
            {"recipients": neighbours},
            {
                "shares": np.frombuffer(bytes(sealed), np.uint8).reshape(len(neighbours), SEALED_BYTES),
                "commit": np.frombuffer(_commitment(self._seed, self._ctx, self._client), np.uint8).reshape(1, -1),
            },
        )

    def _mask(self, request: Payload, contribution: np.ndarray) -> Payload:
        senders = request.names("senders")
        if not set(senders) <= set(self._neighbours):
            raise ValueError("shares from clients that are not this client's neighbours")
        sealed = request.rows("shares", (len(senders), SEALED_BYTES))
        for j, row in zip(senders, sealed):
            data = row.tobytes()
            key = _agree(self._c_key, self._c_public[j], b"share")
            try:
                associated = _associated(self._ctx, j, self._client)
                plaintext = AESGCM(key).decrypt(data[:_NONCE_BYTES], data[_NONCE_BYTES:], associated)
            except InvalidTag:
                continue  # not verifiable: this client will not reveal a share for j (the server needs t others)
            size = shamir.SHARE_BYTES
            self._held[j] = (shamir.from_bytes(plaintext[:size]), shamir.from_bytes(plaintext[size:]))
        self._senders = senders
        masked = self._encode(contribution)
        stream = ring.Keystream(masked.shape[0])
        masked += stream.words(self._seed)
        for j in senders:
            mask = stream.words(_agree(self._s_key, self._s_public[j], b"mask"))
            (np.add if _sign(self._client, j) > 0 else np.subtract)(masked, mask, out=masked)
        return Payload({"unverified": sorted(set(senders) - set(self._held))}, {"y": masked})

    def _encode(self, contribution: np.ndarray) -> np.ndarray:
        try:
            return ring.encode(contribution, len(self._ctx.participants))
        except ring.RingOverflow as exc:
            raise ValueError(f"cannot mask the contribution: {exc}") from None

    def _reveal(self, request: Payload) -> Payload:
        survivors = request.names("survivors")
        dropped = request.names("dropped")
        if set(survivors) & set(dropped) or not set(survivors) | set(dropped) <= set(self._senders):
            raise ValueError("the server asked for both shares of a client, or for non-neighbours")
        survivors = [j for j in survivors if j in self._held]
        dropped = [j for j in dropped if j in self._held]
        self._done = True
        return Payload(
            {"survivors": survivors, "dropped": dropped},
            {
                "b": _share_rows([self._held[j][0] for j in survivors]),
                "s": _share_rows([self._held[j][1] for j in dropped]),
            },
        )


def _key_rows(keys: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), KEY_BYTES)


def _share_rows(shares: list[int]) -> np.ndarray:
    data = b"".join(shamir.to_bytes(share) for share in shares)
    return np.frombuffer(data, np.uint8).reshape(len(shares), shamir.SHARE_BYTES)
