"""NPZ in the Keras mnist.npz layout: round trips; missing, misshaped or out-of-range arrays."""

from __future__ import annotations

import numpy as np
import pytest

from mnistlab.data import idx, npz
from mnistlab.errors import DataError


def keras_arrays(n: int = 6, side: int = 4) -> dict[str, np.ndarray]:
    """The arrays of a Keras mnist.npz in miniature: uint8 images and uint8 labels."""
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.integers(0, 256, (n, side, side), dtype=np.uint8),
        "y_train": (np.arange(n) % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n // 2, side, side), dtype=np.uint8),
        "y_test": (np.arange(n // 2) % 10).astype(np.uint8),
    }


def save(tmp_path, **arrays):
    path = tmp_path / "mnist.npz"
    np.savez(path, **arrays)
    return path


def test_keras_layout_is_read(tmp_path):
    arrays = keras_arrays()
    train, test = npz.read_npz(save(tmp_path, **arrays))
    np.testing.assert_array_equal(train.images, arrays["x_train"])
    np.testing.assert_array_equal(test.labels, arrays["y_test"])
    assert train.labels.dtype == np.int64 and test.images.dtype == np.uint8
    assert train.origin.endswith("mnist.npz:train")


def test_train_only_and_wider_integer_dtypes(tmp_path):
    arrays = keras_arrays()
    x, y = arrays["x_train"].astype(np.int32), arrays["y_train"].astype(np.int64)
    train, test = npz.read_npz(save(tmp_path, x_train=x, y_train=y))
    assert test is None and train.images.dtype == np.uint8
    np.testing.assert_array_equal(train.images, x)


@pytest.mark.parametrize("with_test", [True, False])
def test_round_trip(tmp_path, make_dataset, with_test):
    train, test = make_dataset(8, side=5), make_dataset(4, side=5, seed=1) if with_test else None
    npz.write_npz(tmp_path / "out.npz", train, test)
    assert sorted(np.load(tmp_path / "out.npz").files) == sorted(
        ["x_train", "y_train"] + ["x_test", "y_test"] * with_test
    )
    read_train, read_test = npz.read_npz(tmp_path / "out.npz")
    np.testing.assert_array_equal(read_train.images, train.images)
    np.testing.assert_array_equal(read_train.labels, train.labels)
    assert (read_test is None) != with_test


def replaced(**changes) -> dict[str, np.ndarray]:
    arrays = keras_arrays()
    arrays.update(changes)
    return {k: v for k, v in arrays.items() if v is not None}


def poke(array: np.ndarray, index: tuple[int, ...], value: int) -> np.ndarray:
    array[index] = value
    return array


@pytest.mark.parametrize(
    ("arrays", "fragments"),
    [
        (replaced(y_train=None), ["missing array 'y_train'", "(it has: x_train, x_test, y_test)"]),
        (replaced(y_test=None), ["missing array 'y_test'"]),
        (
            replaced(x_train=np.zeros((6, 16), np.uint8)),
            [":x_train:", "shape (6, 16), expected (N, H, W)"],
        ),
        (replaced(y_train=np.zeros((6, 1), np.uint8)), [":y_train:", "expected (N,)"]),
        (replaced(x_train=np.zeros((0, 4, 4), np.uint8)), ["shape (0, 4, 4)"]),
        (replaced(x_test=np.zeros((3, 4, 4), np.float32)), ["'x_test' has dtype float32", "uint8"]),
        (replaced(y_train=np.zeros(6, bool)), ["'y_train' has dtype bool"]),
        (
            replaced(x_train=poke(np.zeros((6, 4, 4), np.int16), (2, 1, 3), 300)),
            [":x_train[2, 1, 3]: 'x_train' holds 300, outside 0..255"],
        ),
        (replaced(y_test=np.array([0, 1, -2])), [":y_test[2]: 'y_test' holds -2, outside 0..9"]),
        (
            replaced(y_train=np.arange(5, dtype=np.uint8)),
            [":y_train:", "5 labels in 'y_train' for 6"],
        ),
        (replaced(x_test=np.zeros((3, 5, 5), np.uint8)), None),
    ],
)
def test_validation_errors(tmp_path, arrays, fragments):
    path = save(tmp_path, **arrays)
    if fragments is None:  # parts disagree on image size: a loader-level check, not this reader's
        assert npz.read_npz(path)[1].images.shape == (3, 5, 5)
        return
    with pytest.raises(DataError) as info:
        npz.read_npz(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_pickled_arrays_are_refused(tmp_path):
    arrays = replaced(y_train=np.array([object()] * 6, dtype=object))
    path = tmp_path / "p.npz"
    np.savez(path, **arrays)
    with pytest.raises(
        DataError, match=r"y_train: array 'y_train' cannot be read .*allow_pickle=False"
    ):
        npz.read_npz(path)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"not an archive at all", r"x\.npz:byte 0: not an \.npz archive \(no zip signature\)"),
        (b"", "no zip signature"),
        (b"PK\x03\x04" + bytes(40), r"not a readable \.npz archive \(File is not a zip file\)"),
    ],
)
def test_not_an_archive(tmp_path, data, fragment):
    (tmp_path / "x.npz").write_bytes(data)
    with pytest.raises(DataError, match=fragment):
        npz.read_npz(tmp_path / "x.npz")


def test_single_npy_and_truncated_archive(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros(3))
    with pytest.raises(DataError, match=r"single \.npy array"):
        npz.read_npz(tmp_path / "a.npy")
    data = save(tmp_path, **keras_arrays(200)).read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.npz"):
        npz.read_npz(tmp_path / "cut.npz")


def test_real_mnist_round_trip(tmp_path, mnist_dir):
    real = idx.read_idx(
        mnist_dir / "t10k-images-idx3-ubyte.gz", mnist_dir / "t10k-labels-idx1-ubyte.gz"
    )
    npz.write_npz(tmp_path / "mnist.npz", real, real.subset(np.arange(100)))
    train, test = npz.read_npz(tmp_path / "mnist.npz")
    np.testing.assert_array_equal(train.images, real.images)
    np.testing.assert_array_equal(test.labels, real.labels[:100])
