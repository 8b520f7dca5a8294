"""Job files: TOML validated by pydantic, with one-line errors that name the offending key.

Every section rejects unknown keys, so a typo (``rouns = 5``) is an error rather than a silently
ignored setting.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedcrypt.data import DATASETS, PARTITION_METHODS
from fedcrypt.crypto.ckks import PRESETS
from fedcrypt.dp import DpSettings, calibrate_noise
from fedcrypt.mechanisms import MECHANISMS, Options, Selection
from fedcrypt.models.zoo import MODELS


class JobError(Exception):
    """A job file that cannot be used; the message is meant for the user as is."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class JobSection(_Section):
    name: str = Field("fedcrypt-job", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")
    rounds: int = Field(10, ge=1, le=100_000)
    seed: int = Field(0, ge=0, le=2**63 - 1)


class DataSection(_Section):
    dataset: str = "digits"
    num_clients: int = Field(10, ge=1, le=100_000)
    partition: str = "iid"
    alpha: float = Field(0.5, gt=0, le=1e6)
    shards_per_client: int = Field(2, ge=1, le=1000)
    data_dir: str | None = None
    train_samples: int | None = Field(
        None, ge=1, le=100_000_000,
        description="use only this many training examples (a seeded random subset), e.g. for a privacy audit",
    )

    _dataset = field_validator("dataset")(lambda v: _check_choice("dataset", v, DATASETS))
    _partition = field_validator("partition")(lambda v: _check_choice("partition", v, PARTITION_METHODS))


class ModelSection(_Section):
    name: str = "mlp"
    hidden: tuple[Annotated[int, Field(ge=1, le=65536)], ...] = (64, 64)

    _name = field_validator("name")(lambda v: _check_choice("model", v, MODELS))


class TrainSection(_Section):
    local_epochs: int = Field(1, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, le=1_000_000)
    lr: float = Field(0.05, gt=0, le=100)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, le=1)


class _StrategyBase(_Section):
    fraction_fit: float = Field(1.0, gt=0, le=1)
    min_fit_clients: int = Field(2, ge=1)
    weighting: Literal["samples", "uniform"] = "samples"


class FedAvgSection(_StrategyBase):
    name: Literal["fedavg"] = "fedavg"
    server_lr: float = Field(1.0, gt=0, le=100)


class FedProxSection(_StrategyBase):
    name: Literal["fedprox"]
    server_lr: float = Field(1.0, gt=0, le=100)
    proximal_mu: float = Field(0.01, ge=0, le=1e4)


class _FedOptSection(_StrategyBase):
    server_lr: float = Field(0.01, gt=0, le=100)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0, le=1)


class FedAdamSection(_FedOptSection):
    name: Literal["fedadam"]


class FedYogiSection(_FedOptSection):
    name: Literal["fedyogi"]


StrategySection = Annotated[
    FedAvgSection | FedProxSection | FedAdamSection | FedYogiSection, Field(discriminator="name")
]


class PrivacySection(_Section):
    """How updates are protected; `keys` is a directory from `fedcrypt keys` (HE mechanisms)."""

    mechanism: str = "none"
    preset: str = Field("fast", description="CKKS parameter preset (see `fedcrypt keys ckks --help`)")
    keys: str | None = Field(None, description="key directory; simulations without one use a fresh key per run")
    paillier_bits: Literal[1024, 2048, 3072, 4096] = Field(
        2048, description="paillier, batchcrypt: key size of the fresh key a simulation without `keys` makes"
    )
    bits: int = Field(16, ge=2, le=32, description="batchcrypt: quantization bits per value")
    neighbors: int | None = Field(
        None, ge=2, description="secagg: neighbours per client (default ~3 log2 n; n - 1 or more: classic SecAgg)"
    )
    threshold: float = Field(
        0.5, ge=0.5, lt=1, description="secagg: fraction of a client's neighbours whose shares reconstruct its secrets"
    )
    aggregators: int = Field(
        2, ge=2, le=16, description="shares: k, the aggregators holding shares (the server and k - 1 helpers)"
    )
    encrypt_ratio: float = Field(
        1.0, gt=0, le=1, description="ckks: encrypt the most privacy-sensitive fraction of parameters (1 = all)"
    )
    encrypt_layers: list[str] = Field(
        default_factory=list, description="ckks: encrypt only tensors matching these patterns (e.g. \"0.*\")"
    )

    _mechanism = field_validator("mechanism")(lambda v: _check_choice("mechanism", v, tuple(MECHANISMS)))
    _preset = field_validator("preset")(lambda v: _check_choice("CKKS preset", v, tuple(PRESETS)))

    @model_validator(mode="after")
    def _selection_needs_he(self) -> PrivacySection:
        selective = self.encrypt_ratio != 1.0 or self.encrypt_layers
        if selective and self.mechanism != "ckks":
            raise ValueError("encrypt_ratio and encrypt_layers apply to mechanism = \"ckks\" only")
        if self.bits != 16 and self.mechanism != "batchcrypt":
            raise ValueError("bits applies to mechanism = \"batchcrypt\" only")
        if (self.neighbors is not None or self.threshold != 0.5) and self.mechanism != "secagg":
            raise ValueError("neighbors and threshold apply to mechanism = \"secagg\" only")
        if self.aggregators != 2 and self.mechanism != "shares":
            raise ValueError("aggregators applies to mechanism = \"shares\" only")
        if self.encrypt_ratio != 1.0 and self.encrypt_layers:
            raise ValueError("set either encrypt_ratio or encrypt_layers, not both")
        return self

    @property
    def options(self) -> Options:
        return Options(
            preset=self.preset,
            selection=Selection(self.encrypt_ratio, tuple(self.encrypt_layers)),
            paillier_bits=self.paillier_bits,
            bits=self.bits,
            neighbors=self.neighbors,
            threshold=self.threshold,
            aggregators=self.aggregators,
        )


class DpSection(_Section):
    """Client-level differential privacy (DP-FedAvg); present = on. Give `noise_multiplier`, or
    `target_epsilon` to have it calibrated for the job's rounds, or both (the job then stops
    before a round that would exceed `target_epsilon`)."""

    noise: Literal["central", "distributed", "local"] = Field(
        "central", description="who adds the Gaussian noise: the server, the clients' shares, or each client in full"
    )
    clip_norm: float = Field(1.0, gt=0, description="L2 bound on each client's update")
    noise_multiplier: float | None = Field(None, ge=0, description="noise std on the sum / clip_norm")
    target_epsilon: float | None = Field(None, gt=0, description="privacy budget (with delta) for the whole job")
    delta: float = Field(1e-5, gt=0, lt=1)
    adaptive: bool = Field(False, description="adapt clip_norm each round toward a quantile of update norms")
    target_quantile: float = Field(0.5, gt=0, lt=1, description="adaptive: fraction of updates left unclipped")
    clip_lr: float = Field(0.2, gt=0, le=10, description="adaptive: geometric step of the clip norm")
    count_noise: float | None = Field(
        None, gt=0, description="adaptive: noise std on the count of unclipped updates (default: clients per round / 20)"
    )

    @model_validator(mode="after")
    def _noise_or_budget(self) -> DpSection:
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("set noise_multiplier, target_epsilon, or both")
        return self


class DeploySection(_Section):
    """Settings of `fedcrypt server`: deadlines, retries and message limits."""

    min_clients: int | None = Field(None, ge=1, description="clients to wait for; default min_fit_clients")
    wait_timeout: float = Field(300.0, gt=0, le=86_400)
    round_timeout: float = Field(600.0, gt=0, le=86_400)
    liveness_timeout: float = Field(30.0, gt=0, le=3_600)
    max_retries: int = Field(2, ge=0, le=100)
    max_message_mb: int = Field(4096, ge=1, le=1 << 20)
    chunk_kb: int = Field(1024, ge=1, le=3072)
    parallel_downloads: int = Field(4, ge=1, le=1024, description="requests streamed to clients at once")
    spool_mb: int = Field(
        16, ge=0, le=1 << 20, description="messages above this go to a temporary file as they arrive (TMPDIR)"
    )


class JobConfig(_Section):
    """A whole job: what to train, on which data, with which strategy and protection."""

    job: JobSection = Field(default_factory=JobSection)
    data: DataSection = Field(default_factory=DataSection)
    model: ModelSection = Field(default_factory=ModelSection)
    train: TrainSection = Field(default_factory=TrainSection)
    strategy: StrategySection = Field(default_factory=FedAvgSection)
    privacy: PrivacySection = Field(default_factory=PrivacySection)
    deploy: DeploySection = Field(default_factory=DeploySection)
    dp: DpSection | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_strategy_name(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and isinstance(raw.get("strategy"), dict):
            raw = {**raw, "strategy": {"name": "fedavg", **raw["strategy"]}}
        return raw

    @model_validator(mode="after")
    def _enough_clients(self) -> JobConfig:
        if self.strategy.min_fit_clients > self.data.num_clients:
            raise ValueError(
                f"strategy.min_fit_clients ({self.strategy.min_fit_clients}) exceeds "
                f"data.num_clients ({self.data.num_clients})"
            )
        return self

    @model_validator(mode="after")
    def _dp_weighs_clients_uniformly(self) -> JobConfig:
        if self.dp is not None and self.strategy.weighting != "uniform":
            raise ValueError('[dp] needs [strategy] weighting = "uniform" (DP-FedAvg bounds each client\'s influence)')
        return self

    def dp_settings(self) -> DpSettings | None:
        """The resolved DP settings (noise multiplier calibrated to ``target_epsilon`` if not given)."""
        if self.dp is None:
            return None
        dp = self.dp
        multiplier = dp.noise_multiplier
        if multiplier is None:
            assert dp.target_epsilon is not None
            multiplier = calibrate_noise(dp.target_epsilon, self.job.rounds, self.sampling_rate, dp.delta, dp.noise)
        count_noise = dp.count_noise if dp.count_noise is not None else self.sampled_clients / 20
        return DpSettings(
            dp.noise, dp.clip_norm, multiplier, dp.delta, dp.target_epsilon,
            adaptive=dp.adaptive, target_quantile=dp.target_quantile, clip_lr=dp.clip_lr, count_noise=count_noise,
        )

    @property
    def sampled_clients(self) -> int:
        """Clients each round samples (as the strategy does, with all clients available)."""
        n = self.data.num_clients
        return min(n, max(self.strategy.min_fit_clients, math.ceil(self.strategy.fraction_fit * n)))

    @property
    def sampling_rate(self) -> float:
        return self.sampled_clients / self.data.num_clients

    def with_overrides(self, **sections: dict[str, Any]) -> JobConfig:
        """A copy with some keys replaced, validated like a file (e.g. ``job={"rounds": 3}``)."""
        merged = self.model_dump()
        for section, values in sections.items():
            merged[section] = {**(merged.get(section) or {}), **values}
        return parse_job(merged, source="overrides")

    def in_the_clear(self) -> JobConfig:
        """The same job with updates unprotected (mechanism ``none``) and without DP: what an
        attacker who knows the job can run itself."""
        return parse_job({**self.model_dump(), "privacy": {}, "dp": None}, source="the job in the clear")

    def to_toml(self) -> str:
        """The resolved job (defaults filled in) as TOML."""
        return toml_document(self.model_dump())


def parse_job(raw: dict[str, Any], *, source: str = "job") -> JobConfig:
    """Validate a parsed TOML document; raises :class:`JobError` with a one-line reason."""
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        raise JobError(f"{source}: {_first_error(exc)}") from None


def load_job(path: str | Path) -> JobConfig:
    """Read and validate a TOML job file."""
    return parse_job(read_toml(path), source=str(path))


def read_toml(path: str | Path) -> dict[str, Any]:
    """A job file's TOML document; :class:`JobError` if it cannot be read or parsed."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise JobError(f"{path}: cannot read job file: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise JobError(f"{path}: not valid TOML: {exc}") from None


def toml_document(sections: dict[str, Any]) -> str:
    """Sections as TOML: a dict is a ``[table]``, a list of dicts ``[[tables]]``; None is left out."""
    lines: list[str] = []
    for section, values in sections.items():
        if values is None:  # an optional section that is off
            continue
        for table in values if isinstance(values, list) else [values]:
            lines.append(f"[[{section}]]" if isinstance(values, list) else f"[{section}]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in table.items() if value is not None]
            lines.append("")
    return "\n".join(lines)


def _check_choice(kind: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; choose one of: {', '.join(choices)}")
    return value


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    # pydantic puts the tag of a tagged union in the location (strategy.fedavg.x): lift it out.
    tags = [str(p) for p in error["loc"] if p in _STRATEGY_NAMES]
    loc = [str(p) for p in error["loc"] if p not in _STRATEGY_NAMES]
    key = ".".join(loc)
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = f"unknown key (not a setting of strategy {tags[0]!r})" if tags else "unknown key"
    elif error["type"] == "union_tag_invalid":
        key += ".name"
        message = f"unknown strategy {error['ctx']['tag']!r}; choose one of: {', '.join(_STRATEGY_NAMES)}"
    elif error["type"] not in ("missing", "value_error") and not isinstance(error.get("input"), dict):
        message += f" (got {error['input']!r})"
    return f"{key}: {message}" if key else message


_STRATEGY_NAMES = ("fedavg", "fedprox", "fedadam", "fedyogi")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
