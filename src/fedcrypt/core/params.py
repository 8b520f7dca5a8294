"""Model parameters as one flat float32 vector plus the spec that rebuilds the state_dict.

Every privacy mechanism works on flat float32 vectors: encryption packs them into slots,
secret sharing splits them, DP clips their norm. The :class:`ParamSpec` remembers the names,
shapes and dtypes, so :func:`unflatten` restores the exact ``state_dict``.

Exactness: float32, float16 and bfloat16 tensors, booleans and integers of magnitude below
2**24 are represented exactly by float32. Anything else (float64 values with more precision,
large integers) raises :class:`ValueError` naming the tensor instead of being silently rounded.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedcrypt.core.wire import WINDOW, Blob

_FLOAT32_EXACT_INT = 2**24


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one state_dict entry."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ParamSpec:
    """The layout of a flat parameter vector: which slice belongs to which tensor."""

    tensors: tuple[TensorSpec, ...]

    @property
    def size(self) -> int:
        """Length of the flat vector."""
        return sum(t.numel for t in self.tensors)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> ParamSpec:
        return cls(
            tuple(
                TensorSpec(name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
                for name, tensor in state.items()
            )
        )

    def to_json(self) -> str:
        return json.dumps([[t.name, list(t.shape), t.dtype] for t in self.tensors])

    @classmethod
    def from_json(cls, text: str) -> ParamSpec:
        try:
            rows = json.loads(text)
            return cls(tuple(TensorSpec(str(n), tuple(int(d) for d in s), str(dt)) for n, s, dt in rows))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"malformed parameter spec: {exc}") from exc


def flatten(
    state: Mapping[str, torch.Tensor], spec: ParamSpec | None = None, out: np.ndarray | None = None
) -> np.ndarray:
    """Concatenate a state_dict into one float32 vector (in the spec's order), into ``out`` if given."""
    spec = spec or ParamSpec.from_state_dict(state)
    if out is None:
        out = np.empty(spec.size, dtype=np.float32)
    elif out.shape != (spec.size,) or out.dtype != np.float32:
        raise ValueError(f"output buffer has shape {out.shape} and dtype {out.dtype}, need ({spec.size},) float32")
    offset = 0
    for entry in spec.tensors:
        if entry.name not in state:
            raise ValueError(f"state_dict has no entry {entry.name!r} required by the spec")
        tensor = state[entry.name].detach()
        if tuple(tensor.shape) != entry.shape:
            raise ValueError(f"{entry.name}: shape {tuple(tensor.shape)} != spec shape {entry.shape}")
        values = tensor.to("cpu", torch.float32).reshape(-1)
        _check_exact(entry.name, tensor, values)
        out[offset : offset + entry.numel] = values.numpy()
        offset += entry.numel
    return out


def unflatten(vector: np.ndarray, spec: ParamSpec) -> dict[str, torch.Tensor]:
    """Rebuild the state_dict that :func:`flatten` turned into ``vector``."""
    if vector.ndim != 1 or vector.shape[0] != spec.size:
        raise ValueError(f"parameter vector has shape {vector.shape}, spec needs ({spec.size},)")
    flat = torch.from_numpy(np.ascontiguousarray(vector, dtype=np.float32))
    state: dict[str, torch.Tensor] = {}
    offset = 0
    for entry in spec.tensors:
        chunk = flat[offset : offset + entry.numel].reshape(entry.shape)
        state[entry.name] = chunk.to(getattr(torch, entry.dtype)).clone()
        offset += entry.numel
    return state


def load_flat(module: torch.nn.Module, vector: Blob, spec: ParamSpec) -> None:
    """Copy a flat vector into a module's parameters and buffers in place (no reallocation).

    ``vector`` may be a :class:`~fedcrypt.core.wire.FileArray`; it is read in windows, so loading
    a large model needs no model-sized temporary.
    """
    if vector.shape != (spec.size,):
        raise ValueError(f"parameter vector has shape {vector.shape}, spec needs ({spec.size},)")
    state = module.state_dict(keep_vars=True)
    offset = 0
    with torch.no_grad():
        for entry in spec.tensors:
            target = state[entry.name].detach()
            if target.dtype == torch.float32 and target.device.type == "cpu" and target.is_contiguous():
                flat_target = target.numpy().reshape(-1)  # shares the tensor's memory
                for start in range(0, entry.numel, WINDOW):
                    stop = min(start + WINDOW, entry.numel)
                    flat_target[start:stop] = vector[offset + start : offset + stop]
            else:
                chunk = np.asarray(vector[offset : offset + entry.numel]).reshape(entry.shape)
                target.copy_(torch.from_numpy(chunk.copy()).to(target.dtype))
            offset += entry.numel


def _check_exact(name: str, original: torch.Tensor, as_float32: torch.Tensor) -> None:
    """Refuse conversions that would change a value."""
    if original.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.bool):
        return
    if original.dtype.is_floating_point:
        if not torch.equal(as_float32.to(original.dtype), original.reshape(-1).cpu()):
            raise ValueError(f"{name}: {original.dtype} values are not exactly representable in float32")
        return
    if original.numel() and int(original.abs().max()) >= _FLOAT32_EXACT_INT:
        raise ValueError(f"{name}: integer values of magnitude >= 2**24 are not exact in float32")
