"""Per-client label statistics of a partition, and a rich table to show them."""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from rich import box
from rich.table import Table

# Above this many classes the table shows a one-cell histogram instead of one column per class.
MAX_CLASS_COLUMNS = 20
_BARS = "▁▂▃▄▅▆▇█"
_EMPTY_BAR = "·"


@dataclass(frozen=True)
class ClientSummary:
    """How many samples of each class one client holds."""

    client: int
    num_samples: int
    label_counts: tuple[int, ...]


def summarize(partitions: Sequence[np.ndarray], labels: np.ndarray, num_classes: int) -> list[ClientSummary]:
    """Count samples per class for each client's index array."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
    return [
        ClientSummary(
            client=client,
            num_samples=len(indices),
            label_counts=tuple(int(c) for c in np.bincount(labels[indices], minlength=num_classes)),
        )
        for client, indices in enumerate(partitions)
    ]


def _histogram(counts: Sequence[int]) -> str:
    """One bar character per class, scaled to the largest count ('·' for none)."""
    peak = max(counts, default=0)
    return "".join(_BARS[-(-len(_BARS) * c // peak) - 1] if c else _EMPTY_BAR for c in counts)


def summary_table(summaries: Sequence[ClientSummary], class_names: Sequence[str] | None = None) -> Table:
    """A rich table with one row per client (samples, per-class counts) and a totals footer."""
    num_classes = len(summaries[0].label_counts) if summaries else len(class_names or ())
    names = tuple(class_names) if class_names is not None else tuple(str(c) for c in range(num_classes))
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names given for {num_classes} classes")
    totals = [sum(s.label_counts[c] for s in summaries) for c in range(num_classes)]
    # No side borders and collapsed padding: ten classes fit an 80-column terminal.
    table = Table(
        title="Client data", show_footer=True, box=box.SIMPLE_HEAVY, pad_edge=False, collapse_padding=True
    )
    table.add_column("client", footer="total", justify="right")
    table.add_column("samples", footer=str(sum(s.num_samples for s in summaries)), justify="right")
    table.add_column("classes", footer=str(sum(1 for t in totals if t)), justify="right")
    per_class = num_classes <= MAX_CLASS_COLUMNS
    if per_class:
        for name, total in zip(names, totals, strict=True):
            table.add_column(name, footer=str(total), justify="right")
    else:
        table.add_column(f"labels {names[0]}..{names[-1]}", footer=_histogram(totals))
    for s in summaries:
        cells = [str(c) for c in s.label_counts] if per_class else [_histogram(s.label_counts)]
        table.add_row(str(s.client), str(s.num_samples), str(sum(1 for c in s.label_counts if c)), *cells)
    return table
