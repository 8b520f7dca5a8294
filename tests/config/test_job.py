from __future__ import annotations

from pathlib import Path

import pytest

from fedcrypt.config.job import FedProxSection, JobConfig, JobError, load_job, parse_job

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")) + sorted(EXAMPLES.glob("audit/*.toml")),
                         ids=lambda p: p.name)
def test_examples_are_valid_and_round_trip_through_toml(path: Path, tmp_path: Path) -> None:
    job = load_job(path)
    resolved = tmp_path / "job.toml"
    resolved.write_text(job.to_toml())
    assert load_job(resolved) == job


def test_defaults_form_a_runnable_job() -> None:
    job = parse_job({})
    assert (job.data.dataset, job.strategy.name, job.privacy.mechanism) == ("digits", "fedavg", "none")


def test_strategy_name_selects_its_settings() -> None:
    job = parse_job({"strategy": {"name": "fedprox", "proximal_mu": 0.5}})
    assert isinstance(job.strategy, FedProxSection) and job.strategy.proximal_mu == 0.5
    assert parse_job({"strategy": {"fraction_fit": 0.5}}).strategy.name == "fedavg"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"job": {"rouns": 5}}, "job.rouns: unknown key"),
        ({"jobs": {}}, "jobs: unknown key"),
        ({"job": {"rounds": "ten"}}, "job.rounds: Input should be a valid integer"),
        ({"job": {"rounds": 0}}, "job.rounds: Input should be greater than or equal to 1 (got 0)"),
        ({"strategy": {"fraction_fit": 1.5}}, "strategy.fraction_fit: Input should be less than or equal to 1"),
        ({"strategy": {"name": "fedsgd"}}, "strategy.name: unknown strategy 'fedsgd'"),
        ({"strategy": {"proximal_mu": 0.1}}, "strategy.proximal_mu: unknown key (not a setting of strategy 'fedavg')"),
        ({"data": {"dataset": "cifar"}}, "data.dataset: unknown dataset 'cifar'; choose one of: digits"),
        ({"data": {"partition": "random"}}, "data.partition: unknown partition 'random'"),
        ({"model": {"name": "resnet"}}, "model.name: unknown model 'resnet'"),
        ({"model": {"hidden": [64, 0]}}, "model.hidden.1: Input should be greater than or equal to 1"),
        ({"train": {"lr": float("nan")}}, "train.lr: Input should be a finite number"),
        ({"privacy": {"mechanism": "rot13"}}, "privacy.mechanism: unknown mechanism 'rot13'; choose one of: none"),
        ({"data": {"num_clients": 1}}, "min_fit_clients (2) exceeds data.num_clients (1)"),
        ({"privacy": {"encrypt_ratio": 0.1}}, "encrypt_ratio and encrypt_layers apply to mechanism = \"ckks\" only"),
        ({"privacy": {"mechanism": "ckks", "encrypt_ratio": 0}}, "privacy.encrypt_ratio: Input should be greater than 0"),
        ({"privacy": {"mechanism": "ckks", "encrypt_ratio": 0.5, "encrypt_layers": ["fc.*"]}}, "not both"),
    ],
)
def test_errors_are_one_line_and_name_the_key(raw: dict[str, object], message: str) -> None:
    with pytest.raises(JobError) as info:
        parse_job(raw, source="job.toml")
    text = str(info.value)
    assert text.startswith("job.toml: ") and message in text and "\n" not in text


def test_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[job\nrounds = 1")
    with pytest.raises(JobError, match="not valid TOML"):
        load_job(bad)
    with pytest.raises(JobError, match="cannot read job file"):
        load_job(tmp_path / "missing.toml")


def test_overrides_are_validated_like_the_file() -> None:
    job = JobConfig().with_overrides(job={"rounds": 3})
    assert job.job.rounds == 3
    with pytest.raises(JobError, match="job.rounds"):
        job.with_overrides(job={"rounds": -1})


def test_in_the_clear_drops_every_protection_setting() -> None:
    job = parse_job({
        "privacy": {"mechanism": "batchcrypt", "bits": 8},
        "strategy": {"weighting": "uniform"},
        "dp": {"noise_multiplier": 1.0},
    })
    clear = job.in_the_clear()
    assert clear.privacy.mechanism == "none" and clear.privacy.bits == 16 and clear.dp is None
    assert clear.model_dump(exclude={"privacy", "dp"}) == job.model_dump(exclude={"privacy", "dp"})
