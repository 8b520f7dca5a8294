"""The ``none`` mechanism: updates travel in the clear. The baseline every other mechanism is
measured against, and the right choice when the server is trusted."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from fedcrypt.core.mechanism import OneShotMechanism, PayloadRejected, RecoveryError, RoundContext
from fedcrypt.core.messages import Payload
from fedcrypt.core.wire import WINDOW, add_windowed


class PlaintextMechanism(OneShotMechanism[np.ndarray]):
    """Sum float32 vectors, rejecting wrong lengths and non-finite values.

    The accumulator is float32 (as in Flower): a server holding a large model keeps one update-sized
    array, and the rounding of a sum of client updates is far below the noise of SGD.
    """

    name: ClassVar[str] = "none"
    server_can_recover: ClassVar[bool] = True

    def protect(self, contribution: np.ndarray, ctx: RoundContext) -> Payload:
        return Payload(arrays={"vector": np.asarray(contribution, dtype=np.float32)})

    def empty(self, ctx: RoundContext) -> np.ndarray:
        return np.zeros(ctx.vector_size, dtype=np.float32)

    def fold_one(self, accumulator: np.ndarray, payload: Payload, ctx: RoundContext) -> np.ndarray:
        vector = payload.arrays.get("vector")
        if vector is None:
            raise PayloadRejected("payload has no 'vector' array")
        if vector.dtype != np.float32 or vector.shape != (ctx.vector_size,):
            raise PayloadRejected(
                f"update has shape {vector.shape} and dtype {vector.dtype}, "
                f"expected ({ctx.vector_size},) float32"
            )
        # Two passes in windows: the server needs no update-sized temporary (the vector may still be
        # in a spooled file), and a rejected update leaves the sum untouched.
        bad = 0
        for start in range(0, vector.shape[0], WINDOW):
            bad += int((~np.isfinite(vector[start : start + WINDOW])).sum())
        if bad:
            raise PayloadRejected(f"update contains {bad} NaN/Inf values")
        add_windowed(accumulator, vector)
        return accumulator

    def to_payload(self, accumulator: np.ndarray, ctx: RoundContext) -> Payload:
        return Payload(arrays={"sum": accumulator})

    def server_view(self, stage: str, payload: Payload, ctx: RoundContext) -> np.ndarray | None:
        vector = payload.arrays.get("vector")
        return None if vector is None else np.array(vector, dtype=np.float32)

    def recover(self, aggregate: Payload, ctx: RoundContext) -> np.ndarray:
        total = aggregate.arrays.get("sum")
        if total is None or total.shape != (ctx.vector_size,) or total.dtype != np.float32:
            raise RecoveryError("aggregate payload has no sum of the expected size")
        return total if total.flags.writeable else total.copy()
