"""``fedcrypt vertical`` and ``fedcrypt psi``: the example runs, and every input mistake is one
``error:`` line with status 2 that leaves earlier results alone."""

from __future__ import annotations

import csv
import json
import shutil
import stat
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedcrypt.cli.main import app
from fedcrypt.vertical.network import psi_listen

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "vertical"


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.output


@pytest.fixture()
def example(tmp_path: Path) -> Path:
    """The shipped example, copied (with 1024-bit keys and 3 epochs to keep the test short)."""
    folder = tmp_path / "job"
    shutil.copytree(EXAMPLE, folder)
    job = folder / "hetero_lr.toml"
    job.write_text(job.read_text().replace("key_bits = 2048", "key_bits = 1024").replace("epochs = 10", "epochs = 3"))
    return folder


def test_the_example_runs_and_writes_each_partys_files(example: Path, tmp_path: Path) -> None:
    code, output = run("vertical", str(example / "hetero_lr.toml"), "--out", str(tmp_path / "out"), "-q")
    assert code == 0, output
    assert "done: 455 common rows" in output and "test" in output
    metrics = json.loads((tmp_path / "out" / "guest" / "metrics.json").read_text())
    assert metrics["rows"]["common"] == 455 and metrics["metrics"]["test"]["accuracy"] > 0.9
    for part in ("guest", "host-0"):
        assert stat.S_IMODE((tmp_path / "out" / part / "model.json").stat().st_mode) == 0o600

    code, output = run("vertical", str(example / "hetero_lr.toml"), "--out", str(tmp_path / "out"), "-q")
    assert code == 2 and "already holds a model" in output and "Traceback" not in output
    assert json.loads((tmp_path / "out" / "guest" / "metrics.json").read_text()) == metrics


def _rewrite_guest(folder: Path, edit: str) -> None:
    path = folder / "guest.csv"
    rows = list(csv.reader(path.open()))
    if edit == "duplicate":
        rows[3][0] = rows[2][0]
    elif edit == "nan":
        rows[5][4] = "nan"
    elif edit == "no label":
        rows = [row[:1] + row[2:] for row in rows]
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)


@pytest.mark.parametrize(("edit", "message"), [
    ("duplicate", "guest.csv: IDs must be unique; repeated: 'bc-"),
    ("nan", "guest.csv: column 'mean_perimeter', line 6"),
    ("no label", "guest.csv: no label column 'label'"),
])
def test_bad_guest_files_are_one_line_errors(example: Path, tmp_path: Path, edit: str, message: str) -> None:
    _rewrite_guest(example, edit)
    code, output = run("vertical", str(example / "hetero_lr.toml"), "--out", str(tmp_path / "out"), "-q")
    assert code == 2 and message in output and "Traceback" not in output
    assert not (tmp_path / "out" / "guest" / "model.json").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--listen", "127.0.0.1:0"], "go with --role"),
    (["--role", "guest"], "the guest listens"),
    (["--role", "host-0", "--listen", "127.0.0.1:0"], "host-0 connects to the guest"),
    (["--role", "host-0", "--connect", "127.0.0.1:9", "--insecure", "--certs", "x"], "exclude each other"),
    (["--role", "guest", "--listen", "10.1.2.3:8000", "--insecure"], "loopback only"),
])
def test_conflicting_flags_are_one_line_errors(example: Path, args: list[str], message: str) -> None:
    code, output = run("vertical", str(example / "hetero_lr.toml"), *args)
    assert code == 2 and message in output and "Traceback" not in output


def test_a_bad_job_file_names_the_key(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text('[guest]\ndata = "g.csv"\n\n[[hosts]]\nname = "arbiter"\ndata = "h.csv"\n')
    code, output = run("vertical", str(job))
    assert code == 2 and "hosts.0.name: a host cannot be named 'arbiter'" in output


def test_psi_command_writes_the_common_ids(tmp_path: Path) -> None:
    ids = [f"c{i}" for i in range(40)]
    (tmp_path / "ours.csv").write_text("customer\n" + "\n".join(ids[::2] + ["x1", "x2"]) + "\n")
    theirs = [f"c{i}" for i in range(0, 40, 3)] + ["y1"]
    port: list[int] = []
    ready = threading.Event()
    got: list[list[str]] = []
    listener = threading.Thread(target=lambda: got.append(psi_listen(
        theirs, address="127.0.0.1:0", tls=None, peer="shop", wait_timeout=30, workers=1,
        on_listening=lambda p: (port.append(p), ready.set()))))
    listener.start()
    assert ready.wait(30)
    code, output = run("psi", str(tmp_path / "ours.csv"), "--id-column", "customer", "--connect",
                       f"127.0.0.1:{port[0]}", "--name", "shop", "--insecure", "--workers", "1",
                       "--out", str(tmp_path / "common.csv"))
    listener.join(30)
    assert code == 0, output
    written = [row[0] for row in csv.reader((tmp_path / "common.csv").open())]
    assert written[0] == "customer" and written[1:] == got[0]
    assert sorted(written[1:]) == sorted(set(ids[::2]) & set(theirs))

    code, output = run("psi", str(tmp_path / "ours.csv"), "--id-column", "customer", "--connect", "127.0.0.1:1",
                       "--insecure", "--out", str(tmp_path / "common.csv"))
    assert code == 2 and "exists; refusing to overwrite" in output


@pytest.mark.parametrize(("args", "message"), [
    (["--listen", "127.0.0.1:0", "--connect", "127.0.0.1:1", "--insecure"], "exactly one of --listen"),
    (["--connect", "127.0.0.1:1", "--insecure", "--id-column", "nope"], "no ID column 'nope'"),
])
def test_psi_input_errors(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "ids.csv").write_text("id\na\nb\n")
    code, output = run("psi", str(tmp_path / "ids.csv"), "--out", str(tmp_path / "o.csv"), *args)
    assert code == 2 and message in output and "Traceback" not in output
