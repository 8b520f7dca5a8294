"""Vertical federated learning: parties hold different features of the same people."""
