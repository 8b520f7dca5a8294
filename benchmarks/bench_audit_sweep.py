"""How much of an update must selective encryption hide to stop gradient inversion?

The sweep behind ``fedcrypt audit --sweep``, larger: more images and more ratios, attacked in
parallel processes. Two steps, so the attacks can run on a bigger machine that lacks the
protocol's dependencies (TenSEAL and friends):

1. ``prepare OUT.npz`` (here): one real plaintext round of a LeNet-on-MNIST job with ``--images``
   clients of one example each (``fedcrypt.audit.observe``), each client's batch gradient as the
   server reads it, and every rule's encryption mask for every ratio (``selection_mask``, the
   sensitivity rule being exactly the mask ``[privacy] encrypt_ratio`` agrees).
2. ``attack IN.npz`` (anywhere with PyTorch, scikit-image and matplotlib): every (rule, ratio,
   image) attack with the mask's entries hidden, ``--workers`` processes of one thread each;
   writes ``benchmarks/results/audit_sweep_<attack>.json``.
3. ``plot``: draws ``docs/images/audit-psnr-vs-ratio-<attack>.png`` from those files.

The baseline in the same run is the unmasked attack (ratio 0) on the same images.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import command_line

REPO = Path(__file__).resolve().parents[1]
RATIOS = (0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
RULES = ("sensitivity", "magnitude", "random", "layer")


def prepare(out: Path, images: int, seed: int) -> None:
    from fedcrypt.audit.leakage import selection_mask
    from fedcrypt.audit.observe import audit_batches, gradient_of, observe_round
    from fedcrypt.config.job import load_job
    from fedcrypt.data import load_dataset

    job = load_job(REPO / "examples" / "audit" / "lenet_plain.toml")
    dataset = load_dataset(job.data.dataset)
    observed = observe_round(job, dataset, audit_batches(dataset, images, 1, seed=seed))
    gradients = np.stack([
        gradient_of(o.view, observed.params, observed.trainer.config, job.strategy.weighting)
        for o in observed.observations
    ])
    keys, masks = [], []
    for rule in RULES:
        for ratio in RATIOS:
            keys.append(f"{rule}:{ratio}")
            masks.append(selection_mask(rule, ratio, observed, seed=seed))
    np.savez_compressed(
        out, params=observed.params, gradients=gradients, masks=np.stack(masks), keys=np.array(keys),
        x=np.concatenate([o.batch.x.numpy() for o in observed.observations]),
        y=np.concatenate([o.batch.y.numpy() for o in observed.observations]),
    )
    print(f"wrote {out}: {images} gradients of {gradients.shape[1]} entries, {len(keys)} masks")


@dataclass(frozen=True)
class Point:
    rule: str
    ratio: float
    encrypted_fraction: float
    mean_psnr: float
    mean_ssim: float
    label_recovery: float


_STATE: dict[str, Any] = {}


def _load(path: str) -> None:
    from fedcrypt.core.params import ParamSpec, load_flat
    from fedcrypt.models.zoo import build_model

    data = dict(np.load(path))
    model = build_model("lenet", (1, 28, 28), 10)
    spec = ParamSpec.from_state_dict(model.state_dict())
    load_flat(model, data["params"], spec)
    _STATE.update(data=data, model=model, spec=spec)


def _attack(task: tuple[str, int, int, str, int]) -> tuple[int, int, float, float, bool, float]:
    from fedcrypt.audit.inversion import GradientInversion
    from fedcrypt.audit.metrics import score_image

    attack, mask_index, image, device, iterations = task
    data, model, spec = _STATE["data"], _STATE["model"], _STATE["spec"]
    gradient = data["gradients"][image].copy()
    gradient[data["masks"][mask_index][:-1]] = np.nan
    started = time.perf_counter()
    result = GradientInversion(attack, iterations=iterations or None, seed=image, device=device).reconstruct(
        model, gradient, spec, batch_size=1, input_shape=(1, 28, 28), num_classes=10
    )
    score = score_image(data["x"][image], result.images[0], 1.0)
    return mask_index, image, score.psnr, score.ssim, bool(result.labels[0] == data["y"][image]), time.perf_counter() - started


def attack(path: Path, attacks: list[str], workers: int, device: str, iterations: int, out: Path) -> None:
    _load(str(path))
    data = _STATE["data"]
    keys = [str(k) for k in data["keys"]]
    images = data["gradients"].shape[0]
    for name in attacks:
        results: dict[str, Any] = {"attack": name, "images": images, "parameters": int(data["gradients"].shape[1]),
                                   "iterations": iterations or None}
        started = time.perf_counter()
        tasks = [(name, m, i, device, iterations) for m in range(len(keys)) for i in range(images)]
        with ProcessPoolExecutor(workers, initializer=_load, initargs=(str(path),)) as pool:
            done = list(pool.map(_attack, tasks, chunksize=4))
        points = []
        for m, key in enumerate(keys):
            rule, ratio = key.split(":")
            rows = [d for d in done if d[0] == m]
            points.append(Point(rule, float(ratio), float(data["masks"][m][:-1].mean()),
                                float(np.mean([r[2] for r in rows])), float(np.mean([r[3] for r in rows])),
                                float(np.mean([r[4] for r in rows]))))
        seconds = time.perf_counter() - started
        results.update(seconds=seconds, attack_seconds_mean=float(np.mean([d[5] for d in done])),
                       points=[vars(p) for p in points], command=command_line(), device=device, workers=workers, torch=torch.__version__,
                       cpu_count=os.cpu_count(), gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
        print(f"{name}: {len(tasks)} attacks in {seconds:.0f} s on {workers} workers")
        for rule in RULES:
            row = [p for p in points if p.rule == rule]
            print(f"  {rule:>11}: " + "  ".join(f"{p.ratio:g}:{p.mean_psnr:.1f}" for p in row))
        target = out / f"audit_sweep_{name}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {target}")


def plot(results: Path, images: Path) -> None:
    from fedcrypt.audit.figures import ratio_plot

    for path in sorted(results.glob("audit_sweep_*.json")):
        run = json.loads(path.read_text())
        points = [Point(**p) for p in run["points"]]
        target = images / f"audit-psnr-vs-ratio-{run['attack']}.png"
        ratio_plot(points, target, f"{run['attack']} on sigmoid LeNet / MNIST, batch 1, {run['images']} images")
        print(f"wrote {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    steps = parser.add_subparsers(dest="step", required=True)
    first = steps.add_parser("prepare")
    first.add_argument("out", type=Path)
    first.add_argument("--images", type=int, default=16)
    first.add_argument("--seed", type=int, default=0)
    second = steps.add_parser("attack")
    second.add_argument("path", type=Path)
    second.add_argument("--attacks", default="idlg")
    second.add_argument("--workers", type=int, default=2)
    second.add_argument("--device", default="cpu")
    second.add_argument("--iterations", type=int, default=0, help="0: the attack's default")
    second.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="folder of the results")
    third = steps.add_parser("plot")
    third.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    third.add_argument("--images", type=Path, default=REPO / "docs" / "images")
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.out, args.images, args.seed)
    elif args.step == "attack":
        attack(args.path, args.attacks.split(","), args.workers, args.device, args.iterations, args.out)
    else:
        plot(args.results, args.images)


if __name__ == "__main__":
    main()
