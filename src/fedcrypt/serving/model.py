"""A finished run's model, loaded for inference, and the checks on what clients send it."""

from __future__ import annotations

import json
import math
import pickle
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedcrypt.config.job import JobError, parse_job
from fedcrypt.data import DatasetError, load_dataset
from fedcrypt.models.zoo import ModelSpec
from fedcrypt.simulation import model_spec


class ServingError(Exception):
    """The run folder cannot be served; the message names the file and why."""


class InputError(ValueError):
    """A request's inputs are malformed; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ServedModel:
    """A run's final model in eval mode, with its spec and what is known about the run."""

    spec: ModelSpec
    model: nn.Module
    run: dict[str, Any] = field(default_factory=dict)

    @property
    def flat_length(self) -> int:
        return math.prod(self.spec.input_shape)

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (batch, num_classes), for float32 inputs of the model's shape."""
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(inputs))
            return torch.softmax(logits, dim=1).numpy()

    def metadata(self) -> dict[str, Any]:
        return {
            "model": self.spec.to_json(),
            "input": {"shape": list(self.spec.input_shape), "flat_length": self.flat_length, "dtype": "float32",
                      "format": "preprocessed as in training: images scaled to [0, 1], tables standardized"},
            "run": self.run,
        }


def load_served_model(run_dir: str | Path) -> ServedModel:
    """Load ``model.pt`` from a run folder with the spec in ``model.json`` (or, for folders from
    before ``model.json``, the job's built-in model and dataset)."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise ServingError(f"{folder} is not a run folder (no such directory)")
    weights = folder / "model.pt"
    if not weights.is_file():
        raise ServingError(f"{folder} has no model.pt: the run has not finished (or this is not a run folder)")
    job = _read_job(folder / "job.toml")
    spec = _read_spec(folder / "model.json", job)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing a foreign file
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ServingError(f"{weights} is not a file of saved weights (it holds more than tensors, or is corrupt)") from None
    except (RuntimeError, ValueError, OSError, EOFError) as exc:
        raise ServingError(f"{weights} is not a file of saved weights: {str(exc).splitlines()[0]}") from None
    model = spec.build()
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError, AttributeError) as exc:
        raise ServingError(f"{weights} does not hold the weights of the {spec.name} model in model.json: "
                           f"{str(exc).splitlines()[0]}") from None
    model.eval()
    return ServedModel(spec, model, _run_info(folder, job))


def parse_inputs(body: bytes, spec: ModelSpec, *, max_batch: int) -> np.ndarray:
    """``{"inputs": [x, ...]}`` -> float32 array (batch, *input_shape); each ``x`` has the model's
    input shape or is flat. Raises :class:`InputError` naming what is wrong."""
    try:
        document = json.loads(body, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"body is not valid JSON: {exc}", 400) from None
    if not isinstance(document, dict) or "inputs" not in document:
        raise InputError('body must be a JSON object {"inputs": [...]}, a batch of inputs')
    extra = sorted(set(document) - {"inputs"})
    if extra:
        raise InputError(f"unknown field(s) {', '.join(map(repr, extra))}; the body holds only \"inputs\"")
    inputs = document["inputs"]
    if not isinstance(inputs, list) or not inputs:
        raise InputError("inputs must be a non-empty list (a batch)")
    if len(inputs) > max_batch:
        raise InputError(f"inputs holds {len(inputs)} items; at most {max_batch} per request", 413)
    try:
        array = np.asarray(inputs)
    except ValueError:
        raise InputError("inputs must all have the same shape (a rectangular batch of numbers)") from None
    if array.dtype.kind not in "iuf" or (b"true" in body or b"false" in body) and _has_bool(inputs):
        raise InputError("inputs must hold only numbers")
    shape, flat = tuple(spec.input_shape), math.prod(spec.input_shape)
    if array.shape[1:] != shape:
        if array.ndim != 2 or array.shape[1] != flat:
            raise InputError(f"each input must have shape {list(shape)} or be {flat} numbers; "
                             f"got a batch of shape {list(array.shape)}")
        array = array.reshape(len(array), *shape)
    with np.errstate(over="ignore"):
        array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise InputError("inputs must be finite float32 numbers (one is too large)")
    return array


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def _has_bool(value: Any) -> bool:
    if isinstance(value, list):
        return any(_has_bool(item) for item in value)
    return isinstance(value, bool)


def _read_job(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ServingError(f"cannot read {path}: {exc}") from None


def _read_spec(path: Path, job: dict[str, Any]) -> ModelSpec:
    if path.exists():
        try:
            return ModelSpec.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
            raise ServingError(f"{path} is not a model spec: {exc}") from None
    if not job:
        raise ServingError(f"{path.parent} has neither model.json nor job.toml: cannot tell which model model.pt holds")
    try:
        config = parse_job(job)
        return model_spec(config, load_dataset(config.data.dataset, config.data.data_dir, download=False))
    except (JobError, DatasetError, ValueError) as exc:
        raise ServingError(f"{path.parent} has no model.json, and its job.toml does not name a usable model: {exc}") from None


def _run_info(folder: Path, job: dict[str, Any]) -> dict[str, Any]:
    """The run's id, job, mechanism and last round, from the files in its folder."""
    info: dict[str, Any] = {"run_dir": str(folder.resolve())}
    id_file = folder / "run_id"
    if id_file.exists():
        info["id"] = id_file.read_text(encoding="utf-8").strip()
    section = job.get("job", {})
    privacy = job.get("privacy", {})
    info.update(job=section.get("name"), mechanism=privacy.get("mechanism", "none") + ("+dp" if "dp" in job else ""),
                strategy=job.get("strategy", {}).get("name"), planned_rounds=section.get("rounds"))
    metrics = folder / "metrics.jsonl"
    lines = metrics.read_text(encoding="utf-8").splitlines() if metrics.exists() else []
    if lines:
        try:
            last = json.loads(lines[-1])
            info.update(rounds=last.get("round"), accuracy=last.get("accuracy"), loss=last.get("loss"))
        except json.JSONDecodeError:
            pass
    return info
