"""A run's output folder: ``job.toml`` (resolved), ``metrics.jsonl`` (one line per round, written
as each round ends), ``model.pt`` (the final global state_dict, written atomically), ``model.json``
(what rebuilds a built-in model, for ``fedcrypt serve``), ``run_id`` (its row in the run store) and,
for deployed servers, ``checkpoint.npz`` (see :mod:`fedcrypt.tracking.checkpoint`)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any
from pathlib import Path

import torch

from fedcrypt.core.server import RoundRecord
from fedcrypt.models.zoo import ModelSpec


class RunDirectory:
    """Creates the folder (refusing one that already holds a run) and writes as the run goes."""

    def __init__(self, path: str | Path, *, resume: bool = False) -> None:
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OSError(f"cannot create output folder {self.path}: {exc.strerror or exc}") from None
        self.metrics_path = self.path / "metrics.jsonl"
        self.model_path = self.path / "model.pt"
        self.spec_path = self.path / "model.json"
        self.job_path = self.path / "job.toml"
        self.checkpoint_path = self.path / "checkpoint.npz"
        if resume:
            return
        self.refuse_used(self.path)
        self.metrics_path.write_text("")

    @staticmethod
    def refuse_used(path: Path) -> None:
        """Raise :class:`FileExistsError` if ``path`` already holds a run's metrics."""
        metrics = Path(path) / "metrics.jsonl"
        if metrics.exists() and metrics.stat().st_size:
            raise FileExistsError(f"{path} already holds a run; choose another output folder or --resume")

    def write_job(self, toml_text: str) -> None:
        self._atomic_write(self.job_path, toml_text.encode())

    def append_round(self, record: RoundRecord) -> None:
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record.to_json(), allow_nan=False) + "\n")

    def rounds(self) -> list[dict[str, Any]]:
        """The recorded rounds, in order; a line cut short by a crash is left out."""
        lines = self.metrics_path.read_text().splitlines() if self.metrics_path.exists() else []
        rows = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("round"), int):
                rows.append(row)
        return rows

    def keep_rounds(self, last_round: int) -> None:
        """Drop metric lines after ``last_round`` (written before a crash, not checkpointed)."""
        kept = [row for row in self.rounds() if row["round"] <= last_round]
        self._atomic_write(self.metrics_path, "".join(json.dumps(row) + "\n" for row in kept).encode())

    def write_model(self, state_dict: Mapping[str, torch.Tensor], spec: ModelSpec | None = None) -> None:
        """Write the final weights and, for a built-in model, the spec that rebuilds it."""
        if spec is not None:
            self._atomic_write(self.spec_path, (json.dumps(spec.to_json(), indent=2) + "\n").encode())
        tmp = self.model_path.with_suffix(".pt.tmp")
        torch.save(dict(state_dict), tmp)
        os.replace(tmp, self.model_path)

    def _atomic_write(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
