"""Vertical job files: which parties hold which CSV, the algorithm and its hyper-parameters.

Every party runs ``fedcrypt vertical`` with the same job file (its own data path in it, or given
with ``--data``); when a party connects, the guest sends its job and the party refuses one that
differs in anything but the data paths. Relative data paths are read from the job file's folder.

.. code-block:: toml

    [vertical]
    name = "breast-cancer-lr"
    algorithm = "hetero_lr"        # or "secureboost"
    psi = true                     # intersect the ID columns first
    test_fraction = 0.2            # held-out share of the common rows, scored at the end

    [guest]
    data = "guest.csv"
    id_column = "id"
    label_column = "label"

    [[hosts]]
    name = "host-0"
    data = "host.csv"

    [hetero_lr]
    epochs = 10
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from fedcrypt.config.job import JobError, _first_error, _Section, read_toml, toml_document

#: Role names other than the hosts'.
GUEST, ARBITER = "guest", "arbiter"
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class VerticalSection(_Section):
    name: str = Field("fedcrypt-vertical", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")
    algorithm: Literal["hetero_lr", "secureboost"] = "hetero_lr"
    psi: bool = Field(True, description="intersect the ID columns with PSI; false: every file holds the same IDs")
    test_fraction: float = Field(0.2, ge=0, lt=1, description="common rows held out and scored after training")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="train/test split and batch order (not secret)")


class GuestSection(_Section):
    data: str = Field(min_length=1)
    id_column: str = Field("id", min_length=1)
    label_column: str = Field("label", min_length=1)


class HostSection(_Section):
    name: str = Field(pattern=_NAME)
    data: str = Field(min_length=1)
    id_column: str = Field("id", min_length=1)

    @field_validator("name")
    @classmethod
    def _not_a_role(cls, name: str) -> str:
        if name in (GUEST, ARBITER):
            raise ValueError(f"a host cannot be named {name!r} (a role of its own)")
        return name


class HeteroLRSection(_Section):
    lr: float = Field(0.1, gt=0, le=100)
    epochs: int = Field(10, ge=1, le=100_000)
    batch_size: int = Field(64, ge=1, le=10_000_000)
    l2: float = Field(0.0, ge=0, le=1e6)
    decay: float = Field(0.5, ge=0, le=1e6)
    key_bits: int = Field(2048, ge=1024, le=8192, multiple_of=2)
    arbiter: Literal["separate", "guest"] = Field(
        "separate", description="who holds the Paillier key: a third party, or the guest (it then sees host scores)"
    )
    standardize: bool = True


class SecureBoostSection(_Section):
    n_trees: int = Field(10, ge=1, le=10_000)
    max_depth: int = Field(3, ge=1, le=16)
    learning_rate: float = Field(0.3, gt=0, le=1)
    n_bins: int = Field(32, ge=2, le=255)
    l2: float = Field(1.0, ge=0, le=1e6)
    min_child_weight: float = Field(1.0, ge=0, le=1e9)
    min_samples_leaf: int = Field(1, ge=1, le=10_000_000)
    key_bits: int = Field(2048, ge=1024, le=8192, multiple_of=2)


class VerticalDeploySection(_Section):
    """Deadlines of a run whose parties are separate processes."""

    wait_timeout: float = Field(300.0, gt=0, le=86_400, description="seconds to wait for every party to connect")
    step_timeout: float = Field(600.0, gt=0, le=86_400, description="seconds one party may take to answer a step")
    liveness_timeout: float = Field(30.0, gt=0, le=3_600, description="a silent party is dropped after this")
    max_message_mb: int = Field(4096, ge=1, le=1 << 20)


class VerticalJob(_Section):
    """A whole vertical job; ``source_dir`` (not in the file) resolves relative data paths."""

    vertical: VerticalSection = Field(default_factory=VerticalSection)
    guest: GuestSection
    hosts: list[HostSection] = Field(min_length=1, max_length=64)
    hetero_lr: HeteroLRSection = Field(default_factory=HeteroLRSection)
    secureboost: SecureBoostSection = Field(default_factory=SecureBoostSection)
    deploy: VerticalDeploySection = Field(default_factory=VerticalDeploySection)
    source_dir: str = Field(".", exclude=True)

    @model_validator(mode="after")
    def _distinct_hosts(self) -> VerticalJob:
        names = [host.name for host in self.hosts]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"hosts: names must be distinct, repeated: {', '.join(repeated)}")
        return self

    @property
    def uses_arbiter(self) -> bool:
        """Whether a separate arbiter party holds the key (HeteroLR with ``arbiter = "separate"``)."""
        return self.vertical.algorithm == "hetero_lr" and self.hetero_lr.arbiter == "separate"

    @property
    def peers(self) -> list[str]:
        """Every party but the guest: the hosts, then the arbiter if there is one."""
        return [host.name for host in self.hosts] + ([ARBITER] if self.uses_arbiter else [])

    def host(self, name: str) -> HostSection:
        for host in self.hosts:
            if host.name == name:
                return host
        raise JobError(f"no host {name!r} in this job (hosts: {', '.join(h.name for h in self.hosts)})")

    def data_path(self, data: str) -> Path:
        """A data path from the file, relative to the job file's folder."""
        path = Path(data).expanduser()
        return path if path.is_absolute() else Path(self.source_dir) / path

    def agreement(self) -> dict[str, Any]:
        """What every party must share: the whole job but the data paths (each party's own)."""
        dump = self.model_dump()
        dump["guest"].pop("data")
        for host in dump["hosts"]:
            host.pop("data")
        return dump

    def to_toml(self) -> str:
        """The resolved job (defaults filled in) as TOML; data paths as written."""
        return toml_document(self.model_dump())


def parse_vertical_job(raw: dict[str, Any], *, source: str = "job", source_dir: str | Path = ".") -> VerticalJob:
    """Validate a parsed TOML document; raises :class:`JobError` with a one-line reason."""
    try:
        return VerticalJob.model_validate({**raw, "source_dir": str(source_dir)})
    except ValidationError as exc:
        raise JobError(f"{source}: {_first_error(exc)}") from None


def load_vertical_job(path: str | Path) -> VerticalJob:
    """Read and validate a vertical job file."""
    path = Path(path)
    raw = read_toml(path)
    if "source_dir" in raw:
        raise JobError(f"{path}: source_dir: unknown key")
    return parse_vertical_job(raw, source=str(path), source_dir=path.parent)
