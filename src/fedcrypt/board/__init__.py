"""The web board over the run store: ``fedcrypt board``."""

from fedcrypt.board.app import create_app

__all__ = ["create_app"]
