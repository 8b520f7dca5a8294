"""The gradient-leakage audit: attack what the server observed, score it, sweep encryption masks.

:func:`audit_inversion` runs one real round of the job (see :mod:`~fedcrypt.audit.observe`) and
attacks every client's observed update. :func:`selection_sweep` asks the question behind
selective encryption (FedML-HE): if only a fraction of the update were encrypted, chosen by a
given rule, how much of the batch would the plaintext rest still give away?
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from fedcrypt.audit.inversion import GradientInversion, Reconstruction
from fedcrypt.audit.metrics import label_recovery, pair_images, score_image
from fedcrypt.audit.observe import ObservedRound, audit_batches, gradient_of, observe_round
from fedcrypt.config.job import JobConfig
from fedcrypt.core.client import client_seed
from fedcrypt.core.params import load_flat
from fedcrypt.data import Dataset
from fedcrypt.mechanisms.selective import layer_mask, normalized, selected_count, sensitivity_mask
from fedcrypt.models.training import ClientData

log = logging.getLogger(__name__)

RULES = ("sensitivity", "magnitude", "random", "layer")
RATIOS = (0.0, 0.01, 0.05, 0.1, 0.3, 1.0)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ImageResult:
    """One attacked example: its true and recovered label and the reconstruction's scores."""

    client: str
    label: int
    recovered_label: int
    mse: float
    psnr: float
    ssim: float


@dataclass
class InversionReport:
    """The attack on one setting: every image's scores and the summary figures."""

    attack: str
    mechanism: str
    batch_size: int
    readable: float  # mean fraction of each update the server read
    images: list[ImageResult]
    seconds: float
    label_sources: list[str] = field(default_factory=list)

    @property
    def mean_psnr(self) -> float:
        return float(np.mean([i.psnr for i in self.images]))

    @property
    def mean_ssim(self) -> float:
        return float(np.mean([i.ssim for i in self.images]))

    @property
    def mean_mse(self) -> float:
        return float(np.mean([i.mse for i in self.images]))

    @property
    def label_rate(self) -> float:
        return float(np.mean([i.label == i.recovered_label for i in self.images]))

    def to_json(self) -> dict[str, object]:
        return {
            "attack": self.attack, "mechanism": self.mechanism, "batch_size": self.batch_size,
            "readable_fraction": self.readable, "mean_psnr": self.mean_psnr, "mean_ssim": self.mean_ssim,
            "mean_mse": self.mean_mse, "label_recovery": self.label_rate, "seconds": self.seconds,
            "label_sources": self.label_sources, "images": [asdict(i) for i in self.images],
        }


@dataclass
class Attacked:
    """An :class:`InversionReport` with the pictures behind it (true and rebuilt, paired)."""

    report: InversionReport
    originals: np.ndarray
    reconstructions: np.ndarray


def data_bounds(dataset: Dataset) -> tuple[float, float]:
    return float(dataset.x_train.min()), float(dataset.x_train.max())


def attack_views(
    observed: ObservedRound,
    views: Sequence[np.ndarray | None],
    dataset: Dataset,
    inversion: GradientInversion,
    weighting: str,
    progress: Progress | None = None,
) -> Attacked:
    """Attack each client's ``views`` entry (NaN = unread) and score against its true batch."""
    started = time.perf_counter()
    model = observed.trainer.model
    load_flat(model, observed.params, observed.spec)
    bounds = data_bounds(dataset)
    data_range = bounds[1] - bounds[0]
    images: list[ImageResult] = []
    originals, rebuilt, sources, readable = [], [], [], []
    for observation, view in zip(observed.observations, views):
        batch = observation.batch
        size = int(batch.y.shape[0])
        if view is None:
            gradient = np.full(observed.spec.size, np.nan, dtype=np.float32)
            readable.append(0.0)
        else:
            gradient = gradient_of(view, observed.params, observed.trainer.config, weighting)
            readable.append(float(np.isfinite(view).mean()))
        result: Reconstruction = inversion.reconstruct(
            model, gradient, observed.spec, batch_size=size, input_shape=dataset.input_shape,
            num_classes=dataset.num_classes, bounds=bounds,
        )
        truth = batch.x.numpy()
        pairing = pair_images(truth, result.images)
        labels = batch.y.numpy()
        found = result.labels[pairing] if result.label_source == "optimized" else _pair_labels(labels, result.labels)
        for i in range(size):
            score = score_image(truth[i], result.images[pairing[i]], data_range)
            images.append(ImageResult(observation.client, int(labels[i]), int(found[i]), score.mse, score.psnr, score.ssim))
        originals.append(truth)
        rebuilt.append(np.clip(result.images[pairing], *bounds))
        sources.append(result.label_source)
        if progress:
            progress(f"{observation.client}: PSNR {np.mean([i.psnr for i in images[-size:]]):.1f} dB, "
                     f"labels {label_recovery(labels, result.labels):.0%} ({result.seconds:.1f} s)")
    report = InversionReport(
        inversion.attack, observed.mechanism, int(observed.observations[0].batch.y.shape[0]),
        float(np.mean(readable)), images, time.perf_counter() - started, sources,
    )
    return Attacked(report, np.concatenate(originals), np.concatenate(rebuilt))


def _pair_labels(true: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Recovered labels (an unordered multiset) lined up with the true ones: matches first."""
    remaining = list(found)
    out = np.full(true.shape[0], -1, dtype=np.int64)
    for i, label in enumerate(true):
        if label in remaining:
            remaining.remove(label)
            out[i] = label
    for i in np.flatnonzero(out < 0):
        out[i] = remaining.pop(0)
    return out


def audit_inversion(
    config: JobConfig,
    dataset: Dataset,
    *,
    attack: str = "idlg",
    clients: int = 8,
    batch_size: int = 1,
    seed: int = 0,
    iterations: int | None = None,
    restarts: int = 1,
    device: str = "cpu",
    progress: Progress | None = None,
) -> tuple[Attacked, ObservedRound]:
    """Run one round of ``config`` with ``clients`` clients holding one batch each, then attack
    what the server read of every update."""
    batches = audit_batches(dataset, clients, batch_size, seed=seed)
    if progress:
        progress(f"running one round of mechanism {config.privacy.mechanism!r} with {clients} client{'s' * (clients != 1)} "
                 f"(batch {batch_size}, one SGD step each)")
    observed = observe_round(config, dataset, batches)
    inversion = GradientInversion(attack, iterations=iterations, restarts=restarts, seed=seed, device=device)
    views = [o.view for o in observed.observations]
    return attack_views(observed, views, dataset, inversion, config.strategy.weighting, progress), observed


# --- selective encryption --------------------------------------------------------------------


def selection_mask(
    rule: str, ratio: float, observed: ObservedRound, *, seed: int = 0, sensitivity: np.ndarray | None = None
) -> np.ndarray:
    """The encryption mask (True = encrypted; the last entry is the weight) ``rule`` picks for
    ``ratio`` of the parameters, agreed over the round's clients as the mechanism agrees it:

    * ``sensitivity``: FedML-HE's score, each client's map scaled to a maximum of 1, summed (what
      ``[privacy] encrypt_ratio`` does);
    * ``magnitude``: the same with each client's ``|update|`` as the score;
    * ``random``: a seeded uniform choice;
    * ``layer``: whole tensors, the most sensitive per parameter first, as many as fit in
      ``ratio`` (what ``encrypt_layers`` can express).

    ``sensitivity`` is :func:`round_sensitivity` of ``observed`` if already computed (the sweep
    computes it once for all its ratios).
    """
    parameters = observed.spec.size
    if ratio <= 0:
        mask = np.zeros(parameters + 1, dtype=bool)
        mask[-1] = True
        return mask
    if rule == "sensitivity":
        return sensitivity_mask(sensitivity if sensitivity is not None else round_sensitivity(observed), ratio)
    if rule == "magnitude":
        total = np.zeros(parameters, dtype=np.float64)
        for observation in observed.observations:
            if observation.view is None or not np.isfinite(observation.view).all():
                raise ValueError("the magnitude rule needs the clients' plaintext updates (mechanism \"none\")")
            total += normalized(np.abs(observation.view[:-1]))
        return sensitivity_mask(total, ratio)
    if rule == "random":  # an experiment's reproducible choice, not a secret
        order = np.random.default_rng(seed).permutation(parameters)
        mask = np.zeros(parameters + 1, dtype=bool)
        mask[order[: selected_count(parameters, ratio)]] = True
        mask[-1] = True
        return mask
    if rule == "layer":
        scores = sensitivity if sensitivity is not None else round_sensitivity(observed)
        return layer_mask(observed.spec, _layers_within(observed, scores, ratio))
    raise ValueError(f"unknown selection rule {rule!r}; choose one of: {', '.join(RULES)}")


def round_sensitivity(observed: ObservedRound) -> np.ndarray:
    """The clients' sensitivity maps, each scaled to a maximum of 1, summed (as the clients agree it)."""
    total = np.zeros(observed.spec.size, dtype=np.float64)
    for observation in observed.observations:
        data = ClientData.whole(observation.batch.x, observation.batch.y)
        # the seed a round-1 client uses for its map (see fedcrypt.core.client._Local.sensitivity)
        seed = client_seed(observed.job_seed, 0, observation.client)
        total += normalized(observed.trainer.sensitivity(observed.params, data, seed=seed))
    return total


def _layers_within(observed: ObservedRound, scores: np.ndarray, ratio: float) -> list[str]:
    """Tensor names by descending mean sensitivity, greedily while they fit in ``ratio``."""
    budget = ratio * observed.spec.size
    ranked, offset = [], 0
    for tensor in observed.spec.tensors:
        ranked.append((float(np.mean(scores[offset : offset + tensor.numel])), tensor.name, tensor.numel))
        offset += tensor.numel
    chosen, used = [], 0
    for _, name, size in sorted(ranked, reverse=True):
        if used + size <= budget:
            chosen.append(name)
            used += size
    return chosen or [min(ranked, key=lambda r: r[2])[1]]


@dataclass(frozen=True)
class SweepPoint:
    rule: str
    ratio: float
    encrypted_fraction: float  # of the parameters, as the mask came out
    mean_psnr: float
    mean_ssim: float
    label_recovery: float


def selection_sweep(
    config: JobConfig,
    dataset: Dataset,
    *,
    attack: str = "idlg",
    rules: Sequence[str] = RULES,
    ratios: Sequence[float] = RATIOS,
    clients: int = 8,
    batch_size: int = 1,
    seed: int = 0,
    iterations: int | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
) -> list[SweepPoint]:
    """Mean PSNR of ``attack`` when the ``ratio`` of the update chosen by ``rule`` is encrypted
    and the rest travels in the clear, for every rule and ratio. It observes one plaintext round
    of the job (mechanism ``none``, no DP) and hides each mask's entries from the attack, which
    is what a selective-CKKS server reads under that mask."""
    for rule in rules:
        if rule not in RULES:
            raise ValueError(f"unknown selection rule {rule!r}; choose one of: {', '.join(RULES)}")
    plain = config.in_the_clear()
    observed = observe_round(plain, dataset, audit_batches(dataset, clients, batch_size, seed=seed))
    inversion = GradientInversion(attack, iterations=iterations, seed=seed, device=device)
    scores = round_sensitivity(observed) if {"sensitivity", "layer"} & set(rules) else None
    points: list[SweepPoint] = []
    shared: dict[float, SweepPoint] = {}
    for rule in rules:
        for ratio in ratios:
            if ratio in (0.0, 1.0) and ratio in shared:  # every rule encrypts nothing / everything alike
                points.append(replace(shared[ratio], rule=rule))
                continue
            mask = selection_mask(rule, ratio, observed, seed=seed, sensitivity=scores)
            views = []
            for observation in observed.observations:
                assert observation.view is not None
                view = observation.view.copy()
                view[mask] = np.nan
                views.append(view if not mask.all() else None)
            report = attack_views(observed, views, dataset, inversion, plain.strategy.weighting).report
            point = SweepPoint(rule, ratio, float(mask[:-1].mean()), report.mean_psnr, report.mean_ssim,
                               report.label_rate)
            if ratio in (0.0, 1.0):
                shared[ratio] = point
            points.append(point)
            if progress:
                progress(f"{rule:>11} {ratio:6.1%} (encrypts {point.encrypted_fraction:6.1%}): "
                         f"PSNR {point.mean_psnr:5.1f} dB, SSIM {point.mean_ssim:.2f}, labels {point.label_recovery:.0%}")
    return points

