"""The seeded, stratified split: deterministic, disjoint, covering, proportional."""

import gzip

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mnistlab.data.dataset import Dataset, Source, make_splits, split, split_indices
from mnistlab.errors import DataError


@pytest.fixture(scope="module")
def mnist_train_labels(mnist_dir) -> np.ndarray:
    path = mnist_dir / "train-labels-idx1-ubyte.gz"
    return np.frombuffer(gzip.decompress(path.read_bytes()), np.uint8, offset=8).astype(np.int64)


def _dataset(labels: np.ndarray) -> Dataset:
    # Each image encodes its row number, so rows can be told apart after a split.
    rows = np.arange(len(labels))
    images = np.zeros((len(labels), 2, 2), np.uint8)
    images[:, 0, 0], images[:, 0, 1] = rows // 256, rows % 256
    return Dataset(images, labels.astype(np.int64), origin="synthetic")


@given(
    labels=st.lists(st.integers(0, 9), min_size=1, max_size=300),
    fraction=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**32 - 1),
    stratified=st.booleans(),
)
@settings(max_examples=200, deadline=None)
def test_split_is_a_disjoint_cover(labels, fraction, seed, stratified):
    labels = np.array(labels)
    keep, held = split_indices(labels, fraction, seed, stratified)
    assert np.intersect1d(keep, held).size == 0
    assert np.array_equal(np.sort(np.concatenate([keep, held])), np.arange(len(labels)))
    again = split_indices(labels, fraction, seed, stratified)
    assert np.array_equal(again[0], keep) and np.array_equal(again[1], held)


def test_stratified_split_keeps_class_proportions_on_real_labels(mnist_train_labels):
    train, val = split(_dataset(mnist_train_labels), 0.2, seed=0)
    assert (len(train), len(val)) == (48_000, 12_000)
    whole = np.bincount(mnist_train_labels, minlength=10) / len(mnist_train_labels)
    held = np.bincount(val.labels, minlength=10) / len(val)
    assert np.abs(whole - held).max() < 1e-3
    assert -(-len(train) // 128) == 375  # the seed study's 375 iterations per epoch


def test_split_depends_on_the_seed_and_only_on_it():
    labels = np.repeat(np.arange(10), 50)
    a = split_indices(labels, 0.2, seed=1)[1]
    assert np.array_equal(a, split_indices(labels, 0.2, seed=1)[1])
    assert not np.array_equal(a, split_indices(labels, 0.2, seed=2)[1])


def test_split_rows_carry_their_images():
    data = _dataset(np.repeat(np.arange(10), 5))
    train, val = split(data, 0.2, seed=3)
    rows = {bytes(img.tobytes()) for img in np.concatenate([train.images, val.images])}
    assert rows == {bytes(img.tobytes()) for img in data.images}


def test_unlabelled_data_cannot_be_split():
    data = Dataset(np.zeros((4, 2, 2), np.uint8), None, origin="test.csv")
    with pytest.raises(DataError, match=r"test\.csv"):
        split(data)


def test_single_part_source_holds_out_a_test_set():
    data = _dataset(np.repeat(np.arange(10), 60))
    splits = make_splits(Source("t10k", data), 0.2, seed=0)
    assert len(splits.test) == 100 and len(splits.train) + len(splits.val) == 500
    assert "held out" in splits.note
    parts = [splits.train.images, splits.val.images, splits.test.images]
    seen = [bytes(i.tobytes()) for part in parts for i in part]
    assert len(seen) == len(set(seen)) == 600


def test_two_part_source_keeps_its_test_set():
    train, test = _dataset(np.repeat(np.arange(10), 10)), _dataset(np.arange(10))
    splits = make_splits(Source("two", train, test), 0.2)
    assert splits.test is test and splits.note == ""
