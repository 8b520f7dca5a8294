"""One party's rows for vertical federated learning: a CSV with an ID column, read and checked.

Each party holds a CSV whose rows are people (or accounts, devices...) named by an ID column; the
guest's file also carries the label column. Parties find their common IDs with PSI and
:func:`align` their rows to that list, so row ``i`` is the same person everywhere.
:func:`breast_cancer_split` writes the example: scikit-learn's breast cancer data cut by columns
into a guest and a host file whose IDs only partly overlap.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: Offending values named in an error message before "... and N more".
_NAMED = 5


class VerticalDataError(ValueError):
    """A party's file or rows are unusable: the message says which file, column, line or ID."""


@dataclass(frozen=True)
class PartyData:
    """One party's rows: ``ids[i]`` names row ``i`` of ``features`` (and of ``labels``, guest only)."""

    ids: tuple[str, ...]
    features: np.ndarray
    feature_names: tuple[str, ...]
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        features = np.array(self.features, dtype=np.float64)  # a private, read-only copy
        if features.ndim != 2 or features.shape != (len(self.ids), len(self.feature_names)):
            raise VerticalDataError(
                f"features must be (rows, columns) = ({len(self.ids)}, {len(self.feature_names)}), "
                f"got shape {features.shape}"
            )
        features.flags.writeable = False
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "ids", tuple(self.ids))
        object.__setattr__(self, "feature_names", tuple(self.feature_names))
        if self.labels is not None:
            labels = np.array(self.labels, dtype=np.float64)
            if labels.shape != (len(self.ids),):
                raise VerticalDataError(f"labels must be one per row ({len(self.ids)}), got shape {labels.shape}")
            labels.flags.writeable = False
            object.__setattr__(self, "labels", labels)

    def __len__(self) -> int:
        return len(self.ids)


def _named(values: Sequence[str], quote: bool = True) -> str:
    """``'a', 'b', ... and 3 more``: enough to find them, short enough to read."""
    shown = ", ".join(repr(v) if quote else v for v in values[:_NAMED])
    return shown + (f" and {len(values) - _NAMED} more" if len(values) > _NAMED else "")


def _number(raw: str, *, where: str, column: str, line: int, row_id: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not np.isfinite(value):
        raise VerticalDataError(f"{where}: column {column!r}, line {line} (id {row_id!r}): "
                                f"{raw!r} is not a finite number")
    return value


def load_party_csv(path: str | Path, id_column: str, label_column: str | None = None) -> PartyData:
    """Read one party's CSV (header row first): the ID column, the label column if this is the
    guest (``label_column`` given), and every other column as a numeric feature, in file order."""
    path = Path(path)
    where = path.name
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.reader(handle))
    if not rows or not any(cell.strip() for cell in rows[0]):
        raise VerticalDataError(f"{where}: empty file (expected a header row naming the columns)")
    header = [cell.strip() for cell in rows[0]]
    repeated = [name for name, count in Counter(header).items() if count > 1]
    if repeated:
        raise VerticalDataError(f"{where}: repeated column names {_named(repeated)}")
    if id_column not in header:
        raise VerticalDataError(f"{where}: no ID column {id_column!r} (columns: {_named(header)})")
    if label_column is not None and label_column not in header:
        raise VerticalDataError(f"{where}: no label column {label_column!r}; the guest's file must carry "
                                f"the labels (columns: {_named(header)})")
    id_at = header.index(id_column)
    label_at = header.index(label_column) if label_column is not None else None
    feature_at = [i for i in range(len(header)) if i not in (id_at, label_at)]
    if not feature_at:
        raise VerticalDataError(f"{where}: no feature columns besides the ID and label")
    body = [(line, row) for line, row in enumerate(rows[1:], start=2) if any(cell.strip() for cell in row)]
    if not body:
        raise VerticalDataError(f"{where}: a header but no data rows")

    ids: list[str] = []
    features = np.empty((len(body), len(feature_at)), dtype=np.float64)
    labels = np.empty(len(body), dtype=np.float64) if label_at is not None else None
    for r, (line, row) in enumerate(body):
        if len(row) != len(header):
            raise VerticalDataError(f"{where}: line {line} has {len(row)} fields, the header {len(header)}")
        row_id = row[id_at].strip()
        if not row_id:
            raise VerticalDataError(f"{where}: line {line} has an empty ID")
        ids.append(row_id)
        for c, at in enumerate(feature_at):
            features[r, c] = _number(row[at], where=where, column=header[at], line=line, row_id=row_id)
        if labels is not None and label_at is not None:
            labels[r] = _number(row[label_at], where=where, column=header[label_at], line=line, row_id=row_id)
    _check_unique(where, ids)
    log.info("%s: %d rows, %d features%s", where, len(ids), len(feature_at), ", labelled" if labels is not None else "")
    return PartyData(tuple(ids), features, tuple(header[i] for i in feature_at), labels)


def read_ids(path: str | Path, id_column: str) -> list[str]:
    """The ID column of a CSV (header row first), for PSI: non-empty and unique."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = [cell.strip() for cell in next(reader, [])]
        if id_column not in header:
            raise VerticalDataError(f"{path.name}: no ID column {id_column!r} (columns: {_named(header)})")
        at = header.index(id_column)
        ids = []
        for line, row in enumerate(reader, start=2):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) <= at or not row[at].strip():
                raise VerticalDataError(f"{path.name}: line {line} has no ID")
            ids.append(row[at].strip())
    if not ids:
        raise VerticalDataError(f"{path.name}: no IDs")
    _check_unique(path.name, ids)
    return ids


def _check_unique(where: str, ids: Sequence[str]) -> None:
    duplicates = [f"{i!r} ({count} times)" for i, count in Counter(ids).items() if count > 1]
    if duplicates:
        raise VerticalDataError(f"{where}: IDs must be unique; repeated: {_named(duplicates, quote=False)}")


def align(party: PartyData, ids: Sequence[str]) -> PartyData:
    """``party``'s rows for ``ids``, in that order (e.g. the PSI intersection, or a train split of it)."""
    ids = tuple(ids)
    repeated = [i for i, count in Counter(ids).items() if count > 1]
    if repeated:
        raise VerticalDataError(f"the ID list to align to repeats {_named(repeated)}")
    row_of = {row_id: row for row, row_id in enumerate(party.ids)}
    missing = [i for i in ids if i not in row_of]
    if missing:
        raise VerticalDataError(f"{len(missing)} IDs to align to are not this party's: {_named(missing)}")
    rows = np.fromiter((row_of[i] for i in ids), dtype=np.int64, count=len(ids))
    labels = party.labels[rows] if party.labels is not None else None
    return PartyData(ids, party.features[rows], party.feature_names, labels)


def breast_cancer_split(out_dir: str | Path, overlap: float = 0.8, seed: int = 0) -> tuple[Path, Path]:
    """Write scikit-learn's breast cancer data (569 rows) as ``guest.csv`` (``id``, ``label``, the 10
    "mean" features) and ``host.csv`` (``id``, the 20 "error" and "worst" features).

    A fraction ``overlap`` of the people is in both files; the rest is split evenly between
    guest-only and host-only rows (``overlap = 0.8``: each side misses a different 10 %), so the
    parties must intersect their IDs first. Rows are shuffled per file. Deterministic for ``seed``.
    """
    from sklearn.datasets import load_breast_cancer  # bundled with scikit-learn: no download

    if not 0 < overlap <= 1:
        raise VerticalDataError(f"overlap must be in (0, 1], got {overlap}")
    data = load_breast_cancer()
    x, y = np.asarray(data.data, dtype=np.float64), np.asarray(data.target, dtype=np.int64)
    names = [str(name).replace(" ", "_") for name in data.feature_names]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    shared = round(overlap * len(y))
    rest = order[shared:]
    guest_rows = rng.permutation(np.concatenate([order[:shared], rest[: len(rest) // 2]]))
    host_rows = rng.permutation(np.concatenate([order[:shared], rest[len(rest) // 2 :]]))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    guest_path, host_path = out / "guest.csv", out / "host.csv"
    _write(guest_path, ["id", "label", *names[:10]],
           ([f"bc-{i:04d}", str(y[i]), *map(repr, x[i, :10].tolist())] for i in guest_rows))
    _write(host_path, ["id", *names[10:]], ([f"bc-{i:04d}", *map(repr, x[i, 10:].tolist())] for i in host_rows))
    return guest_path, host_path


def _write(path: Path, header: list[str], rows: Iterable[list[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
