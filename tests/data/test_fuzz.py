"""Property tests: any bytes given to a reader give a valid result or a DataError, nothing else.

Inputs are random bytes/text and valid files that were then truncated, had a byte flipped, or had
bytes inserted or appended: the damage real downloads and hand edits produce. Unharmed files must
read back exactly as written.
"""

from __future__ import annotations

import gzip
import io
import os
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mnistlab.data import csv, idx, npz
from mnistlab.data.dataset import Dataset
from mnistlab.errors import DataError

FUZZ = settings(
    max_examples=int(os.environ.get("MNISTLAB_FUZZ_EXAMPLES", 150)), deadline=timedelta(seconds=2)
)
pytestmark = pytest.mark.timeout(120)  # a hang fails the test instead of stalling the run


@st.composite
def datasets(draw: st.DrawFn, square: bool = False, unlabelled: bool = False) -> Dataset:
    n, height = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    width = height if square else draw(st.integers(1, 4))
    pixels = draw(st.binary(min_size=n * height * width, max_size=n * height * width))
    images = np.frombuffer(pixels, np.uint8).reshape(n, height, width).copy()
    labels = np.array(draw(st.lists(st.integers(0, 9), min_size=n, max_size=n)), np.int64)
    return Dataset(images, None if unlabelled and draw(st.booleans()) else labels)


@st.composite
def damaged(draw: st.DrawFn, data: bytes) -> tuple[bytes, bool]:
    """(bytes, intact): `data` itself, or truncated / one byte flipped / bytes inserted or added."""
    how = draw(st.sampled_from(["intact", "truncate", "flip", "insert", "append"]))
    at = draw(st.integers(0, len(data) - 1))
    extra = draw(st.binary(min_size=1, max_size=8))
    damage = {
        "intact": lambda: data,
        "truncate": lambda: data[:at],
        "flip": lambda: data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :],
        "insert": lambda: data[:at] + extra + data[at:],
        "append": lambda: data + extra,
    }
    return damage[how](), how == "intact"


JUNK = st.binary(max_size=64)


def cases(encode, junk: st.SearchStrategy[bytes] = JUNK, **kinds):
    """(dataset, bytes, intact): an encoded dataset, maybe damaged, or (None, junk, False)."""
    encoded = datasets(**kinds).flatmap(lambda d: damaged(encode(d)).map(lambda r: (d, *r)))
    return encoded | junk.map(lambda b: (None, b, False))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "input"


def read(reader, path, data: bytes):
    """reader(path) on `data`, or None when it raised DataError (any other exception fails)."""
    path.write_bytes(data)
    try:
        return reader(path)
    except DataError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
        return None


def check_images(path, case) -> None:
    dataset, data, intact = case
    images = read(idx.read_images, path, data)
    if intact:
        np.testing.assert_array_equal(images, dataset.images)
    elif images is not None:
        assert images.dtype == np.uint8 and images.ndim == 3 and images.size > 0


@FUZZ
@given(cases(lambda d: idx.encode(d.images)))
def test_idx_raw_images(scratch, case):
    check_images(scratch, case)


@FUZZ
@given(cases(lambda d: gzip.compress(idx.encode(d.images))))
def test_idx_gz_images(scratch, case):
    check_images(scratch, case)


@FUZZ
@given(cases(lambda d: idx.encode(d.labels)))
def test_idx_labels(scratch, case):
    dataset, data, intact = case
    labels = read(idx.read_labels, scratch, data)
    if intact:
        np.testing.assert_array_equal(labels, dataset.labels)
    elif labels is not None:
        assert labels.dtype == np.int64 and labels.ndim == 1 and labels.max() <= 9


# Text near the CSV grammar (digits, separators, signs, nulls, quotes) and any text at all.
CSV_TEXT = st.text(alphabet='0123456789,\n\r +-.xaNl"', max_size=120) | st.text(max_size=60)


@FUZZ
@given(
    cases(
        lambda d: csv.encode(d, csv.LAYOUTS[len(d) % 3]),  # n = 1..4 picks every layout
        junk=CSV_TEXT.map(str.encode) | st.binary(max_size=64),
        square=True,
        unlabelled=True,
    )
)
def test_csv(scratch, case):
    dataset, data, intact = case
    read_back = read(csv.read_csv, scratch, data)
    if intact:
        np.testing.assert_array_equal(read_back.images, dataset.images)
        assert (read_back.labels is None) == (dataset.labels is None)
    elif read_back is not None:
        assert read_back.images.shape[1] == read_back.images.shape[2] and len(read_back) > 0


def npz_bytes(dataset: Dataset) -> bytes:
    out = io.BytesIO()
    np.savez(out, x_train=dataset.images, y_train=dataset.labels.astype(np.uint8))
    return out.getvalue()


@FUZZ
@given(cases(npz_bytes))
def test_npz(scratch, case):
    dataset, data, intact = case
    parts = read(npz.read_npz, scratch, data)
    if intact:
        np.testing.assert_array_equal(parts[0].images, dataset.images)
    elif parts is not None:
        assert parts[0].images.dtype == np.uint8 and parts[1] is None
