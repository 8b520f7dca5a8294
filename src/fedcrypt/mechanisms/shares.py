"""The ``shares`` mechanism: additive secret sharing over ``k`` non-colluding aggregators, as
PySyft shares tensors: the server and ``k - 1`` helper aggregators.

Each client encodes its contribution ``x`` in fixed point in ``Z_2^64`` and splits it into ``k``
additive shares, ``x = s_0 + s_1 + ... + s_{k-1} mod 2^64``. The helpers' shares are AES-256-CTR
expansions of fresh 32-byte seeds, ``s_j = PRG(r_j)``, and the server's is
``s_0 = x - sum_j s_j``; any ``k - 1`` of the shares are jointly (pseudo)random, so no coalition
short of all ``k`` aggregators learns anything about ``x``. A helper receives the seed of its
share (60 bytes sealed) rather than the share itself (8 bytes per value): the same shares, with
``k - 1`` uploads of the update saved. Four stages per round:

1. ``seal`` (clients, in ``FitRes``): a fresh X25519 key ``e``; for each helper ``j`` its seed
   sealed with AES-GCM under ``HKDF(X25519(e, H_j))``, bound to job, round, client and helper.
   ``H_j`` is helper ``j``'s static public key, which clients take from the helpers' key files,
   never from the server.
2. ``open`` (helpers): the server relays each helper the sealed seeds addressed to it; the helper
   opens and keeps them, and names the clients whose seed it could not open (altered, sealed for
   another key, or a replayed key).
3. ``protect`` (clients): a client every helper could open sends ``s_0``; the server adds these
   mod 2^64. A client some helper refused is dropped with that helper's reason.
4. ``partial`` (helpers): the server names the clients whose ``s_0`` it added; each helper
   answers ``sum PRG(r_j)`` over exactly those, and the server adds the partial sums: the sum of
   the contributions. A helper that does not answer fails the round (all ``k`` shares are needed),
   never yielding a wrong sum.

What each party learns: the server, the sum and every client's ``s_0`` (uniformly random); a
helper, which clients took part. A helper opens each client key once, sums at least
``min_clients`` clients it opened, and forgets the seeds after the round, so a server that
re-asks cannot isolate one client's share by differencing; a server that fabricates clients to
fill the minimum is outside the trust model (non-colluding, honest-but-curious aggregators).
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedcrypt.core.mechanism import (
    ClientProtector,
    HelperRound,
    LocalModel,
    Mechanism,
    PayloadRejected,
    RecoveryError,
    RoundContext,
    ServerAggregator,
)
from fedcrypt.core.messages import Payload
from fedcrypt.core.wire import add_windowed
from fedcrypt.crypto import ring
from fedcrypt.crypto.agreement import KEY_BYTES, agree, private_bytes, public_bytes, usable_public_key
from fedcrypt.crypto.keyfiles import read_key_file, write_key_pair

log = logging.getLogger(__name__)

SEAL, OPEN, PROTECT, PARTIAL = "seal", "open", "protect", "partial"
STAGES = (SEAL, OPEN, PROTECT, PARTIAL)
_NONCE_BYTES = 12
SEALED_BYTES = _NONCE_BYTES + ring.SEED_BYTES + 16  # nonce, seed, GCM tag
#: Largest vector a helper agrees to sum (its partial sum is 8 bytes per value).
MAX_VECTOR = 1 << 31


def helper_names(aggregators: int) -> tuple[str, ...]:
    """The helper aggregators of a job with ``aggregators`` (``k``) aggregators in all: the
    server is the first, the helpers are ``aggregator-1`` to ``aggregator-(k-1)``."""
    if aggregators < 2:
        raise ValueError(f"additive sharing needs at least 2 aggregators (the server and a helper), got {aggregators}")
    return tuple(f"aggregator-{index}" for index in range(1, aggregators))


def _binding(job: str, server_round: int, client: str, helper: str) -> bytes:
    return f"fedcrypt-shares|{job}|{server_round}|{client}|{helper}".encode()


class SharesMechanism(Mechanism):
    """Additive sharing over the server and ``helpers``. Each role gets its own instance: the
    server's needs the helper names only, a client's the helpers' public keys
    (``helper_keys``), a helper's its secret key (``helper_key``)."""

    name: ClassVar[str] = "shares"
    server_can_recover: ClassVar[bool] = True

    def __init__(
        self,
        helpers: Sequence[str],
        *,
        helper_keys: dict[str, bytes] | None = None,
        helper_key: X25519PrivateKey | None = None,
        min_clients: int = 1,
    ) -> None:
        if not helpers or len(set(helpers)) != len(helpers):
            raise ValueError("additive sharing needs at least one helper aggregator, each named once")
        if helper_keys is not None:
            if set(helper_keys) != set(helpers):
                missing = sorted(set(helpers) - set(helper_keys))
                raise ValueError(f"public keys of helper aggregators {missing} are missing")
            for helper, key in helper_keys.items():
                if not usable_public_key(key):
                    raise ValueError(f"the public key of helper aggregator {helper!r} is not a usable X25519 key")
        self.helpers = tuple(helpers)
        self.min_clients = min_clients
        self._helper_keys = helper_keys
        self._helper_key = helper_key
        self._opened_keys: set[bytes] = set()  # a helper opens each client key once, ever

    @property
    def aggregators(self) -> int:
        """``k``: the server and the helpers."""
        return len(self.helpers) + 1

    def server_round(self, ctx: RoundContext) -> ServerAggregator:
        return _Aggregator(self, ctx)

    def client_round(self, ctx: RoundContext, client: str, local: LocalModel | None = None) -> ClientProtector:
        if self._helper_keys is None:
            raise ValueError("this party holds no public keys of the helper aggregators")
        return _Protector(self, ctx, client, self._helper_keys)

    def helper_round(self, job: str, server_round: int, helper: str) -> HelperRound:
        if self._helper_key is None:
            raise ValueError("this party holds no helper aggregator key")
        return _HelperRound(self, job, server_round, helper, self._helper_key)

    def recover(self, aggregate: Payload, ctx: RoundContext) -> np.ndarray:
        total = aggregate.arrays.get("sum")
        if total is None or total.dtype != np.int64 or total.shape != (ctx.vector_size,):
            raise RecoveryError("shares aggregate has no int64 sum of the expected size")
        return ring.decode(total)

    def server_view(self, stage: str, payload: Payload, ctx: RoundContext) -> np.ndarray | None:
        """The server's own share, read as fixed point (the helpers' shares never reach it)."""
        share = payload.arrays.get("share") if stage == PROTECT else None
        return None if share is None else ring.decode(share)

    def helper_public_key(self) -> bytes:
        """This helper's public key, which clients seal its seeds to."""
        if self._helper_key is None:
            raise ValueError("this party holds no helper aggregator key")
        return public_bytes(self._helper_key)

    def open_once(self, key: bytes) -> bool:
        """Whether a client key is new to this helper (then it is remembered as opened)."""
        if key in self._opened_keys:
            return False
        self._opened_keys.add(key)
        return True


# --- server -----------------------------------------------------------------------------------


class _Aggregator(ServerAggregator):
    def __init__(self, mechanism: SharesMechanism, ctx: RoundContext) -> None:
        self._mechanism = mechanism
        self._ctx = ctx
        self._keys: dict[str, bytes] = {}  # client -> its round key e
        self._sealed: dict[str, np.ndarray] = {}  # client -> (helpers, SEALED_BYTES) sealed seeds
        self._refused: dict[str, str] = {}  # client -> why a helper could not open its seed
        self._opened: set[str] = set()  # helpers that answered `open`
        self._summed: list[str] = []  # clients whose server share is in the sum
        self._partials: set[str] = set()  # helpers whose partial sum is in the sum
        self._sum = np.zeros(ctx.vector_size, dtype=np.uint64)

    @property
    def stages(self) -> tuple[str, ...]:
        return STAGES

    @property
    def helper_stages(self) -> frozenset[str]:
        return frozenset((OPEN, PARTIAL))

    def request(self, stage: str, recipient: str) -> Payload:
        if stage == SEAL:
            return Payload()
        if stage == OPEN:
            index = self._mechanism.helpers.index(recipient)
            clients = list(self._sealed)
            return Payload(
                {"clients": clients, "size": self._ctx.vector_size},
                {
                    "keys": np.frombuffer(b"".join(self._keys[c] for c in clients), np.uint8).reshape(-1, KEY_BYTES),
                    "seeds": np.stack([self._sealed[c][index] for c in clients])
                    if clients
                    else np.zeros((0, SEALED_BYTES), np.uint8),
                },
            )
        if stage == PROTECT:
            reason = self._refused.get(recipient)
            return Payload({"excluded": reason}) if reason else Payload()
        if stage == PARTIAL:
            return Payload({"clients": self._summed})
        raise ValueError(f"shares has no stage {stage!r}")

    def fold(self, stage: str, sender: str, payload: Payload) -> None:
        try:
            if stage == SEAL:
                self._fold_sealed(sender, payload)
            elif stage == OPEN:
                self._fold_opened(sender, payload)
            elif stage == PROTECT:
                self._fold_share(sender, payload)
            elif stage == PARTIAL:
                add_windowed(self._sum, payload.vector("sum", self._ctx.vector_size, np.uint64))
                self._partials.add(sender)
            else:
                raise ValueError(f"unexpected stage {stage!r}")
        except ValueError as exc:
            raise PayloadRejected(str(exc)) from None

    def _fold_sealed(self, client: str, payload: Payload) -> None:
        key = payload.rows("key", (1, KEY_BYTES)).tobytes()
        sealed = payload.rows("seeds", (len(self._mechanism.helpers), SEALED_BYTES))
        if not usable_public_key(key):
            raise ValueError("the round key is not a usable X25519 public key")
        if key in self._keys.values():
            raise ValueError("duplicated round key (another client sent it)")
        self._keys[client], self._sealed[client] = key, sealed.copy()

    def _fold_opened(self, helper: str, payload: Payload) -> None:
        refused = payload.meta.get("refused")
        if not isinstance(refused, dict) or not all(
            isinstance(c, str) and c in self._sealed and isinstance(reason, str) for c, reason in refused.items()
        ):
            raise ValueError("the helper's list of refused clients is malformed")
        for client, reason in refused.items():
            self._refused.setdefault(client, f"helper aggregator {helper} refused its sealed seed: {reason}")
        self._opened.add(helper)

    def _fold_share(self, client: str, payload: Payload) -> None:
        if client in self._refused:
            raise ValueError(self._refused[client])
        if client not in self._sealed:
            raise ValueError("sent a share without sealing seeds first")
        add_windowed(self._sum, payload.vector("share", self._ctx.vector_size, np.uint64))
        self._summed.append(client)

    def close_stage(self, stage: str, survivors: Sequence[str]) -> None:
        if stage in (OPEN, PARTIAL):
            done = self._opened if stage == OPEN else self._partials
            missing = [helper for helper in self._mechanism.helpers if helper not in done]
            if missing:
                raise RecoveryError(
                    f"helper aggregator(s) {', '.join(missing)} did not answer the {stage!r} stage; additive "
                    f"sharing needs all {self._mechanism.aggregators} aggregators, so the round fails"
                )
        elif stage == PROTECT and not self._summed:
            raise RecoveryError("no client sent its share this round")

    def finish(self) -> Payload:
        if len(self._partials) != len(self._mechanism.helpers) or not self._summed:
            raise RecoveryError("shares: the round did not collect every aggregator's partial sum")
        return Payload(arrays={"sum": self._sum.view(np.int64)})

    def metrics(self) -> dict[str, float]:
        return {"shares_aggregators": float(self._mechanism.aggregators), "shares_refused": float(len(self._refused))}


# --- client -----------------------------------------------------------------------------------


class _Protector(ClientProtector):
    def __init__(self, mechanism: SharesMechanism, ctx: RoundContext, client: str, helper_keys: dict[str, bytes]) -> None:
        self._mechanism = mechanism
        self._ctx = ctx
        self._client = client
        self._helper_keys = helper_keys
        self._seeds: list[bytes] = []
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def respond(self, stage: str, request: Payload, contribution: np.ndarray) -> Payload:
        if stage == SEAL:
            return self._seal()
        if stage == PROTECT:
            return self._share(request, contribution)
        raise ValueError(f"mechanism 'shares' has no client stage {stage!r}")

    def _seal(self) -> Payload:
        round_key = X25519PrivateKey.generate()
        sealed = bytearray()
        for helper in self._mechanism.helpers:
            seed = secrets.token_bytes(ring.SEED_BYTES)
            binding = _binding(self._ctx.job, self._ctx.round, self._client, helper)
            nonce = secrets.token_bytes(_NONCE_BYTES)
            sealed += nonce + AESGCM(agree(round_key, self._helper_keys[helper], binding)).encrypt(nonce, seed, binding)
            self._seeds.append(seed)
        return Payload(arrays={
            "key": np.frombuffer(public_bytes(round_key), np.uint8).reshape(1, KEY_BYTES),
            "seeds": np.frombuffer(bytes(sealed), np.uint8).reshape(len(self._seeds), SEALED_BYTES),
        })

    def _share(self, request: Payload, contribution: np.ndarray) -> Payload:
        if not self._seeds:
            raise ValueError("asked for a share before sealing seeds")
        self._done = True
        seeds, self._seeds = self._seeds, []
        excluded = request.meta.get("excluded")
        if excluded:
            log.warning("client %s left out of round %d: %s", self._client, self._ctx.round, excluded)
            return Payload({"excluded": True})
        try:
            share = ring.encode(contribution, len(self._ctx.participants))
        except ring.RingOverflow as exc:
            raise ValueError(f"cannot share the contribution: {exc}") from None
        stream = ring.Keystream(share.shape[0])
        for seed in seeds:
            share -= stream.words(seed)
        return Payload(arrays={"share": share})


# --- helper aggregator ------------------------------------------------------------------------


class _HelperRound(HelperRound):
    def __init__(self, mechanism: SharesMechanism, job: str, server_round: int, helper: str, key: X25519PrivateKey):
        if helper not in mechanism.helpers:
            raise ValueError(f"{helper!r} is not a helper aggregator of this job")
        self._mechanism = mechanism
        self._job, self._round, self._helper = job, server_round, helper
        self._key = key
        self._seeds: dict[str, bytes] = {}
        self._size = 0
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def respond(self, stage: str, request: Payload) -> Payload:
        if stage == OPEN:
            return self._open(request)
        if stage == PARTIAL:
            return self._partial(request)
        raise ValueError(f"a helper aggregator of 'shares' has no stage {stage!r}")

    def _open(self, request: Payload) -> Payload:
        """Open the seeds sealed for this helper; a re-run of the round starts afresh."""
        clients = request.names("clients")
        size = request.meta.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_VECTOR:
            raise ValueError(f"implausible vector size {size!r}")
        keys = request.rows("keys", (len(clients), KEY_BYTES))
        sealed = request.rows("seeds", (len(clients), SEALED_BYTES))
        self._seeds, self._size = {}, size
        refused: dict[str, str] = {}
        for client, key_row, row in zip(clients, keys, sealed):
            key, data = key_row.tobytes(), row.tobytes()
            if not usable_public_key(key):
                refused[client] = "its round key is not a usable X25519 key"
                continue
            if not self._mechanism.open_once(key):
                refused[client] = "its round key was opened before (a replay)"
                continue
            binding = _binding(self._job, self._round, client, self._helper)
            try:
                cipher = AESGCM(agree(self._key, key, binding))
                self._seeds[client] = cipher.decrypt(data[:_NONCE_BYTES], data[_NONCE_BYTES:], binding)
            except InvalidTag:
                refused[client] = "it does not verify (sealed for another key of this helper, or altered)"
        if refused:
            log.warning("round %d: could not open the seeds of %s", self._round, ", ".join(sorted(refused)))
        return Payload({"refused": refused})

    def _partial(self, request: Payload) -> Payload:
        """The sum of this helper's shares of exactly the named clients, once per round."""
        if not self._size:
            raise ValueError("asked for a partial sum before opening this round's seeds")
        clients = request.names("clients")
        unknown = sorted(set(clients) - set(self._seeds))
        if unknown:
            raise ValueError(f"asked to sum shares this helper did not open: {', '.join(unknown)}")
        if len(clients) < self._mechanism.min_clients:
            raise ValueError(
                f"asked to sum {len(clients)} clients' shares, fewer than the job's minimum of "
                f"{self._mechanism.min_clients} (a partial sum over so few could expose one client)"
            )
        seeds, self._seeds, self._done = self._seeds, {}, True
        total = np.zeros(self._size, dtype=np.uint64)
        stream = ring.Keystream(self._size)
        for client in clients:
            total += stream.words(seeds[client])
        return Payload(arrays={"sum": total})


# --- key files --------------------------------------------------------------------------------


def public_file(helper: str) -> str:
    return f"{helper}.public.json"


def secret_file(helper: str) -> str:
    return f"{helper}.secret.json"


class HelperKeyError(ValueError):
    """A helper aggregator's key file is missing or malformed."""


def write_helper_key(key_dir: Path, helper: str) -> bytes:
    """Create helper ``helper``'s key pair in ``key_dir`` (secret 0600); returns its public key."""
    private = X25519PrivateKey.generate()
    public = public_bytes(private)
    write_key_pair(
        key_dir,
        (public_file(helper), json.dumps({"scheme": "x25519", "helper": helper, "public_key": public.hex()})),
        (secret_file(helper), json.dumps({"scheme": "x25519", "helper": helper, "secret_key": private_bytes(private).hex()}).encode()),
        HelperKeyError,
    )
    return public


def _read(path: Path, helper: str, field: str) -> bytes:
    text = read_key_file(path, f"aggregator --name {helper}", HelperKeyError)
    try:
        record = json.loads(text)
        value = bytes.fromhex(record[field])
        if record.get("scheme") != "x25519" or record.get("helper") != helper or len(value) != KEY_BYTES:
            raise ValueError
    except (ValueError, KeyError, TypeError, AttributeError):
        raise HelperKeyError(f"{path} is not the X25519 key file of helper aggregator {helper!r}") from None
    return value


def load_helper_public(key_dir: Path, helpers: Sequence[str]) -> dict[str, bytes]:
    """The helpers' public keys, from their ``<helper>.public.json`` files in ``key_dir``."""
    keys = {helper: _read(key_dir / public_file(helper), helper, "public_key") for helper in helpers}
    for helper, key in keys.items():
        if not usable_public_key(key):
            raise HelperKeyError(f"{key_dir / public_file(helper)} holds an unusable X25519 key")
    return keys


def load_helper_secret(key_dir: Path, helper: str) -> X25519PrivateKey:
    """Helper ``helper``'s secret key, from ``<helper>.secret.json`` in ``key_dir``."""
    return X25519PrivateKey.from_private_bytes(_read(key_dir / secret_file(helper), helper, "secret_key"))
