"""Job configuration (TOML validated by pydantic)."""

from fedcrypt.config.job import JobConfig, JobError, load_job, parse_job

__all__ = ["JobConfig", "JobError", "load_job", "parse_job"]
