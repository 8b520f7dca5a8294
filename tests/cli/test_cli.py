"""The command line as a user meets it: real subprocesses for the error paths (no traceback, exit
status 2), and a full quickstart run that writes the run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart.toml"


def fedcrypt(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedcrypt.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        timeout=300,
    )


def test_quickstart_runs_end_to_end_and_writes_the_run_directory(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = fedcrypt("run", str(QUICKSTART), "--out", str(out), "--rounds", "12", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert "final accuracy" in result.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(1, 13))
    for row in rows:
        assert {"accuracy", "loss", "bytes_up", "bytes_down", "seconds", "train_seconds"} <= row.keys()
        assert row["status"] == "ok" and row["bytes_up"] > 0 and row["bytes_down"] > 0
    assert rows[-1]["accuracy"] >= 0.9
    state = torch.load(out / "model.pt")
    assert set(state) == {"1.weight", "1.bias", "3.weight", "3.bias", "5.weight", "5.bias"}
    resolved = (out / "job.toml").read_text()
    assert "rounds = 12" in resolved and "seed = 1" in resolved


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[job]\nrouns = 3\n", "job.rouns: unknown key"),
        ("[strategy]\nfraction_fit = 2.0\n", "strategy.fraction_fit"),
        ("[job\n", "not valid TOML"),
        ('[data]\ndataset = "mnist"\n', "MNIST files missing"),
        ('[data]\ndataset = "digits"\n[model]\nname = "cnn"\n', "28x28"),
        ('[privacy]\nmechanism = "ckks"\npreset = "huge"\n', "unknown CKKS preset 'huge'"),
        ('[privacy]\nmechanism = "ckks"\nkeys = "/nonexistent"\n', "cannot read /nonexistent/ckks.public.json"),
        ('[privacy]\nmechanism = "ckks"\nencrypt_layers = ["conv9.*"]\n', "pattern 'conv9.*' matches no tensor"),
        ('[privacy]\nmechanism = "paillier"\nkeys = "/nonexistent"\n', "cannot read /nonexistent/paillier.public.json"),
        ('[privacy]\nmechanism = "paillier"\npaillier_bits = 1000\n', "privacy.paillier_bits"),
        ('[privacy]\nmechanism = "batchcrypt"\nbits = 1\n', "privacy.bits"),
        ('[privacy]\nmechanism = "ckks"\nbits = 8\n', "bits applies to mechanism = \"batchcrypt\" only"),
        ('[privacy]\nmechanism = "batchcrypt"\nkeys = "/nonexistent"\n', "cannot read /nonexistent/paillier.public.json"),
        ('[privacy]\nmechanism = "secagg"\nthreshold = 0.3\n', "privacy.threshold"),
        ('[privacy]\nmechanism = "none"\nneighbors = 4\n', "neighbors and threshold apply to mechanism = \"secagg\" only"),
        ('[privacy]\nmechanism = "shares"\naggregators = 1\n', "privacy.aggregators"),
        ('[privacy]\nmechanism = "secagg"\naggregators = 3\n', "aggregators applies to mechanism = \"shares\" only"),
        ('[privacy]\nmechanism = "shares"\nkeys = "/nonexistent"\n', "cannot read /nonexistent/aggregator-1.secret.json"),
        ('[strategy]\nweighting = "uniform"\n[dp]\nclip_norm = 1.0\n', "set noise_multiplier, target_epsilon, or both"),
        ('[dp]\nnoise_multiplier = 1.0\n', 'needs [strategy] weighting = "uniform"'),
        ('[strategy]\nweighting = "uniform"\n[dp]\nnoise_multiplier = 1.0\ndelta = 1.5\n', "dp.delta"),
        ('[strategy]\nweighting = "uniform"\n[dp]\nnoise_multiplier = -1.0\n', "dp.noise_multiplier"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(tmp_path: Path, content: str, message: str) -> None:
    job = tmp_path / "job.toml"
    job.write_text(content)
    result = fedcrypt("run", str(job), "--out", str(tmp_path / "out"), env={"FEDCRYPT_DATA": str(tmp_path)})
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_bad_flags_and_missing_files_exit_2_without_traceback(tmp_path: Path) -> None:
    for args in (["run", str(QUICKSTART), "--rounds", "zero"], ["run", str(tmp_path / "nope.toml")]):
        result = fedcrypt(*args)
        assert result.returncode == 2, args
        assert "Traceback" not in result.stderr + result.stdout


def test_data_command_prints_the_partition_summary() -> None:
    result = fedcrypt("data", str(QUICKSTART))
    assert result.returncode == 0, result.stderr
    assert "1437 training examples" in result.stdout and "10 clients" in result.stdout


def test_check_prints_the_resolved_job() -> None:
    result = fedcrypt("check", str(QUICKSTART))
    assert result.returncode == 0 and 'mechanism = "none"' in result.stdout


def test_an_existing_run_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n')
    result = fedcrypt("run", str(QUICKSTART), "--out", str(tmp_path), "--rounds", "1")
    assert result.returncode == 2 and "already holds a run" in result.stderr
    assert (tmp_path / "metrics.jsonl").read_text() == '{"round": 1}\n'


def test_he_server_without_keys_is_refused_before_listening(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text('[privacy]\nmechanism = "ckks"\n')
    result = fedcrypt("server", str(job), "--insecure", "--address", "127.0.0.1:0", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "needs --keys DIR" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_aggregator_keys_command_writes_the_helpers_files(tmp_path: Path) -> None:
    made = fedcrypt("keys", "aggregator", "--out", str(tmp_path / "keys"), "--name", "aggregator-2")
    assert made.returncode == 0, made.stderr
    assert oct((tmp_path / "keys" / "aggregator-2.secret.json").stat().st_mode & 0o777) == "0o600"
    assert (tmp_path / "keys" / "aggregator-2.public.json").is_file() and "public key" in made.stdout
    again = fedcrypt("keys", "aggregator", "--out", str(tmp_path / "keys"), "--name", "aggregator-2")
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr and "Traceback" not in again.stderr
    odd = fedcrypt("keys", "aggregator", "--out", str(tmp_path / "keys"), "--name", "server")
    assert odd.returncode == 2 and "--name must be aggregator-1" in odd.stderr


def test_a_helper_aggregator_without_keys_or_server_fails_in_one_line(tmp_path: Path) -> None:
    result = fedcrypt("aggregator", "--server", "127.0.0.1:1", "--name", "aggregator-1", "--insecure",
                      "--reconnect-timeout", "0")
    assert result.returncode == 2 and "cannot reach the server" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_paillier_keys_command_writes_the_two_roles_files(tmp_path: Path) -> None:
    made = fedcrypt("keys", "paillier", "--out", str(tmp_path / "keys"), "--bits", "1024")
    assert made.returncode == 0, made.stderr
    assert oct((tmp_path / "keys" / "paillier.secret.json").stat().st_mode & 0o777) == "0o600"
    assert "fingerprint" in made.stdout
    again = fedcrypt("keys", "paillier", "--out", str(tmp_path / "keys"), "--bits", "1024")
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr and "Traceback" not in again.stderr
    odd = fedcrypt("keys", "paillier", "--out", str(tmp_path / "other"), "--bits", "1000")
    assert odd.returncode == 2 and "--bits must be" in odd.stderr
