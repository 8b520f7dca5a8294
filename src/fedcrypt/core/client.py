"""Client logic, independent of transport: bytes in, bytes out.

On ``FitIns`` the client loads the global model, trains on its own data, packs its contribution
``[w * delta, w]`` (in one update-sized array; the request may stay spooled in a file) and answers the mechanism's first stage inside ``FitRes``; later stages arrive
as ``StageIns``. The raw data and the plaintext update never leave this object except through
the mechanism.
"""

from __future__ import annotations

import hashlib
import logging
import time

import numpy as np

from fedcrypt.core import contribution
from fedcrypt.core.mechanism import RECOVER_STAGE, ClientProtector, Mechanism, RecoveryError, RoundContext
from fedcrypt.core.messages import (
    ErrorReply,
    FitIns,
    FitRes,
    Message,
    Payload,
    Shutdown,
    StageIns,
    StageRes,
    from_bytes,
    to_parts,
)
from fedcrypt.core.transport import Inbound
from fedcrypt.core.wire import Blob, WireError
from fedcrypt.models.training import ClientData, LocalTrainer

log = logging.getLogger(__name__)


def client_seed(job_seed: int, server_round: int, client: str) -> int:
    """A per-(job, round, client) training seed, the same in every process."""
    digest = hashlib.blake2b(f"{job_seed}/{server_round}/{client}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class Client:
    """One party: answers the server's messages for one job."""

    def __init__(
        self,
        name: str,
        job: str,
        trainer: LocalTrainer,
        data: ClientData,
        mechanism: Mechanism,
        *,
        seed: int = 0,
    ) -> None:
        self.name = name
        self.job = job
        self.trainer = trainer
        self.data = data
        self.mechanism = mechanism
        self.seed = seed
        self.finished = False
        self._round: int | None = None
        self._protector: ClientProtector | None = None
        self._contribution: np.ndarray | None = None
        self._participants: tuple[str, ...] = ()

    def handle(self, request: Inbound) -> list[memoryview]:
        """Answer one server message with the reply's buffers (to send back to back, unjoined);
        refusals come back as ``ErrorReply``, never as exceptions."""
        try:
            received = from_bytes(request)
        except WireError as exc:
            return self._reply(ErrorReply(0, f"undecodable request: {exc}"))
        if received.job != self.job:
            return self._reply(ErrorReply(received.message.round, f"wrong job {received.job!r}"))
        try:
            return self._reply(self._dispatch(received.message))
        except (ValueError, RuntimeError) as exc:
            log.warning("client %s refused a %s: %s", self.name, type(received.message).__name__, exc)
            return self._reply(ErrorReply(received.message.round, str(exc)))

    def _dispatch(self, message: Message) -> Message:
        if isinstance(message, FitIns):
            return self._fit(message)
        if isinstance(message, StageIns) and message.stage == RECOVER_STAGE:
            return self._recover(message)
        if isinstance(message, StageIns):
            if self._protector is None or message.round != self._round or self._contribution is None:
                raise ValueError(f"stage {message.stage!r} for round {message.round} without a fit")
            started = time.perf_counter()
            payload = self._protector.respond(message.stage, message.payload, self._contribution)
            if self._protector.done:
                self._forget_round()
            return StageRes(message.round, message.stage, payload, time.perf_counter() - started)
        if isinstance(message, Shutdown):
            self.finished = True
            return Shutdown(message.round)
        raise ValueError(f"unexpected {type(message).__name__} from the server")

    def _fit(self, ins: FitIns) -> FitRes:
        if ins.params is None or ins.params.shape != (self.trainer.spec.size,):
            raise ValueError(f"fit request carries no model of size {self.trainer.spec.size}")
        mu = ins.config.get("proximal_mu", 0.0)
        if not isinstance(mu, (int, float)) or mu < 0:
            raise ValueError(f"proximal_mu must be a number >= 0, got {mu!r}")
        weight = 1.0 if ins.config.get("weighting") == "uniform" else float(self.data.num_examples)
        packed = np.empty(self.trainer.spec.size + 1, dtype=np.float32)
        result = self.trainer.fit(
            ins.params,
            self.data,
            seed=client_seed(self.seed, ins.round, self.name),
            proximal_mu=float(mu),
            out=packed[:-1],
        )
        self._contribution = contribution.pack_trained(packed, ins.params, weight)
        ctx = RoundContext(self.job, ins.round, ins.participants, self._contribution.shape[0])
        self._round = ins.round
        self._protector = self.mechanism.client_round(ctx, self.name, _Local(self, ins.params))
        started = time.perf_counter()
        payload = self._protector.respond(ins.stage, ins.payload, self._contribution)
        if self._protector.done:
            self._forget_round()
        metrics = {
            "train_loss": result.train_loss,
            "train_seconds": result.seconds,
            "protect_seconds": time.perf_counter() - started,
        }
        return FitRes(ins.round, self.data.num_examples, metrics, payload)

    def _recover(self, ins: StageIns) -> StageRes:
        """Decrypt the round's aggregate for a server that cannot (HE: clients hold the key)."""
        ctx = RoundContext(self.job, ins.round, (), self.trainer.spec.size + 1)
        try:
            summed = self.mechanism.recover(ins.payload, ctx)
        except RecoveryError as exc:
            raise ValueError(f"cannot decrypt the aggregate: {exc}") from None
        return StageRes(ins.round, RECOVER_STAGE, Payload(arrays={"sum": np.asarray(summed, dtype=np.float32)}))

    def _forget_round(self) -> None:
        """Drop the plaintext update once the mechanism no longer needs it (memory, and exposure)."""
        self._protector = None
        self._contribution = None

    def _reply(self, message: Message) -> list[memoryview]:
        return to_parts(message, job=self.job, sender=self.name)


class _Local:
    """The client's model and data as a mechanism may query them (during the fit stage only:
    it refers to the round's global model, which may live in the request's spool file)."""

    def __init__(self, client: Client, global_params: Blob) -> None:
        self._client: Client | None = client
        self._params: Blob | None = global_params

    def sensitivity(self) -> np.ndarray:
        if self._client is None or self._params is None:
            raise ValueError("the model's sensitivity can only be computed while answering the fit request")
        client, params = self._client, self._params
        self._client = self._params = None
        return client.trainer.sensitivity(params, client.data, seed=client_seed(client.seed, 0, client.name))
