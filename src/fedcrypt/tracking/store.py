"""The run store: every run (simulation or server) recorded as it goes, in SQLite or PostgreSQL.

A run row holds the job's name, mechanism, kind (``simulation`` / ``server``), status
(``running`` -> ``finished`` or ``failed`` with the error), start and end times, the planned
rounds, the run folder, the model's path and the resolved job TOML; each finished round adds a
row holding :meth:`RoundRecord.to_json` (accuracy, loss, bytes, seconds by phase, epsilon...).
The store is written through SQLAlchemy Core, so a URL picks the database:

* nothing: ``$FEDCRYPT_STORE``, else ``runs.sqlite`` in the user's data folder;
* a path: an SQLite file there;
* ``postgresql://user@host/db``: PostgreSQL, through psycopg (``pip install fedcrypt[postgres]``).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs
from sqlalchemy import (
    Column,
    Engine,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

from fedcrypt.core.server import RoundRecord

STATUSES = ("running", "finished", "failed")
KINDS = ("simulation", "server")

_metadata = MetaData()
_runs = Table(
    "runs", _metadata,
    Column("id", String(40), primary_key=True),
    Column("job", String(128), nullable=False),
    Column("mechanism", String(32), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("error", Text, nullable=False, default=""),
    Column("started", Float, nullable=False),
    Column("ended", Float),
    Column("planned_rounds", Integer, nullable=False),
    Column("run_dir", Text, nullable=False),
    Column("model_path", Text),
    Column("config", Text, nullable=False),
)
_rounds = Table(
    "rounds", _metadata,
    Column("run_id", String(40), ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("round", Integer, primary_key=True),
    Column("record", Text, nullable=False),
)


class StoreError(Exception):
    """The store cannot be opened or used; the message names it and why."""


class RunNotFound(StoreError):
    """No run (or more than one) has the id or prefix asked for."""


@dataclass(frozen=True)
class RunSummary:
    id: str
    job: str
    mechanism: str
    kind: str
    status: str
    error: str
    started: float
    ended: float | None
    planned_rounds: int
    run_dir: str
    model_path: str | None
    config: str
    rounds_done: int = 0
    final_accuracy: float | None = None

    @property
    def seconds(self) -> float:
        return (self.ended or time.time()) - self.started


@dataclass(frozen=True)
class RunDetail:
    run: RunSummary
    rounds: list[dict[str, Any]] = field(default_factory=list)


def default_store() -> str:
    """``$FEDCRYPT_STORE``, else ``runs.sqlite`` in the user's data folder."""
    return os.environ.get("FEDCRYPT_STORE") or str(Path(platformdirs.user_data_dir("fedcrypt")) / "runs.sqlite")


def store_url(location: str | None) -> str:
    """A SQLAlchemy URL for a path or URL (None: :func:`default_store`)."""
    location = location or default_store()
    if location.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + location.split("://", 1)[1]
    if "://" in location:
        return location
    path = Path(location).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


class RunStore:
    """Reads and writes runs; tables are created on first use."""

    def __init__(self, location: str | None = None) -> None:
        self.location = location or default_store()
        try:
            self._engine: Engine = create_engine(store_url(location), future=True)
            _metadata.create_all(self._engine)
        except (ArgumentError, NoSuchModuleError) as exc:
            raise StoreError(f"run store {self.location!r}: not a usable database URL ({exc})") from None
        except ModuleNotFoundError as exc:
            raise StoreError(f"run store {self.location!r} needs {exc.name}: pip install 'fedcrypt[postgres]'") from None
        except (SQLAlchemyError, OSError) as exc:
            raise StoreError(f"cannot open run store {self.location!r}: {_reason(exc)}") from None

    def close(self) -> None:
        self._engine.dispose()

    def start(self, *, job: str, mechanism: str, kind: str, planned_rounds: int, run_dir: Path, config: str,
              run_id: str | None = None) -> str:
        """Record a new running run (or, given ``run_id``, mark a resumed one running again)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        with self._writing() as connection:
            if run_id is not None and connection.execute(select(_runs.c.id).where(_runs.c.id == run_id)).first():
                connection.execute(update(_runs).where(_runs.c.id == run_id).values(
                    status="running", error="", ended=None))
                return run_id
            run_id = run_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
            connection.execute(insert(_runs).values(
                id=run_id, job=job, mechanism=mechanism, kind=kind, status="running", error="",
                started=time.time(), planned_rounds=planned_rounds, run_dir=str(run_dir), config=config))
        return run_id

    def add_round(self, run_id: str, record: RoundRecord) -> None:
        """Record a finished round (replacing a row of the same number: a resumed server redoes it)."""
        row = json.dumps(record.to_json(), allow_nan=False)
        with self._writing() as connection:
            connection.execute(delete(_rounds).where((_rounds.c.run_id == run_id) & (_rounds.c.round == record.round)))
            connection.execute(insert(_rounds).values(run_id=run_id, round=record.round, record=row))

    def restore_rounds(self, run_id: str, rows: Iterable[Mapping[str, Any]]) -> int:
        """Record the rounds of ``rows`` (``metrics.jsonl`` lines) the store lacks, e.g. one a
        killed server finished in its run folder but not here; returns how many were added."""
        with self._writing() as connection:
            known = set(connection.execute(select(_rounds.c.round).where(_rounds.c.run_id == run_id)).scalars())
            missing = [row for row in rows if row["round"] not in known]
            for row in missing:
                connection.execute(insert(_rounds).values(
                    run_id=run_id, round=row["round"], record=json.dumps(dict(row), allow_nan=False)))
        return len(missing)

    def finish(self, run_id: str, model_path: Path | None) -> None:
        with self._writing() as connection:
            connection.execute(update(_runs).where(_runs.c.id == run_id).values(
                status="finished", ended=time.time(), model_path=str(model_path) if model_path else None))

    def fail(self, run_id: str, error: str) -> None:
        with self._writing() as connection:
            connection.execute(update(_runs).where(_runs.c.id == run_id).values(
                status="failed", ended=time.time(), error=error or "failed"))

    def runs(self, *, mechanism: str | None = None, status: str | None = None, limit: int = 100) -> list[RunSummary]:
        """Runs, newest first, optionally filtered."""
        query = select(_runs).order_by(_runs.c.started.desc()).limit(limit)
        if mechanism:
            query = query.where(_runs.c.mechanism == mechanism)
        if status:
            query = query.where(_runs.c.status == status)
        with self._reading() as connection:
            rows = connection.execute(query).mappings().all()
            return [self._summary(connection, dict(row)) for row in rows]

    def mechanisms(self) -> list[str]:
        """The mechanisms of the recorded runs, sorted."""
        with self._reading() as connection:
            return list(connection.execute(select(_runs.c.mechanism).distinct().order_by(_runs.c.mechanism)).scalars())

    def get(self, run_id: str, *, after: int = 0) -> RunDetail:
        """One run and its rounds numbered above ``after`` (a live view asks only for new ones);
        ``run_id`` may be a unique prefix."""
        with self._reading() as connection:
            rows = connection.execute(select(_runs).where(_runs.c.id.startswith(run_id, autoescape=True))
                                      ).mappings().all()
            if len(rows) != 1:
                found = "no run" if not rows else f"{len(rows)} runs"
                raise RunNotFound(f"{found} with id {run_id!r} in {self.location}")
            summary = self._summary(connection, dict(rows[0]))
            records = connection.execute(select(_rounds.c.record)
                                         .where((_rounds.c.run_id == summary.id) & (_rounds.c.round > after))
                                         .order_by(_rounds.c.round)).scalars().all()
        return RunDetail(summary, [json.loads(record) for record in records])

    def _summary(self, connection: Any, row: dict[str, Any]) -> RunSummary:
        last = connection.execute(select(_rounds.c.record).where(_rounds.c.run_id == row["id"])
                                  .order_by(_rounds.c.round.desc()).limit(1)).scalar()
        done = connection.execute(select(func.count()).where(_rounds.c.run_id == row["id"])).scalar()
        accuracy = json.loads(last).get("accuracy") if last else None
        return RunSummary(**row, rounds_done=int(done or 0), final_accuracy=accuracy)

    @contextmanager
    def _writing(self) -> Iterator[Any]:
        try:
            with self._engine.begin() as connection:
                yield connection
        except SQLAlchemyError as exc:
            raise StoreError(f"run store {self.location}: {_reason(exc)}") from None

    @contextmanager
    def _reading(self) -> Iterator[Any]:
        try:
            with self._engine.connect() as connection:
                yield connection
        except SQLAlchemyError as exc:
            raise StoreError(f"run store {self.location}: {_reason(exc)}") from None


@contextmanager
def recording(store: RunStore, *, job: str, mechanism: str, kind: str, planned_rounds: int, run_dir: Path,
              config: str, model_path: Path, run_id: str | None = None,
              on_start: Callable[[str], None] | None = None) -> Iterator[Callable[[RoundRecord], None]]:
    """Record one run around its body: yields the per-round callback; an exception marks the run
    failed with its message (and propagates). ``on_start`` gets the run's id."""
    run_id = store.start(job=job, mechanism=mechanism, kind=kind, planned_rounds=planned_rounds, run_dir=run_dir,
                         config=config, run_id=run_id)
    if on_start is not None:
        on_start(run_id)
    try:
        yield lambda record: store.add_round(run_id, record)
    except BaseException as exc:
        store.fail(run_id, str(exc) or type(exc).__name__)
        raise
    store.finish(run_id, model_path if model_path.exists() else None)


def _reason(exc: BaseException) -> str:
    original = getattr(exc, "orig", None)
    return str(original or exc).strip().splitlines()[0] if str(original or exc).strip() else type(exc).__name__

