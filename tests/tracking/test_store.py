"""The run store: runs and rounds recorded as they go, listed and filtered, a failing run marked
failed with its error, a resumed run continued in place, and unusable stores refused with a clear
message; `fedcrypt run` records its simulation and `fedcrypt runs` shows it. The store tests run on
SQLite and on a real PostgreSQL server (started by ``.ci/services``), each in a fresh database."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from fedcrypt.cli.main import app
from fedcrypt.core.server import RoundRecord
from fedcrypt.tracking.rundir import RunDirectory
from fedcrypt.tracking.store import RunStore, StoreError, recording, store_url

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def postgres_db(postgres_url: str) -> Iterator[str]:
    """The URL of a new, empty database on the test PostgreSQL server (dropped afterwards)."""
    name = f"fedcrypt_test_{secrets.token_hex(4)}"
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{postgres_url.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunStore]:
    location = str(tmp_path / "runs.sqlite") if request.param == "sqlite" else request.getfixturevalue("postgres_db")
    opened = RunStore(location)
    yield opened
    opened.close()


def _start(store: RunStore, tmp_path: Path, **changes: object) -> str:
    settings: dict[str, object] = {"job": "j", "mechanism": "ckks", "kind": "simulation", "planned_rounds": 3,
                                   "run_dir": tmp_path / "out", "config": "[job]\n"}
    return store.start(**{**settings, **changes})  # type: ignore[arg-type]


def test_runs_and_rounds_round_trip_and_filter(store: RunStore, tmp_path: Path) -> None:
    first = _start(store, tmp_path)
    store.add_round(first, RoundRecord(1, accuracy=0.5, bytes_up=10, mechanism={"dp_epsilon": 1.5}))
    store.add_round(first, RoundRecord(2, accuracy=0.75, loss=float("nan")))
    store.finish(first, tmp_path / "model.pt")
    second = _start(store, tmp_path, mechanism="none", kind="server")

    runs = {run.id: run for run in store.runs()}
    assert runs[first].status == "finished" and runs[first].rounds_done == 2 and runs[first].final_accuracy == 0.75
    assert runs[second].status == "running" and runs[second].ended is None
    assert [run.id for run in store.runs(mechanism="ckks")] == [first]
    assert [run.id for run in store.runs(status="running")] == [second]
    detail = store.get(first[:-2])  # a unique prefix
    assert [r["round"] for r in detail.rounds] == [1, 2]
    assert detail.rounds[0]["dp_epsilon"] == 1.5 and detail.rounds[1]["loss"] is None
    assert detail.run.model_path == str(tmp_path / "model.pt")
    assert [r["round"] for r in store.get(first, after=1).rounds] == [2]  # what a live view asks for
    assert store.mechanisms() == ["ckks", "none"]


def test_recording_marks_a_failing_run_failed_and_re_raises(store: RunStore, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="round 2 failed"):
        with recording(store, job="j", mechanism="none", kind="simulation", planned_rounds=3, run_dir=tmp_path,
                       config="", model_path=tmp_path / "model.pt") as record_round:
            record_round(RoundRecord(1, accuracy=0.1))
            raise RuntimeError("round 2 failed")
    (run,) = store.runs()
    assert run.status == "failed" and run.error == "round 2 failed" and run.rounds_done == 1 and run.ended


def test_a_resumed_run_continues_in_place(store: RunStore, tmp_path: Path) -> None:
    run_id = _start(store, tmp_path, kind="server")
    store.add_round(run_id, RoundRecord(1, accuracy=0.1))
    store.add_round(run_id, RoundRecord(2, accuracy=0.2))
    store.fail(run_id, "killed")
    assert _start(store, tmp_path, kind="server", run_id=run_id) == run_id
    store.add_round(run_id, RoundRecord(2, accuracy=0.25))  # redone after the last checkpoint
    detail = store.get(run_id)
    assert detail.run.status == "running" and detail.run.error == ""
    assert [(r["round"], r["accuracy"]) for r in detail.rounds] == [(1, 0.1), (2, 0.25)]


def test_rounds_a_killed_server_wrote_only_to_its_folder_are_restored(store: RunStore, tmp_path: Path) -> None:
    """SIGKILL between the folder's metrics line and the store's row: the resume fills the gap."""
    run_dir = RunDirectory(tmp_path / "out")
    run_id = _start(store, tmp_path, kind="server")
    for number in (1, 2, 3):
        run_dir.append_round(RoundRecord(number, accuracy=number / 10))
    store.add_round(run_id, RoundRecord(1, accuracy=0.1))
    store.add_round(run_id, RoundRecord(3, accuracy=0.35))  # the store's own row wins
    with run_dir.metrics_path.open("a") as metrics:
        metrics.write('{"round": 4, "accur')  # the line the kill cut short
    assert [row["round"] for row in run_dir.rounds()] == [1, 2, 3]
    assert store.restore_rounds(run_id, run_dir.rounds()) == 1
    assert store.restore_rounds(run_id, run_dir.rounds()) == 0
    assert [(r["round"], r["accuracy"]) for r in store.get(run_id).rounds] == [(1, 0.1), (2, 0.2), (3, 0.35)]


def test_unknown_and_ambiguous_ids_are_clear_errors(store: RunStore, tmp_path: Path) -> None:
    _start(store, tmp_path)
    _start(store, tmp_path)
    with pytest.raises(StoreError, match="no run with id 'nope'"):
        store.get("nope")
    with pytest.raises(StoreError, match="2 runs with id '2'"):
        store.get("2")


def test_unusable_store_urls_are_refused() -> None:
    with pytest.raises(StoreError, match="not a usable database URL"):
        RunStore("nosuchdb://x")
    # psycopg is an extra: without it the message says what to install, with it the closed port fails
    with pytest.raises(StoreError, match="needs psycopg|cannot open run store"):
        RunStore("postgresql://user@127.0.0.1:9/db")


def test_a_folder_is_not_a_store(tmp_path: Path) -> None:
    (tmp_path / "dir.sqlite").mkdir()
    with pytest.raises(StoreError, match="cannot open run store"):
        RunStore(str(tmp_path / "dir.sqlite"))


def test_store_urls() -> None:
    assert store_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert store_url("sqlite:///x.db") == "sqlite:///x.db"


def test_fedcrypt_run_is_recorded_and_listed(tmp_path: Path) -> None:
    store = str(tmp_path / "runs.sqlite")
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(REPO / "examples" / "quickstart.toml"), "--rounds", "2", "--out", str(out),
                                 "--store", store, "-q"])
    assert result.exit_code == 0, result.output
    (run,) = RunStore(store).runs()
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert (run.status, run.kind, run.rounds_done, run.planned_rounds) == ("finished", "simulation", 2, 2)
    assert run.final_accuracy == last["accuracy"] and run.model_path == str(out / "model.pt")

    listing = runner.invoke(app, ["runs", "--store", store], env={"COLUMNS": "200"})
    assert listing.exit_code == 0 and run.id in listing.output and "finished" in listing.output
    shown = runner.invoke(app, ["runs", "show", run.id, "--store", store], env={"COLUMNS": "200"})
    assert shown.exit_code == 0 and f"{last['accuracy']:.4f}" in shown.output and str(out) in shown.output

    again = runner.invoke(app, ["run", str(REPO / "examples" / "quickstart.toml"), "--out", str(out),
                                "--store", store, "-q"])
    assert again.exit_code == 2 and "already holds a run" in again.output
    assert [r.id for r in RunStore(store).runs()] == [run.id]  # refused before anything is recorded
    assert (out / "run_id").read_text().strip() == run.id and (out / "model.json").exists()
    bad = runner.invoke(app, ["runs", "--store", store, "--status", "done"])
    assert bad.exit_code == 2 and "--status must be one of" in bad.output


def test_fedcrypt_run_records_into_postgresql(postgres_db: str, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(REPO / "examples" / "quickstart.toml"), "--rounds", "2",
                                 "--out", str(tmp_path / "run"), "--store", postgres_db, "-q"])
    assert result.exit_code == 0, result.output
    (run,) = RunStore(postgres_db).runs()
    assert (run.status, run.rounds_done, run.job) == ("finished", 2, "quickstart")
    listing = runner.invoke(app, ["runs", "--store", postgres_db], env={"COLUMNS": "200"})
    assert listing.exit_code == 0 and run.id in listing.output
