"""Built-in models. Any ``nn.Module`` factory works through the Python API; these are the ones a
job file can name."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn


class MLP(nn.Sequential):
    """Fully connected ReLU network on flattened inputs."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (64, 64)) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


class McMahanCNN(nn.Sequential):
    """The 2-conv CNN of McMahan et al. (2017) for 28x28 images: 5x5 conv 32, pool, 5x5 conv 64,
    pool, 512 fully connected, softmax (1,663,370 parameters for 10 classes)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__(
            nn.Conv2d(in_channels, 32, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 512),
            nn.ReLU(),
            nn.Linear(512, num_classes),
        )


class LeNet(nn.Module):
    """The sigmoid LeNet of Zhu et al.'s *Deep Leakage from Gradients* (2019), the model gradient
    inversion is usually measured on: three 5x5 convolutions of 12 channels (strides 2, 2, 1) and
    one fully connected layer, with weights drawn uniformly from [-0.5, 0.5] as in their code.
    Smooth activations make its gradients invertible; ``fedcrypt audit`` uses it as the worst case."""

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 12, 5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=1),
            nn.Sigmoid(),
            nn.Flatten(),
        )
        features = 12 * math.ceil(math.ceil(height / 2) / 2) * math.ceil(math.ceil(width / 2) / 2)
        self.fc = nn.Linear(features, num_classes)
        for parameter in self.parameters():
            nn.init.uniform_(parameter, -0.5, 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.body(x))


class LogisticRegression(nn.Sequential):
    """Multinomial logistic regression: one linear layer on flattened inputs."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__(nn.Flatten(), nn.Linear(in_features, num_classes))


MODELS = ("mlp", "cnn", "logreg", "lenet")


def build_model(
    name: str, input_shape: Sequence[int], num_classes: int, *, hidden: Sequence[int] = (64, 64)
) -> nn.Module:
    """Build a named model for inputs of ``input_shape`` (without the batch dimension)."""
    features = math.prod(input_shape)
    if name == "mlp":
        return MLP(features, num_classes, hidden)
    if name == "logreg":
        return LogisticRegression(features, num_classes)
    if name == "cnn":
        if len(input_shape) != 3 or tuple(input_shape[1:]) != (28, 28):
            raise ValueError(f"the cnn model needs 28x28 images, the dataset gives {tuple(input_shape)}")
        return McMahanCNN(input_shape[0], num_classes)
    if name == "lenet":
        if len(input_shape) != 3:
            raise ValueError(f"the lenet model needs images (channels, height, width), the dataset gives {tuple(input_shape)}")
        return LeNet(*input_shape, num_classes)
    raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}")


@dataclass(frozen=True)
class ModelSpec:
    """Everything that rebuilds a built-in model and says what it expects: written beside
    ``model.pt`` as ``model.json``, read by ``fedcrypt serve``."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    class_names: tuple[str, ...]
    hidden: tuple[int, ...] = (64, 64)
    dataset: str = ""

    def build(self) -> nn.Module:
        return build_model(self.name, self.input_shape, self.num_classes, hidden=self.hidden)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.name, "input_shape": list(self.input_shape), "num_classes": self.num_classes,
                "class_names": list(self.class_names), "hidden": list(self.hidden), "dataset": self.dataset}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ModelSpec:
        """Parse :meth:`to_json`'s output, naming the first field that is missing or wrong."""
        def ints(key: str) -> tuple[int, ...]:
            value = raw.get(key)
            if not isinstance(value, list) or not all(type(v) is int and v >= 1 for v in value):
                raise ValueError(f"{key} must be a list of positive integers, got {value!r}")
            return tuple(value)

        name, num_classes, names = raw.get("model"), raw.get("num_classes"), raw.get("class_names")
        if name not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)}, got {name!r}")
        if type(num_classes) is not int or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if not isinstance(names, list) or len(names) != num_classes or not all(isinstance(n, str) for n in names):
            raise ValueError(f"class_names must be {num_classes} strings, got {names!r}")
        shape = ints("input_shape")
        if not shape:
            raise ValueError("input_shape must not be empty")
        return cls(name, shape, num_classes, tuple(names), ints("hidden"), str(raw.get("dataset", "")))
