from __future__ import annotations

import numpy as np
import pytest
import torch

from fedcrypt.models.training import ClientData, LocalTrainer, TrainConfig
from fedcrypt.models.zoo import build_model


@pytest.mark.parametrize(
    ("name", "shape"), [("mlp", (1, 8, 8)), ("logreg", (30,)), ("cnn", (1, 28, 28))]
)
def test_models_produce_class_logits(name: str, shape: tuple[int, ...]) -> None:
    model = build_model(name, shape, 10)
    assert model(torch.zeros(3, *shape)).shape == (3, 10)


def test_model_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="28x28"):
        build_model("cnn", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="available: mlp, cnn, logreg"):
        build_model("resnet", (1, 8, 8), 10)


def _separable(n: int = 200) -> ClientData:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=gen)
    return ClientData.whole(x, (x.sum(dim=1) > 0).long())


def test_local_training_learns_and_evaluation_agrees() -> None:
    trainer = LocalTrainer(build_model("logreg", (2,), 2), TrainConfig(local_epochs=5, lr=0.5))
    data = _separable()
    start = trainer.initial_params()
    before_loss, _ = trainer.evaluate(start, data)
    result = trainer.fit(start, data, seed=0)
    loss, accuracy = trainer.evaluate(result.params, data)
    assert loss < before_loss and accuracy > 0.95 and result.seconds > 0


def test_fedprox_term_keeps_the_model_closer_to_the_global_one() -> None:
    trainer = LocalTrainer(build_model("mlp", (2,), 2, hidden=(16,)), TrainConfig(local_epochs=5, lr=0.5))
    data = _separable()
    start = trainer.initial_params()
    free = trainer.fit(start, data, seed=0).params
    prox = trainer.fit(start, data, seed=0, proximal_mu=1.0).params
    assert np.linalg.norm(prox - start) < 0.5 * np.linalg.norm(free - start)
