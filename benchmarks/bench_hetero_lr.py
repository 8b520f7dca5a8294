"""Hetero logistic regression on the breast cancer split: fedcrypt against python-paillier, one run.

The example split (``breast_cancer_split``: guest = label + 10 features, host = 20 features),
aligned on the 455 common IDs, 75 % of them for training (stratified, seed 0), ``--epochs``
epochs (default 10) with ``--bits`` keys (default 2048). Three models, same rows:

* fedcrypt's :class:`~fedcrypt.vertical.hetero_lr.HeteroLR`, every role in this process, every
  message a ``Payload``: fixed-point encodings, DJN randomness precomputed on all cores, the
  ciphertext-times-features products as one multi-exponentiation per feature, arbiter decryption
  in threads. Timed from key generation to the last weight update.
* The same protocol with ``phe`` (python-paillier) one value at a time, as FATE's HeteroLR uses
  it: the same batches, fixed-point scales, fresh encryptions and masks, but ``EncryptedNumber``
  arithmetic per value (``r^n`` a full exponentiation per encryption, one ``powmod`` per
  ciphertext-times-feature product) and one decryption per gradient value (no packing), on one
  core (phe has no parallelism).
* scikit-learn's ``LogisticRegression`` on the joined, standardized features (the plaintext
  reference a vertical model should match).

Reported: fit seconds of both and their ratio, test accuracy of all three, final Taylor loss, and
the largest weight difference between fedcrypt and phe (the same algorithm: ~0). Requires ``phe``.
"""

from __future__ import annotations

import argparse
import math
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import phe
from common import RESULTS_DIR, command_line, figure_table, machine_info, write_json
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from fedcrypt.vertical.data import PartyData, align, breast_cancer_split, load_party_csv
from fedcrypt.vertical.hetero_lr import FEATURE_BITS, GRADIENT_BITS, VALUE_BITS, HeteroLR, batch_plan

HYPER: dict[str, Any] = {"lr": 0.1, "batch_size": 64, "l2": 0.0, "decay": 0.5}


def load(out_dir: Path) -> dict[str, PartyData]:
    guest_csv, host_csv = breast_cancer_split(out_dir)
    guest, host = load_party_csv(guest_csv, "id", "label"), load_party_csv(host_csv, "id")
    common = sorted(set(guest.ids) & set(host.ids))
    guest, host = align(guest, common), align(host, common)
    assert guest.labels is not None
    train, test = train_test_split(np.array(common), test_size=0.25, random_state=0, stratify=guest.labels)
    return {"guest": align(guest, train), "host": align(host, train),
            "guest_test": align(guest, test), "host_test": align(host, test)}


def quantized(party: PartyData, train: PartyData) -> np.ndarray:
    """A party's features as fedcrypt trains on them: standardized with its own training
    statistics and rounded to ``2^-FEATURE_BITS``."""
    z = (party.features - train.features.mean(axis=0)) / train.features.std(axis=0)
    rounded: np.ndarray = np.rint(z * 2.0**FEATURE_BITS) / 2.0**FEATURE_BITS
    return rounded


def _encoded(public: phe.PaillierPublicKey, value: float, bits: int) -> phe.EncodedNumber:
    """python-paillier's encoding at scale ``2^bits`` (its base is 16, so ``exponent = -bits / 4``)."""
    return phe.EncodedNumber(public, int(round(value * 2.0**bits)) % public.n, -bits // 4)


def phe_fit(x_guest: np.ndarray, x_host: np.ndarray, labels: np.ndarray, *, bits: int, epochs: int,
            lr: float, batch_size: int, l2: float, decay: float) -> dict[str, Any]:
    """fedcrypt's protocol (one host, separate arbiter) with python-paillier, value by value."""
    started = time.perf_counter()
    public, private = phe.generate_paillier_keypair(n_length=bits)  # the arbiter's
    n = public.n
    x_guest = np.hstack([x_guest, np.ones((len(x_guest), 1))])
    y = 2 * labels - 1
    w_g, w_h = np.zeros(x_guest.shape[1]), np.zeros(x_host.shape[1])
    enc_g = [[_encoded(public, v, FEATURE_BITS) for v in row] for row in x_guest]
    enc_h = [[_encoded(public, v, FEATURE_BITS) for v in row] for row in x_host]

    def masked_round_trip(values: list[phe.EncryptedNumber]) -> np.ndarray:
        """Mask with uniform r in Z_n, re-randomize, let the arbiter decrypt, unmask, decode."""
        masks = [secrets.randbelow(n) for _ in values]
        masked = [v + phe.EncodedNumber(public, r, v.exponent) for v, r in zip(values, masks)]
        for m in masked:
            m.obfuscate()
        plain = [private.raw_decrypt(m.ciphertext(be_secure=False)) for m in masked]  # at the arbiter
        return np.array([phe.EncodedNumber(public, (p - r) % n, v.exponent).decode()
                         for p, r, v in zip(plain, masks, values)])

    losses = []
    for epoch, batches in enumerate(batch_plan(len(y), batch_size, epochs, 0)):
        step, total = lr / (1 + decay * epoch), 0.0
        for rows in batches:
            size = len(rows)
            wx_h = x_host[rows] @ w_h  # host: forward
            enc_wx = [public.encrypt(float(v), precision=2.0**-VALUE_BITS) for v in wx_h]
            square = float(wx_h @ wx_h) + 4 * size * l2 * float(w_h @ w_h)
            enc_square = public.encrypt(square, precision=2.0**-GRADIENT_BITS)
            wx_g = x_guest[rows] @ w_g  # guest: residual, fresh randomness
            d = [c + _encoded(public, u, VALUE_BITS) for c, u in zip(enc_wx, wx_g - 2 * y[rows])]
            for c in d:
                c.obfuscate()
            coefficient = 2 * wx_g - 4 * y[rows]
            cross = sum(c * _encoded(public, k, FEATURE_BITS) for c, k in zip(enc_wx, coefficient))
            plain = float(wx_g @ wx_g - 4 * y[rows] @ wx_g)
            loss = cross + enc_square + _encoded(public, plain, GRADIENT_BITS)
            guest_g = [sum(d[i] * enc_g[r][j] for i, r in enumerate(rows)) for j in range(len(w_g))]
            host_g = [sum(d[i] * enc_h[r][j] for i, r in enumerate(rows)) for j in range(len(w_h))]
            guest_values = masked_round_trip([*guest_g, loss])
            host_values = masked_round_trip(host_g)
            total += size * (math.log(2) + guest_values[-1] / (8 * size) + 0.5 * l2 * float(w_g[:-1] @ w_g[:-1]))
            penalty = l2 * w_g
            penalty[-1] = 0.0
            w_g = w_g - step * (guest_values[:-1] / (4 * size) + penalty)
            w_h = w_h - step * (host_values / (4 * size) + l2 * w_h)
        losses.append(total / len(y))
    return {"fit_seconds": time.perf_counter() - started, "weights": np.concatenate([w_g, w_h]), "losses": losses}


def run(bits: int, epochs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        data = load(Path(folder))
    guest, host, guest_test, host_test = data["guest"], data["host"], data["guest_test"], data["host_test"]
    assert guest.labels is not None and guest_test.labels is not None

    started = time.perf_counter()
    model = HeteroLR(key_bits=bits, epochs=epochs, random_state=0, **HYPER).fit(guest, [host])
    fit_seconds = time.perf_counter() - started
    started = time.perf_counter()
    predicted = model.predict(guest_test, [host_test])
    predict_seconds = time.perf_counter() - started
    weights = np.concatenate([model.guest_.weights, [model.guest_.intercept], model.hosts_[0].weights])
    assert model.loss_history_ is not None

    baseline = phe_fit(quantized(guest, guest), quantized(host, host), guest.labels, bits=bits, epochs=epochs, **HYPER)
    x_test = np.hstack([quantized(guest_test, guest), np.ones((len(guest_test), 1)), quantized(host_test, host)])
    phe_predicted = (x_test @ baseline["weights"] > 0).astype(np.int64)

    joined = np.hstack([guest.features, host.features])
    scaler = StandardScaler().fit(joined)
    reference = LogisticRegression(max_iter=1000).fit(scaler.transform(joined), guest.labels)
    sklearn_predicted = reference.predict(scaler.transform(np.hstack([guest_test.features, host_test.features])))

    def accuracy(labels: np.ndarray) -> float:
        assert guest_test.labels is not None
        return float((labels == guest_test.labels).mean())

    return {
        "bits": bits, "epochs": epochs, **HYPER, "train_rows": len(guest), "test_rows": len(guest_test),
        "guest_features": len(guest.feature_names), "host_features": len(host.feature_names),
        "batches_per_epoch": model.guest_.batches_per_epoch,
        "fedcrypt": {"fit_seconds": fit_seconds, "predict_seconds": predict_seconds,
                     "accuracy": accuracy(predicted), "final_loss": model.loss_history_[-1]},
        "phe": {"fit_seconds": baseline["fit_seconds"], "accuracy": accuracy(phe_predicted),
                "final_loss": baseline["losses"][-1]},
        "sklearn": {"accuracy": accuracy(sklearn_predicted)},
        "speedup": baseline["fit_seconds"] / fit_seconds,
        "max_weight_difference": float(np.abs(weights - baseline["weights"]).max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "hetero_lr.json")
    args = parser.parse_args()
    machine = machine_info(("fedcrypt", "phe", "gmpy2", "numpy", "scikit-learn"))  # load average before the run
    result = run(args.bits, args.epochs)
    write_json(args.out, {"benchmark": "hetero_lr", "command": command_line(), "machine": machine, "result": result})
    fed, base = result["fedcrypt"], result["phe"]
    print(figure_table([
        (f"fedcrypt fit, {args.epochs} epochs, {args.bits}-bit keys (s)", f"{fed['fit_seconds']:.2f}"),
        ("python-paillier fit, same protocol (s)", f"{base['fit_seconds']:.2f}"),
        ("speedup", f"**{result['speedup']:.1f}x**"),
        ("fedcrypt predict, test rows (s)", f"{fed['predict_seconds']:.2f}"),
        ("accuracy: fedcrypt / python-paillier / scikit-learn",
         f"{fed['accuracy']:.4f} / {base['accuracy']:.4f} / {result['sklearn']['accuracy']:.4f}"),
        ("final Taylor loss: fedcrypt / python-paillier", f"{fed['final_loss']:.5f} / {base['final_loss']:.5f}"),
        ("max weight difference fedcrypt vs python-paillier", f"{result['max_weight_difference']:.1e}"),
    ]))
    print(f"\nResults: {args.out}")


if __name__ == "__main__":
    main()
