"""Transports: how message bytes move between server and clients."""

from fedcrypt.transport.inprocess import InProcessTransport

__all__ = ["InProcessTransport"]
