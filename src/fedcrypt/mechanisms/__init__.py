"""Privacy mechanisms, each in its own module, all implementing :mod:`fedcrypt.core.mechanism`."""

from __future__ import annotations

from fedcrypt.core.mechanism import Mechanism
from fedcrypt.mechanisms.plaintext import PlaintextMechanism

MECHANISMS: dict[str, type[Mechanism]] = {PlaintextMechanism.name: PlaintextMechanism}


def build_mechanism(name: str) -> Mechanism:
    """Instantiate the mechanism a job names."""
    try:
        return MECHANISMS[name]()
    except KeyError:
        raise ValueError(f"unknown mechanism {name!r}; available: {', '.join(MECHANISMS)}") from None


__all__ = ["MECHANISMS", "PlaintextMechanism", "build_mechanism"]
