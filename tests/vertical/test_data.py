"""Per-party CSV loading, alignment and the breast cancer example split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer

from fedcrypt.vertical.data import PartyData, VerticalDataError, align, breast_cancer_split, load_party_csv


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return breast_cancer_split(tmp_path_factory.mktemp("bc"))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "party.csv"
    path.write_text(text, encoding="utf-8")
    return path


def test_split_is_the_breast_cancer_data_cut_by_columns_with_partly_overlapping_ids(split: tuple[Path, Path]) -> None:
    guest = load_party_csv(split[0], "id", "label")
    host = load_party_csv(split[1], "id")
    data = load_breast_cancer()
    assert guest.features.shape == (512, 10) and host.features.shape == (512, 20) and host.labels is None
    assert guest.feature_names[0] == "mean_radius" and "label" not in guest.feature_names
    assert host.feature_names[0] == "radius_error" and host.feature_names[-1] == "worst_fractal_dimension"
    common = set(guest.ids) & set(host.ids)
    assert len(common) == 455  # 80 % of 569 in both files, 10 % only in each
    assert len(set(guest.ids) - common) == len(set(host.ids) - common) == 57
    assert guest.ids != tuple(sorted(guest.ids))  # shuffled: rows must be aligned, not assumed
    rows = np.array([int(i.split("-")[1]) for i in guest.ids])
    np.testing.assert_array_equal(guest.features, data.data[rows, :10])  # exact round trip of the floats
    np.testing.assert_array_equal(guest.labels, data.target[rows])
    host_rows = np.array([int(i.split("-")[1]) for i in host.ids])
    np.testing.assert_array_equal(host.features, data.data[host_rows, 10:])


def test_split_is_deterministic_and_overlap_is_configurable(split: tuple[Path, Path], tmp_path: Path) -> None:
    again = breast_cancer_split(tmp_path / "again")
    assert again[0].read_bytes() == split[0].read_bytes() and again[1].read_bytes() == split[1].read_bytes()
    guest, host = (load_party_csv(p, "id") for p in breast_cancer_split(tmp_path / "half", overlap=0.5))
    assert len(set(guest.ids) & set(host.ids)) == 284  # round(0.5 * 569)
    with pytest.raises(VerticalDataError, match="overlap"):
        breast_cancer_split(tmp_path / "bad", overlap=0.0)


def test_align_reorders_rows_to_an_id_list(split: tuple[Path, Path]) -> None:
    guest = load_party_csv(split[0], "id", "label")
    host = load_party_csv(split[1], "id")
    common = sorted(set(guest.ids) & set(host.ids))
    g, h = align(guest, common), align(host, common)
    assert g.ids == h.ids == tuple(common)
    row = guest.ids.index(common[7])
    np.testing.assert_array_equal(g.features[7], guest.features[row])
    assert g.labels is not None and guest.labels is not None and g.labels[7] == guest.labels[row]
    with pytest.raises(VerticalDataError, match=r"2 IDs to align to are not this party's: 'nobody', 'ghost'"):
        align(host, [common[0], "nobody", "ghost"])
    with pytest.raises(VerticalDataError, match="repeats"):
        align(host, [common[0], common[0]])


def test_party_data_is_read_only_and_checks_shapes() -> None:
    party = PartyData(("a", "b"), np.array([[1.0], [2.0]]), ("x",), np.array([0, 1]))
    with pytest.raises(ValueError):
        party.features[0, 0] = 5.0
    with pytest.raises(VerticalDataError, match="features must be"):
        PartyData(("a",), np.zeros((2, 1)), ("x",))
    with pytest.raises(VerticalDataError, match="labels must be one per row"):
        PartyData(("a",), np.zeros((1, 1)), ("x",), np.zeros(2))


def test_loads_ids_as_strings_labels_and_features_in_file_order(tmp_path: Path) -> None:
    party = load_party_csv(_write(tmp_path, "b,id,y,a\n1.5,007,1,-2\n3,x9,0,1e3\n"), "id", "y")
    assert party.ids == ("007", "x9") and party.feature_names == ("b", "a")
    np.testing.assert_array_equal(party.features, [[1.5, -2.0], [3.0, 1000.0]])
    assert party.labels is not None and party.labels.tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    ("text", "label", "message"),
    [
        ("", None, "empty file"),
        ("\n\n", None, "empty file"),
        ("id,a\n", None, "a header but no data rows"),
        ("key,a\n1,2\n", None, "no ID column 'id'"),
        ("id,a\n1,2\n", "label", "no label column 'label'; the guest's file must carry the labels"),
        ("id,a,a\n1,2,3\n", None, "repeated column names 'a'"),
        ("id\n1\n", None, "no feature columns"),
        ("id,a\n1,2\n2,3,4\n", None, "line 3 has 3 fields, the header 2"),
        ("id,a\n1,2\n ,3\n", None, "line 3 has an empty ID"),
        ("id,a,b\n1,2,3\n2,oops,4\n", None, r"column 'a', line 3 \(id '2'\): 'oops' is not a finite number"),
        ("id,a,b\n1,2,nan\n", None, r"column 'b', line 2 \(id '1'\): 'nan' is not a finite number"),
        ("id,a,b\n1,2,\n", None, r"column 'b', line 2 \(id '1'\): '' is not a finite number"),
        ("id,a\n1,inf\n", None, "'inf' is not a finite number"),
        ("id,y,a\n1,yes,2\n", "y", r"column 'y', line 2 \(id '1'\): 'yes'"),
        ("id,a\nu1,1\nu2,2\nu1,3\nu3,4\nu2,5\nu1,6\n", None,
         r"IDs must be unique; repeated: 'u1' \(3 times\), 'u2' \(2 times\)"),
    ],
)
def test_bad_files_raise_clear_errors(tmp_path: Path, text: str, label: str | None, message: str) -> None:
    with pytest.raises(VerticalDataError, match=message) as info:
        load_party_csv(_write(tmp_path, text), "id", label)
    assert "party.csv" in str(info.value)  # every message names the file


def test_many_duplicates_are_summarized(tmp_path: Path) -> None:
    rows = "".join(f"d{i},{i}\nd{i},{i}\n" for i in range(8))
    with pytest.raises(VerticalDataError, match=r"'d4' \(2 times\) and 3 more"):
        load_party_csv(_write(tmp_path, "id,a\n" + rows), "id")
