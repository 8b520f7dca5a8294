from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

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


def test_sensitivity_estimates_the_norm_of_each_gradient_entry_s_input_jacobian() -> None:
    """Oracle: the exact Jacobian d(grad_w loss)/dx by autograd, example by example; the estimate
    (one random +-1 probe per batch) averaged over many seeds must converge to its row norms."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.BatchNorm1d(2))
    model.eval()
    trainer = LocalTrainer(model, TrainConfig(batch_size=2))
    gen = torch.Generator().manual_seed(1)
    data = ClientData.whole(torch.randn(4, 3, generator=gen), torch.tensor([0, 1, 1, 0]))
    params = trainer.initial_params()
    names = [name for name, _ in model.named_parameters()]

    exact = []
    for k in range(4):
        x, y = data.x[k : k + 1], data.y[k : k + 1]

        def gradient(inputs: torch.Tensor) -> torch.Tensor:
            loss = nn.functional.cross_entropy(model(inputs), y, reduction="sum")
            grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
            return torch.cat([g.reshape(-1) for g in grads])

        jacobian = torch.autograd.functional.jacobian(gradient, x).reshape(-1, 3)
        exact.append((jacobian**2).sum(dim=1))
    expected = torch.stack(exact).mean(dim=0).sqrt().numpy()

    estimates = np.mean([trainer.sensitivity(params, data, seed=s) ** 2 for s in range(400)], axis=0)
    spec_names = [t.name for t in trainer.spec.tensors]
    trainable = np.concatenate([np.full(t.numel, t.name in names) for t in trainer.spec.tensors])
    assert np.isinf(estimates[~trainable]).all() and "1.running_mean" not in names and len(spec_names) > len(names)
    np.testing.assert_allclose(np.sqrt(estimates[trainable]), expected, rtol=0.15, atol=1e-4)
