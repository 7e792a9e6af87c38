"""CSV: layout detection for each published layout, round trips, and every validation message."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from mnistlab.data import csv, idx
from mnistlab.errors import DataError

KAGGLE_HEADER = "label," + ",".join(f"pixel{i}" for i in range(784))
H = "label,pixel0,pixel1,pixel2,pixel3\n"
# Excel/R style: byte-order mark, quoted header, CRLF, a space, trailing blank lines.
BOM_QUOTED_CRLF = (
    '\ufeff"label","pixel0","pixel1","pixel2","pixel3"\r\n5,0,1,2,255\r\n3, 9,8,7,6\r\n\r\n\n'
)
MNIST_HEADER = "label," + ",".join(f"{r}x{c}" for r in range(1, 29) for c in range(1, 29))


def write_text(tmp_path, text: str, name: str = "d.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def assert_equal(a, b) -> None:
    np.testing.assert_array_equal(a.images, b.images)
    if b.labels is None:
        assert a.labels is None
    else:
        np.testing.assert_array_equal(a.labels, b.labels)


@pytest.mark.parametrize(
    ("layout", "labelled", "first_line"),
    [
        ("kaggle", True, KAGGLE_HEADER),  # Kaggle Digit Recognizer train.csv
        ("kaggle", False, KAGGLE_HEADER.removeprefix("label,")),  # Kaggle test.csv
        ("mnist", True, MNIST_HEADER),  # "MNIST in CSV" with its header
        ("plain", True, None),  # "MNIST in CSV" without a header
        ("plain", False, None),
    ],
)
def test_layouts_are_detected_and_round_trip(tmp_path, make_dataset, layout, labelled, first_line):
    dataset = make_dataset(9, labelled=labelled)
    path = tmp_path / "d.csv"
    csv.write_csv(path, dataset, layout)
    lines = path.read_text().splitlines()
    assert len(lines) == 9 + (first_line is not None)
    if first_line is not None:
        assert lines[0] == first_line
    assert_equal(csv.read_csv(path), dataset)


def test_hand_written_files_of_each_layout(tmp_path):
    expected = np.array([[[0, 1], [2, 255]], [[9, 8], [7, 6]]], np.uint8)
    texts = {
        "label,pixel0,pixel1,pixel2,pixel3\n5,0,1,2,255\n3,9,8,7,6\n": [5, 3],
        "pixel0,pixel1,pixel2,pixel3\n0,1,2,255\n9,8,7,6\n": None,
        "label,1x1,1x2,2x1,2x2\n5,0,1,2,255\n3,9,8,7,6\n": [5, 3],
        "5,0,1,2,255\n3,9,8,7,6\n": [5, 3],
        BOM_QUOTED_CRLF: [5, 3],
    }
    for text, labels in texts.items():
        dataset = csv.read_csv(write_text(tmp_path, text))
        np.testing.assert_array_equal(dataset.images, expected)
        assert (dataset.labels is None) == (labels is None)
        if labels is not None:
            assert dataset.labels.tolist() == labels and dataset.labels.dtype == np.int64


def test_gzipped_csv(tmp_path, make_dataset):
    dataset = make_dataset(5, side=3)
    (tmp_path / "d.csv.gz").write_bytes(gzip.compress(csv.encode(dataset)))
    assert_equal(csv.read_csv(tmp_path / "d.csv.gz"), dataset)


def test_rows_across_parse_blocks(tmp_path, make_dataset):
    dataset = make_dataset(2 * csv._BLOCK + 3, side=2)
    csv.write_csv(tmp_path / "d.csv", dataset)
    assert_equal(csv.read_csv(tmp_path / "d.csv"), dataset)


def test_named_classes_bound_the_labels(tmp_path):
    path = write_text(tmp_path, "11,0,0,0,0\n")
    assert csv.read_csv(path, classes=tuple("abcdefghijkl")).labels.tolist() == [11]
    with pytest.raises(DataError, match=r"label 11 is outside 0\.\.9"):
        csv.read_csv(path)


@pytest.mark.parametrize(
    ("text", "where", "fragments"),
    [
        (
            H + "1,0,0,0,0\n2,0,,0,0\n",
            "line 3, column 3",
            ["empty cell in column 'pixel1'", "fill in"],
        ),
        (H + "1,0,0,0,NA\n", "line 2, column 5", ["null value 'NA' in column 'pixel3'"]),
        (H + "1,0,0,0,null\n", "line 2, column 5", ["null value 'null'"]),
        (
            H + "1,0,x7,0,0\n",
            "line 2, column 3",
            ["pixel value 'x7' in column 'pixel1' is not a whole"],
        ),
        (H + "1,0,0,0,0.5\n", "line 2, column 5", ["'0.5'", "not a whole number", "0..255"]),
        (H + "1,0,0,0,0\n1,0,0,0\n", "line 3", ["4 columns where the header has 5"]),
        (H + "1,0,0,0,0,0\n", "line 2", ["6 columns where the header has 5"]),
        (
            H + "1,0,0,256,0\n",
            "line 2, column 4",
            ["pixel value 256 in column 'pixel2' is outside 0..255"],
        ),
        (H + "1,-1,0,0,0\n", "line 2, column 2", ["pixel value -1", "outside 0..255"]),
        (H + "1,0,0,0," + "9" * 5000, "line 2, column 5", ["pixel value 99999999999999999... in"]),
        (
            H + "1,0,0,0," + "x" * 5000,
            "line 2, column 5",
            ["pixel value 'xxxxxxxxxxxxxxxxx...' in"],
        ),
        (H + "1,0,0,0,0\n\n10,0,0,0,0\n", "line 4, column 1", ["label 10 is outside 0..9"]),
        (
            H + "3.0,0,0,0,0\n",
            "line 2, column 1",
            ["label '3.0' in column 'label' is not a whole number"],
        ),
        ("1,0,0,0,0\n2,0,0,0,999\n", "line 2, column 5", ["pixel value 999 in column 'pixel3'"]),
        ("1,0,0,0,0\n2,0,0,0\n", "line 2", ["4 columns where the first row has 5"]),
        ("", None, ["file is empty"]),
        ("\n  \n", None, ["file is empty"]),
        (H + "\n", None, ["header but no data rows"]),
        ("1,2,3\n", "line 1", ["3 columns are neither a square image", "Kaggle header"]),
        ("label,pixel0,pixel1\n", "line 1", ["2 pixel columns, not a square"]),
        (
            "label,pixel0,pixel1,pixel3,pixel2\n",
            "line 1, column 4",
            ["'pixel3' should be 'pixel2'"],
        ),
        ("label,1x1,1x2,2x2,2x1\n", "line 1, column 4", ["'2x2' should be '2x1'"]),
    ],
)
def test_validation_errors(tmp_path, text, where, fragments):
    path = write_text(tmp_path, text)
    with pytest.raises(DataError) as info:
        csv.read_csv(path)
    message = str(info.value)
    assert "\n" not in message and ";" in message  # one line: problem; fix
    assert message.startswith(f"{path}:{where}: " if where else f"{path}: ")
    for fragment in fragments:
        assert fragment in message


def test_not_utf8_names_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"1,0,0,0,0\n2,0,\xff,0,0\n")
    with pytest.raises(DataError, match=r"d\.csv:line 2: not UTF-8 text \(byte 14\)"):
        csv.read_csv(path)


def test_high_code_points_are_a_data_error_not_a_crash(tmp_path):
    # np.loadtxt (NumPy 2.4) segfaults on U+10CC6A; the reader must never hand it such text.
    path = write_text(tmp_path, "\U0010cc6a\n")
    with pytest.raises(DataError, match="line 1, column 1: pixel value '\U0010cc6a'"):
        csv.read_csv(path)


def test_late_error_is_located_precisely(tmp_path, make_dataset):
    lines = csv.encode(make_dataset(3 * csv._BLOCK, side=2)).decode().splitlines()
    lines[2 * csv._BLOCK + 7] = "4,1,2,3,abc"
    path = write_text(tmp_path, "\n".join(lines))
    with pytest.raises(
        DataError, match=rf":line {2 * csv._BLOCK + 8}, column 5: pixel value 'abc'"
    ):
        csv.read_csv(path)


def test_writer_rejects_unknown_layout_and_non_square(tmp_path, make_dataset):
    with pytest.raises(ValueError, match="layout"):
        csv.write_csv(tmp_path / "d.csv", make_dataset(2), "excel")  # type: ignore[arg-type]
    wide = make_dataset(2)
    with pytest.raises(ValueError, match="square"):
        csv.encode(type(wide)(wide.images[:, :, :27], wide.labels))


def test_real_mnist_as_each_layout(tmp_path, mnist_dir):
    real = idx.read_idx(
        mnist_dir / "t10k-images-idx3-ubyte.gz", mnist_dir / "t10k-labels-idx1-ubyte.gz"
    )
    part = real.subset(np.arange(500))
    for layout in csv.LAYOUTS:
        csv.write_csv(tmp_path / f"{layout}.csv", part, layout)
        assert_equal(csv.read_csv(tmp_path / f"{layout}.csv"), part)
    assert (tmp_path / "kaggle.csv").read_text().startswith(KAGGLE_HEADER + "\n7,0,0,")
