"""What each client adds to the secure sum: its weighted model delta and its weight.

Clients send ``[w * delta, w]`` (as Flower's SecAgg+ does), so one protected sum yields both the
numerator and the denominator of the weighted average and the weights stay protected too.
"""

from __future__ import annotations

import numpy as np

from fedcrypt.core.mechanism import RecoveryError
from fedcrypt.core.wire import WINDOW, Blob


def pack(delta: np.ndarray, weight: float) -> np.ndarray:
    """The contribution vector ``[weight * delta, weight]`` as float32."""
    out = np.empty(delta.shape[0] + 1, dtype=np.float32)
    np.multiply(delta, weight, out=out[:-1])
    out[-1] = weight
    return out


def pack_trained(buffer: np.ndarray, reference: Blob, weight: float) -> np.ndarray:
    """:func:`pack` in place: ``buffer[:-1]`` holds the locally trained parameters, ``reference``
    the global ones; returns ``buffer`` as ``[weight * (trained - reference), weight]``.

    Works in windows, so a client holds its contribution and no other update-sized array (the
    reference may still be in a spooled request).
    """
    size = buffer.shape[0] - 1
    if reference.shape != (size,):
        raise ValueError(f"reference has shape {reference.shape}, expected ({size},)")
    for start in range(0, size, WINDOW):
        window = buffer[start : min(start + WINDOW, size)]
        window -= reference[start : start + window.shape[0]]
        window *= weight
    buffer[-1] = weight
    return buffer


def unpack_average(summed: np.ndarray) -> tuple[np.ndarray, float]:
    """Turn the summed contributions into the weighted average delta and the total weight.

    Divides ``summed`` in place (it is the round's own aggregate) to avoid another update-sized copy.
    """
    total_weight = float(summed[-1])
    if not np.isfinite(total_weight) or total_weight <= 0:
        raise RecoveryError(f"aggregate total weight is {total_weight}; nothing to average")
    average = summed[:-1] if summed.flags.writeable else summed[:-1].copy()
    average /= total_weight
    return average, total_weight
