"""Models and the local training loop clients run."""

from fedcrypt.models.training import LocalTrainer, TrainConfig
from fedcrypt.models.zoo import MODELS, MLP, LogisticRegression, McMahanCNN, ModelSpec, build_model

__all__ = ["MLP", "MODELS", "LocalTrainer", "LogisticRegression", "McMahanCNN", "ModelSpec", "TrainConfig", "build_model"]
