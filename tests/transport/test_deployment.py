"""Deployment with real processes on 127.0.0.1: a server, clients, TLS, faults and resume."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import fedcrypt
from fedcrypt.core.params import flatten
from fedcrypt.crypto.ckks import PRESETS, SecretKey
from fedcrypt.crypto.paillier import generate_keypair
from fedcrypt.mechanisms.ckks import write_keys
from fedcrypt.mechanisms.paillier import write_keys as write_paillier_keys
from fedcrypt.mechanisms.shares import public_file, write_helper_key
from fedcrypt.tracking.store import RunStore
from fedcrypt.transport.certs import client_files, write_bundle

CLIENTS = ["client-000", "client-001", "client-002"]
HELPERS = ["aggregator-1", "aggregator-2"]
JOB = """
[job]
name = "deploy-test"
rounds = {rounds}
seed = 3
[data]
num_clients = 3
partition = "iid"
[train]
lr = 0.1
momentum = 0.9
local_epochs = {epochs}
[strategy]
min_fit_clients = 2
[deploy]
min_clients = {min_clients}
wait_timeout = 60
round_timeout = 60
liveness_timeout = 4
max_retries = 3
"""
TIMEOUT = 180


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _spawn(*args: str, log: Path) -> subprocess.Popen[bytes]:
    """A fedcrypt command in its own process (one torch thread each: several share 2 cores)."""
    handle = log.open("wb")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "fedcrypt.cli", *args]
    return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)


@pytest.fixture()
def deployment(tmp_path: Path) -> Iterator[dict[str, object]]:
    """Certificates, a job file and a port; kills every process the test started."""
    write_bundle(tmp_path / "certs", [*CLIENTS, "mallory", *HELPERS])
    processes: list[subprocess.Popen[bytes]] = []
    yield {"dir": tmp_path, "port": _free_port(), "processes": processes}
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def _job(tmp_path: Path, rounds: int = 3, epochs: int = 1, min_clients: int = 3, extra: str = "") -> Path:
    path = tmp_path / "job.toml"
    path.write_text(JOB.format(rounds=rounds, epochs=epochs, min_clients=min_clients) + extra)
    return path


def _server(env: dict[str, object], job: Path, *extra: str) -> subprocess.Popen[bytes]:
    tmp = env["dir"]
    assert isinstance(tmp, Path)
    args = ["server", str(job), "--address", f"127.0.0.1:{env['port']}", "--certs", str(tmp / "certs")]
    process = _spawn(*args, "--out", str(tmp / "out"), *extra, log=tmp / "server.log")
    env["processes"].append(process)  # type: ignore[attr-defined]
    return process


def _client(env: dict[str, object], name: str, partition: int, *extra: str) -> subprocess.Popen[bytes]:
    tmp = env["dir"]
    assert isinstance(tmp, Path)
    args = ["client", "--server", f"localhost:{env['port']}", "--name", name, "--partition", str(partition)]
    process = _spawn(*args, "--certs", str(tmp / "certs"), *extra, log=tmp / f"{name}.log")
    env["processes"].append(process)  # type: ignore[attr-defined]
    return process


def _finish(process: subprocess.Popen[bytes], log: Path) -> str:
    assert process.wait(TIMEOUT) == 0, log.read_text()
    return log.read_text()


def _rounds(out: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_three_clients_match_the_simulation(deployment: dict[str, object]) -> None:
    tmp = deployment["dir"]
    assert isinstance(tmp, Path)
    # Every message goes through a temporary file, and the 1.2 MB updates are read from it in windows.
    job = _job(tmp, extra="spool_mb = 0\n[model]\nhidden = [4096]\n")
    server = _server(deployment, job)
    clients = [_client(deployment, name, i) for i, name in enumerate(CLIENTS)]
    _finish(server, tmp / "server.log")
    for name, process in zip(CLIENTS, clients):
        assert "done: answered 4 requests" in _finish(process, tmp / f"{name}.log")
    rows = _rounds(tmp / "out")
    assert [r["round"] for r in rows] == [1, 2, 3] and all(r["succeeded"] == 3 for r in rows)
    deployed = flatten(torch.load(tmp / "out" / "model.pt"))
    simulated = fedcrypt.simulate(job)
    # Replies are summed in arrival order, so float32 rounding differs in the last bits (then
    # amplified by three rounds of momentum SGD); any real divergence would be orders larger.
    np.testing.assert_allclose(deployed, simulated.params, rtol=1e-5, atol=2e-5)
    # Same message bytes: sizes differ only by the digits of timing metrics in the JSON headers.
    for row, record in zip(rows, simulated.history):
        assert abs(int(row["bytes_up"]) - record.bytes_up) < 3 * 20  # type: ignore[call-overload]
        assert row["bytes_down"] == record.bytes_down


def test_a_client_killed_mid_round_is_dropped_and_the_job_completes(deployment: dict[str, object]) -> None:
    tmp = deployment["dir"]
    assert isinstance(tmp, Path)
    server = _server(deployment, _job(tmp, rounds=3))
    honest = [_client(deployment, name, i) for i, name in enumerate(CLIENTS[:2])]
    # A client that takes the first round's request and dies without answering.
    files = client_files(tmp / "certs", CLIENTS[2])
    script = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from fedcrypt.transport.certs import TlsFiles
        from fedcrypt.transport.grpc_client import GrpcClientConnection
        tls = TlsFiles(Path({str(files.ca)!r}), Path({str(files.cert)!r}), Path({str(files.key)!r}))
        connection = GrpcClientConnection("localhost:{deployment['port']}", {CLIENTS[2]!r}, tls=tls)
        connection.hello()
        connection.job = "deploy-test"
        while connection.next_request() is None:
            pass
        os._exit(1)
        """
    )
    victim = subprocess.Popen([sys.executable, "-c", script])
    deployment["processes"].append(victim)  # type: ignore[attr-defined]
    assert victim.wait(TIMEOUT) == 1
    _finish(server, tmp / "server.log")
    rows = _rounds(tmp / "out")
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[0]["succeeded"] == 2 and "connection lost" in str(rows[0]["failures"]["client-002"])
    for process, name in zip(honest, CLIENTS):
        _finish(process, tmp / f"{name}.log")


def test_server_killed_after_round_two_resumes_without_double_counting(deployment: dict[str, object]) -> None:
    tmp = deployment["dir"]
    assert isinstance(tmp, Path)
    job = _job(tmp, rounds=6, epochs=15)
    server = _server(deployment, job)
    clients = [_client(deployment, name, i, "--reconnect-timeout", "60") for i, name in enumerate(CLIENTS)]
    metrics = tmp / "out" / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert time.monotonic() < deadline and server.poll() is None, (tmp / "server.log").read_text()
        time.sleep(0.02)
    server.send_signal(signal.SIGKILL)
    server.wait(10)
    completed_before = len(metrics.read_text().splitlines())
    assert completed_before < 6, "the job finished before the server could be killed"
    restarted = _server(deployment, job, "--resume")
    log = _finish(restarted, tmp / "server.log")
    assert "done: 6 rounds" in log
    assert [r["round"] for r in _rounds(tmp / "out")] == [1, 2, 3, 4, 5, 6]
    for process, name in zip(clients, CLIENTS):
        _finish(process, tmp / f"{name}.log")
    # the run store holds one server run, resumed in place: six rounds, none twice, finished
    recorded = [run for run in RunStore().runs(limit=1000) if run.run_dir == str(tmp / "out")]
    assert len(recorded) == 1 and recorded[0].kind == "server" and recorded[0].status == "finished"
    detail = RunStore().get(recorded[0].id)
    assert [r["round"] for r in detail.rounds] == [1, 2, 3, 4, 5, 6]
    assert detail.run.model_path == str(tmp / "out" / "model.pt")


@pytest.mark.parametrize("case", ["other_ca", "revoked", "no_certs"])
def test_bad_credentials_are_refused_with_a_clear_message(deployment: dict[str, object], case: str) -> None:
    tmp = deployment["dir"]
    assert isinstance(tmp, Path)
    extra = ("--revoked", "mallory") if case == "revoked" else ()
    server = _server(deployment, _job(tmp, rounds=1, min_clients=1), *extra)
    if case == "other_ca":
        write_bundle(tmp / "rogue", ["mallory"])
        args = ["--certs", str(tmp / "rogue")]
    elif case == "revoked":
        args = ["--certs", str(tmp / "certs")]
    else:
        args = []
    base = ["client", "--server", f"localhost:{deployment['port']}", "--name", "mallory", "--reconnect-timeout", "3"]
    if args:
        base = [*base, *args]
    process = subprocess.run(
        [sys.executable, "-m", "fedcrypt.cli", *base], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert process.returncode == 2 and "Traceback" not in process.stderr
    expected = {"other_ca": "cannot reach the server", "revoked": "revoked", "no_certs": "TLS needs --certs"}[case]
    assert expected in process.stderr
    server.kill()


def test_ckks_over_grpc_with_the_server_holding_only_public_parameters(deployment: dict[str, object]) -> None:
    tmp = deployment["dir"]
    assert isinstance(tmp, Path)
    made = subprocess.run(
        [sys.executable, "-m", "fedcrypt.cli", "keys", "ckks", "--out", str(tmp / "keys")],
        capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert made.returncode == 0, made.stderr
    assert oct((tmp / "keys" / "ckks.secret").stat().st_mode & 0o777) == "0o600"
    again = subprocess.run(
        [sys.executable, "-m", "fedcrypt.cli", "keys", "ckks", "--out", str(tmp / "keys")],
        capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr and "Traceback" not in again.stderr
    public_only = tmp / "server-keys"
    public_only.mkdir()
    (public_only / "ckks.public.json").write_text((tmp / "keys" / "ckks.public.json").read_text())
    job = _job(tmp, rounds=2, extra='[privacy]\nmechanism = "ckks"\n')
    _deploy_two_rounds(deployment, job, public_only)
    _assert_matches_simulation(tmp, job, atol=1e-4)


def test_selective_ckks_agrees_its_mask_over_grpc_and_matches_the_simulation(deployment: dict[str, object]) -> None:
    tmp = deployment["dir"]
    assert isinstance(tmp, Path)
    write_keys(tmp / "keys", SecretKey(PRESETS["fast"]))
    job = _job(tmp, rounds=2, extra='[privacy]\nmechanism = "ckks"\nencrypt_ratio = 0.1\n')
    rows = _deploy_two_rounds(deployment, job, tmp / "keys")
    assert all(0.1 < r["encrypted_fraction"] < 0.11 for r in rows)
    # Round 1 also carries the encrypted sensitivity maps and the global map back.
    assert rows[0]["bytes_up"] > rows[1]["bytes_up"] and rows[0]["bytes_down"] > rows[1]["bytes_down"]
    _assert_matches_simulation(tmp, job, atol=1e-4)


def test_paillier_over_grpc_matches_the_simulation(deployment: dict[str, object]) -> None:
    tmp = deployment["dir"]
    assert isinstance(tmp, Path)
    write_paillier_keys(tmp / "keys", generate_keypair(1024)[1])
    job = _job(tmp, rounds=2, extra='[model]\nname = "logreg"\n[privacy]\nmechanism = "paillier"\n')
    _deploy_two_rounds(deployment, job, tmp / "keys")
    _assert_matches_simulation(tmp, job, atol=1e-5)


def _deploy_two_rounds(deployment: dict[str, object], job: Path, server_keys: Path | None) -> list[dict[str, object]]:
    """Run ``job`` (2 rounds) with the server on ``server_keys`` and the clients on ``DIR/keys``
    (no keys at all when ``server_keys`` is None); returns the server's metrics rows after
    checking every round succeeded with all clients."""
    tmp = deployment["dir"]
    assert isinstance(tmp, Path)
    server_args = () if server_keys is None else ("--keys", str(server_keys))
    client_args = () if server_keys is None else ("--keys", str(tmp / "keys"))
    server = _server(deployment, job, *server_args)
    clients = [_client(deployment, name, i, *client_args) for i, name in enumerate(CLIENTS)]
    _finish(server, tmp / "server.log")
    for name, process in zip(CLIENTS, clients):
        _finish(process, tmp / f"{name}.log")
    rows = _rounds(tmp / "out")
    assert [r["round"] for r in rows] == [1, 2] and all(r["succeeded"] == 3 and r["status"] == "ok" for r in rows)
    return rows


def _assert_matches_simulation(tmp: Path, job: Path, atol: float) -> None:
    """The deployed model equals a simulation of the same job with the same keys."""
    deployed = flatten(torch.load(tmp / "out" / "model.pt"))
    keys = {"keys": str(tmp / "keys")} if (tmp / "keys").exists() else {}
    simulated = fedcrypt.simulate(fedcrypt.load_job(job).with_overrides(privacy=keys))
    np.testing.assert_allclose(deployed, simulated.params, atol=atol)


def test_batchcrypt_over_grpc_matches_the_simulation(deployment: dict[str, object]) -> None:
    tmp = deployment["dir"]
    assert isinstance(tmp, Path)
    write_paillier_keys(tmp / "keys", generate_keypair(1024)[1])
    job = _job(tmp, rounds=2, extra='[model]\nname = "logreg"\n[privacy]\nmechanism = "batchcrypt"\nbits = 12\n')
    rows = _deploy_two_rounds(deployment, job, tmp / "keys")
    assert all(r["batchcrypt_slots"] > 0 for r in rows)
    _assert_matches_simulation(tmp, job, atol=2e-3)  # 12 bits, rounded stochastically in each run


def test_secagg_over_grpc_matches_the_simulation(deployment: dict[str, object]) -> None:
    tmp = deployment["dir"]
    assert isinstance(tmp, Path)
    job = _job(tmp, rounds=2, extra='[model]\nname = "logreg"\n[privacy]\nmechanism = "secagg"\n')
    rows = _deploy_two_rounds(deployment, job, None)
    assert all(r["secagg_neighbors"] == 2 and r["secagg_threshold"] == 2 for r in rows)
    _assert_matches_simulation(tmp, job, atol=1e-6)  # fixed-point sums are exact: same model


def test_dp_with_adaptive_clipping_over_grpc(deployment: dict[str, object]) -> None:
    tmp = deployment["dir"]
    assert isinstance(tmp, Path)
    extra = (
        '[model]\nname = "logreg"\n[privacy]\nmechanism = "secagg"\n'
        '[dp]\nnoise = "distributed"\nclip_norm = 5.0\nnoise_multiplier = 0.5\nadaptive = true\ncount_noise = 0.5\n'
    )
    job = _job(tmp, rounds=2, extra=extra)
    job.write_text(job.read_text().replace("[strategy]\n", '[strategy]\nweighting = "uniform"\n', 1))
    rows = _deploy_two_rounds(deployment, job, None)
    assert rows[0]["dp_clip_norm"] == 5.0 and rows[1]["dp_clip_norm"] == rows[0]["dp_next_clip_norm"]
    assert 0 < rows[0]["dp_epsilon"] < rows[1]["dp_epsilon"]


def _helper(env: dict[str, object], name: str) -> subprocess.Popen[bytes]:
    """Helper aggregator ``name`` with its own key folder ``DIR/name`` (made on its machine)."""
    tmp = env["dir"]
    assert isinstance(tmp, Path)
    args = ["aggregator", "--server", f"localhost:{env['port']}", "--name", name, "--keys", str(tmp / name)]
    process = _spawn(*args, "--certs", str(tmp / "certs"), log=tmp / f"{name}.log")
    env["processes"].append(process)  # type: ignore[attr-defined]
    return process


def test_shares_over_grpc_with_two_helper_aggregators_matches_the_simulation(deployment: dict[str, object]) -> None:
    tmp = deployment["dir"]
    assert isinstance(tmp, Path)
    (tmp / "keys").mkdir()
    for name in HELPERS:  # each helper makes its key; the clients get the public files only
        write_helper_key(tmp / name, name)
        (tmp / "keys" / public_file(name)).write_bytes((tmp / name / public_file(name)).read_bytes())
    job = _job(tmp, rounds=2, extra='[model]\nname = "logreg"\n[privacy]\nmechanism = "shares"\naggregators = 3\n')
    server = _server(deployment, job)
    helpers = [_helper(deployment, name) for name in HELPERS]
    clients = [_client(deployment, name, i, "--keys", str(tmp / "keys")) for i, name in enumerate(CLIENTS)]
    _finish(server, tmp / "server.log")
    for name, process in zip(HELPERS, helpers):  # open and partial in each of 2 rounds, then the shutdown
        assert f"answered 5 requests as helper aggregator {name}" in _finish(process, tmp / f"{name}.log")
    for name, process in zip(CLIENTS, clients):
        _finish(process, tmp / f"{name}.log")
    rows = _rounds(tmp / "out")
    assert [r["round"] for r in rows] == [1, 2] and all(r["succeeded"] == 3 and r["status"] == "ok" for r in rows)
    assert all(r["shares_aggregators"] == 3 for r in rows)
    deployed = flatten(torch.load(tmp / "out" / "model.pt"))
    np.testing.assert_allclose(deployed, fedcrypt.simulate(job).params, atol=1e-6)  # exact sums: same model


def test_a_shares_server_stops_with_a_clear_message_when_a_helper_never_connects(deployment: dict[str, object]) -> None:
    tmp = deployment["dir"]
    assert isinstance(tmp, Path)
    write_helper_key(tmp / "aggregator-1", "aggregator-1")
    job = _job(tmp, rounds=1, extra='[privacy]\nmechanism = "shares"\naggregators = 3\n')
    job.write_text(job.read_text().replace("wait_timeout = 60", "wait_timeout = 3"))
    server = _server(deployment, job)
    _helper(deployment, "aggregator-1")
    assert server.wait(TIMEOUT) == 2
    log = (tmp / "server.log").read_text()
    assert "aggregator-2 did not connect within 3 s" in log and "Traceback" not in log
