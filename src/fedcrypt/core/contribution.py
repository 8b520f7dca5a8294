"""What each client adds to the secure sum: its weighted model delta and its weight.

Clients send ``[w * delta, w]`` (as Flower's SecAgg+ does), so one protected sum yields both the
numerator and the denominator of the weighted average and the weights stay protected too.
"""

from __future__ import annotations

import numpy as np

from fedcrypt.core.mechanism import RecoveryError


def pack(delta: np.ndarray, weight: float) -> np.ndarray:
    """The contribution vector ``[weight * delta, weight]`` as float32."""
    out = np.empty(delta.shape[0] + 1, dtype=np.float32)
    np.multiply(delta, weight, out=out[:-1])
    out[-1] = weight
    return out


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
