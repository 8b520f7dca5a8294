"""``fedcrypt audit`` as a user meets it: a real subprocess, its files, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LENET = REPO / "examples" / "audit" / "lenet_plain.toml"


def fedcrypt(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedcrypt.cli", *args], capture_output=True, text=True, cwd=REPO,
        env={**os.environ, "COLUMNS": "200"}, timeout=600,
    )


def test_audit_attacks_writes_report_and_pictures(tmp_path: Path) -> None:
    out = tmp_path / "audit"
    result = fedcrypt("audit", str(LENET), "--clients", "2", "--sweep", "--ratios", "0,0.5,1",
                      "--rules", "sensitivity,random", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "the server can rebuild the training inputs" in result.stdout
    report = json.loads((out / "audit.json").read_text())
    inversion = report["inversion"]
    assert report["mechanism"] == "none" and inversion["attack"] == "idlg"
    assert inversion["mean_psnr"] >= 30 and inversion["label_recovery"] == 1.0
    assert len(inversion["images"]) == 2
    assert [(p["rule"], p["ratio"]) for p in report["sweep"]] == [
        (rule, ratio) for rule in ("sensitivity", "random") for ratio in (0.0, 0.5, 1.0)
    ]
    for picture in ("reconstructions.png", "psnr_vs_ratio.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = fedcrypt("audit", str(LENET), "--clients", "1", "--out", str(out))
    assert again.returncode == 2 and "already holds an audit" in again.stderr
    assert json.loads((out / "audit.json").read_text()) == report  # the first audit is untouched


def test_audit_of_an_encrypted_job_says_nothing_is_readable(tmp_path: Path) -> None:
    job = tmp_path / "ckks.toml"
    job.write_text(LENET.read_text().replace('mechanism = "none"', 'mechanism = "ckks"'))
    result = fedcrypt("audit", str(job), "--clients", "2", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "reads no value of the updates" in result.stdout
    assert json.loads((tmp_path / "out" / "audit.json").read_text())["inversion"]["readable_fraction"] == 0.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--attack", "foo"], "unknown attack 'foo'"),
        (["--sweep", "--ratios", "0,2"], "--ratios must be numbers in [0, 1]"),
        (["--sweep", "--ratios", "a,b"], "--ratios must be a comma-separated list"),
        (["--sweep", "--rules", "sensitivity,biggest"], "unknown selection rule 'biggest'"),
        (["--attack", "mia", "--sweep"], "--sweep applies to the gradient attacks"),
        (["--device", "tpu"], "--device must be cpu or cuda"),
        (["--clients", "0"], "--clients"),
    ],
)
def test_bad_flags_are_one_line_errors(tmp_path: Path, args: list[str], message: str) -> None:
    result = fedcrypt("audit", str(LENET), "--out", str(tmp_path / "out"), *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "audit.json").exists()


def test_missing_job_file_is_a_one_line_error(tmp_path: Path) -> None:
    result = fedcrypt("audit", str(tmp_path / "nope.toml"))
    assert result.returncode == 2 and "cannot read job file" in result.stderr and "Traceback" not in result.stderr


def test_membership_audit_compares_with_and_without_dp(tmp_path: Path) -> None:
    out = tmp_path / "mia"
    result = fedcrypt("audit", str(REPO / "examples" / "audit" / "mia_dp.toml"), "--attack", "mia",
                      "--members", "300", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "membership inference" in result.stdout and "without DP" in result.stdout
    report = json.loads((out / "audit.json").read_text())["membership"]
    dp, plain = report["rows"]
    assert dp["epsilon"] == pytest.approx(8, abs=0.01) and plain["epsilon"] is None
    assert plain["loss_auc"] > 0.62 and plain["train_accuracy"] == 1.0  # the attack works on the overfit model
    assert abs(dp["loss_auc"] - 0.5) < 0.1 and abs(dp["shadow_auc"] - 0.5) < 0.1
