"""Privacy mechanisms, each in its own module, all implementing :mod:`fedcrypt.core.mechanism`.

Mechanisms with keys are built per role: the server's instance gets public material only.
"""

from __future__ import annotations

from pathlib import Path

from fedcrypt.core.mechanism import Mechanism
from fedcrypt.crypto.ckks import PRESETS, SecretKey
from fedcrypt.mechanisms.ckks import CkksMechanism, load_public, load_secret
from fedcrypt.mechanisms.plaintext import PlaintextMechanism

MECHANISMS: tuple[str, ...] = (PlaintextMechanism.name, CkksMechanism.name)


def _check(name: str) -> None:
    if name not in MECHANISMS:
        raise ValueError(f"unknown mechanism {name!r}; available: {', '.join(MECHANISMS)}")


def build_mechanism(name: str) -> Mechanism:
    """A mechanism that needs no keys."""
    _check(name)
    if name != PlaintextMechanism.name:
        raise ValueError(f"mechanism {name!r} needs keys: use server_mechanism / client_mechanism")
    return PlaintextMechanism()


def simulation_mechanisms(name: str, *, preset: str, key_dir: Path | None) -> tuple[Mechanism, Mechanism]:
    """(server's instance, clients' instance) for one process. Without ``key_dir`` an HE
    mechanism gets a fresh key for this run; the server's instance still holds no secret."""
    _check(name)
    if name == PlaintextMechanism.name:
        mechanism = PlaintextMechanism()
        return mechanism, mechanism
    secret = load_secret(key_dir) if key_dir is not None else SecretKey(PRESETS[preset])
    return CkksMechanism(secret.public), CkksMechanism(secret.public, secret)


def server_mechanism(name: str, *, key_dir: Path | None) -> Mechanism:
    """The deployed server's instance: public parameters only."""
    _check(name)
    if name == PlaintextMechanism.name:
        return PlaintextMechanism()
    if key_dir is None:
        raise ValueError(f"mechanism {name!r} needs --keys DIR with the key authority's public file")
    return CkksMechanism(load_public(key_dir))


def client_mechanism(name: str, *, key_dir: Path | None) -> Mechanism:
    """A deployed client's instance, with the secret key."""
    _check(name)
    if name == PlaintextMechanism.name:
        return PlaintextMechanism()
    if key_dir is None:
        raise ValueError(f"mechanism {name!r} needs --keys DIR with the key authority's secret file")
    secret = load_secret(key_dir)
    return CkksMechanism(secret.public, secret)


__all__ = [
    "MECHANISMS",
    "CkksMechanism",
    "PlaintextMechanism",
    "build_mechanism",
    "client_mechanism",
    "server_mechanism",
    "simulation_mechanisms",
]
