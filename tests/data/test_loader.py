"""load_path/load/overview: which files a folder's layout selects, name dispatch, the summary."""

from __future__ import annotations

import gzip
import shutil
import types

import numpy as np
import pytest

import mnistlab.data
from mnistlab.data import csv, idx, load, load_path, make_splits, npz, overview
from mnistlab.data.dataset import DIGITS
from mnistlab.data.idx import MNIST_LAYOUT
from mnistlab.errors import DataError, MnistlabError


def write_pair(directory, prefix: str, dataset, suffix: str = ".gz") -> None:
    idx.write_idx(
        directory / f"{prefix}-images-idx3-ubyte{suffix}",
        directory / f"{prefix}-labels-idx1-ubyte{suffix}",
        dataset,
    )


def test_idx_quartet(idx_dir):
    source = load_path(idx_dir)
    assert source.name == idx_dir.name
    assert (len(source.train), len(source.test)) == (30, 20)
    assert source.train.origin.endswith("train-images-idx3-ubyte.gz")
    assert source.train.classes == DIGITS


def test_only_t10k_pair_is_the_training_part(tmp_path, make_dataset):
    write_pair(tmp_path, "t10k", make_dataset(20))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"a lone file is ignored")
    source = load_path(tmp_path)
    assert len(source.train) == 20 and source.test is None


def test_only_train_pair_raw(tmp_path, make_dataset):
    write_pair(tmp_path, "train", make_dataset(12, side=7), suffix="")
    source = load_path(tmp_path)
    assert source.train.images.shape == (12, 7, 7) and source.test is None


def test_raw_files_win_over_gz_twins(idx_dir):
    for path in list(idx_dir.glob("*.gz")):
        shutil.copy(path, path.with_suffix(""))
        path.write_bytes(b"\x1f\x8b broken")  # would fail if read
    assert len(load_path(idx_dir).train) == 30


def test_lone_idx_file_names_the_missing_partner(tmp_path, make_dataset):
    idx.write(tmp_path / "train-images-idx3-ubyte.gz", make_dataset(3).images)
    with pytest.raises(DataError, match=r"without their partner \(train-images-idx3-ubyte\.gz\)"):
        load_path(tmp_path)
    with pytest.raises(DataError, match="pass the folder that holds both"):
        load_path(tmp_path / "train-images-idx3-ubyte.gz")


def test_count_mismatch(tmp_path, make_dataset):
    idx.write(tmp_path / "train-images-idx3-ubyte.gz", make_dataset(5).images)
    idx.write(tmp_path / "train-labels-idx1-ubyte.gz", make_dataset(6).labels)
    with pytest.raises(DataError, match="6 labels for 5 images"):
        load_path(tmp_path)


def test_kaggle_folder(tmp_path, make_dataset):
    csv.write_csv(tmp_path / "train.csv", make_dataset(10))
    csv.write_csv(tmp_path / "test.csv", make_dataset(4, labelled=False))
    (tmp_path / "sample_submission.csv").write_text("ImageId,Label\n1,0\n")
    source = load_path(tmp_path)
    assert source.train.labels is not None and source.test.labels is None
    assert len(source.test) == 4


def test_mnist_in_csv_folder(tmp_path, make_dataset):
    csv.write_csv(tmp_path / "mnist_train.csv", make_dataset(10), "plain")
    csv.write_csv(tmp_path / "mnist_test.csv", make_dataset(5), "mnist")
    source = load_path(tmp_path)
    assert (len(source.train), len(source.test)) == (10, 5)


@pytest.mark.parametrize("name", ["digits.csv", "digits.csv.gz", "keras.npz"])
def test_single_file_folder_and_file(tmp_path, make_dataset, name):
    dataset = make_dataset(6, side=4)
    path = tmp_path / name
    if name.endswith(".npz"):
        npz.write_npz(path, dataset, dataset)
    else:
        csv.write_csv(path.with_suffix(".tmp"), dataset)
        data = path.with_suffix(".tmp").read_bytes()
        path.with_suffix(".tmp").unlink()
        path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    for source in (load_path(tmp_path), load_path(path)):
        np.testing.assert_array_equal(source.train.images, dataset.images)
    assert source.name == name


def test_content_not_extension_picks_the_reader(tmp_path, make_dataset):
    npz.write_npz(tmp_path / "data.bin", make_dataset(4))
    assert len(load_path(tmp_path / "data.bin").train) == 4


@pytest.mark.parametrize(
    ("names", "fragment"),
    [
        ([], "no MNIST-format data found"),
        (["a.csv", "b.npz"], r"several candidate files \(a\.csv, b\.npz\); pass one file"),
    ],
)
def test_folder_without_one_source(tmp_path, names, fragment):
    for name in names:
        (tmp_path / name).write_text("x")
    with pytest.raises(DataError, match=fragment):
        load_path(tmp_path)


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        load_path(tmp_path / "nope")


def test_train_and_test_image_sizes_must_agree(tmp_path, make_dataset):
    write_pair(tmp_path, "train", make_dataset(4, side=28))
    write_pair(tmp_path, "t10k", make_dataset(4, side=27))
    with pytest.raises(
        DataError, match=r"t10k-images.*images are 27x27 but the training images are 28x28"
    ):
        load_path(tmp_path)


@pytest.fixture
def fake_sources(monkeypatch, idx_dir):
    """A stand-in for mnistlab.data.sources: one registered name that locates `idx_dir`."""
    calls = []

    def locate(name, *, download=True, progress=True):
        calls.append((name, download, progress))
        return idx_dir

    info = types.SimpleNamespace(name="fashion-mnist", classes=tuple(f"c{i}" for i in range(10)),
                                 layout=MNIST_LAYOUT)
    fake = types.SimpleNamespace(REGISTRY={"fashion-mnist": info}, locate=locate, calls=calls)
    monkeypatch.setattr(mnistlab.data, "sources", fake, raising=False)
    return fake


def test_load_a_registered_name(fake_sources):
    source = load("fashion-mnist", download=False, progress=False)
    assert fake_sources.calls == [("fashion-mnist", False, False)]
    assert source.name == "fashion-mnist" and source.train.classes[0] == "c0"
    assert source.test.classes == source.train.classes


def test_load_a_path(fake_sources, idx_dir):
    assert len(load(idx_dir).train) == 30 and len(load(str(idx_dir)).train) == 30
    assert fake_sources.calls == []


def test_load_unknown_name(fake_sources):
    with pytest.raises(MnistlabError) as info:
        load("mnits")
    assert str(info.value) == (
        "mnits: neither a known dataset (fashion-mnist) nor an existing file or folder; "
        "pass a dataset name or a path that exists"
    )


def test_overview(tmp_path, make_dataset):
    csv.write_csv(tmp_path / "train.csv", make_dataset(20, side=4))
    csv.write_csv(tmp_path / "test.csv", make_dataset(3, side=4, labelled=False))
    text = overview(load_path(tmp_path))
    assert text.splitlines()[:8] == [
        f"source: {tmp_path.name}",
        f"train: {tmp_path / 'train.csv'}",
        "  rows: 20",
        "  image shape: 4x4",
        "  pixel min/max: 0/255",
        "  labels: yes, 10 classes",
        "  class counts: 0: 2, 1: 2, 2: 2, 3: 2, 4: 2, 5: 2, 6: 2, 7: 2, 8: 2, 9: 2",
        "  nulls found: 0",
    ]
    assert "  labels: none (unlabelled)" in text and text.count("nulls found: 0") == 2


def test_real_mnist_folder(mnist_dir):
    source = load_path(mnist_dir, name="mnist", classes=tuple("0123456789"))
    assert (len(source.train), len(source.test)) == (60000, 10000)
    assert source.test.class_counts()["5"] == 892 and source.train.class_counts()["1"] == 6742


def test_real_mnist_test_set_alone_holds_out_a_test_part(mnist_dir, tmp_path):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
                 "train-labels-idx1-ubyte.gz"):
        (tmp_path / name).symlink_to(mnist_dir / name)
    source = load_path(tmp_path)  # t10k pair plus a lone train-labels file
    assert len(source.train) == 10000 and source.test is None
    assert "  rows: 10000" in overview(source) and "test: none" in overview(source)
    splits = make_splits(source)
    assert len(splits.test) + len(splits.train) + len(splits.val) == 10000 and splits.note


def test_real_fashion_mnist_folder(fashion_dir):
    source = load_path(fashion_dir, name="fashion-mnist", classes=tuple("abcdefghij"))
    assert (len(source.train), len(source.test)) == (60000, 10000)
    assert source.train.class_counts() == dict.fromkeys("abcdefghij", 6000)


def test_cli_data_check(idx_dir, tmp_path):
    from typer.testing import CliRunner

    from mnistlab.cli import app

    result = CliRunner().invoke(app, ["data", "check", str(idx_dir)])
    assert result.exit_code == 0 and "  rows: 30" in result.stdout and "  rows: 20" in result.stdout
    thirteen = tmp_path / "thirteen.csv"  # nothing names its classes: labels 0..12 are 13
    thirteen.write_text("label,pixel0\n3,0\n12,0\n")
    result = CliRunner().invoke(app, ["data", "check", str(thirteen)])
    assert result.exit_code == 0 and "  labels: yes, 13 classes" in result.stdout
    bad = tmp_path / "bad.csv"
    bad.write_text("label,pixel0\n3,0\n300,0\n")
    result = CliRunner().invoke(app, ["data", "check", str(bad)])
    assert result.exit_code == 2
    assert (
        result.stderr
        == f"error: {bad}:line 3, column 1: label 300 is outside 0..255; use class indices 0..255\n"
    )
