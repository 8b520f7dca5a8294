"""How close a reconstruction is to the batch it attacked: MSE, PSNR and SSIM per image (from
scikit-image), after pairing each rebuilt image with the true one it resembles most, and the
fraction of labels recovered."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

#: Mean PSNR from which a reconstruction shows the input ("the attack works").
WORKS_PSNR = 30.0
#: Mean PSNR at or below which reconstructions are noise ("the attack failed").
NOISE_PSNR = 12.0
#: PSNR of a perfect reconstruction is infinite; reports cap it here (an MSE of 1e-10 of the range squared).
PSNR_CAP = 100.0


@dataclass(frozen=True)
class ImageScore:
    mse: float
    psnr: float
    ssim: float

    def to_json(self) -> dict[str, float]:
        return asdict(self)


def score_image(true: np.ndarray, rebuilt: np.ndarray, data_range: float) -> ImageScore:
    """Scores of one ``(channels, height, width)`` image (``rebuilt`` is clipped to the range first)."""
    low = float(true.min(initial=0.0))
    rebuilt = np.clip(rebuilt, low, low + data_range) if data_range > 0 else rebuilt
    true64, rebuilt64 = true.astype(np.float64), rebuilt.astype(np.float64)
    mse = float(mean_squared_error(true64, rebuilt64))
    psnr = PSNR_CAP if mse <= data_range**2 * 1e-10 else float(peak_signal_noise_ratio(true64, rebuilt64, data_range=data_range))
    channels_last_true, channels_last_rebuilt = np.moveaxis(true64, 0, -1), np.moveaxis(rebuilt64, 0, -1)
    side = min(true.shape[-2:])
    window = min(7, side if side % 2 else side - 1)
    ssim = float(structural_similarity(
        channels_last_true, channels_last_rebuilt, data_range=data_range, channel_axis=-1, win_size=window
    ))
    return ImageScore(mse, min(psnr, PSNR_CAP), ssim)


def pair_images(true: np.ndarray, rebuilt: np.ndarray) -> np.ndarray:
    """For each true image, the index of the rebuilt one paired with it (minimum total MSE):
    an attack returns a batch in no particular order."""
    costs = ((true[:, None] - rebuilt[None, :]) ** 2).reshape(true.shape[0], rebuilt.shape[0], -1).mean(axis=-1)
    rows, cols = linear_sum_assignment(costs)
    return cols[np.argsort(rows)]


def label_recovery(true: np.ndarray, found: np.ndarray) -> float:
    """Fraction of the batch's labels recovered, as multisets (order carries no information)."""
    overlap = Counter(true.tolist()) & Counter(found.tolist())
    return sum(overlap.values()) / max(len(true), 1)
