"""The privacy audit across mechanisms: what gradient inversion recovers from what each server reads.

For each setting below, one real round of the sigmoid-LeNet MNIST job
(``examples/audit/lenet_plain.toml``) under that mechanism, ``--images`` clients of one example
each, then iDLG and the cosine attack on every update the server read
(``fedcrypt.audit.leakage.audit_inversion``). The baseline, in the same run, is the plaintext
setting ``none``: every other row says how much of that attack's success its mechanism removes.
Also timed: one audit setting as ``fedcrypt audit`` runs it by default (8 updates, iDLG), the
issue's budget being 5 minutes on 2 cores, and the cosine attack on plaintext batches of 4 and 8.
Writes ``benchmarks/results/audit.json``.

``--part membership``: the membership audit of ``examples/audit/mia_dp.toml`` (an overfit MLP;
the job with DP at epsilon 8 and, as the baseline in the same run, without), ``--repeats`` times
since DP noise is not repeatable. Writes ``benchmarks/results/audit_membership.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import RESULTS_DIR, command_line, machine_info, write_json

from fedcrypt.audit.leakage import audit_inversion
from fedcrypt.audit.membership import audit_membership
from fedcrypt.config.job import load_job
from fedcrypt.data import load_dataset

REPO = Path(__file__).resolve().parents[1]
UNIFORM = {"strategy": {"weighting": "uniform"}}
SETTINGS: dict[str, dict[str, Any]] = {
    "none": {},
    "ckks": {"privacy": {"mechanism": "ckks"}},
    "ckks encrypt_ratio 0.1": {"privacy": {"mechanism": "ckks", "encrypt_ratio": 0.1}},
    "ckks encrypt_ratio 0.9": {"privacy": {"mechanism": "ckks", "encrypt_ratio": 0.9}},
    "ckks encrypt_layers fc.*": {"privacy": {"mechanism": "ckks", "encrypt_layers": ["fc.*"]}},
    "paillier": {"privacy": {"mechanism": "paillier", "paillier_bits": 2048}},
    "batchcrypt": {"privacy": {"mechanism": "batchcrypt", "paillier_bits": 2048}},
    "secagg": {"privacy": {"mechanism": "secagg"}},
    "shares": {"privacy": {"mechanism": "shares"}},
    "none + DP central (z=1, C=1)": {**UNIFORM, "dp": {"noise": "central", "noise_multiplier": 1.0}},
    "none + DP local (eps 8)": {**UNIFORM, "dp": {"noise": "local", "target_epsilon": 8.0}},
    "secagg + DP distributed (eps 8)": {**UNIFORM, "privacy": {"mechanism": "secagg"},
                                        "dp": {"noise": "distributed", "target_epsilon": 8.0}},
}


def row(name: str, report: Any, seconds: float) -> dict[str, Any]:
    return {"setting": name, "attack": report.attack, "readable": report.readable, "mean_psnr": report.mean_psnr,
            "mean_ssim": report.mean_ssim, "label_recovery": report.label_rate, "seconds": seconds}


def membership(repeats: int) -> None:
    job = load_job(REPO / "examples" / "audit" / "mia_dp.toml")
    runs = []
    for repeat in range(repeats):
        started = time.perf_counter()
        report = audit_membership(job, members=300)
        runs.append({**report.to_json(), "audit_seconds": time.perf_counter() - started})
        for r in report.rows:
            print(f"run {repeat + 1} {r.label:>28}: test acc {r.test_accuracy:.3f}  member acc {r.train_accuracy:.3f}  "
                  f"loss AUC {r.loss_auc:.3f} adv {r.loss_advantage:.3f}  shadow AUC {r.shadow_auc:.3f} "
                  f"adv {r.shadow_advantage:.3f}", flush=True)
        print(f"run {repeat + 1}: {runs[-1]['audit_seconds']:.1f} s", flush=True)
    write_json(RESULTS_DIR / "audit_membership.json", {
        "command": command_line(), "machine": machine_info(("torch", "numpy", "scikit-learn")), "runs": runs,
    })
    print(f"wrote {RESULTS_DIR / 'audit_membership.json'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("inversion", "membership"), default="inversion")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--cosine-iterations", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.part == "membership":
        membership(args.repeats)
        return
    base = load_job(REPO / "examples" / "audit" / "lenet_plain.toml")
    dataset = load_dataset(base.data.dataset)
    rows = []
    for name, sections in SETTINGS.items():
        job = base.with_overrides(**sections) if sections else base
        for attack, iterations in (("idlg", None), ("cosine", args.cosine_iterations)):
            started = time.perf_counter()
            attacked, _ = audit_inversion(job, dataset, attack=attack, clients=args.images, iterations=iterations)
            rows.append(row(name, attacked.report, time.perf_counter() - started))
            r = rows[-1]
            print(f"{name:>32} {attack:>6}: read {r['readable']:6.1%}  PSNR {r['mean_psnr']:5.1f} dB  "
                  f"SSIM {r['mean_ssim']:5.2f}  labels {r['label_recovery']:4.0%}  {r['seconds']:5.1f} s", flush=True)
    started = time.perf_counter()
    default, _ = audit_inversion(base, dataset, attack="idlg", clients=8)
    default_seconds = time.perf_counter() - started
    print(f"one audit setting (8 updates, iDLG): {default_seconds:.1f} s, PSNR {default.report.mean_psnr:.1f} dB")
    batches = []
    for batch in (4, 8):
        started = time.perf_counter()
        attacked, _ = audit_inversion(base, dataset, attack="cosine", clients=2, batch_size=batch,
                                      iterations=args.cosine_iterations)
        batches.append({**row(f"none, batch {batch}", attacked.report, time.perf_counter() - started),
                        "batch": batch})
        print(f"cosine at batch {batch}: PSNR {batches[-1]['mean_psnr']:.1f} dB, SSIM {batches[-1]['mean_ssim']:.2f}, "
              f"labels {batches[-1]['label_recovery']:.0%}")
    write_json(RESULTS_DIR / "audit.json", {
        "command": command_line(), "machine": machine_info(("torch", "numpy", "scikit-image", "tenseal")),
        "torch_threads": torch.get_num_threads(), "images": args.images, "settings": rows,
        "default_audit_seconds": default_seconds, "default_audit_psnr": default.report.mean_psnr,
        "default_audit_labels": default.report.label_rate, "batches": batches,
        "psnr_guess_floor": float(np.mean([r["mean_psnr"] for r in rows if r["readable"] == 0])),
    })
    print(f"wrote {RESULTS_DIR / 'audit.json'}")


if __name__ == "__main__":
    main()
