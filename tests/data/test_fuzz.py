"""Property tests: any bytes given to a reader give a valid result or a DataError, nothing else.

Inputs are random bytes/text and valid files that were then truncated, had a byte flipped, or had
bytes inserted or appended: the damage real downloads and hand edits produce. Unharmed files must
read back exactly as written.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import tracemalloc
import zipfile
import zlib
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mnistlab.data import csv, idx, load, npz
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


# --- issue 26: large declared sizes and special files -----------------------------------------

LARGE = settings(max_examples=max(20, FUZZ.max_examples // 5), deadline=timedelta(seconds=10))


def bounded_read(reader, path, data: bytes, mib: int = 48):
    """`read` with Python's memory traced: what a file declares costs nothing until its bytes
    are there (a header's sizes, a zip member's shape, a gzip stream's ratio)."""
    tracemalloc.start()
    try:
        return read(reader, path, data)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < mib << 20, f"{peak} bytes"


def zeros_gzip(head: bytes, mib: int) -> bytes:
    """`head`, then `mib` MiB of zero bytes, gzipped at ~1000:1."""
    stream = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [stream.compress(head), *(stream.compress(bytes(1 << 20)) for _ in range(mib))]
    return b"".join([*parts, stream.flush()])


@LARGE
@given(dims=st.tuples(st.integers(1, 2**32 - 1), st.integers(1, 2**16), st.integers(1, 2**16)),
       mib=st.integers(0, 40))
def test_idx_declaring_any_size(scratch, dims, mib):
    header = b"\0\0\x08\x03" + struct.pack(">3I", *dims)
    images = bounded_read(idx.read_images, scratch, zeros_gzip(header, mib))
    if images is not None:
        assert images.shape == dims


@LARGE
@given(shape=st.lists(st.integers(0, 2**20), min_size=1, max_size=3),
       dtype=st.sampled_from(["|u1", "<i8", "<f8"]), mib=st.integers(0, 40))
def test_npz_member_declaring_any_size(scratch, shape, dtype, mib):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        with archive.open("x_train.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": dtype, "fortran_order": False, "shape": tuple(shape)})
            for _ in range(mib):
                f.write(bytes(1 << 20))
        with archive.open("y_train.npy", "w") as f:
            np.lib.format.write_array(f, np.zeros(3, np.uint8))
    bounded_read(npz.read_npz, scratch.with_suffix(".npz"), buffer.getvalue())


@settings(LARGE, deadline=timedelta(seconds=60))
@given(line=st.sampled_from([b"0\n", b"\n", b"1,2,3,4\n", b"label\n", b"0," * 784 + b"0\n"]),
       mib=st.integers(1, 2) | st.integers(17, 64))
def test_csv_gzip_of_any_ratio(scratch, line, mib):
    """Repeated lines compress ~1000:1: refused past the ratio cap (16 MiB here), never parsed
    into GBs; below it (1-2 MiB: up to a million rows) read in bounded memory."""
    stream = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    unit = line * max(1, (1 << 20) // len(line))
    data = b"".join([*(stream.compress(unit) for _ in range(mib)), stream.flush()])
    bounded_read(csv.read_csv, scratch.with_suffix(".csv.gz"), data, mib=96)


READERS = [idx.read_images, idx.read_labels, csv.read_csv, npz.read_npz, load]
SPECIAL = [(reader, kind) for reader in READERS
           for kind in ("fifo", "folder", "/dev/zero", "/dev/null")
           if not (reader is load and kind == "folder")]  # a folder is a source to `load`


@pytest.mark.parametrize(("reader", "kind"), SPECIAL)
def test_special_files_are_refused_without_waiting(tmp_path, reader, kind):
    path = Path(kind) if kind.startswith("/") else tmp_path / kind
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    with pytest.raises(DataError) as info:
        reader(str(path))
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert "not a regular file" in str(info.value)
