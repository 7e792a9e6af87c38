"""IDX read/write: round trips, gzip detection by content, every header/length/gzip error."""

from __future__ import annotations

import gzip
import hashlib
import shutil
import struct

import numpy as np
import pytest

from mnistlab.data import idx
from mnistlab.errors import DataError

MNIST_MD5 = {
    "t10k-images-idx3-ubyte.gz": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte.gz": "27ae3e4e09519cfbb04c329615203637",
    "train-labels-idx1-ubyte.gz": "a25bea736e30d166cdddb491f175f624",
    "train-images-idx3-ubyte.gz": "6bbc9ace898e44ae57da46a324031adb",
}


def error_of(func, *args) -> str:
    with pytest.raises(DataError) as info:
        func(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
def test_images_round_trip(tmp_path, make_dataset, name):
    images = make_dataset(7, side=5).images
    idx.write(tmp_path / name, images)
    assert (tmp_path / name).read_bytes().startswith(b"\x1f\x8b") == name.endswith(".gz")
    read = idx.read_images(tmp_path / name)
    assert read.dtype == np.uint8 and read.flags.writeable
    np.testing.assert_array_equal(read, images)


def test_pair_round_trip(tmp_path, make_dataset):
    dataset = make_dataset(12, side=3)
    idx.write_idx(tmp_path / "i.gz", tmp_path / "l", dataset)
    read = idx.read_idx(tmp_path / "i.gz", tmp_path / "l")
    np.testing.assert_array_equal(read.images, dataset.images)
    np.testing.assert_array_equal(read.labels, dataset.labels)
    assert read.labels.dtype == np.int64 and read.origin == str(tmp_path / "i.gz")


def test_gzip_detected_by_content_not_name(tmp_path, make_dataset):
    labels = make_dataset(9).labels
    (tmp_path / "zipped-but-unnamed").write_bytes(gzip.compress(idx.encode(labels)))
    (tmp_path / "raw-but-named.gz").write_bytes(idx.encode(labels))
    for name in ("zipped-but-unnamed", "raw-but-named.gz"):
        np.testing.assert_array_equal(idx.read_labels(tmp_path / name), labels)


def test_multi_member_gzip_is_read_whole(tmp_path):
    data = idx.encode(np.arange(10, dtype=np.uint8))
    (tmp_path / "l").write_bytes(gzip.compress(data[:7]) + gzip.compress(data[7:]))
    np.testing.assert_array_equal(idx.read_labels(tmp_path / "l"), np.arange(10))


def header(magic_type: int, ndim: int, *dims: int) -> bytes:
    return struct.pack(">BBBB", 0, 0, magic_type, ndim) + struct.pack(f">{len(dims)}I", *dims)


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        (b"", ["byte 0", "ends inside the 16-byte IDX header"]),
        (header(8, 3, 2, 2), ["byte 12", "ends inside"]),
        (
            header(8, 1, 4) + bytes(4),
            [
                "byte 0",
                "magic number 0x00000801, expected 0x00000803",
                "pass a *-idx3-ubyte images file",
            ],
        ),
        (b"\x1f\x00" + bytes(30), ["byte 0", "not an IDX images file"]),
        (header(0x0D, 3, 1, 1, 1) + bytes(4), ["byte 2", "element type 0x0d", "convert"]),
        (header(8, 3, 0, 28, 28), ["byte 4", "empty array"]),
        (
            header(8, 3, 2, 2, 2) + bytes(7),
            [
                "byte 23",
                "file ends early",
                "2 images of 2x2",
                "ending at byte 24",
                "download the file again",
            ],
        ),
        (header(8, 3, 2, 2, 2) + bytes(10), ["byte 24", "2 unexpected bytes follow"]),
    ],
)
def test_image_header_errors(tmp_path, data, fragments):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(data)
    message = error_of(idx.read_images, path)
    assert message.startswith(f"{path}:byte ")
    for fragment in fragments:
        assert fragment in message


def test_label_out_of_range_names_its_byte(tmp_path):
    path = tmp_path / "l"
    path.write_bytes(idx.encode(np.array([1, 2, 3, 12, 4], np.uint8)))
    message = error_of(idx.read_labels, path)
    assert f"{path}:byte 11: label 12 of item 3 is outside 0..9" in message
    np.testing.assert_array_equal(idx.read_labels(path, num_classes=13), [1, 2, 3, 12, 4])


def test_count_mismatch_names_both_files(tmp_path, make_dataset):
    idx.write(tmp_path / "i", make_dataset(5).images)
    idx.write(tmp_path / "l", make_dataset(4).labels)
    message = error_of(idx.read_idx, tmp_path / "i", tmp_path / "l")
    assert f"{tmp_path / 'l'}: 4 labels for 5 images in {tmp_path / 'i'}" in message


def gz_labels(n: int = 5000) -> bytes:
    labels = np.random.default_rng(0).integers(0, 10, n, dtype=np.uint8)
    return gzip.compress(idx.encode(labels), mtime=0)


@pytest.mark.parametrize(
    ("mangle", "fragments"),
    [
        (lambda gz: gz[:-20], ["gzip stream ends early", "truncated"]),
        (
            lambda gz: gz[:-8] + bytes([gz[-8] ^ 1]) + gz[-7:],
            ["corrupt gzip data", "incorrect data check"],
        ),
        (lambda gz: gz + b"junk", ["4 unexpected bytes after the gzip stream"]),
    ],
)
def test_corrupt_gzip_names_offset(tmp_path, mangle, fragments):
    data = mangle(gz_labels())
    path = tmp_path / "l.gz"
    path.write_bytes(data)
    message = error_of(idx.read_labels, path)
    for fragment in fragments:
        assert fragment in message
    offset = int(message.split(":byte ")[1].split(":")[0])
    assert 0 < offset <= len(data)


def test_crc_error_offset_is_in_the_trailer(tmp_path):
    gz = gz_labels()
    path = tmp_path / "l.gz"
    path.write_bytes(gz[:-8] + bytes([gz[-8] ^ 0xFF]) + gz[-7:])
    offset = int(error_of(idx.read_labels, path).split(":byte ")[1].split(":")[0])
    assert len(gz) - 8 <= offset < len(gz)


def test_unreadable_path(tmp_path):
    assert "cannot read" in error_of(idx.read_images, tmp_path / "missing")


def test_writers_reject_what_idx_cannot_hold(tmp_path, make_dataset):
    with pytest.raises(ValueError, match=r"0\.\.255"):
        idx.write(tmp_path / "l", np.array([1, 256]))
    with pytest.raises(ValueError, match="unlabelled"):
        idx.write_idx(tmp_path / "i", tmp_path / "l", make_dataset(3, labelled=False))


# Real data ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MNIST_MD5))
def test_real_mnist_payload_md5(mnist_dir, name):
    assert hashlib.md5(idx.read_bytes(mnist_dir / name)).hexdigest() == MNIST_MD5[name]


def test_real_mnist_t10k(mnist_dir):
    data = idx.read_idx(
        mnist_dir / "t10k-images-idx3-ubyte.gz", mnist_dir / "t10k-labels-idx1-ubyte.gz"
    )
    assert data.images.shape == (10000, 28, 28)
    assert np.bincount(data.labels).tolist() == [
        980,
        1135,
        1032,
        1010,
        982,
        892,
        958,
        1028,
        974,
        1009,
    ]
    assert data.labels[:5].tolist() == [7, 2, 1, 0, 4]


def test_real_mnist_train(mnist_dir):
    data = idx.read_idx(
        mnist_dir / "train-images-idx3-ubyte.gz", mnist_dir / "train-labels-idx1-ubyte.gz"
    )
    assert data.images.shape == (60000, 28, 28)
    assert np.bincount(data.labels).tolist() == [
        5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949
    ]
    assert data.labels[:5].tolist() == [5, 0, 4, 1, 9]


def test_real_mnist_raw_round_trip(tmp_path, mnist_dir):
    images = idx.read_images(mnist_dir / "t10k-images-idx3-ubyte.gz")
    idx.write(tmp_path / "t10k-images-idx3-ubyte", images)
    assert (
        hashlib.md5((tmp_path / "t10k-images-idx3-ubyte").read_bytes()).hexdigest()
        == (MNIST_MD5["t10k-images-idx3-ubyte.gz"])
    )


def test_real_mnist_truncated_copy(tmp_path, mnist_dir):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    data = (mnist_dir / path.name).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = error_of(idx.read_images, path)
    assert message == (
        f"{path}:byte {len(data) // 2}: gzip stream ends early: the file is truncated; "
        f"{idx.REFETCH}"
    )


def test_real_mnist_flipped_byte(tmp_path, mnist_dir):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    shutil.copy(mnist_dir / path.name, path)
    data = bytearray(path.read_bytes())
    flip = len(data) // 2
    data[flip] ^= 0xFF
    path.write_bytes(data)
    message = error_of(idx.read_images, path)
    assert message.startswith(f"{path}:byte ") and "corrupt gzip data" in message
    assert flip <= int(message.split(":byte ")[1].split(":")[0]) < len(data)


def test_real_fashion_mnist(fashion_dir):
    train = idx.read_idx(
        fashion_dir / "train-images-idx3-ubyte.gz", fashion_dir / "train-labels-idx1-ubyte.gz"
    )
    test = idx.read_idx(
        fashion_dir / "t10k-images-idx3-ubyte.gz", fashion_dir / "t10k-labels-idx1-ubyte.gz"
    )
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
