"""Data that would cost memory or leave half a run behind: gzip bombs, splits with an empty part,
a NumPy array named like an archive (issue 12, causes 2, 8 and 13)."""

from __future__ import annotations

import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mnistlab.cli import app
from mnistlab.data import idx, load
from mnistlab.data.csv import read_csv, write_csv
from mnistlab.data.dataset import Dataset, Source, make_splits, split
from mnistlab.errors import DataError


def bomb(path: Path, header: bytes, payload_mib: int) -> Path:
    """A gzip file: `header`, then `payload_mib` MiB of zeros (compressed ~1000:1)."""
    stream = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [stream.compress(header)]
    zeros = bytes(1 << 20)
    parts += [stream.compress(zeros) for _ in range(payload_mib)]
    path.write_bytes(b"".join([*parts, stream.flush()]))
    return path


def peak_mib(read, path: Path) -> tuple[str, float]:
    """(the DataError's message, the peak of Python's memory while `read(path)` ran, MiB)."""
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as info:
            read(path)
        return str(info.value), tracemalloc.get_traced_memory()[1] / (1 << 20)
    finally:
        tracemalloc.stop()


def test_an_idx_gzip_bomb_is_read_no_further_than_its_header_declares(tmp_path):
    """Cause 2: the whole member was decompressed before the header was read (a 2 MB .gz took
    4.2 GB). 10 images of 28×28 declared, 200 MiB delivered: refused within a few MiB."""
    path = bomb(tmp_path / "train-images-idx3-ubyte.gz",
                b"\0\0\x08\x03" + struct.pack(">3I", 10, 28, 28), 200)
    assert path.stat().st_size < 300_000
    message, peak = peak_mib(idx.read_images, path)
    assert "the gzip payload is longer than its IDX header declares" in message
    assert peak < 16


def test_a_gzip_bomb_of_any_other_file_stops_at_the_payload_limit(tmp_path, monkeypatch):
    """A gzipped CSV has no header to trust: it may not decompress past MAX_PAYLOAD."""
    monkeypatch.setattr(idx, "MAX_PAYLOAD", 8 << 20)
    path = bomb(tmp_path / "train.csv.gz", b"label,pixel0\n", 100)
    message, peak = peak_mib(read_csv, path)
    assert f"the gzip payload is longer than mnistlab reads ({8 << 20} bytes)" in message
    assert peak < 32


def test_honest_trailing_bytes_are_still_counted(tmp_path):
    """Within the slack past the declared size, the reader still says exactly how many bytes
    follow (as for an uncompressed file)."""
    images = np.zeros((2, 3, 3), np.uint8)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(zlib.compress(idx.encode(images) + b"12345", wbits=16 + zlib.MAX_WBITS))
    with pytest.raises(DataError, match="5 unexpected bytes follow"):
        idx.read_images(path)


def dataset(n: int) -> Dataset:
    images = np.zeros((n, 28, 28), np.uint8)
    return Dataset(images, np.arange(n, dtype=np.int64) % 10, origin="tiny.csv")


@pytest.mark.parametrize(
    ("source", "fraction", "empty"),
    [
        (Source("s", dataset(3), dataset(10)), 0.2, "validation"),
        (Source("s", dataset(3)), 0.2, "test"),
        (Source("s", dataset(30), dataset(10)), 0.9999, "training"),
    ],
)
def test_an_empty_split_is_a_one_line_data_error(source, fraction, empty):
    """Cause 8: a 3-row CSV or val_fraction = 0.9999 left an empty part (a traceback later)."""
    with pytest.raises(DataError) as info:
        make_splits(source, fraction)
    message = str(info.value)
    assert message.startswith(f"tiny.csv: {len(source.train)} labelled rows leave the {empty} "
                              "part empty") and "\n" not in message
    assert len(split(dataset(30), 0.2)[1]) == 10  # an ordinary split is untouched


def test_too_little_data_leaves_no_run_directory(tmp_path):
    """Cause 8: the error comes before the run directory exists (data load first)."""
    write_csv(tmp_path / "tiny.csv", dataset(3), "kaggle")
    result = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "tiny.csv"), "--epochs",
                                      "1", "--device", "cpu", "--out", str(tmp_path / "runs")])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: {tmp_path / 'tiny.csv'}: 3 labelled rows leave")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_a_npy_file_named_npz_is_told_so(tmp_path):
    """Cause 13: a .npy renamed .npz was told "not UTF-8; pass a CSV"."""
    path = tmp_path / "mnist.npz"
    with open(path, "wb") as f:
        np.save(f, np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(DataError) as info:
        load(str(path))
    assert str(info.value).startswith(f"{path}: a single NumPy array (.npy)")
    assert "numpy.savez" in str(info.value) and "UTF-8" not in str(info.value)
