"""X25519 key agreement for the secret-sharing mechanisms: raw 32-byte keys, HKDF-derived secrets."""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

KEY_BYTES = 32


def agree(private: X25519PrivateKey, public: bytes, info: bytes) -> bytes:
    """A 32-byte secret from X25519 agreement with ``public``, bound to ``info`` (HKDF-SHA256).

    Raises ``ValueError`` for a low-order ``public`` (the agreement would be all zeros).
    """
    shared = private.exchange(X25519PublicKey.from_public_bytes(public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def private_bytes(private: X25519PrivateKey) -> bytes:
    return private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def usable_public_key(data: bytes) -> bool:
    """A 32-byte X25519 public key that is not of low order (agreement with it fails)."""
    if len(data) != KEY_BYTES:
        return False
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(data))
    except ValueError:
        return False
    return True
