"""Partition summaries and their rich table."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from rich.table import Table

from fedcrypt.data import ClientSummary, partition, summarize, summary_table


def render(table: Table) -> str:
    console = Console(record=True, width=200)
    console.print(table)
    return console.export_text()


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 10), st.integers(1, 8), st.integers(0, 1000))
def test_counts_add_up(num_classes: int, num_clients: int, seed: int) -> None:
    labels = np.random.default_rng(seed).integers(0, num_classes, 200)
    parts = partition(labels, num_clients, "quantity", seed=seed)
    summaries = summarize(parts, labels, num_classes)
    assert [s.client for s in summaries] == list(range(num_clients))
    for s, part in zip(summaries, parts, strict=True):
        assert s.num_samples == len(part) == sum(s.label_counts)
        assert len(s.label_counts) == num_classes
        assert s.label_counts == tuple(np.bincount(labels[part], minlength=num_classes))
    assert np.sum([s.label_counts for s in summaries], axis=0).tolist() == np.bincount(
        labels, minlength=num_classes
    ).tolist()


def test_summarize_rejects_labels_outside_classes() -> None:
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.1"):
        summarize([np.arange(3)], np.array([0, 1, 2]), 2)


def cells(line: str) -> list[str]:
    return line.split()


def test_table_has_rows_per_client_and_totals() -> None:
    summaries = [ClientSummary(0, 5, (4, 1, 0)), ClientSummary(1, 7, (0, 2, 5))]
    lines = render(summary_table(summaries, ["cat", "dog", "eel"])).splitlines()
    header = next(line for line in lines if "client" in line)
    assert cells(header) == ["client", "samples", "classes", "cat", "dog", "eel"]
    rows = [cells(line) for line in lines if cells(line) and cells(line)[0] in ("0", "1", "total")]
    assert rows == [
        ["0", "5", "2", "4", "1", "0"],
        ["1", "7", "2", "0", "2", "5"],
        ["total", "12", "3", "4", "3", "5"],
    ]


def test_table_uses_histogram_for_many_classes() -> None:
    counts = tuple([0] * 29 + [8])
    text = render(summary_table([ClientSummary(0, 8, counts)]))
    assert "labels 0..29" in text
    assert "·" * 29 + "█" in text


def test_table_rejects_wrong_number_of_class_names() -> None:
    with pytest.raises(ValueError, match="2 class names given for 3 classes"):
        summary_table([ClientSummary(0, 1, (1, 0, 0))], ["a", "b"])
