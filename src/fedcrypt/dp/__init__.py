"""Differential privacy: the Gaussian noise, the privacy accountant and their settings.

Client-level DP-FedAvg (McMahan et al. 2018): each client's update is clipped to L2 norm
``clip_norm`` and the sum of updates gets Gaussian noise of standard deviation
``noise_multiplier * clip_norm``, added by the server (``central``), split among the clients
(``distributed``, so it composes with secure aggregation and homomorphic encryption), or in
full by every client (``local``). The accountant is Google's ``dp-accounting`` (RDP).
"""

from fedcrypt.dp.accountant import DpSettings, calibrate_noise, epsilon_after, rounds_within
from fedcrypt.dp.noise import gaussian

__all__ = ["DpSettings", "calibrate_noise", "epsilon_after", "gaussian", "rounds_within"]
