"""The board's JSON API and pages: runs listed and filtered, one run with its rounds (only the new
ones when asked), clear 404/422/503 answers, and every page asset served by the board itself."""

from __future__ import annotations

import json
import re
import socket
import sqlite3
import urllib.request
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from fedcrypt.board import create_app
from fedcrypt.cli.main import app
from fedcrypt.core.server import RoundRecord
from fedcrypt.tracking.store import RunStore


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    store = RunStore(str(tmp_path / "runs.sqlite"))
    done = store.start(job="a", mechanism="ckks", kind="simulation", planned_rounds=2, run_dir=tmp_path / "a",
                       config='[job]\nname = "a"\n')
    for n, accuracy in ((1, 0.5), (2, 0.8)):
        store.add_round(done, RoundRecord(n, accuracy=accuracy, bytes_up=1000 * n))
    store.finish(done, None)
    store.start(job="b", mechanism="none", kind="server", planned_rounds=5, run_dir=tmp_path / "b", config="")
    return store


def test_runs_are_listed_and_filtered(store: RunStore) -> None:
    client = TestClient(create_app(store))
    body = client.get("/api/runs").json()
    assert [run["job"] for run in body["runs"]] == ["b", "a"] and body["mechanisms"] == ["ckks", "none"]
    assert "config" not in body["runs"][0]
    assert [run["job"] for run in client.get("/api/runs?mechanism=ckks").json()["runs"]] == ["a"]
    finished = client.get("/api/runs?status=finished").json()["runs"]
    assert [(run["job"], run["rounds_done"], run["final_accuracy"]) for run in finished] == [("a", 2, 0.8)]
    assert client.get("/api/runs?status=done").status_code == 422
    assert client.get("/api/runs?limit=0").status_code == 422


def test_one_run_with_its_rounds_and_only_new_rounds_on_request(store: RunStore) -> None:
    client = TestClient(create_app(store))
    run_id = client.get("/api/runs?mechanism=ckks").json()["runs"][0]["id"]
    body = client.get(f"/api/runs/{run_id}").json()
    assert body["run"]["config"] == '[job]\nname = "a"\n' and body["run"]["status"] == "finished"
    assert [(r["round"], r["accuracy"], r["bytes_up"]) for r in body["rounds"]] == [(1, 0.5, 1000), (2, 0.8, 2000)]
    assert [r["round"] for r in client.get(f"/api/runs/{run_id}?after=1").json()["rounds"]] == [2]
    missing = client.get("/api/runs/nope")
    assert missing.status_code == 404 and "no run with id 'nope'" in missing.json()["detail"]
    assert client.get(f"/api/runs/{run_id}?after=-1").status_code == 422


def test_a_broken_store_answers_503(tmp_path: Path) -> None:
    path = tmp_path / "runs.sqlite"
    client = TestClient(create_app(RunStore(str(path))))
    with sqlite3.connect(path) as database:  # someone else breaks the database under the board
        database.execute("DROP TABLE rounds")
        database.execute("DROP TABLE runs")
    answer = client.get("/api/runs")
    assert answer.status_code == 503 and "no such table: runs" in answer.json()["detail"]


def test_pages_and_assets_come_from_the_board_itself(store: RunStore) -> None:
    client = TestClient(create_app(store, refresh_seconds=0.5))
    for page in ("/", "/runs/anything", "/compare?ids=a,b"):
        html = client.get(page)
        assert html.status_code == 200 and 'data-refresh-ms="500"' in html.text
        sources = re.findall(r'(?:src|href)="([^"]+)"', html.text)
        assert sources and all(not s.startswith(("http:", "https:", "//")) for s in sources), sources
        for source in sources:
            if source.startswith("/static/"):
                assert client.get(source).status_code == 200, source
    assert client.get("/static/vendor/chart.umd.min.js").text.startswith("/*!\n * Chart.js v4")
    with pytest.raises(ValueError, match="refresh_seconds"):
        create_app(store, refresh_seconds=0)


def test_the_board_package_ships_its_chart_library() -> None:
    static = Path(create_app.__code__.co_filename).parent / "static"
    assert (static / "vendor" / "chart.umd.min.js").stat().st_size > 100_000
    assert "MIT" in (static / "vendor" / "chart.js-LICENSE.md").read_text()


def test_fedcrypt_board_serves_the_store_and_refuses_a_busy_port(
        store: RunStore, fedcrypt_listening: Callable[[list[str]], AbstractContextManager[str]]) -> None:
    with fedcrypt_listening(["board", "--store", store.location]) as url:
        with urllib.request.urlopen(url + "/api/runs", timeout=10) as answer:
            assert [run["job"] for run in json.load(answer)["runs"]] == ["b", "a"]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = CliRunner().invoke(app, ["board", "--store", store.location, "--port", str(busy.getsockname()[1])])
    assert result.exit_code == 2 and "cannot listen on 127.0.0.1" in result.output
