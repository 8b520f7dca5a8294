from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedcrypt.core.server import RoundRecord
from fedcrypt.strategies import FedAdam
from fedcrypt.tracking.checkpoint import Checkpoint, CheckpointError, job_digest, load_checkpoint, save_checkpoint
from fedcrypt.tracking.rundir import RunDirectory


def test_checkpoint_round_trips_model_strategy_and_sampler(tmp_path: Path) -> None:
    strategy = FedAdam()
    strategy.apply(np.zeros(3, np.float32), np.array([0.1, -0.2, 0.3]))
    sampler = np.random.default_rng(4)
    sampler.random(5)
    digest = job_digest("[job]\nname = 'x'\n")
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, Checkpoint(7, np.arange(3, dtype=np.float32), strategy.state(), sampler.bit_generator.state, digest))
    loaded = load_checkpoint(path, digest)
    assert loaded.round == 7
    np.testing.assert_array_equal(loaded.params, np.arange(3, dtype=np.float32))
    restored = FedAdam()
    restored.load_state(loaded.strategy_state)
    np.testing.assert_array_equal(restored.m_, strategy.m_)  # type: ignore[arg-type]
    resumed = np.random.default_rng(0)
    resumed.bit_generator.state = loaded.sampler_state
    assert resumed.random() == sampler.random()
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_of_another_job_or_corrupt_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.npz"
    with pytest.raises(CheckpointError, match="nothing to resume"):
        load_checkpoint(path, "d")
    save_checkpoint(path, Checkpoint(1, np.zeros(2, np.float32), {}, {}, "digest-a"))
    with pytest.raises(CheckpointError, match="different job"):
        load_checkpoint(path, "digest-b")
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(path, "digest-a")


def test_resume_drops_rounds_after_the_checkpoint(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path)
    for r in (1, 2, 3):
        run.append_round(RoundRecord(r))
    with pytest.raises(FileExistsError, match="already holds a run"):
        RunDirectory(tmp_path)
    resumed = RunDirectory(tmp_path, resume=True)
    resumed.keep_rounds(2)
    rounds = [json.loads(line)["round"] for line in resumed.metrics_path.read_text().splitlines()]
    assert rounds == [1, 2]
