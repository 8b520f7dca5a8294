"""Typed messages between server and clients, and their conversion to wire bytes.

A round is: ``FitIns`` (global model, training config, the mechanism's first request) ->
``FitRes`` (sample count, training metrics, the protected update); mechanisms with more stages
(SecAgg+, BatchCrypt's statistics exchange) continue with ``StageIns`` -> ``StageRes`` pairs.
``Shutdown`` ends a client; ``ErrorReply`` is how a client reports a refused request;
``JobSpec`` tells a newly connected client of a deployment which job it joined.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

import numpy as np

from fedcrypt.core.wire import Blob, Envelope, SpooledMessage, WireError, decode, encode_parts

Scalar = Union[bool, int, float, str]
_PAYLOAD_PREFIX = "p."


@dataclass
class Payload:
    """What a mechanism sends in one direction of one stage: small JSON metadata plus arrays.

    Received arrays may be :class:`~fedcrypt.core.wire.FileArray` blobs of a spooled message:
    read large ones in windows (slices), not whole.
    """

    meta: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, Blob] = field(default_factory=dict)

    def rows(self, name: str, shape: tuple[int, int], dtype: type = np.uint8) -> np.ndarray:
        """Small array ``name`` in memory; ``ValueError`` unless it has this dtype and shape."""
        array = self.arrays.get(name)
        if array is None or array.dtype != dtype or array.shape != shape:
            raise ValueError(f"{name!r} must be a {np.dtype(dtype).name} array of shape {shape}")
        return np.asarray(array)

    def vector(self, name: str, size: int, dtype: type) -> Blob:
        """Vector ``name`` of ``size`` values (it may stay in its spool file); ``ValueError`` otherwise."""
        vector = self.arrays.get(name)
        if vector is None or vector.dtype != dtype or vector.shape != (size,):
            raise ValueError(f"{name!r} must be a {np.dtype(dtype).name} vector of {size} values")
        return vector

    def names(self, key: str) -> list[str]:
        """Metadata ``key`` as a list of distinct names; ``ValueError`` otherwise."""
        value = self.meta.get(key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or len(set(value)) != len(value):
            raise ValueError(f"{key} must be a list of distinct names")
        return value


@dataclass
class FitIns:
    TYPE: ClassVar[str] = "fit_ins"
    round: int
    params: Blob | None
    config: dict[str, Scalar]
    participants: tuple[str, ...]
    payload: Payload = field(default_factory=Payload)
    stage: str = "protect"  # the mechanism stage that ``payload`` opens and ``FitRes`` answers


@dataclass
class FitRes:
    TYPE: ClassVar[str] = "fit_res"
    round: int
    num_examples: int
    metrics: dict[str, float]
    payload: Payload


@dataclass
class StageIns:
    TYPE: ClassVar[str] = "stage_ins"
    round: int
    stage: str
    payload: Payload


@dataclass
class StageRes:
    TYPE: ClassVar[str] = "stage_res"
    round: int
    stage: str
    payload: Payload
    seconds: float = 0.0  # the client's time to answer (reported as protect time)


@dataclass
class ErrorReply:
    TYPE: ClassVar[str] = "error"
    round: int
    reason: str


@dataclass
class Shutdown:
    TYPE: ClassVar[str] = "shutdown"
    round: int = 0


@dataclass
class JobSpec:
    """The job description a deployed server sends a client when it first connects."""

    TYPE: ClassVar[str] = "job"
    toml: str
    round: int = 0


Message = Union[FitIns, FitRes, StageIns, StageRes, ErrorReply, Shutdown, JobSpec]


@dataclass(frozen=True)
class Received:
    """A decoded message and who claims to have sent it for which job."""

    message: Message
    job: str
    sender: str


def to_bytes(message: Message, *, job: str, sender: str) -> bytes:
    return b"".join(to_parts(message, job=job, sender=sender))


def to_parts(message: Message, *, job: str, sender: str) -> list[memoryview]:
    """The message's bytes as buffers (header, then views of the arrays): no copy of large arrays."""
    meta: dict[str, Any] = {}
    blobs: dict[str, Blob] = {}
    payload = getattr(message, "payload", None)
    if payload is not None:
        meta["payload"] = payload.meta
        blobs.update({_PAYLOAD_PREFIX + name: array for name, array in payload.arrays.items()})
    if isinstance(message, FitIns):
        meta["config"] = message.config
        meta["participants"] = list(message.participants)
        meta["stage"] = message.stage
        if message.params is not None:
            blobs["params"] = np.asarray(message.params, dtype=np.float32)
    elif isinstance(message, FitRes):
        meta["num_examples"] = message.num_examples
        meta["metrics"] = message.metrics
    elif isinstance(message, (StageIns, StageRes)):
        meta["stage"] = message.stage
        if isinstance(message, StageRes):
            meta["seconds"] = message.seconds
    elif isinstance(message, ErrorReply):
        meta["reason"] = message.reason
    elif isinstance(message, JobSpec):
        meta["toml"] = message.toml
    return encode_parts(Envelope(message.TYPE, job, message.round, sender, meta, blobs))


def from_bytes(data: bytes | bytearray | memoryview | SpooledMessage) -> Received:
    """Decode and type-check a message; raises :class:`WireError` with the reason."""
    env = decode(data)
    meta = env.meta
    if env.type == FitIns.TYPE:
        config = _field(meta, "config", dict)
        if not all(isinstance(v, (bool, int, float, str)) for v in config.values()):
            raise WireError("fit config values must be scalars")
        participants = _field(meta, "participants", list)
        if not all(isinstance(p, str) for p in participants):
            raise WireError("participants must be client names")
        params = env.blobs.get("params")
        if params is not None and (params.dtype != np.float32 or params.ndim != 1):
            raise WireError("params must be a flat float32 vector")
        stage = _field(meta, "stage", str)
        message: Message = FitIns(env.round, params, config, tuple(participants), _payload(env), stage)
    elif env.type == FitRes.TYPE:
        num_examples = _field(meta, "num_examples", int)
        metrics = _field(meta, "metrics", dict)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()):
            raise WireError("metrics must be numbers")
        message = FitRes(env.round, num_examples, metrics, _payload(env))
    elif env.type == StageIns.TYPE:
        message = StageIns(env.round, _field(meta, "stage", str), _payload(env))
    elif env.type == StageRes.TYPE:
        seconds = meta.get("seconds", 0.0)
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 <= seconds < float("inf"):
            raise WireError("stage seconds must be a finite number >= 0")
        message = StageRes(env.round, _field(meta, "stage", str), _payload(env), float(seconds))
    elif env.type == ErrorReply.TYPE:
        message = ErrorReply(env.round, _field(meta, "reason", str))
    elif env.type == Shutdown.TYPE:
        message = Shutdown(env.round)
    elif env.type == JobSpec.TYPE:
        message = JobSpec(_field(meta, "toml", str), env.round)
    else:
        raise WireError(f"unknown message type {env.type!r}")
    return Received(message, env.job, env.sender)


def _field(meta: Any, key: str, kind: type) -> Any:
    value = meta.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise WireError(f"field {key!r} missing or not {kind.__name__}")
    return value


def _payload(env: Envelope) -> Payload:
    meta = env.meta.get("payload", {})
    if not isinstance(meta, dict):
        raise WireError("payload metadata must be an object")
    arrays = {
        name[len(_PAYLOAD_PREFIX) :]: array
        for name, array in env.blobs.items()
        if name.startswith(_PAYLOAD_PREFIX)
    }
    return Payload(meta, arrays)
