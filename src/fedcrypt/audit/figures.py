"""The audit's pictures (matplotlib, no display needed): originals beside reconstructions, and
PSNR against the encrypted fraction for each selection rule."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
import numpy as np  # noqa: E402

from fedcrypt.audit.metrics import NOISE_PSNR  # noqa: E402

if TYPE_CHECKING:  # the attack-only benchmark draws without the job machinery
    from fedcrypt.audit.leakage import ImageResult, SweepPoint


def _picture(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    """A ``(channels, height, width)`` image as something ``imshow`` draws, with its colour map."""
    if image.shape[0] == 1:
        return image[0], "gray"
    return np.clip(np.moveaxis(image, 0, -1), 0, 1), None


def image_grid(
    originals: np.ndarray, reconstructions: np.ndarray, results: Sequence[ImageResult], path: Path, title: str
) -> None:
    """Two rows per block of up to 8 images: the true inputs above, the attack's below, each
    reconstruction captioned with its PSNR, SSIM and recovered label."""
    count = originals.shape[0]
    columns = min(count, 8)
    blocks = -(-count // columns)
    low, high = float(originals.min()), float(originals.max())
    scale = lambda x: (x - low) / (high - low) if high > low else x  # noqa: E731
    figure, axes = plt.subplots(2 * blocks, columns, figsize=(1.6 * columns, 4.0 * blocks), squeeze=False)
    for index in range(blocks * columns):
        top, bottom = axes[2 * (index // columns), index % columns], axes[2 * (index // columns) + 1, index % columns]
        top.axis("off")
        bottom.axis("off")
        if index >= count:
            continue
        result = results[index]
        picture, cmap = _picture(scale(originals[index]))
        top.imshow(picture, cmap=cmap, vmin=0, vmax=1)
        top.set_title(f"true {result.label}", fontsize=8)
        picture, cmap = _picture(scale(reconstructions[index]))
        bottom.imshow(picture, cmap=cmap, vmin=0, vmax=1)
        bottom.text(0.5, -0.04, f"{result.psnr:.1f} dB, SSIM {result.ssim:.2f}\nlabel {result.recovered_label}",
                    transform=bottom.transAxes, ha="center", va="top", fontsize=7)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def ratio_plot(points: Sequence[SweepPoint], path: Path, title: str) -> None:
    """Mean PSNR against ``encrypt_ratio``, the ratios evenly spaced (they span 1% to 100%)."""
    ratios = sorted({p.ratio for p in points})
    position = {ratio: index for index, ratio in enumerate(ratios)}
    figure, axis = plt.subplots(figsize=(max(6.4, 0.5 * len(ratios) + 1), 4.2))
    for rule in dict.fromkeys(p.rule for p in points):
        series = sorted((p for p in points if p.rule == rule), key=lambda p: p.ratio)
        axis.plot([position[p.ratio] for p in series], [p.mean_psnr for p in series], marker="o", label=rule)
    axis.axhline(NOISE_PSNR, color="grey", linestyle="--", linewidth=1, label=f"noise level ({NOISE_PSNR:g} dB)")
    axis.set_xticks(range(len(ratios)))
    axis.set_xticklabels([f"{r * 100:g}%" for r in ratios])
    axis.set_xlabel("encrypt_ratio (share of parameters encrypted; layer: whole tensors within it)")
    axis.set_ylabel("mean PSNR of the reconstruction (dB)")
    axis.set_title(title, fontsize=9)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
