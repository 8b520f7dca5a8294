"""Server checkpoints: everything needed to continue a job after the last completed round.

Written after every round with write-then-rename, so a crash leaves either the old or the new
checkpoint, never half of one. Loaded with ``allow_pickle=False``: a checkpoint is data only.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class CheckpointError(Exception):
    """A checkpoint that is missing, corrupt, or belongs to another job."""


@dataclass(frozen=True)
class Checkpoint:
    round: int
    params: np.ndarray
    strategy_state: dict[str, np.ndarray]
    sampler_state: dict[str, Any]
    job_digest: str
    mechanism_state: dict[str, float] = field(default_factory=dict)


def job_digest(job_toml: str) -> str:
    """Identifies the job a checkpoint belongs to (the resolved job text, minus nothing)."""
    return hashlib.sha256(job_toml.encode()).hexdigest()


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    meta = {
        "round": checkpoint.round,
        "sampler_state": checkpoint.sampler_state,
        "job_digest": checkpoint.job_digest,
        "mechanism_state": checkpoint.mechanism_state,
    }
    arrays = {f"strategy.{k}": v for k, v in checkpoint.strategy_state.items()}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        np.savez(handle, params=checkpoint.params, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, expected_digest: str) -> Checkpoint:
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: nothing to resume (run without --resume)")
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(data["meta"].tobytes())
            params = data["params"].astype(np.float32)
            strategy = {k.removeprefix("strategy."): data[k] for k in data.files if k.startswith("strategy.")}
        mechanism_state = meta.get("mechanism_state", {})
        if not isinstance(mechanism_state, dict):
            raise ValueError("mechanism_state is not a mapping")
        checkpoint = Checkpoint(
            int(meta["round"]), params, strategy, meta["sampler_state"], str(meta["job_digest"]), mechanism_state
        )
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable: {exc}") from None
    if checkpoint.job_digest != expected_digest:
        raise CheckpointError(f"checkpoint {path} belongs to a different job configuration; refusing to resume")
    return checkpoint
