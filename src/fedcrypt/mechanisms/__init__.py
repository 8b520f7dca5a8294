"""Privacy mechanisms, each in its own module, all implementing :mod:`fedcrypt.core.mechanism`.

Mechanisms with keys are built per role: the server's instance gets public material only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedcrypt.core.mechanism import Mechanism
from fedcrypt.crypto.ckks import PRESETS, PublicParams, SecretKey
from fedcrypt.crypto.paillier import PrivateKey, PublicKey, generate_keypair
from fedcrypt.mechanisms import paillier as paillier_keys
from fedcrypt.mechanisms.batchcrypt import BatchCryptMechanism
from fedcrypt.mechanisms.ckks import CkksMechanism, load_public, load_secret
from fedcrypt.mechanisms.paillier import PaillierMechanism
from fedcrypt.mechanisms.plaintext import PlaintextMechanism
from fedcrypt.mechanisms.secagg import SecAggMechanism
from fedcrypt.mechanisms.selective import SelectiveCkksMechanism
from fedcrypt.mechanisms.shares import SharesMechanism, helper_names, load_helper_public, load_helper_secret

if TYPE_CHECKING:
    from fedcrypt.core.params import ParamSpec  # imports PyTorch, which helper processes do without

MECHANISMS: tuple[str, ...] = (
    PlaintextMechanism.name,
    CkksMechanism.name,
    PaillierMechanism.name,
    BatchCryptMechanism.name,
    SecAggMechanism.name,
    SharesMechanism.name,
)


_PAILLIER_FAMILY = (PaillierMechanism.name, BatchCryptMechanism.name)


def _check(name: str) -> None:
    if name not in MECHANISMS:
        raise ValueError(f"unknown mechanism {name!r}; available: {', '.join(MECHANISMS)}")


@dataclass(frozen=True)
class Selection:
    """Which entries an HE mechanism encrypts: all (the default), the most sensitive
    ``ratio`` of them, or the tensors matching ``layers`` (fnmatch patterns)."""

    ratio: float = 1.0
    layers: tuple[str, ...] = ()

    @property
    def full(self) -> bool:
        return self.ratio == 1.0 and not self.layers


def _ckks(public: PublicParams, secret: SecretKey | None, spec: ParamSpec | None, selection: Selection) -> Mechanism:
    if selection.full:
        return CkksMechanism(public, secret)
    if spec is None:
        raise ValueError("selective encryption needs the model's parameter layout")
    return SelectiveCkksMechanism(
        public, secret, spec=spec, encrypt_ratio=selection.ratio, encrypt_layers=selection.layers
    )


@dataclass(frozen=True)
class Options:
    """A job's mechanism settings (its ``[privacy]`` section); each mechanism reads its own."""

    preset: str = "fast"
    selection: Selection = Selection()
    paillier_bits: int = 2048
    bits: int = 16
    neighbors: int | None = None
    threshold: float = 0.5
    aggregators: int = 2


def _paillier(
    name: str, public: PublicKey, private: PrivateKey | None, spec: ParamSpec | None, options: Options
) -> Mechanism:
    if name == PaillierMechanism.name:
        return PaillierMechanism(public, private)
    sizes = [tensor.numel for tensor in spec.tensors] if spec is not None else None
    return BatchCryptMechanism(public, private, bits=options.bits, tensor_sizes=sizes)


def _keyless(name: str, options: Options) -> Mechanism | None:
    """The mechanism if it needs no keys (the same instance serves server and clients)."""
    if name == PlaintextMechanism.name:
        return PlaintextMechanism()
    if name == SecAggMechanism.name:
        return SecAggMechanism(options.neighbors, options.threshold)
    return None


def build_mechanism(name: str, options: Options = Options()) -> Mechanism:
    """A mechanism that needs no keys."""
    _check(name)
    mechanism = _keyless(name, options)
    if mechanism is None:
        raise ValueError(f"mechanism {name!r} needs keys: use server_mechanism / client_mechanism")
    return mechanism


def helpers_of(name: str, options: Options = Options()) -> tuple[str, ...]:
    """The helper aggregators a mechanism needs besides the server (``shares``: ``k - 1``)."""
    _check(name)
    return helper_names(options.aggregators) if name == SharesMechanism.name else ()


def helper_mechanism(
    name: str, *, helper: str, key_dir: Path | None, options: Options, min_clients: int
) -> SharesMechanism:
    """A helper aggregator's instance with its secret key, from ``key_dir`` or fresh (simulation).
    It refuses to sum fewer than ``min_clients`` clients' shares."""
    helpers = helpers_of(name, options)
    if helper not in helpers:
        raise ValueError(f"{helper!r} is not a helper aggregator of this job; its helpers: {', '.join(helpers) or 'none'}")
    key = load_helper_secret(key_dir, helper) if key_dir is not None else X25519PrivateKey.generate()
    return SharesMechanism(helpers, helper_key=key, min_clients=min_clients)


def simulation_mechanisms(
    name: str,
    *,
    key_dir: Path | None,
    spec: ParamSpec | None = None,
    options: Options = Options(),
    helper_keys: dict[str, bytes] | None = None,
) -> tuple[Mechanism, Mechanism]:
    """(server's instance, clients' instance) for one process. Without ``key_dir`` an HE
    mechanism gets a fresh key for this run; the server's instance still holds no secret.
    ``shares`` takes its helper aggregators' public keys from ``helper_keys`` (the simulation's
    helper processes made them) or from ``key_dir``."""
    _check(name)
    if name == SharesMechanism.name:
        helpers = helper_names(options.aggregators)
        if helper_keys is None:
            if key_dir is None:
                raise ValueError("shares needs the helper aggregators' public keys")
            helper_keys = load_helper_public(key_dir, helpers)
        return SharesMechanism(helpers), SharesMechanism(helpers, helper_keys=helper_keys)
    keyless = _keyless(name, options)
    if keyless is not None:
        return keyless, keyless
    if name in _PAILLIER_FAMILY:
        private = (
            paillier_keys.load_secret(key_dir) if key_dir is not None else generate_keypair(options.paillier_bits)[1]
        )
        return (
            _paillier(name, private.public, None, spec, options),
            _paillier(name, private.public, private, spec, options),
        )
    secret = load_secret(key_dir) if key_dir is not None else SecretKey(PRESETS[options.preset])
    return _ckks(secret.public, None, spec, options.selection), _ckks(secret.public, secret, spec, options.selection)


def server_mechanism(
    name: str, *, key_dir: Path | None, spec: ParamSpec | None = None, options: Options = Options()
) -> Mechanism:
    """The deployed server's instance: public parameters only."""
    _check(name)
    if name == SharesMechanism.name:
        return SharesMechanism(helper_names(options.aggregators))
    keyless = _keyless(name, options)
    if keyless is not None:
        return keyless
    if key_dir is None:
        raise ValueError(f"mechanism {name!r} needs --keys DIR with the key authority's public file")
    if name in _PAILLIER_FAMILY:
        return _paillier(name, paillier_keys.load_public(key_dir), None, spec, options)
    return _ckks(load_public(key_dir), None, spec, options.selection)


def client_mechanism(
    name: str, *, key_dir: Path | None, spec: ParamSpec | None = None, options: Options = Options()
) -> Mechanism:
    """A deployed client's instance, with the secret key."""
    _check(name)
    keyless = _keyless(name, options)
    if keyless is not None:
        return keyless
    if key_dir is None:
        raise ValueError(
            f"mechanism {name!r} needs --keys DIR with "
            + ("the helper aggregators' public files" if name == SharesMechanism.name else "the key authority's secret file")
        )
    if name == SharesMechanism.name:
        helpers = helper_names(options.aggregators)
        return SharesMechanism(helpers, helper_keys=load_helper_public(key_dir, helpers))
    if name in _PAILLIER_FAMILY:
        private = paillier_keys.load_secret(key_dir)
        return _paillier(name, private.public, private, spec, options)
    secret = load_secret(key_dir)
    return _ckks(secret.public, secret, spec, options.selection)


__all__ = [
    "MECHANISMS",
    "BatchCryptMechanism",
    "CkksMechanism",
    "Options",
    "PaillierMechanism",
    "PlaintextMechanism",
    "SecAggMechanism",
    "Selection",
    "SelectiveCkksMechanism",
    "SharesMechanism",
    "build_mechanism",
    "client_mechanism",
    "helper_mechanism",
    "helpers_of",
    "server_mechanism",
    "simulation_mechanisms",
]
